"""Input gradient of a fully connected layer: grad_input = δ W, δ formed in the prologue.

    grad_out (M, N)  ∂C/∂a from the layer above (any strides)
    saved    (M, N)  what the forward saved for f′: a (ids 0-4) or z (ids 5-9)
    W        (N, K)  weight (any strides)
    grad_input (M, K) = (grad_out ⊙ f′(saved)) · W

Prologue: every (BLOCK_M, BLOCK_N) tile of grad_out is multiplied by f′ of the matching tile of
`saved` before it enters the dot, so δ is never written to memory. With ACT = identity the
operand is taken as δ itself and `saved` is not read (the backend passes a precomputed δ so).

Optional epilogue (PREV_ACT ≠ identity): the result is multiplied by f′⁽ˡ⁻¹⁾ of `prev_saved`
(M, K), the previous layer's saved a or z. The kernel then writes δ⁽ˡ⁻¹⁾ = f′⁽ˡ⁻¹⁾ ⊙ δ⁽ˡ⁾W
directly, the seed recursion for an inner layer, which a whole-network backward uses to skip
the previous layer's δ pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import (
    Alloc,
    check_matrix,
    check_slope,
    check_tensor,
    downcast,
    gemm_config,
    input_precision,
    needs_upcast,
    tile_count,
    upcast,
)
from .activations import IDENTITY, RELU, act_grad, check_act_id, delta_tile, uses_output
from .delta import linear_delta
from .linear_forward import grouped_tile


@triton.jit
def grad_input_kernel(
    grad_ptr, saved_ptr, w_ptr, prev_ptr, gi_ptr,
    M, N, K,
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_wn, stride_wk,
    stride_pm, stride_pk,
    stride_im, stride_ik,
    negative_slope, prev_negative_slope,
    ACT: tl.constexpr,
    PREV_ACT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    if USE_TMA:
        # Hopper: δ and W tiles by TMA (see linear_forward_kernel), persistent tile loop.
        g_desc = tl.make_tensor_descriptor(grad_ptr, [M, N], [stride_gm, 1], [BLOCK_M, BLOCK_N])
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        num_tiles = tile_count(M, K, BLOCK_M, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _grad_input_tile(
                tile, g_desc, w_desc, saved_ptr, prev_ptr, gi_ptr, M, N, K,
                stride_gm, stride_gn, stride_sm, stride_sn, stride_wn, stride_wk,
                stride_pm, stride_pk, stride_im, stride_ik, negative_slope, prev_negative_slope,
                ACT, PREV_ACT, UPCAST, INPUT_PRECISION, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            )  # fmt: skip
    else:  # one tile per program (no tile loop, as in linear_forward_kernel)
        _grad_input_tile(
            tl.program_id(0), grad_ptr, w_ptr, saved_ptr, prev_ptr, gi_ptr, M, N, K,
            stride_gm, stride_gn, stride_sm, stride_sn, stride_wn, stride_wk,
            stride_pm, stride_pk, stride_im, stride_ik, negative_slope, prev_negative_slope,
            ACT, PREV_ACT, UPCAST, INPUT_PRECISION, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


@triton.jit
def _grad_input_tile(
    tile, g_src, w_src, saved_ptr, prev_ptr, gi_ptr, M, N, K,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_wn, stride_wk,
    stride_pm, stride_pk, stride_im, stride_ik, negative_slope, prev_negative_slope,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Output tile (pid_m, pid_k) of the (M, K) result, the reduction over N; g_src and w_src
    are tensor descriptors (USE_TMA) or pointers."""
    pid_m, pid_k = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        mask_n = n < N
        mask_mn = mask_m[:, None] & mask_n[None, :]
        if USE_TMA:
            g = g_src.load([pid_m * BLOCK_M, n0])  # (BLOCK_M, BLOCK_N)
        else:
            g = tl.load(g_src + offs_m[:, None] * stride_gm + n[None, :] * stride_gn, mask=mask_mn, other=0.0)
        if ACT != IDENTITY:
            s = tl.load(
                saved_ptr + offs_m[:, None] * stride_sm + n[None, :] * stride_sn, mask=mask_mn, other=0.0
            )
            # δ in fp32, rounded to the storage dtype like a materialised δ would be.
            delta = downcast(delta_tile(g, s, ACT, negative_slope, UPCAST), g.dtype, UPCAST)
        else:
            delta = g
        if USE_TMA:
            w = w_src.load([n0, pid_k * BLOCK_K])  # (BLOCK_N, BLOCK_K)
        else:
            w = tl.load(
                w_src + n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :],
                other=0.0,
            )
        acc = tl.dot(upcast(delta, UPCAST), upcast(w, UPCAST), acc, input_precision=INPUT_PRECISION)
    _epilogue(
        acc, prev_ptr, gi_ptr, offs_m, offs_k, mask_m, mask_k,
        stride_pm, stride_pk, stride_im, stride_ik, prev_negative_slope, PREV_ACT, UPCAST,
    )  # fmt: skip


