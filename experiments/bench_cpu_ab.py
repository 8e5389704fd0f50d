"""MLP train step on CPU: manualbp against native PyTorch, timed as interleaved A/B pairs.

On a shared machine wall-clock timings drift with the neighbours' load, so every cell is timed
in one process, as alternating blocks (native, manualbp, native, ... in alternating order) of
the same number of steps, with the process's CPU time (`time.process_time`; wall time with
more than one thread), and the medians are compared: speed = native median ÷ manualbp median
(> 1 is faster). A step is what `python -m manualbp.bench --suites mlp` times: zero_grad,
forward, MSE loss, backward, SGD step; both models hold the same parameter values. `--modes`
adds manualbp's per-layer mode; `--layer-shapes` times `LinearAct` fwd+bwd instead.

Not a test: run it by hand, e.g.

    python experiments/bench_cpu_ab.py --batches 32 64 --widths 64 128 --depths 2 4 \\
        --activations relu gelu --out experiments/results/bench_cpu_ab.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import manualbp as mbp


def _native(sizes: list[int], activation: str, dtype: torch.dtype) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(nn.Linear(n_in, n_out, dtype=dtype))
        if i < len(sizes) - 2:
            mods.append(mbp.get_activation(activation).native())
    return nn.Sequential(*mods)


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()

    return step


# The process's CPU time with one thread; with more, wall time: CPU time would count the
# intra-op pool's spin-waiting as work.
_clock = time.process_time


def _block(fn: Callable[[], None], n: int) -> float:
    start = _clock()
    for _ in range(n):
        fn()
    return (_clock() - start) / n


def cell(batch: int, width: int, depth: int, activation: str, dtype: torch.dtype, modes: list[str],
         rounds: int, block_s: float) -> dict[str, float]:  # fmt: skip
    """Median seconds per step of native and of each manualbp mode."""
    sizes = [width] * (depth + 1)
    torch.manual_seed(0)
    native = _native(sizes, activation, dtype)
    models: dict[str, nn.Module] = {"native": native}
    for mode in modes:
        model = mbp.MLP(sizes, activation, dtype=dtype, mode=mode)
        with torch.no_grad():
            for layer, lin in zip(model.layers, list(native)[::2], strict=True):
                layer.weight.copy_(lin.weight)
                layer.bias.copy_(lin.bias)
        models[mode] = model
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen).to(dtype)
    target = torch.randn(batch, width, generator=gen).to(dtype)
    steps = {name: _step(model, x, target) for name, model in models.items()}
    for fn in steps.values():  # warm up, then size the blocks
        fn()
    n = max(2, math.ceil(block_s / max(_block(steps["native"], 2), 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_block(steps[name], n))
    return {name: statistics.median(t) for name, t in times.items()}


def layer_cell(shape: str, activation: str, dtype: torch.dtype, rounds: int, block_s: float
               ) -> tuple[float, float]:  # fmt: skip
    """Median seconds of `LinearAct` fwd+bwd (x requires grad) and of nn.Linear + activation."""
    m, n, k = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    ours = mbp.LinearAct(k, n, activation, dtype=dtype)
    lin = nn.Linear(k, n, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(ours.weight)
        lin.bias.copy_(ours.bias)
    native = nn.Sequential(lin, mbp.get_activation(activation).native())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(m, n, generator=gen).to(dtype)
    steps = {"native": lambda: native(x).backward(grad), "ours": lambda: ours(x).backward(grad)}
    for fn in steps.values():
        fn()
    count = max(2, math.ceil(block_s / max(_block(steps["native"], 2), 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in ("native", "ours") if r % 2 == 0 else ("ours", "native"):
            times[name].append(_block(steps[name], count))
    return statistics.median(times["native"]), statistics.median(times["ours"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 256, 1024])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    p.add_argument("--activations", nargs="+", default=["relu", "gelu"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=["network"], choices=mbp.MLP.MODES)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-ms", type=float, default=40.0, help="CPU time per timed block")
    p.add_argument("--out", type=Path, help="markdown file the table is appended to")
    p.add_argument("--layer-shapes", nargs="+", default=[], help="MxNxK: time LinearAct fwd+bwd")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.threads == 1 else time.perf_counter
    dtype = getattr(torch, args.dtype)
    if args.layer_shapes:
        _layers(args, dtype)
        return
    head = "| batch | width | depth | act | dtype | threads | native ms |"
    head += "".join(f" {m} ms | {m} × native |" for m in args.modes)
    lines = [head, "|" + " --- |" * (6 + 1 + 2 * len(args.modes))]
    speeds: dict[str, list[float]] = {m: [] for m in args.modes}
    print(head, flush=True)
    for depth in args.depths:
        for activation in args.activations:
            for batch in args.batches:
                for width in args.widths:
                    t = cell(batch, width, depth, activation, dtype, args.modes, args.rounds,
                             args.block_ms / 1e3)  # fmt: skip
                    row = f"| {batch} | {width} | {depth} | {activation} | {args.dtype} | {args.threads} "
                    row += f"| {t['native'] * 1e3:.3f} |"
                    for m in args.modes:
                        speeds[m].append(t["native"] / t[m])
                        row += f" {t[m] * 1e3:.3f} | {t['native'] / t[m]:.3f} |"
                    lines.append(row)
                    print(row, flush=True)
    summary = []
    for m, s in speeds.items():
        geo = math.exp(sum(math.log(v) for v in s) / len(s))
        below = sum(v < 1.0 for v in s)
        summary.append(f"- {m}: geometric mean {geo:.3f}× native, min {min(s):.3f}×, "
                       f"max {max(s):.3f}×, {below} of {len(s)} cells below 1.0×")  # fmt: skip
    print("\n".join(summary))
    if args.out is not None:
        command = "python experiments/bench_cpu_ab.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = [f"\n### {args.dtype}, {args.threads} thread(s)\n", f"- command: `{command}`",
                f"- date: {when}; torch {torch.__version__}", *summary, "", *lines, ""]  # fmt: skip
        with args.out.open("a") as f:
            f.write("\n".join(text))


def _layers(args: argparse.Namespace, dtype: torch.dtype) -> None:
    lines = ["| shape MxNxK | act | dtype | threads | native ms | LinearAct ms | × native |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for shape in args.layer_shapes:
        for activation in args.activations:
            t_native, t_ours = layer_cell(shape, activation, dtype, args.rounds, args.block_ms / 1e3)
            lines.append(f"| {shape} | {activation} | {args.dtype} | {args.threads} | "
                         f"{t_native * 1e3:.4f} | {t_ours * 1e3:.4f} | {t_native / t_ours:.3f} |")
            print(lines[-1], flush=True)
    if args.out is not None:
        command = "python experiments/bench_cpu_ab.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = ["\n### LinearAct fwd+bwd\n", f"- command: `{command}`", f"- date: {when}", "", *lines, ""]
        with args.out.open("a") as f:
            f.write("\n".join(text))


if __name__ == "__main__":
    main()
