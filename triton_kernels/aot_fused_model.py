"""Modelled training-step time of a fused MLP (`fused_mlp.py`) against per-layer eager PyTorch.

    python -m manualbp.triton_kernels.aot_fused_model > experiments/results/fused_mlp_model.md

The machine and its rates are `aot_inspect`'s (H100/H200 SXM, sm_90: 790 TFLOP/s 16-bit dense,
4.8 TB/s HBM, 132 SMs; cuBLAS-class GEMMs at η = 0.905, a cp.async wgmma loop at 0.85). On top:

* every launch costs at least LAUNCH_S = 5 µs of host time (a PyTorch eager op with autograd
  bookkeeping, or a Triton launch from Python): a kernel takes max(5 µs, its GPU time), so short
  kernels are launch-bound and long ones hide the next launch;
* a kernel's GPU time is max(FLOPs / (peak · η), HBM bytes / 4.8 TB/s, L2 bytes / 10 TB/s):
  compulsory bytes only (each tensor read or written once per kernel that touches it);
* the step is forward + backward of the stack in bf16, input needing no gradient, biases on,
  an output-derived hidden activation (tanh: f and f′ cost nothing beside the memory traffic;
  gelu-class ones add elementwise ALU work to both sides alike) and an identity last layer;
  the loss and the optimizer are left out (the same for both);
* per-layer eager: per layer the forward GEMM (addmm), the activation, and in backward the
  activation's backward, the input-gradient GEMM (not for the first layer), the weight-gradient
  GEMM and the bias sum — 6 launches a layer, each reading and writing its tensors in HBM;
* fused: 4 launches — the forward sweep (reads x, writes each layer's kept tensor once), the δ
  sweep (reads ∂C/∂a and the kept tensors, writes every δ once and the bias partials), the
  weight-gradient loop (reads δ and the layer inputs, writes one fp32 partial per program and
  layer: min(132, M / 256) programs) and one fixed-order reduction of all partials. The
  weights are re-read per row tile from L2 (BLOCK_M rows: 128 at width ≤ 64, 64 at 128). The
  sweeps run their per-tile chain of dependent dots at η = 0.5 of peak (one wgmma wait a
  layer), the weight-gradient loop at 0.85;
* fused, where `fused_mlp_acc.fits` takes the stack on sm_90 (here widths 32 and 64: groups of
  2 layers for tanh, `fused_mlp_acc.group_bounds`): 3 launches — the forward, the accumulating
  sweep and the reduction. The sweep's programs (`group_programs`: in proportion to each
  group's dots, at most 132 in all, so that the groups finish together) run group g's dots per tile:
  its own layers' δᵀh and one δW for every layer from the top down to its lowest — Σ_g of them
  at η = 0.5 over the whole machine. HBM: ∂C/∂a, the L − 1 kept tensors and x once, plus the
  fp32 partials (programs × its group's W² + W): the groups of one row range read its tiles
  at about the same time (tiles taken in turn, every group at the same pace), so a tile's
  reads after the first are L2 hits, counted as L2 bytes with the weights (read once per
  program: resident in shared memory, fused_mlp_acc.py). The reduction reads the partials
  and writes the gradients.
±10 % on the rates, and nothing here was measured: no GPU was at hand.
"""

from __future__ import annotations

import argparse

import torch

from .aot_inspect import BANDWIDTH, BASE, CUBLAS_EFFICIENCY, PEAK_FLOPS, SMS

LAUNCH_S = 5e-6
L2_BANDWIDTH = 10e12
ETA_SWEEP = 0.5
ESIZE = 2  # bf16
CAPABILITY = (9, 0)  # the modelled machine: its groups (`fused_mlp_acc.group_limits`)
WIDTHS, DEPTHS, ROWS = (32, 64, 128), (2, 4, 8), (2**12, 2**16, 2**18)


def _kernel(flops: float, eta: float, hbm: float, l2: float = 0.0) -> float:
    gpu = max(flops / (PEAK_FLOPS * eta) if flops else 0.0, hbm / BANDWIDTH, l2 / L2_BANDWIDTH)
    return max(LAUNCH_S, gpu)


def eager_step(width: int, depth: int, rows: int) -> float:
    """Seconds of one per-layer eager training step (module docstring)."""
    M, W, e = rows, width, ESIZE
    total = 0.0
    for layer in range(depth):
        last, first = layer == depth - 1, layer == 0
        gemm_flops = 2 * M * W * W
        total += _kernel(gemm_flops, CUBLAS_EFFICIENCY, (2 * M * W + W * W) * e)  # z = x Wᵀ + b
        if not last:
            total += _kernel(0, 1, 2 * M * W * e)  # a = f(z)
            total += _kernel(0, 1, 3 * M * W * e)  # δ = g ⊙ f′
        if not first:
            total += _kernel(gemm_flops, CUBLAS_EFFICIENCY, (2 * M * W + W * W) * e)  # δ W
        total += _kernel(gemm_flops, CUBLAS_EFFICIENCY, (2 * M * W + W * W) * e)  # δᵀ a
        total += _kernel(0, 1, M * W * e)  # Σ δ
    return total


def fused_step(width: int, depth: int, rows: int) -> float:
    """Seconds of one fused training step (module docstring)."""
    return sum(fused_kernels(width, depth, rows).values())


def _plan(width: int, depth: int):
    from . import fused_mlp

    acts = [4] * (depth - 1) + [0]  # tanh hidden layers, identity output
    return fused_mlp.Plan([width] * (depth + 1), acts, [0.0] * depth, [True] * depth)


