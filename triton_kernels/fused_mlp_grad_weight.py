"""The fused MLP's weight-gradient loop (`fused_mlp.py`'s split backward path).

    mlp_grad_weight_kernel  ∇W_l = δ_lᵀ h_l for every layer: program p reduces its own range of
                            rows into an fp32 partial (one K-loop over rows per layer, both
                            operands loaded straight from memory, no atomics); `fused_mlp_reduce`
                            sums the programs' partials in a fixed order.

Where a layer's output is narrower than a wgmma's 64 rows and its input is not, the loop
computes the transpose h_lᵀ δ_l instead (`grad_weight_transposed`), so that every layer's dot
is a wgmma on sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import upcast


@triton.jit
def _rows_tile(ptr, rows, in_rows, stride_m, stride_n, n_real, NP: tl.constexpr, BY_COLUMN: tl.constexpr):
    """Rows × the first n_real columns straight from memory, as (BLOCK_M, NP), or as its
    transpose (NP, BLOCK_M) when BY_COLUMN; 0 elsewhere."""
    n = tl.arange(0, NP)
    if BY_COLUMN:
        ptrs = ptr + rows[None, :] * stride_m + n[:, None] * stride_n
        mask = (n[:, None] < n_real) & in_rows[None, :]
    else:
        ptrs = ptr + rows[:, None] * stride_m + n[None, :] * stride_n
        mask = in_rows[:, None] & (n[None, :] < n_real)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def mlp_grad_weight_kernel(
    input_ptrs, delta_ptrs, part_ptr,
    M, dims, delta_cols, rows_per_program,
    stride_im, stride_ik, stride_delta,
    part_offs, stride_part,
    L: tl.constexpr,
    PAD: tl.constexpr,
    NEED_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """∇W_l = δ_lᵀ h_l, or where TRANSPOSED[l] its transpose h_lᵀ δ_l (stored back as (out,
    in)): the dot's M is then the wider input width, since a wgmma needs M ≥ 64 (a 128 → 1
    layer's δᵀ has 16 padded rows, which would compile to mma.sync). δ_l has `delta_cols[l]`
    columns: its padded width where it is the narrow operand (the sweep writes the zeros)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * rows_per_program
    r = tl.arange(0, BLOCK_M).to(tl.int64)
    for i in tl.static_range(L):
        if NEED_W[i]:
            n = tl.arange(0, PAD[i + 1])
            k = tl.arange(0, PAD[i])
            if TRANSPOSED[i]:
                acc = tl.zeros((tl.constexpr(PAD[i]), tl.constexpr(PAD[i + 1])), dtype=tl.float32)
            else:
                acc = tl.zeros((tl.constexpr(PAD[i + 1]), tl.constexpr(PAD[i])), dtype=tl.float32)
            for r0 in range(0, rows_per_program, BLOCK_M):
                rows = start + r0 + r
                in_rows = rows < M
                # Both operands straight from memory, the dot's M side loaded transposed: each
                # goes from a pipelined load to shared memory to the wgmma, nothing in registers.
                d = _rows_tile(delta_ptrs[i], rows, in_rows, stride_delta[i], 1, delta_cols[i], PAD[i + 1],
                               not TRANSPOSED[i])  # fmt: skip
                a = _rows_tile(input_ptrs[i], rows, in_rows, stride_im[i], stride_ik[i], dims[i], PAD[i],
                               TRANSPOSED[i])  # fmt: skip
                if TRANSPOSED[i]:
                    acc = tl.dot(upcast(a, UPCAST), upcast(d, UPCAST), acc, input_precision=INPUT_PRECISION)
                else:
                    acc = tl.dot(upcast(d, UPCAST), upcast(a, UPCAST), acc, input_precision=INPUT_PRECISION)
            base = part_ptr + pid * stride_part + part_offs[i]
            if TRANSPOSED[i]:  # acc[k, n] is ∇W_l[n, k]
                tl.store(base + n[None, :] * dims[i] + k[:, None], acc,
                         mask=(k[:, None] < dims[i]) & (n[None, :] < dims[i + 1]))  # fmt: skip
            else:
                tl.store(base + n[:, None] * dims[i] + k[None, :], acc,
                         mask=(n[:, None] < dims[i + 1]) & (k[None, :] < dims[i]))  # fmt: skip


# Launch shapes: compiled for sm_90 and sm_80 and checked not to spill (aot_fused.py).
GRAD_WEIGHT_LAUNCH = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}  # see grad_weight_launch


def grad_weight_programs(M: int, device: torch.device) -> int:
    """How many row ranges the weight gradient is split into: one per SM (each program then
    holds one layer's (out, in) fp32 accumulator at a time), never a range under 256 rows."""
    return max(1, min(_utils.num_sms(device), triton.cdiv(M, 256)))


def grad_weight_launch(width: int, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> dict:
    """The weight-gradient loop's launch: a (width, width) fp32 accumulator per program; at
    128 it needs 8 warps (64 registers a thread) not to spill, and on sm_80 2 stages (3 spilled
    128 LDL/STL at 8 layers of 128); float32 (FMA dot, operand slices in registers) 32-row
    steps. From the AOT register counts (aot_fused.py)."""
    block_m = 32 if dtype == torch.float32 else GRAD_WEIGHT_LAUNCH["BLOCK_M"]
    stages = 2 if width > 64 and capability is not None and capability < (9, 0) else 3
    warps = 8 if width > 64 else 4
    return {**GRAD_WEIGHT_LAUNCH, "BLOCK_M": block_m, "num_warps": warps, "num_stages": stages}


def grad_weight_transposed(pad: tuple[int, ...]) -> tuple[bool, ...]:
    """Per layer of padded widths `pad`: whether the loop accumulates ∇W_lᵀ — where the output
    is under a wgmma's 64 rows but the input is not (a coordinate net's 128 → 1 output layer)."""
    return tuple(pad[i + 1] < 64 <= pad[i] for i in range(len(pad) - 1))
