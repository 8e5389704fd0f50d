"""The fused MLP's backward in one persistent δ sweep that also accumulates every ∇W on chip.

    mlp_backward_acc_kernel  each of P programs (one per SM) sweeps its own contiguous run of
                             row tiles; per tile δ_{L−1} = ∂C/∂a ⊙ f′_{L−1}, then for every
                             layer, right to left,
                                 acc_l += δ_lᵀ h_l,   bsum_l += Σ_rows δ_l,
                                 δ_{l−1} = (δ_l W_l) ⊙ f′_{l−1}(kept_{l−1}),
                             where h_l, the layer's input, is x for l = 0 and otherwise read from
                             the tile already loaded for f′ (a itself, or f(z)). The fp32
                             accumulators of all layers stay in registers across the program's
                             tiles; each program writes them once as its partial, and
                             `fused_mlp.mlp_reduce_kernel` sums the P partials in a fixed order.

Against the split backward of `fused_mlp.py` (δ sweep, then a weight-gradient loop) no δ goes to
memory and no layer input is read twice: per row the backward reads ∂C/∂a, the kept tensors
and x once. The price is registers: Σ_l (padded out × padded in) fp32 accumulators per program, and
every layer's loaded tiles, which ptxas keeps live across the unrolled sweep (it hoists the
loads of the kept tensors to the top of the tile loop). Compiled for sm_90 and sm_80 (AOT) at
64 rows and 8 warps: 4 layers spill at any width (gelu 32-wide: ~400 LDL/STL, relu 64-wide:
~110 on sm_90), 2 layers of 64 × 64 spill on sm_80 (~2300), and so do the heavier f′ of gelu,
gelu_tanh, mish and softplus (and relu, by 3) on sm_80 even at [32, 32, 32]. Clean on both:
2 layers, at most 4096 accumulators ([2, 64, 3], [32, 32, 32]), activations identity,
leaky_relu, sigmoid, tanh, silu. Only such stacks take this sweep (`fits`); every other one
the split backward of `fused_mlp.py`. (Measured by compiling, not by running: no GPU.)
Leads for 4 layers: num_stages=1 (no software pipelining of the tile loop, whose prefetched
elementwise loads stay in registers) cuts the sm_90 spills at [64]·5, relu or silu, from ~110
to ~10; 16 warps (128 registers a thread) and 128-row tiles make it worse; sm_80 stays far off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import INTERPRET, downcast, upcast
from .activations import act_fn, act_grad
from .fused_mlp import (
    INTERPRETER_BLOCK_M,
    Plan,
    _load_tile,
    _offsets,
    _rows,
    _store_tile,
    _weight_tile,
    reduce_partials,
)

ACC_ELEMENTS = 64 * 64  # Σ_l out_l · in_l (padded) the accumulating sweep holds
MAX_DEPTH = 2
ACT_IDS = frozenset({0, 2, 3, 4, 7})  # identity, leaky_relu, sigmoid, tanh, silu
GPU_LAUNCH = {"BLOCK_M": 64, "num_warps": 8}


@triton.jit
def mlp_backward_acc_kernel(
    grad_ptr, x_ptr, w_ptrs, kept_ptrs, gx_ptr, w_part_ptr, b_part_ptr,
    M, dims, tiles_per_program,
    stride_gm, stride_gn,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_kept, stride_gxm,
    w_offs, stride_w_part, b_offs, stride_b_part,
    slopes,
    L: tl.constexpr,
    PAD: tl.constexpr,
    ACTS: tl.constexpr,
    BIAS: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_X: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    accs = ()
    sums = ()
    for i in tl.static_range(L):
        accs = accs + (tl.zeros((tl.constexpr(PAD[i + 1]), tl.constexpr(PAD[i])), dtype=tl.float32),)  # type: ignore[assignment]
        sums = sums + (tl.zeros((tl.constexpr(PAD[i + 1]),), dtype=tl.float32),)  # type: ignore[assignment]
    for t in range(tiles_per_program):
        rows = _rows(pid * tiles_per_program + t, BLOCK_M)  # past the last tile: all masked
        g = _load_tile(grad_ptr, rows, stride_gm, stride_gn, M, dims[L], PAD[L], UPCAST)
        if ACTS[L - 1] == 0:
            delta = g
        else:
            s = _load_tile(kept_ptrs[L - 1], rows, stride_kept[L - 1], 1, M, dims[L], PAD[L], UPCAST)
            delta = act_grad(g, s, ACTS[L - 1], slopes[L - 1])
        new_accs = ()  # built right to left, reversed below
        new_sums = ()
        for i in tl.static_range(L - 1, -1, -1):
            d = downcast(delta, grad_ptr.dtype.element_ty, UPCAST)
            d32 = upcast(d, UPCAST).to(tl.float32)
            if i > 0:
                s = _load_tile(kept_ptrs[i - 1], rows, stride_kept[i - 1], 1, M, dims[i], PAD[i], UPCAST)
                if ACTS[i - 1] <= 4:
                    h = s  # layer i's input is the kept a itself
                else:
                    h = act_fn(s, ACTS[i - 1], slopes[i - 1])  # f(z), as the forward fed it on
            else:
                h = _load_tile(x_ptr, rows, stride_xm, stride_xk, M, dims[0], PAD[0], UPCAST)
            acc = accs[i]  # type: ignore[var-annotated]
            if NEED_W[i]:
                h16 = downcast(h, grad_ptr.dtype.element_ty, UPCAST)
                d_t = tl.trans(upcast(d, UPCAST))
                acc = tl.dot(d_t, upcast(h16, UPCAST), acc, input_precision=INPUT_PRECISION)
            bsum = sums[i]  # type: ignore[var-annotated]
            if BIAS[i]:
                bsum += tl.sum(d32, axis=0)
            new_accs = new_accs + (acc,)  # type: ignore[assignment]
            new_sums = new_sums + (bsum,)  # type: ignore[assignment]
            if i > 0 or NEED_X:
                w = _weight_tile(w_ptrs[i], stride_wn[i], stride_wk[i], dims[i + 1], dims[i],
                                 PAD[i + 1], PAD[i], False)  # fmt: skip
                grad_prev = tl.dot(upcast(d, UPCAST), upcast(w, UPCAST), input_precision=INPUT_PRECISION)
                if i > 0:
                    delta = act_grad(grad_prev, s, ACTS[i - 1], slopes[i - 1])
                else:
                    _store_tile(gx_ptr, grad_prev, rows, stride_gxm, M, dims[0], PAD[0], UPCAST)
        accs = ()
        sums = ()
        for j in tl.static_range(L - 1, -1, -1):
            accs = accs + (new_accs[j],)  # type: ignore[assignment]
            sums = sums + (new_sums[j],)  # type: ignore[assignment]
    for i in tl.static_range(L):
        n = tl.arange(0, PAD[i + 1])
        k = tl.arange(0, PAD[i])
        if NEED_W[i]:
            mask = (n[:, None] < dims[i + 1]) & (k[None, :] < dims[i])
            ptrs = w_part_ptr + pid * stride_w_part + w_offs[i] + n[:, None] * dims[i] + k[None, :]
            tl.store(ptrs, accs[i], mask=mask)
        if BIAS[i]:
            tl.store(b_part_ptr + pid * stride_b_part + b_offs[i] + n, sums[i], mask=n < dims[i + 1])


def fits(plan: Plan) -> bool:
    """Whether the accumulating sweep takes this stack (it compiles without spills)."""
    accumulators = sum(plan.pad[i + 1] * plan.pad[i] for i in range(plan.depth))
    return plan.depth <= MAX_DEPTH and accumulators <= ACC_ELEMENTS and set(plan.acts) <= ACT_IDS


def mlp_backward_accumulated(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    kept: list[torch.Tensor | None],
    plan: Plan,
    *,
    need_x: bool,
    need_weight: list[bool],
    need_bias: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """`fused_mlp.mlp_backward`'s results in two launches: the accumulating sweep and the
    reduction of its per-program partials."""
    M, dt, device = x.shape[0], x.dtype, x.device
    alloc, L, dims = _utils.empty, plan.depth, plan.dims
    block = {"BLOCK_M": INTERPRETER_BLOCK_M} if INTERPRET else dict(GPU_LAUNCH)
    tiles = triton.cdiv(M, block["BLOCK_M"]) if M else 0
    programs = min(tiles, _utils.num_sms(device))
    per_program = triton.cdiv(tiles, programs) if programs else 0
    bias = [need_bias[i] and plan.has_bias[i] for i in range(L)]
    w_sizes = [dims[i + 1] * dims[i] if need_weight[i] else 0 for i in range(L)]
    b_sizes = [dims[i + 1] if bias[i] else 0 for i in range(L)]
    w_offs, b_offs = _offsets(w_sizes), _offsets(b_sizes)
    w_part = alloc((max(programs, 1), max(w_offs[-1], 1)), torch.float32, device)
    b_part = alloc((max(programs, 1), max(b_offs[-1], 1)), torch.float32, device)
    grad_x = alloc((M, dims[0]), dt, device) if need_x else None
    gx = grad_x if grad_x is not None else x  # never written without NEED_X
    kept_t = tuple(k if k is not None else x for k in kept)
    if programs:
        _utils.traceable(mlp_backward_acc_kernel)[(programs,)](
            grad_out, x, tuple(weights), kept_t, gx, w_part, b_part,
            M, plan.dims, per_program,
            grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1),
            tuple(w.stride(0) for w in weights), tuple(w.stride(1) for w in weights),
            tuple(k.stride(0) for k in kept_t), gx.stride(0),
            w_offs[:-1], w_part.stride(0), b_offs[:-1], b_part.stride(0),
            plan.slopes,
            BIAS=tuple(bias), NEED_W=tuple(need_weight), NEED_X=need_x, **plan.flags(dt), **block,
        )  # fmt: skip
    grad_w = [alloc(tuple(w.shape), dt, device) if need_weight[i] else None for i, w in enumerate(weights)]
    grad_b = [alloc((dims[i + 1],), dt, device) if bias[i] else None for i in range(L)]
    weight_set = (w_part, programs, grad_w, w_offs, w_sizes)
    reduce_partials(weight_set, (b_part, programs, grad_b, b_offs, b_sizes), dt)
    return grad_x, grad_w, grad_b