def accumulates(width: int, depth: int) -> bool:
    """Whether the step's backward is the accumulating sweep (`fused_mlp_acc.fits` on sm_90,
    for the modelled stack)."""
    from . import fused_mlp_acc

    return fused_mlp_acc.fits(_plan(width, depth), CAPABILITY)


def accumulating_sweep(width: int, depth: int, rows: int) -> tuple[float, float]:
    """(sweep, reduction) seconds of the accumulating backward (module docstring)."""
    from . import fused_mlp_acc

    M, W, L, e = rows, width, depth, ESIZE
    bounds = fused_mlp_acc.group_bounds(_plan(width, depth), CAPABILITY)
    tiles = -(-M // 64)
    programs = fused_mlp_acc.group_programs(bounds, L, tiles, SMS)
    groups = list(zip(bounds, bounds[1:]))
    dots = sum((hi - lo) + (L - 1 - lo) for lo, hi in groups)  # δᵀh of its layers, δW down to them
    tensor = M * W * e
    # each group reads ∂C/∂a and the kept tensors down to its lowest layer (x for the first)
    reads = sum(1 + (L - max(lo, 1)) + (lo == 0) for lo, _ in groups)
    partials = sum(p * (hi - lo) * (W * W + W) * 4 for p, (lo, hi) in zip(programs, groups))
    weights = sum(n * (L - lo) * W * W * e for n, (lo, _) in zip(programs, groups))  # resident
    sweep = _kernel(dots * 2 * M * W * W, ETA_SWEEP, (L + 1) * tensor + partials, reads * tensor + weights)
    reduce = _kernel(0, 1, partials + L * (W * W + W) * e)
    return sweep, reduce


def fused_kernels(width: int, depth: int, rows: int, accumulate: bool | None = None) -> dict[str, float]:
    """Seconds of each launch of a fused training step (`accumulate`: force the backward path;
    None: the one a launch takes)."""
    M, W, L, e = rows, width, depth, ESIZE
    tiles_fw, tiles_bw = -(-M // (128 if width <= 64 else 64)), -(-M // 64)
    weight_bytes = L * W * W * e
    flops_layer = 2 * M * W * W
    # forward: x in, L kept tensors out (the identity last layer's is the output)
    from . import fused_mlp

    resident = fused_mlp.forward_resident(_plan(width, depth), torch.bfloat16)
    weight_reads = min(tiles_fw, fused_mlp.PROGRAMS_PER_SM * SMS) if resident else tiles_fw
    forward = _kernel(L * flops_layer, ETA_SWEEP, (M * W + L * M * W) * e, weight_reads * weight_bytes)
    if accumulates(width, depth) if accumulate is None else accumulate:
        backward, reduce = accumulating_sweep(width, depth, rows)
        return {"mlp_forward": forward, "mlp_backward_acc": backward, "mlp_reduce": reduce}
    # δ sweep: ∂C/∂a and L − 1 kept tensors in, L δ out, bias partials (fp32)
    backward = _kernel((L - 1) * flops_layer, ETA_SWEEP, (M * W + (L - 1) * M * W + L * M * W) * e
                       + tiles_bw * L * W * 4, tiles_bw * weight_bytes)  # fmt: skip
    programs = max(1, min(SMS, M // 256))
    partials = programs * L * W * W * 4
    grad_weight = _kernel(L * flops_layer, BASE["cp.async"], 2 * L * M * W * e + partials)
    reduce = _kernel(0, 1, partials + L * W * W * e + tiles_bw * L * W * 4 + L * W * e)
    return {"mlp_forward": forward, "mlp_backward": backward, "mlp_grad_weight": grad_weight,
            "mlp_reduce": reduce}  # fmt: skip


def table() -> str:
    lines = [
        "| width | layers | rows | eager µs | fused µs | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for W in WIDTHS:
        for L in DEPTHS:
            for M in ROWS:
                eager, fused = eager_step(W, L, M), fused_step(W, L, M)
                lines.append(f"| {W} | {L} | 2^{M.bit_length() - 1} | {eager * 1e6:.1f} | "
                             f"{fused * 1e6:.1f} | {eager / fused:.2f}× |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print("# Fused MLP training step, modelled (H200, bf16; not measured)\n")
    print("Generated by `python -m manualbp.triton_kernels.aot_fused_model`; the assumptions are")
    print("that module's docstring (the machine of `aot_inspect.cost_model`).\n")
    print(table())
    print("\nGoals of issue 19 at width 64, 4 layers:")
    for rows, goal in ((2**18, 3.0), (2**12, 5.0)):
        ratio = eager_step(64, 4, rows) / fused_step(64, 4, rows)
        verdict = "met" if ratio >= goal else "not met"
        print(f"- 2^{rows.bit_length() - 1} rows: {ratio:.2f}× against the goal ≥ {goal:g}× ({verdict})")
    parts = fused_kernels(64, 4, 2**18)
    print("\nWhere the fused step's time goes at width 64, 4 layers, 2^18 rows (µs): "
          + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in parts.items()) + ".")
    print("The backward is the accumulating sweep in groups of 2 layers (sm_90, tanh): no δ goes")
    print("to memory; it is bound by its dots (each group also carries δ through the layers")
    print("above it). Width 128 takes the split path (a 128 × 128 fp32 accumulator a layer).")
    print("For comparison, the split path (4 launches) at width 64, 4 layers:")
    for rows in (2**18, 2**12):
        split = eager_step(64, 4, rows) / sum(fused_kernels(64, 4, rows, accumulate=False).values())
        print(f"- 2^{rows.bit_length() - 1} rows: {split:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
