"""The gated MLP's own kernels, and the whole block composed from them and the linear kernels.

    gated_up_kernel      z_g = x W_gᵀ + b_g and z_u = x W_uᵀ + b_u in ONE GEMM loop: each x tile is
                         loaded once and multiplied by the W_g and the W_u tile (two fp32
                         accumulators); the epilogue adds the biases, stores z_g and z_u (what
                         backward keeps) when STORE_Z, and h = f(z_g) ⊙ z_u.
    gated_delta_kernel   the backward's one elementwise pass over (M, hidden): from δ_h = g W_d,
                         z_g and z_u it forms δ_u = δ_h ⊙ f(z_g) and δ_g = δ_h ⊙ z_u ⊙ f′(z_g)
                         (and h = f(z_g) ⊙ z_u again when STORE_H, for ∇W_d = gᵀ h).

    x (M, K) rows, W_g and W_u (N, K) with N = hidden, biases (N,); every tensor any strides.

`gated_mlp_forward` / `gated_mlp_backward` compose them with the linear kernels (y = h W_dᵀ + b_d
is `linear_forward` with identity; δ_h = g W_d and δ_g W_g, δ_u W_u are `linear_grad_input`; the
weight and bias gradients `linear_grad_weight`). No autograd here (DESIGN.md).
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
    gemm_config,
    input_precision,
    needs_upcast,
    upcast,
)
from .activations import act_fn, act_grad, check_act_id
from .linear_forward import grouped_tile, linear_forward
from .linear_grad_input import linear_grad_input
from .linear_grad_weight import linear_grad_weight


@triton.jit
def gated_up_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, zg_ptr, zu_ptr, h_ptr,
    M, N, K,
    stride_xm, stride_xk,
    stride_gn, stride_gk,
    stride_un, stride_uk,
    stride_zgm, stride_zgn,
    stride_zum, stride_zun,
    stride_hm, stride_hn,
    negative_slope,
    ACT: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K), shared by both products
        mask_w = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(wg_ptr + k[:, None] * stride_gk + offs_n[None, :] * stride_gn, mask=mask_w, other=0.0)
        wu = tl.load(wu_ptr + k[:, None] * stride_uk + offs_n[None, :] * stride_un, mask=mask_w, other=0.0)
        x = upcast(x, UPCAST)
        acc_g = tl.dot(x, upcast(wg, UPCAST), acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(x, upcast(wu, UPCAST), acc_u, input_precision=INPUT_PRECISION)

    if HAS_GATE_BIAS:
        acc_g += upcast(tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0), UPCAST).to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        acc_u += upcast(tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0), UPCAST).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        zg_ptrs = zg_ptr + offs_m[:, None] * stride_zgm + offs_n[None, :] * stride_zgn
        tl.store(zg_ptrs, downcast(acc_g, zg_ptr.dtype.element_ty, UPCAST), mask=mask)
        zu_ptrs = zu_ptr + offs_m[:, None] * stride_zum + offs_n[None, :] * stride_zun
        tl.store(zu_ptrs, downcast(acc_u, zu_ptr.dtype.element_ty, UPCAST), mask=mask)
    h = act_fn(acc_g, ACT, negative_slope) * acc_u
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, downcast(h, h_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def gated_delta_kernel(
    dh_ptr, zg_ptr, zu_ptr, dg_ptr, du_ptr, h_ptr,
    M, N,
    stride_dhm, stride_dhn,
    stride_zgm, stride_zgn,
    stride_zum, stride_zun,
    stride_dgm, stride_dgn,
    stride_dum, stride_dun,
    stride_hm, stride_hn,
    negative_slope,
    ACT: tl.constexpr,
    STORE_H: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm, cn = offs_m[:, None], offs_n[None, :]
    mask = (rm < M) & (cn < N)
    dh = upcast(tl.load(dh_ptr + rm * stride_dhm + cn * stride_dhn, mask=mask), UPCAST).to(tl.float32)
    zg = upcast(tl.load(zg_ptr + rm * stride_zgm + cn * stride_zgn, mask=mask), UPCAST).to(tl.float32)
    zu = upcast(tl.load(zu_ptr + rm * stride_zum + cn * stride_zun, mask=mask), UPCAST).to(tl.float32)
    fz = act_fn(zg, ACT, negative_slope)
    # act_grad reads f′ from a = f(z) for ids 0-4 (output-derived) and from z for ids 5-9.
    if ACT <= 4:
        dg = act_grad(dh * zu, fz, ACT, negative_slope)
    else:
        dg = act_grad(dh * zu, zg, ACT, negative_slope)
    d_g = downcast(dg, dg_ptr.dtype.element_ty, UPCAST)
    tl.store(dg_ptr + rm * stride_dgm + cn * stride_dgn, d_g, mask=mask)
    d_u = downcast(dh * fz, du_ptr.dtype.element_ty, UPCAST)
    tl.store(du_ptr + rm * stride_dum + cn * stride_dun, d_u, mask=mask)
    if STORE_H:
        h = downcast(fz * zu, h_ptr.dtype.element_ty, UPCAST)
        tl.store(h_ptr + rm * stride_hm + cn * stride_hn, h, mask=mask)


# Two accumulators per tile, so half the tile area of the linear forward's lists. Every entry is
# compiled ahead of time for sm_90 and sm_80 and checked not to spill (`aot_gated.py`,
# tests/test_triton_aot_gated.py); none has run on a GPU yet, so none is tuned.
CONFIGS = {
    "16bit": [gemm_config(128, 64, 64, 8, 3), gemm_config(64, 64, 64, 4, 3)],
    # sm_80: 64×64×64 with 4 warps and 3 stages spilled with silu + biases (ptxas settled on 128
    # registers, 8 LDL/STL in fp16); 64-wide K steps in 2 stages, or 32-wide in 3, do not.
    "16bit_sm80": [gemm_config(128, 64, 64, 8, 3), gemm_config(64, 64, 32, 4, 3)],
    # float32 with IEEE precision runs the dot on FMA units, operand slices in registers.
    "fp32": [gemm_config(32, 64, 32, 4, 3)],
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})


def config_flavour(capability: tuple[int, int], dtype: torch.dtype) -> str:
    """Which list of CONFIGS a gated_up launch autotunes over (`capability` e.g. (9, 0))."""
    if dtype == torch.float32:
        return "fp32"
    return "16bit" if capability >= (9, 0) else "16bit_sm80"


def configs_for(capability: tuple[int, int], dtype: torch.dtype) -> list[triton.Config]:
    return CONFIGS[config_flavour(capability, dtype)]


gated_up_autotuned = {
    flavour: triton.autotune(configs=configs, key=["M", "N", "K"])(gated_up_kernel)
    for flavour, configs in CONFIGS.items()
}


def delta_gpu_config() -> triton.Config:
    return triton.Config(dict(DELTA_GPU_BLOCK), num_warps=4, num_stages=1)


DELTA_GPU_BLOCK = {"BLOCK_M": 16, "BLOCK_N": 128}
DELTA_INTERPRETER_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}


def gated_up(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    act_id: int,
    negative_slope: float = 0.01,
    *,
    store_z: bool = True,
    alloc: Alloc | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(h, z_g, z_u) with h = f(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u); z_g, z_u None unless store_z."""
    check_matrix("x", x)
    check_matrix("gate_weight", gate_weight)
    act_id = check_act_id("act_id", act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    M, K = x.shape
    N = gate_weight.shape[0]
    check_tensor("gate_weight", gate_weight, (N, K), x.dtype, x.device)
    check_tensor("up_weight", up_weight, (N, K), x.dtype, x.device)
    for name, b in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if b is not None:
            check_tensor(name, b, (N,), x.dtype, x.device)
    alloc = alloc or _utils.empty
    h = alloc((M, N), x.dtype, x.device)
    z_g = alloc((M, N), x.dtype, x.device) if store_z else None
    z_u = alloc((M, N), x.dtype, x.device) if store_z else None
    if M == 0 or N == 0:
        return h, z_g, z_u
    zg_t, zu_t = (z_g, z_u) if z_g is not None and z_u is not None else (h, h)  # never written then
    args = (
        x, gate_weight, up_weight,
        gate_bias if gate_bias is not None else h, up_bias if up_bias is not None else h,
        zg_t, zu_t, h,
        M, N, K,
        x.stride(0), x.stride(1),
        gate_weight.stride(0), gate_weight.stride(1),
        up_weight.stride(0), up_weight.stride(1),
        zg_t.stride(0), zg_t.stride(1),
        zu_t.stride(0), zu_t.stride(1),
        h.stride(0), h.stride(1),
        negative_slope,
    )  # fmt: skip
    flags = dict(
        ACT=act_id,
        HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None,
        STORE_Z=store_z,
        UPCAST=needs_upcast(x.dtype),
        INPUT_PRECISION=input_precision(x.dtype),
    )

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _utils.launch_gemm(
        gated_up_kernel, grid, args, flags,
        autotuned=gated_up_autotuned,
        configs=CONFIGS,
        flavour=lambda capability: config_flavour(capability, x.dtype),
        interpreter_config=INTERPRETER_CONFIG,
    )  # fmt: skip
    return h, z_g, z_u


def gated_delta(
    delta_h: torch.Tensor,
    z_g: torch.Tensor,
    z_u: torch.Tensor,
    act_id: int,
    negative_slope: float = 0.01,
    *,
    store_h: bool = True,
    alloc: Alloc | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(δ_g, δ_u, h) in one pass: δ_g = δ_h ⊙ z_u ⊙ f′(z_g), δ_u = δ_h ⊙ f(z_g), h = f(z_g) ⊙ z_u
    (None unless store_h)."""
    check_matrix("delta_h", delta_h)
    act_id = check_act_id("act_id", act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    M, N = delta_h.shape
    dtype, device = delta_h.dtype, delta_h.device
    check_tensor("z_g", z_g, (M, N), dtype, device)
    check_tensor("z_u", z_u, (M, N), dtype, device)
    alloc = alloc or _utils.empty
    d_g, d_u = alloc((M, N), dtype, device), alloc((M, N), dtype, device)
    h = alloc((M, N), dtype, device) if store_h else None
    if M == 0 or N == 0:
        return d_g, d_u, h
    h_t = h if h is not None else d_g  # never written when STORE_H is False
    block = DELTA_INTERPRETER_BLOCK if INTERPRET else DELTA_GPU_BLOCK
    grid = (triton.cdiv(M, block["BLOCK_M"]), triton.cdiv(N, block["BLOCK_N"]))
    _utils.traceable(gated_delta_kernel)[grid](
        delta_h, z_g, z_u, d_g, d_u, h_t,
        M, N,
        delta_h.stride(0), delta_h.stride(1),
        z_g.stride(0), z_g.stride(1),
        z_u.stride(0), z_u.stride(1),
        d_g.stride(0), d_g.stride(1),
        d_u.stride(0), d_u.stride(1),
        h_t.stride(0), h_t.stride(1),
        negative_slope,
        ACT=act_id,
        STORE_H=store_h,
        UPCAST=needs_upcast(dtype),
        **block,
        **({} if INTERPRET else {"num_warps": 4}),
    )  # fmt: skip
    return d_g, d_u, h


def gated_mlp_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act_id: int,
    negative_slope: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z_g, z_u): the fused gate/up GEMM, then y = h W_dᵀ + b_d (h is not kept)."""
    h, z_g, z_u = gated_up(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope)
    assert z_g is not None and z_u is not None
    check_tensor("down_weight", down_weight, (down_weight.shape[0], h.shape[1]), x.dtype, x.device)
    y, _ = linear_forward(h, down_weight, down_bias, 0, store_z=False)
    return y, z_g, z_u


def gated_mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    z_g: torch.Tensor,
    z_u: torch.Tensor,
    act_id: int,
    negative_slope: float,
    needs: tuple[bool, bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of (x, W_g, W_u, W_d, b_g, b_u, b_d), None where `needs` says not needed."""
    need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = needs
    grads: list[torch.Tensor | None] = [None] * 7
    upstream = need_x or need_wg or need_wu or need_bg or need_bu
    d_g = d_u = h = None
    if upstream or need_wd:
        # δ_h = g W_d; when only ∇W_d is wanted the pass runs on a stand-in δ_h for h alone.
        delta_h = linear_grad_input(grad_out, down_weight) if upstream else z_u
        d_g, d_u, h = gated_delta(delta_h, z_g, z_u, act_id, negative_slope, store_h=need_wd)
    if need_wd or need_bd:  # without need_wd, x is only read for its shape (need_weight=False)
        grads[3], grads[6] = linear_grad_weight(
            grad_out, h if h is not None else z_u, need_weight=need_wd, need_bias=need_bd
        )
    if upstream and d_g is not None and d_u is not None:
        if need_wg or need_bg:
            grads[1], grads[4] = linear_grad_weight(d_g, x, need_weight=need_wg, need_bias=need_bg)
        if need_wu or need_bu:
            grads[2], grads[5] = linear_grad_weight(d_u, x, need_weight=need_wu, need_bias=need_bu)
        if need_x:
            grads[0] = linear_grad_input(d_g, gate_weight) + linear_grad_input(d_u, up_weight)
    return tuple(grads)
