"""Largest relative error of manualbp against float64 native autograd, per backend and dtype.

    python -m experiments.parity_report                      # reference backend
    TRITON_INTERPRET=1 python -m experiments.parity_report --backend triton   # kernels, on the CPU

For every activation, a few odd shapes and bias on/off, runs `manualbp.functional.linear` forward
and backward in each dtype and reports max over cases of ‖ours − ref‖/‖ref‖ for the output and
each gradient, where ref is native autograd in float64 on the same (dtype-representable) values.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import manualbp as mbp
from manualbp.functional import linear

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
SHAPES = [(1, 5, 3), (17, 64, 33), (130, 200, 129)]


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach(), ref.detach().double()
    return float((ours.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def worst_errors(backend: str, dtype: torch.dtype) -> dict[str, float]:
    worst = {"out": 0.0, "grad_input": 0.0, "grad_weight": 0.0, "grad_bias": 0.0}
    gen = torch.Generator().manual_seed(0)
    for name in mbp.ACTIVATIONS:
        act = mbp.get_activation(name)
        for m, k, n in SHAPES:
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            g = torch.randn(m, n, generator=gen).to(dtype)
            ours = [t.clone().requires_grad_(True) for t in (x, w, b)]
            ref = [t.double().requires_grad_(True) for t in (x, w, b)]
            with mbp.use_backend(backend):
                out = linear(*ours, name)
            out.backward(g)
            ref_out = act.native()(F.linear(*ref))
            ref_out.backward(g.double())
            worst["out"] = max(worst["out"], _rel(out, ref_out))
            for key, a, r in zip(("grad_input", "grad_weight", "grad_bias"), ours, ref):
                worst[key] = max(worst[key], _rel(a.grad, r.grad))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "triton"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    print("| backend | dtype | out | grad_input | grad_weight | grad_bias |\n|---|---|---|---|---|---|")
    for key in args.dtypes:
        if args.backend == "triton" and key == "float64":
            continue  # the kernels take 32- and 16-bit storage
        w = worst_errors(args.backend, DTYPES[key])
        print(f"| {args.backend} | {key} | " + " | ".join(f"{w[c]:.2e}" for c in w) + " |")


if __name__ == "__main__":
    main()
