"""δ = grad_out ⊙ f′(saved), once, in a memory-bound elementwise pass.

The backend runs this pass when both backward GEMMs need δ (grad_input = δ W and
grad_weight = δᵀ x) or when f′ needs z (transcendental), then launches the GEMMs with
ACT = identity so they read δ like any operand; a single GEMM with a cheap output-derived f′
forms δ in its prologue instead. Why, in brief (the full argument is in
manualbp/backends/triton.py):

* In a prologue δ is recomputed for every output tile that reads it: ⌈K/BLOCK_K⌉ times in the
  input-gradient GEMM and ⌈K/BLOCK_K⌉ times in the weight-gradient GEMM. For gelu, mish or
  silu that is ~20-40 fp32 instructions per element per reuse, enough to make a 16-bit
  Hopper GEMM ALU-bound instead of tensor-core-bound, and the transformed tile has to go
  through registers instead of straight from shared memory into the MMA.
* This pass reads grad_out and saved and writes δ: 3·M·N elements, ≈ 3·M·N·2 bytes in 16-bit,
  i.e. M·N·6 / 4.8 TB/s on an H200 — about 40 µs at M = 8192, N = 4096, against ~0.6 ms for
  the two backward GEMMs at K = 4096.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import (
    INTERPRET,
    Alloc,
    check_matrix,
    check_slope,
    check_tensor,
    downcast,
    needs_upcast,
)
from .activations import check_act_id, delta_tile


@triton.jit
def delta_kernel(
    grad_ptr, saved_ptr, delta_ptr,
    M, N,
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_dm, stride_dn,
    negative_slope,
    ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    g = tl.load(grad_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask)
    s = tl.load(saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask)
    delta = delta_tile(g, s, ACT, negative_slope, UPCAST)
    d_ptrs = delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(d_ptrs, downcast(delta, delta_ptr.dtype.element_ty, UPCAST), mask=mask)


# Memory-bound: 16×256 tiles (16 elements per thread at 4 warps, 16-byte vector accesses).
GPU_BLOCK = {"BLOCK_M": 16, "BLOCK_N": 256}
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}


def linear_delta(
    grad_out: torch.Tensor,
    saved: torch.Tensor,
    act_id: int,
    negative_slope: float = 0.01,
    *,
    alloc: Alloc | None = None,
) -> torch.Tensor:
    """δ = grad_out ⊙ f′(saved) in the dtype of grad_out (saved is a for ids 0-4, z for 5-9)."""
    check_matrix("grad_out", grad_out)
    act_id = check_act_id("act_id", act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    M, N = grad_out.shape
    check_tensor("saved", saved, (M, N), grad_out.dtype, grad_out.device)
    delta = (alloc or _utils.empty)((M, N), grad_out.dtype, grad_out.device)
    check_tensor("alloc(...) result", delta, (M, N), grad_out.dtype, grad_out.device)
    if M == 0 or N == 0:
        return delta
    block = INTERPRETER_BLOCK if INTERPRET else GPU_BLOCK
    grid = (triton.cdiv(M, block["BLOCK_M"]), triton.cdiv(N, block["BLOCK_N"]))
    _utils.traceable(delta_kernel)[grid](
        grad_out, saved, delta,
        M, N,
        grad_out.stride(0), grad_out.stride(1),
        saved.stride(0), saved.stride(1),
        delta.stride(0), delta.stride(1),
        negative_slope,
        ACT=act_id,
        UPCAST=needs_upcast(grad_out.dtype),
        **block,
        **({} if INTERPRET else {"num_warps": GPU_NUM_WARPS}),
    )  # fmt: skip
    return delta
