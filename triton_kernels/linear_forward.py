"""Forward of a fully connected layer: z = x Wᵀ + b, a = f(z), fused in one GEMM.

    x  (M, K)   input rows (any strides)
    W  (N, K)   weight, as nn.Linear stores it (any strides)
    b  (N,)     bias, optional
    z  (M, N)   pre-activation, written only when STORE_Z (activations whose f′ needs z)
    a  (M, N)   output

The fp32 accumulator of each (BLOCK_M, BLOCK_N) tile gets the bias and the activation in the
epilogue, so z never makes a round trip through memory unless the backward needs it.
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
from .activations import act_fn, check_act_id, uses_output


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to a (pid_m, pid_n) tile, GROUP_M row-tiles at a time.

    Consecutive programs sweep a group of GROUP_M row tiles down each column of tiles, so the
    operand tiles they load are reused from L2 instead of being refetched from HBM.
    """
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, a_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_am, stride_an,
    stride_zm, stride_zn,
    negative_slope,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    if USE_TMA:
        # Hopper: operand tiles by TMA (no per-step address arithmetic, out-of-range zeros);
        # the launcher checked the descriptor rules (unit last stride, 16-byte alignment).
        # Persistent: the programs stride over the tiles.
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, [N, K], [stride_wn, 1], [BLOCK_N, BLOCK_K])
        num_tiles = tile_count(M, N, BLOCK_M, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _forward_tile(
                tile, x_desc, w_desc, b_ptr, a_ptr, z_ptr, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_an, stride_zm, stride_zn,
                negative_slope, ACT, HAS_BIAS, STORE_Z, UPCAST, INPUT_PRECISION, USE_TMA,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            )  # fmt: skip
    else:
        # One tile per program, no tile loop: an outer loop made float32 tiles spill.
        _forward_tile(
            tl.program_id(0), x_ptr, w_ptr, b_ptr, a_ptr, z_ptr, M, N, K,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_an, stride_zm, stride_zn,
            negative_slope, ACT, HAS_BIAS, STORE_Z, UPCAST, INPUT_PRECISION, USE_TMA,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
        )  # fmt: skip


@triton.jit
def _forward_tile(
    tile, x_src, w_src, b_ptr, a_ptr, z_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_an, stride_zm, stride_zn,
    negative_slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile; x_src and w_src are tensor descriptors (USE_TMA) or pointers."""
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # Row and column indices in int64: M·K and M·N may pass 2³¹ elements.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            x = x_src.load([pid_m * BLOCK_M, k0])
            w = tl.trans(w_src.load([pid_n * BLOCK_N, k0]))  # (BLOCK_K, BLOCK_N)
        else:
            x, w = _operand_tiles(
                x_src, w_src, offs_m, offs_n, k0, K, stride_xm, stride_xk, stride_wn, stride_wk,
                mask_m, mask_n, BLOCK_K,
            )  # fmt: skip
        acc = tl.dot(upcast(x, UPCAST), upcast(w, UPCAST), acc, input_precision=INPUT_PRECISION)
    _epilogue(
        acc, b_ptr, a_ptr, z_ptr, offs_m, offs_n, mask_m, mask_n,
        stride_am, stride_an, stride_zm, stride_zn, negative_slope,
        ACT, HAS_BIAS, STORE_Z, UPCAST,
    )  # fmt: skip


@triton.jit
def _operand_tiles(
    x_ptr, w_ptr, offs_m, offs_n, k0, K, stride_xm, stride_xk, stride_wn, stride_wk,
    mask_m, mask_n, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The pointer path's (BLOCK_M, BLOCK_K) tile of x and (BLOCK_K, BLOCK_N) tile of Wᵀ."""
    k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = k < K
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )
    w = tl.load(
        w_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
        mask=mask_k[:, None] & mask_n[None, :],
        other=0.0,
    )
    return x, w


@triton.jit
def _epilogue(
    acc, b_ptr, a_ptr, z_ptr, offs_m, offs_n, mask_m, mask_n,
    stride_am, stride_an, stride_zm, stride_zn, negative_slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """On the fp32 accumulator: bias, then (optionally) store z, then a = f(z)."""
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        acc += upcast(b, UPCAST).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, downcast(acc, z_ptr.dtype.element_ty, UPCAST), mask=mask)
    a = act_fn(acc, ACT, negative_slope)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
    tl.store(a_ptrs, downcast(a, a_ptr.dtype.element_ty, UPCAST), mask=mask)


# GPU configurations, per flavour; every one is compiled ahead of time for sm_90 and sm_80 and
# checked not to spill (tests/test_triton_aot.py, `python -m manualbp.triton_kernels.aot`).
#   "light": identity and the output-derived activations (a select or one exp in the epilogue).
#   "heavy": activations whose f needs erf/exp/tanh chains (gelu, gelu_tanh, silu, mish,
#            softplus). On sm_90 the wgmma accumulator of a 128×128 tile leaves room for them
#            (mish: 233 registers); on sm_80 mma.sync also keeps operand fragments in registers
#            and 128×128 mish spills, so Ampere gets the 128×64 and 64×64 tiles only.
#   "fp32_fused": heavy activations on float32. With IEEE precision the dot runs on FMA units
#            with operand fragments in registers; 128×64×64 and 64×64×64 mish tiles spilled on
#            sm_80, so 64×64 tiles with 32-wide K steps.
#   "fp32_sm80": every activation on float32 on sm_80 (and other pre-Hopper GPUs). The FMA dot
#            holds a row slice of x and a column slice of W per thread next to the accumulator;
#            on sm_80 the light tiles spilled kilobytes and 64×64×32 with 8 warps spilled with
#            gelu/silu, so 4 warps (64×64×32 mish: 255 registers, no spill) then 32×64×32.
# fp32 configurations whose shared memory does not fit the device fail to launch and the
# autotuner skips them. (128×64 with 4 warps was dropped: it spilled in fp32 on sm_90.)
CONFIGS = {
    "light": [
        gemm_config(128, 128, 64, 8, 3),
        gemm_config(128, 128, 32, 8, 4),
        gemm_config(64, 128, 64, 4, 4),
        gemm_config(64, 64, 64, 4, 4),
    ],
    # float32 on sm_90 (IEEE dot on FMA units, operands in registers): the light list without
    # 128 × 128 × 64 w8 s3 and 64 × 128 × 64 w4 s4, which spill under Triton 3.6 (255 registers).
    "fp32_light": [
        gemm_config(128, 128, 32, 8, 4),
        gemm_config(64, 64, 64, 4, 4),
    ],
    # 128 × 64 first (the launch with autotuning off): 92-117 registers, 2 CTAs/SM, half the
    # epilogue per thread; 128 × 128 holds 164-206 registers (1 CTA/SM, its 2500-5000
    # instruction epilogue not overlapped): modelled 0.77 → 0.81 (gelu), 0.70 → 0.78 (mish).
    "heavy": [
        gemm_config(128, 64, 64, 8, 4),
        gemm_config(128, 128, 64, 8, 3),
        gemm_config(64, 64, 64, 4, 4),
    ],
    "heavy_sm80": [
        gemm_config(128, 64, 64, 8, 3),
        gemm_config(64, 64, 64, 4, 3),
    ],
    "fp32_fused": [
        gemm_config(64, 64, 32, 8, 3),
        gemm_config(64, 64, 32, 4, 3),
    ],
    "fp32_sm80": [
        gemm_config(64, 64, 32, 4, 3),
        gemm_config(32, 64, 32, 4, 3),
    ],
}


def config_flavour(act_id: int, capability: tuple[int, int], dtype: torch.dtype) -> str:
    """Which GPU config list a launch autotunes over (`capability` of the device, e.g. (8, 0))."""
    if dtype == torch.float32 and capability < (9, 0):
        return "fp32_sm80"
    if uses_output(act_id):
        return "fp32_light" if dtype == torch.float32 else "light"
    if dtype == torch.float32:
        return "fp32_fused"
    return "heavy" if capability >= (9, 0) else "heavy_sm80"


# Under the interpreter every program runs in NumPy: small blocks, no autotuning.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})

# One autotuner per flavour over the same kernel (no kernel copies).
linear_forward_autotuned = {
    flavour: triton.autotune(configs=configs, key=["M", "N", "K"])(linear_forward_kernel)
    for flavour, configs in CONFIGS.items()
}


# Two paths in the one kernel, chosen by the USE_TMA constexpr (`_utils.tma_path`; the same in
# grad_input and grad_weight): on sm_90+ with 16-bit operands that a TMA descriptor can address
# (unit last stride, 16-byte aligned base and row stride) the operand tiles come by TMA from
# in-kernel tensor descriptors (zero-padded past the edges, no per-step address arithmetic)
# and the launch is persistent (`_utils.persistent_programs`: 2 programs per SM striding over
# the tiles); everywhere else (sm_80, float32, strided views) one program per tile loads
# through pointers (cp.async).
def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_id: int,
    negative_slope: float = 0.01,
    *,
    store_z: bool | None = None,
    alloc: Alloc | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused forward GEMM. Returns (a, z); z is None unless it was stored.

    store_z: write the pre-activation too; defaults to "the activation's f′ needs z".
    alloc:   `alloc(shape, dtype, device)` allocates the outputs (tests pass one that fills them
             with NaN so that an element the kernel forgets to write fails the comparison).
    """
    check_matrix("x", x)
    check_matrix("weight", weight)
    act_id = check_act_id("act_id", act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    M, K = x.shape
    N = weight.shape[0]
    check_tensor("weight", weight, (N, K), x.dtype, x.device)
    if bias is not None:
        check_tensor("bias", bias, (N,), x.dtype, x.device)
    if store_z is None:
        store_z = not uses_output(act_id)
    alloc = alloc or _utils.empty
    a = alloc((M, N), x.dtype, x.device)
    check_tensor("alloc(...) result for a", a, (M, N), x.dtype, x.device)
    z = alloc((M, N), x.dtype, x.device) if store_z else None
    if z is not None:
        check_tensor("alloc(...) result for z", z, (M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return a, z
    # K == 0 needs no special case: the loop is empty and the epilogue gives f(b).
    zt = z if z is not None else a  # placeholder pointer, never written when STORE_Z is False
    args = (
        x, weight, bias if bias is not None else a, a, zt,
        M, N, K,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        a.stride(0), a.stride(1),
        zt.stride(0), zt.stride(1),
        negative_slope,
    )  # fmt: skip
    flags = dict(
        ACT=act_id,
        HAS_BIAS=bias is not None,
        STORE_Z=store_z,
        UPCAST=needs_upcast(x.dtype),
        INPUT_PRECISION=input_precision(x.dtype),
        USE_TMA=_utils.tma_path(x.device, x.dtype, x, weight),
    )

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (_utils.persistent_programs(x.device, tiles) if flags["USE_TMA"] else tiles,)

    _utils.launch_gemm(
        linear_forward_kernel, grid, args, flags,
        autotuned=linear_forward_autotuned,
        configs=CONFIGS,
        flavour=lambda capability: config_flavour(act_id, capability, x.dtype),
        interpreter_config=INTERPRETER_CONFIG,
    )  # fmt: skip
    return a, z