@triton.jit
def _epilogue(
    acc, prev_ptr, gi_ptr, offs_m, offs_k, mask_m, mask_k,
    stride_pm, stride_pk, stride_im, stride_ik, prev_negative_slope,
    PREV_ACT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Store the tile, multiplied by f′_prev(prev_saved) when PREV_ACT is set."""
    mask = mask_m[:, None] & mask_k[None, :]
    if PREV_ACT != IDENTITY:
        p = tl.load(
            prev_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk,
            mask=mask,
            other=0.0,
        )
        p32 = upcast(p, UPCAST).to(tl.float32)
        if PREV_ACT == RELU:
            # act_grad's select with its 0 taken from the data: a relu output is ±0 where
            # a <= 0, so a · 0 is that 0 (NaN a keeps the gradient, as threshold_backward).
            # With the constant 0, Triton 3.6's ptxas serialises the wgmma of the TMA loop.
            acc = tl.where(p32 <= 0.0, p32 * 0.0, acc)
        else:
            acc = act_grad(acc, p32, PREV_ACT, prev_negative_slope)
    gi_ptrs = gi_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_ik
    tl.store(gi_ptrs, downcast(acc, gi_ptr.dtype.element_ty, UPCAST), mask=mask)


# GPU configurations per flavour; the elementwise work of a prologue or epilogue needs
# registers, so those flavours use smaller tiles, checked ahead of time not to spill with the
# most expensive activations on sm_90 and sm_80 (tests/test_triton_aot.py, aot.py): a mish
# prologue spilled with 128×64 δ tiles on sm_80 and in fp32 on sm_90, so the prologue reads
# 32 columns of δ per step; a mish epilogue in fp32 (FMA dot, operands in registers) spilled
# with 128×64 output tiles, so the epilogue uses 64×64 tiles with 8 warps.
#   "plain":    the operand is δ itself (ACT = identity, PREV_ACT = identity)
#   (no sm_90 16-bit prologue list: there the launcher forms δ in the δ pass, since a prologue
#    serialises the wgmma; `_utils.prologue_serializes`)
#   "epilogue": the result multiplied by f′_prev(prev_saved)
#   "prologue_sm80": the prologue on sm_80 (16-bit), where 64-row δ tiles with mish spilled
#            with 4 and 8 warps alike (ptxas kept them at 64-96 registers); 128 × 32 × 64 with
#            8 warps does not (103 registers).
#   "fp32_fused": prologue or epilogue on float32 (IEEE dot on FMA units, operands in registers);
#            on sm_90 64 × 64 output tiles spilled 8 bytes with gelu, gelu_tanh and silu.
#   "fp32_sm80": every float32 launch on sm_80, where the plain tiles spilled kilobytes.
CONFIGS = {
    "plain": [
        gemm_config(128, 64, 128, 8, 3),
        gemm_config(64, 64, 128, 4, 4),
        gemm_config(64, 64, 64, 4, 4),
    ],
    # float32 plain on sm_90: 128 × 64 × 128 w8 s3 spills under Triton 3.6.
    "fp32_plain": [
        gemm_config(64, 64, 128, 4, 4),
        gemm_config(64, 64, 64, 4, 4),
    ],
    # sm_90, 16-bit, f′_prev read from the output (relu, leaky_relu, sigmoid, tanh: a select or
    # one or two FMAs): 128 × 64 output tiles (64 × 64 × 64 is issue-bound, 117 instructions per
    # step for 128 tensor clocks; modelled 0.45 → 0.72 of cuBLAS at N = K = 1024). Not the plain
    # 128 × 64 × 128: with relu Triton 3.6 serialises its wgmma (3.9 does not). With f′_prev of
    # z (gelu and mish spilled at 128 × 64 × 128) the smaller tiles only.
    "epilogue_light": [
        gemm_config(128, 64, 64, 8, 3),
        gemm_config(64, 64, 64, 8, 3),
        gemm_config(64, 32, 64, 4, 3),
    ],
    "epilogue": [
        gemm_config(64, 64, 64, 8, 3),
        gemm_config(64, 32, 64, 4, 3),
    ],
    # sm_90, 16-bit, f′_prev of z (gelu, gelu_tanh, silu, mish, softplus): with TMA loads the
    # loop holds no addresses, and 128 × 64 output tiles fit without spilling (64 × 64 × 64 is
    # issue-bound: 80 SASS per step for 128 tensor clocks, modelled 0.52 of cuBLAS).
    "epilogue_sm90": [
        gemm_config(128, 64, 64, 8, 3),
        gemm_config(64, 64, 64, 8, 3),
        gemm_config(64, 32, 64, 4, 3),
    ],
    "prologue_sm80": [
        gemm_config(128, 32, 64, 8, 3),
    ],
    "fp32_fused": [
        gemm_config(64, 32, 64, 8, 3),
        gemm_config(32, 32, 64, 4, 3),
    ],
    "fp32_sm80": [
        gemm_config(64, 64, 32, 8, 3),
        gemm_config(64, 32, 64, 8, 3),
    ],
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


def config_flavour(
    act_id: int, prev_act_id: int, capability: tuple[int, int], dtype: torch.dtype
) -> str:
    """Which GPU config list a launch uses (`capability` of the device, e.g. (8, 0); the
    epilogue wins when both are present)."""
    if dtype == torch.float32 and capability < (9, 0):
        return "fp32_sm80"
    if act_id == 0 and prev_act_id == 0:
        return "fp32_plain" if dtype == torch.float32 else "plain"
    if dtype == torch.float32:
        return "fp32_fused"
    if prev_act_id != 0:
        if capability >= (9, 0):
            return "epilogue_light" if uses_output(prev_act_id) else "epilogue_sm90"
        return "epilogue"
    if capability >= (9, 0):
        raise ValueError("a 16-bit sm_90 prologue is routed through the δ pass (prologue_serializes)")
    return "prologue_sm80"


# One autotuner per flavour over the same kernel (no kernel copies).
grad_input_autotuned = {
    flavour: triton.autotune(configs=configs, key=["M", "N", "K"])(grad_input_kernel)
    for flavour, configs in CONFIGS.items()
}


def linear_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor | None = None,
    act_id: int = 0,
    negative_slope: float = 0.01,
    *,
    prev_act_id: int = 0,
    prev_saved: torch.Tensor | None = None,
    prev_negative_slope: float = 0.01,
    alloc: Alloc | None = None,
) -> torch.Tensor:
    """grad_input = (grad_out ⊙ f′(saved)) W [⊙ f′_prev(prev_saved)].

    act_id = 0 (identity) takes `grad_out` as δ and needs no `saved`; prev_act_id = 0 (the
    default) skips the epilogue. `alloc(shape, dtype, device)` allocates the result.
    """
    check_matrix("grad_out", grad_out)
    check_matrix("weight", weight)
    act_id = check_act_id("act_id", act_id)
    prev_act_id = check_act_id("prev_act_id", prev_act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    prev_negative_slope = check_slope("prev_negative_slope", prev_negative_slope)
    M, N = grad_out.shape
    K = weight.shape[1]
    dtype, device = grad_out.dtype, grad_out.device
    check_tensor("weight", weight, (N, K), dtype, device)
    if act_id != 0:
        if saved is None:
            raise ValueError(f"saved: got None, expected an (M, N) = {(M, N)} tensor for act_id={act_id}")
        check_tensor("saved", saved, (M, N), dtype, device)
    if prev_act_id != 0:
        if prev_saved is None:
            raise ValueError(
                f"prev_saved: got None, expected an (M, K) = {(M, K)} tensor for prev_act_id={prev_act_id}"
            )
        check_tensor("prev_saved", prev_saved, (M, K), dtype, device)
    if act_id != 0 and _utils.prologue_serializes(device, dtype):
        # sm_90, 16-bit: a prologue would serialise the wgmma; δ pass, then the plain GEMM.
        grad_out = linear_delta(grad_out, saved, act_id, negative_slope)
        act_id, saved = 0, None
    out = (alloc or _utils.empty)((M, K), dtype, device)
    check_tensor("alloc(...) result", out, (M, K), dtype, device)
    if M == 0 or K == 0:
        return out

    s = saved if act_id != 0 else grad_out  # placeholders are never read
    p = prev_saved if prev_act_id != 0 else out
    args = (
        grad_out, s, weight, p, out,
        M, N, K,
        grad_out.stride(0), grad_out.stride(1),
        s.stride(0), s.stride(1),
        weight.stride(0), weight.stride(1),
        p.stride(0), p.stride(1),
        out.stride(0), out.stride(1),
        negative_slope, prev_negative_slope,
    )  # fmt: skip
    flags = dict(
        ACT=act_id,
        PREV_ACT=prev_act_id,
        UPCAST=needs_upcast(dtype),
        INPUT_PRECISION=input_precision(dtype),
        USE_TMA=act_id == 0 and _utils.tma_path(device, dtype, grad_out, weight),
    )

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"])
        return (_utils.persistent_programs(device, tiles) if flags["USE_TMA"] else tiles,)

    _utils.launch_gemm(
        grad_input_kernel, grid, args, flags,
        autotuned=grad_input_autotuned,
        configs=CONFIGS,
        flavour=lambda capability: config_flavour(act_id, prev_act_id, capability, dtype),
        interpreter_config=INTERPRETER_CONFIG,
    )  # fmt: skip
    return out
