"""Benchmark the fused Triton layer against eager PyTorch and cuBLAS on one CUDA GPU.

    python experiments/bench_triton_layer.py --out experiments/runs/bench_triton_layer

Cases (bfloat16, medians of `triton.testing.do_bench`):

* layer forward + backward, gelu, (M, N, K) = (8192, 1024, 1024) and (8192, 4096, 4096):
  manualbp's Triton backend through the functional API vs nn.Linear + nn.GELU in eager autograd;
* forward GEMM alone (identity, no bias) at 4096³ and 8192³ vs F.linear (cuBLAS);
* weight gradient δᵀx at M = 65536, N = K = 1024: the split-over-M kernel (auto split), the same
  kernel without split, and torch.mm (cuBLAS).

Prints a Markdown table (ms, ratio to the baseline measured in the same run, roofline floor =
max(FLOPs / peak, bytes / bandwidth)) and writes it as CSV to the output folder. Exits with a
message when there is no CUDA device. Runs in well under a minute on an H100/H200 after the
first autotuning of each shape; the first run also JIT-compiles ~25 kernel configurations
(~1 minute in all; `--no-autotune` compiles ~8).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))


def _floor_ms(flops: float, nbytes: float, peak_tflops: float, bw_tbs: float) -> float:
    return max(flops / (peak_tflops * 1e12), nbytes / (bw_tbs * 1e12)) * 1e3


DT = torch.bfloat16
ES = 2  # bytes per bf16 element


def _layer(add, dev: torch.device, M: int, N: int, K: int) -> None:
    """Forward + backward of Linear + GELU: ours through the functional API vs eager autograd."""
    import manualbp as mbp
    from manualbp.functional import linear

    x = torch.randn(M, K, device=dev, dtype=DT, requires_grad=True)
    eager = torch.nn.Sequential(torch.nn.Linear(K, N, device=dev, dtype=DT), torch.nn.GELU())
    w = eager[0].weight.detach().clone().requires_grad_()
    b = eager[0].bias.detach().clone().requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=DT)

    def run_eager() -> None:
        eager(x).backward(g)

    def run_ours() -> None:
        with mbp.use_backend("triton"):
            linear(x, w, b, "gelu").backward(g)

    flops = 3 * 2 * M * N * K
    nbytes = ES * (3 * M * K + 3 * N * K + 4 * M * N)
    base = _bench(run_eager)
    case = f"layer fwd+bwd gelu {M}x{N}x{K}"
    add(case, "eager nn.Linear+GELU", base, base, flops, nbytes)
    add(case, "manualbp triton", _bench(run_ours), base, flops, nbytes)


def _forward_gemm(add, dev: torch.device, S: int) -> None:
    """z = x Wᵀ alone (identity, no bias) vs cuBLAS."""
    from manualbp.triton_kernels.linear_forward import linear_forward

    x = torch.randn(S, S, device=dev, dtype=DT)
    w = torch.randn(S, S, device=dev, dtype=DT)
    flops, nbytes = 2 * S**3, ES * 3 * S * S
    base = _bench(lambda: torch.nn.functional.linear(x, w))
    case = f"forward GEMM {S}^3"
    add(case, "cuBLAS F.linear", base, base, flops, nbytes)
    add(case, "triton linear_forward", _bench(lambda: linear_forward(x, w, None, 0)), base, flops, nbytes)


def _grad_weight(add, dev: torch.device, M: int, N: int, K: int) -> None:
    """δᵀ x with the split over M (auto), without it, and cuBLAS."""
    from manualbp.triton_kernels.linear_grad_weight import choose_split, linear_grad_weight

    g = torch.randn(M, N, device=dev, dtype=DT)
    x = torch.randn(M, K, device=dev, dtype=DT)
    flops, nbytes = 2 * M * N * K, ES * (M * N + M * K + N * K)
    base = _bench(lambda: torch.mm(g.t(), x))
    case = f"grad_weight {M}x{N}x{K}"
    add(case, "cuBLAS torch.mm", base, base, flops, nbytes)
    for split in (None, 1):
        label = f"triton split={choose_split(M, N, K, dev) if split is None else split}"
        ms = _bench(lambda s=split: linear_grad_weight(g, x, need_bias=False, split_k=s))
        add(case, label, ms, base, flops, nbytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/runs/bench_triton_layer"))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="HBM bandwidth (H200: 4.8)")
    parser.add_argument(
        "--no-autotune", action="store_true",
        help="launch each kernel with its first config (MANUALBP_TRITON_AUTOTUNE=0): ~4× fewer "
        "compiles, for a quick run under a tight time limit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_layer: no CUDA device; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["MANUALBP_TRITON_AUTOTUNE"] = "0"

    dev = torch.device("cuda")
    rows: list[dict] = []

    def add(case: str, contender: str, ms: float, base_ms: float, flops: float, nbytes: float) -> None:
        rows.append({
            "case": case, "contender": contender, "ms": round(ms, 4),
            "ratio_vs_baseline": round(ms / base_ms, 3),
            "tflops": round(flops / (ms * 1e-3) / 1e12, 1),
            "floor_ms": round(_floor_ms(flops, nbytes, args.peak_tflops, args.bandwidth_tbs), 4),
        })  # fmt: skip

    for M, N, K in ((8192, 1024, 1024), (8192, 4096, 4096)):
        _layer(add, dev, M, N, K)
    for S in (4096, 8192):
        _forward_gemm(add, dev, S)
    _grad_weight(add, dev, 65536, 1024, 1024)

    header = list(rows[0])
    print(f"# {torch.cuda.get_device_name(dev)}, bf16; ratio = ms / baseline ms (lower is better)\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(str(r[h]) for h in header) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_triton_layer.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
