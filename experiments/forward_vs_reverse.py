"""Right to left (backpropagation) against left to right (forward accumulation), for the full gradient.

The seed: "Multiplying starting from ∇_a C — propagating the error backwards — means that each step
simply multiplies a vector (δˡ) by the matrices of weights (Wˡ)ᵀ and derivatives of activations.
By contrast, multiplying forwards, starting from the changes at an earlier layer, means that each
multiplication multiplies a matrix by a matrix." This script measures that, on a tanh MLP
[8, h, h, 4] with half-MSE loss, float64, for h growing so that the number of weights P goes
from ~10² to ~10⁴:

* ``reverse``      — one backward sweep (`torch.autograd.grad`): cost ≈ a few forward passes, flat
  in P per weight;
* ``forward_chain`` — the seed's forward product by hand: carry ∂aˡ/∂θ (an nˡ × P matrix per
  example) from the input to the loss, each step a matrix–matrix product — cost ≈ P forward passes;
* ``forward_jvp``  — one forward-mode JVP per parameter (`torch.func.jvp` with each basis vector);
* ``jacfwd``       — the same P JVPs vectorised by `torch.func.jacfwd` (vmap): fewer Python calls,
  the same P-fold arithmetic.

All four gradients are checked against each other (relative error ≤ 1e-10). Writes
``forward_vs_reverse.csv`` and ``forward_vs_reverse.png`` (log-log cost against P) into --out.

    python experiments/forward_vs_reverse.py --threads 1
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

METHODS = ("reverse", "forward_chain", "forward_jvp", "jacfwd")
DEFAULT_HIDDEN = (6, 9, 14, 20, 30, 45, 66, 96)


# ------------------------------------------------------------------------------- the network


def parameter_count(sizes: Sequence[int]) -> int:
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))


def unflatten(theta: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """θ holds each layer's W (n_out × n_in, row-major) then its b, layer after layer."""
    params, offset = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        weight = theta[offset : offset + n_out * n_in].view(n_out, n_in)
        offset += n_out * n_in
        bias = theta[offset : offset + n_out]
        offset += n_out
        params.append((weight, bias))
    return params


def loss(theta: Tensor, sizes: Sequence[int], x: Tensor, y: Tensor) -> Tensor:
    """The seed's E = 1/(2n) Σ ‖a^L − y‖², tanh on the hidden layers, identity on the last."""
    a = x
    layers = unflatten(theta, sizes)
    for i, (weight, bias) in enumerate(layers):
        z = a @ weight.t() + bias
        a = torch.tanh(z) if i < len(layers) - 1 else z
    return 0.5 * ((a - y) ** 2).sum() / x.shape[0]


def problem(sizes: Sequence[int], batch: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """θ (nn.Linear-like initialisation), inputs x and targets y, float64."""
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = n_in**-0.5
        chunks.append((torch.rand(n_out * n_in + n_out, generator=gen, dtype=torch.float64) * 2 - 1) * bound)
    x = torch.randn(batch, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randn(batch, sizes[-1], generator=gen, dtype=torch.float64)
    return torch.cat(chunks), x, y


# ------------------------------------------------------------------------------ the methods


def grad_reverse(theta: Tensor, sizes: Sequence[int], x: Tensor, y: Tensor) -> Tensor:
    """Backpropagation: one forward pass, then one sweep from the loss back to the input."""
    theta = theta.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss(theta, sizes, x, y), theta)
    return grad


def grad_forward_chain(theta: Tensor, sizes: Sequence[int], x: Tensor, y: Tensor) -> Tensor:
    """Forward accumulation by hand: T = ∂a/∂θ (batch × n × P) carried from the input upwards.

    zˡ = aˡ⁻¹ Wˡᵀ + bˡ gives ∂zˡ/∂θ = Wˡ · Tˡ⁻¹ (a matrix–matrix product: every path from every
    parameter below) plus the direct terms ∂zˡⱼ/∂Wˡⱼₖ = aˡ⁻¹ₖ and ∂zˡⱼ/∂bˡⱼ = 1; then
    Tˡ = f′(zˡ) ⊙ ∂zˡ/∂θ. At the top, ∇C = (1/n) Σ_examples (aᴸ − y)ᵀ Tᴸ.
    """
    P, batch = theta.numel(), x.shape[0]
    layers = unflatten(theta.detach(), sizes)
    a = x
    tangent = x.new_zeros(batch, sizes[0], P)  # the input does not depend on θ
    offset = 0
    for i, (weight, bias) in enumerate(layers):
        n_out, n_in = weight.shape
        z = a @ weight.t() + bias
        dz = weight @ tangent  # (n_out × n_in) @ (n_in × P) per example: matrix × matrix
        rows = torch.arange(n_out)
        w_block = dz[:, :, offset : offset + n_out * n_in].unflatten(-1, (n_out, n_in))
        w_block[:, rows, rows, :] += a[:, None, :]  # ∂zⱼ/∂Wⱼₖ = aₖ
        offset += n_out * n_in
        dz[:, rows, offset + rows] += 1.0  # ∂zⱼ/∂bⱼ = 1
        offset += n_out
        if i < len(layers) - 1:
            a = torch.tanh(z)
            tangent = (1 - a * a)[:, :, None] * dz  # tanh′ = 1 − a²
        else:
            a, tangent = z, dz
    return torch.einsum("bj,bjp->p", a - y, tangent) / batch


def grad_forward_jvp(theta: Tensor, sizes: Sequence[int], x: Tensor, y: Tensor) -> Tensor:
    """Forward mode, one JVP per parameter: component i is dC/dθ along the basis vector eᵢ."""
    theta = theta.detach()
    f = lambda t: loss(t, sizes, x, y)
    grad = torch.empty_like(theta)
    basis = torch.zeros_like(theta)
    for i in range(theta.numel()):
        basis[i] = 1.0
        _, grad[i] = torch.func.jvp(f, (theta,), (basis,))
        basis[i] = 0.0
    return grad


def grad_jacfwd(theta: Tensor, sizes: Sequence[int], x: Tensor, y: Tensor) -> Tensor:
    """The same P JVPs, vectorised over the basis by vmap."""
    return torch.func.jacfwd(lambda t: loss(t, sizes, x, y))(theta.detach())


GRADIENTS: dict[str, Callable[[Tensor, Sequence[int], Tensor, Tensor], Tensor]] = {
    "reverse": grad_reverse,
    "forward_chain": grad_forward_chain,
    "forward_jvp": grad_forward_jvp,
    "jacfwd": grad_jacfwd,
}


def rel_error(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------- measure


def seconds(fn: Callable[[], object], min_total: float = 0.2, max_runs: int = 10) -> float:
    """Best of several runs (at least one, more while the total stays under `min_total`)."""
    times: list[float] = []
    while not times or (sum(times) < min_total and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(
    hidden: Sequence[int],
    batch: int,
    methods: Sequence[str],
    seed: int = 0,
    jvp_max_params: int = 1000,
    min_time: float = 0.2,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for h in hidden:
        sizes = [8, h, h, 4]
        theta, x, y = problem(sizes, batch, seed)
        reference = grad_reverse(theta, sizes, x, y)
        cost: dict[str, float] = {}
        for method in methods:
            if method == "forward_jvp" and theta.numel() > jvp_max_params:
                continue  # one Python-level JVP call per weight: minutes at P = 10⁴
            fn = GRADIENTS[method]
            err = rel_error(fn(theta, sizes, x, y), reference)
            if err > 1e-10:
                raise RuntimeError(f"{method}: gradient differs from backpropagation, rel. error {err:.3g}")
            cost[method] = seconds(lambda fn=fn, args=(theta, sizes, x, y): fn(*args), min_time)
            rows.append(
                {
                    "date": date,
                    "hidden": h,
                    "sizes": "-".join(map(str, sizes)),
                    "parameters": theta.numel(),
                    "batch": batch,
                    "method": method,
                    "seconds": cost[method],
                    "ratio_vs_reverse": cost[method] / cost["reverse"] if "reverse" in cost else "",
                    "max_rel_err_vs_reverse": err,
                }
            )
            print(
                f"P={theta.numel():6d} {method:14s} {cost[method] * 1e3:10.3f} ms  rel.err {err:.1e}",
                flush=True,
            )
    return rows


def plot(rows: list[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for method in METHODS:
        points = [(r["parameters"], r["seconds"]) for r in rows if r["method"] == method]
        if points:
            ax.loglog(*zip(*points), marker="o", label=method)
    ax.set_xlabel("number of weights P")
    ax.set_ylabel("seconds per full gradient")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", nargs="+", type=int, default=list(DEFAULT_HIDDEN))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--jvp-max-params", type=int, default=1000,
                        help="run the per-parameter JVP loop only up to this many weights")  # fmt: skip
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="repeat while the total stays under this many s; keep the best")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(arguments)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, arguments)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, arguments: list[str]) -> int:
    methods = ["reverse", *(m for m in args.methods if m != "reverse")]  # reverse first: the ratio
    rows = run(args.hidden, args.batch, methods, jvp_max_params=args.jvp_max_params, min_time=args.min_time)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "forward_vs_reverse.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python experiments/forward_vs_reverse.py " + shlex.join(arguments)
    plot(
        rows,
        args.out / "forward_vs_reverse.png",
        f"{command}\n{rows[0]['date']}, torch {torch.__version__}, float64",
    )
    print(f"wrote {args.out / 'forward_vs_reverse.csv'} and {args.out / 'forward_vs_reverse.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
