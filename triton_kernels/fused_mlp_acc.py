"""The fused MLP's backward in one persistent δ sweep that also accumulates every ∇W on chip.

    mlp_backward_acc_kernel  the layers are split into groups (`group_bounds`); a program works
                             for one group: for each of its row tiles (taken in turn with the
                             group's other programs) δ_{L−1} = ∂C/∂a ⊙ f′_{L−1}, then right to
                             left down to the group's lowest layer
                                 δ_{l−1} = (δ_l W_l) ⊙ f′_{l−1}(kept_{l−1})
                             and, for the group's own layers only,
                                 acc_l += δ_lᵀ h_l,   bsum_l += Σ_rows δ_l,
                             where h_l, the layer's input, is x for l = 0 and otherwise formed
                             from the tile already loaded for f′ (a itself, or f(z)). The fp32
                             accumulators of the group stay in registers across the program's
                             tiles; each program writes them once as its partial, and
                             `fused_mlp.mlp_reduce_kernel` sums each layer's partials in a
                             fixed order (no atomics: bitwise reproducible).

Against the split backward of `fused_mlp.py` (δ sweep, then a weight-gradient loop) no δ goes to
memory: per row the backward reads ∂C/∂a, the kept tensors and x, and the groups of one row
range read them at about the same time (L2 hits). The price of the groups is compute: a
program of group g also carries δ through every layer above it (one dot and f′ each), so the
launch gives each group programs in proportion to its dots per tile (`group_programs`) and
all groups finish together. One kernel for every grouping: the bounds are a constexpr tuple
and each group a runtime branch on the program id, so only one group's accumulators are live.

Why groups: one program holding all layers' accumulators spilled at 4 layers (ptxas keeps the
accumulators and every layer's loaded tiles live across the unrolled sweep). Group sizes are
what compiled clean (AOT, sm_90 and sm_80, Triton 3.9, 64-row tiles, 8 warps, num_stages=1 —
software pipelining of the tile loop kept prefetched tiles in registers and made ptxas
serialise the wgmma, C7515), `ACT_GROUPS`: on sm_90 pairs of 64 × 64 layers for the
activations whose f′ reads a (identity, leaky_relu, sigmoid, tanh; 192 registers at 4 layers,
198 under Triton 3.6) up to 4 layers and single ones beyond (3.6 spilled pairs at 8 layers;
singles 207 / 232), single ones for gelu, gelu_tanh, silu, softplus up to 4 layers (f(z)
recomputed in the sweep; pairs spilled, and gelu at 8 layers of 64); relu serialises the
wgmma (C7514: its select reads the accumulator) and mish spills, so both take the split path
there. On sm_80, up to 4 layers, single 64 × 64
layers (pairs at width 32) for the output-derived activations (186 / 187); the z-kept ones
spill (silu only under 3.6). Widths over 64 (a 128 × 128 accumulator is
64 registers a thread at 8 warps) and float32 (FMA dots over register tiles) take the split
path. (Measured by compiling, not by running: no GPU.)
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
)
from .fused_mlp_reduce import reduce_partials

# Per capability and activation id, (Σ_l out_l · in_l padded, layers) of the group one program
# may accumulate, and the deepest stack that takes the sweep (sm_90 gelu at 8 layers of 64 and
# sm_80 tanh at 8 spilled): what compiled without spills or serialised wgmma. An id
# missing here takes the split path (sm_90: relu, whose select serialises the wgmma, and mish;
# sm_80: the activations computing f(z) in the sweep — silu spilled under Triton 3.6).
_PAIR, _ONE = (2 * 64 * 64, 2, 8), (64 * 64, 2, 4)  # width 64: 2 layers, 1 layer; most layers
ACT_GROUPS = {
    90: {0: _PAIR, 2: _PAIR, 3: _PAIR, 4: _PAIR, 5: _ONE, 6: _ONE, 7: _ONE, 9: _ONE},
    80: {0: _ONE, 1: _ONE, 2: _ONE, 3: _ONE, 4: _ONE},
}
PAIRS_UP_TO = 4  # deeper stacks: one layer a group (sm_90 pairs at 8 layers: 2 spills on 3.6)
MAX_WIDTH = 64  # a (64, 128) fp32 tile per live operand besides the accumulators: not tried
GPU_LAUNCH = {"BLOCK_M": 64, "num_warps": 8, "num_stages": 1}


@triton.jit
def mlp_backward_acc_kernel(
    grad_ptr, x_ptr, w_ptrs, kept_ptrs, gx_ptr, w_part_ptr, b_part_ptr,
    M, dims, n_tiles, starts,
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
    BOUNDS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # Programs starts[g] ≤ pid < starts[g + 1] accumulate the layers BOUNDS[g] ≤ l < BOUNDS[g + 1]
    # (one runtime branch per group: only one group's accumulators are live in a program).
    pid = tl.program_id(0)
    for g in tl.static_range(len(BOUNDS) - 1):
        if (pid >= starts[g]) & (pid < starts[g + 1]):
            _group_sweep(
                grad_ptr, x_ptr, w_ptrs, kept_ptrs, gx_ptr, w_part_ptr, b_part_ptr,
                M, dims, n_tiles, pid - starts[g], starts[g + 1] - starts[g],
                stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
                stride_kept, stride_gxm, w_offs, stride_w_part, b_offs, stride_b_part, slopes,
                L, PAD, ACTS, BIAS, NEED_W, NEED_X and g == 0, BOUNDS[g], BOUNDS[g + 1],
                UPCAST, INPUT_PRECISION, BLOCK_M,
            )  # fmt: skip


@triton.jit
def _group_sweep(
    grad_ptr, x_ptr, w_ptrs, kept_ptrs, gx_ptr, w_part_ptr, b_part_ptr,
    M, dims, n_tiles, pid, n_programs,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_kept, stride_gxm, w_offs, stride_w_part, b_offs, stride_b_part, slopes,
    L: tl.constexpr, PAD: tl.constexpr, ACTS: tl.constexpr, BIAS: tl.constexpr,
    NEED_W: tl.constexpr, NEED_X: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Layers LO ≤ l < HI: their accumulators live across the program's tiles; the layers
    above only carry δ down to them (one dot and f′ each, no accumulator). The group's
    n_programs take its tiles in turn (tile pid + t · n_programs), so that every group sweeps
    the rows front to back at the same pace and the tiles one group reads are still in L2
    when the others read them."""
    # Held top layer first (accs[j] is layer HI − 1 − j), the order the sweep rebuilds them in,
    # so that the tile loop carries the tuple as it is, with no reordering step.
    accs = ()
    sums = ()
    for i in tl.static_range(HI - 1, LO - 1, -1):
        accs = accs + (tl.zeros((tl.constexpr(PAD[i + 1]), tl.constexpr(PAD[i])), dtype=tl.float32),)  # type: ignore[assignment]
        sums = sums + (tl.zeros((tl.constexpr(PAD[i + 1]),), dtype=tl.float32),)  # type: ignore[assignment]
    for t in range(tl.cdiv(n_tiles - pid, n_programs)):
        rows = _rows(pid + t * n_programs, BLOCK_M)
        g = _load_tile(grad_ptr, rows, stride_gm, stride_gn, M, dims[L], PAD[L], UPCAST)
        if ACTS[L - 1] == 0:
            delta = g
        else:
            s = _load_tile(kept_ptrs[L - 1], rows, stride_kept[L - 1], 1, M, dims[L], PAD[L], UPCAST)
            delta = act_grad(g, s, ACTS[L - 1], slopes[L - 1])
        new_accs = ()
        new_sums = ()
        for i in tl.static_range(L - 1, LO - 1, -1):
            d = downcast(delta, grad_ptr.dtype.element_ty, UPCAST)
            if i > 0:
                s = _load_tile(kept_ptrs[i - 1], rows, stride_kept[i - 1], 1, M, dims[i], PAD[i], UPCAST)
            if i < HI:
                if i > 0:
                    if ACTS[i - 1] <= 4:
                        h = s  # layer i's input is the kept a itself
                    else:
                        h = act_fn(s, ACTS[i - 1], slopes[i - 1])  # f(z), as the forward fed it on
                else:
                    h = _load_tile(x_ptr, rows, stride_xm, stride_xk, M, dims[0], PAD[0], UPCAST)
                acc = accs[HI - 1 - i]  # type: ignore[var-annotated]
                if NEED_W[i]:
                    h16 = downcast(h, grad_ptr.dtype.element_ty, UPCAST)
                    d_t = tl.trans(upcast(d, UPCAST))
                    acc = tl.dot(d_t, upcast(h16, UPCAST), acc, input_precision=INPUT_PRECISION)
                bsum = sums[HI - 1 - i]  # type: ignore[var-annotated]
                if BIAS[i]:
                    bsum += tl.sum(upcast(d, UPCAST).to(tl.float32), axis=0)
                new_accs = new_accs + (acc,)  # type: ignore[assignment]
                new_sums = new_sums + (bsum,)  # type: ignore[assignment]
            if i > LO or NEED_X:  # NEED_X only where LO = 0
                # loop-invariant: Triton (3.6, 3.9) hoists the load and its shared-memory copy
                # out of the tile loop, so the weights stay resident in shared memory
                w = _weight_tile(w_ptrs[i], stride_wn[i], stride_wk[i], dims[i + 1], dims[i],
                                 PAD[i + 1], PAD[i], False)  # fmt: skip
                grad_prev = tl.dot(upcast(d, UPCAST), upcast(w, UPCAST), input_precision=INPUT_PRECISION)
                if i > 0:
                    delta = act_grad(grad_prev, s, ACTS[i - 1], slopes[i - 1])
                else:
                    _store_tile(gx_ptr, grad_prev, rows, stride_gxm, M, dims[0], PAD[0], UPCAST)
        accs = new_accs
        sums = new_sums
    for i in tl.static_range(LO, HI):
        n = tl.arange(0, PAD[i + 1])
        k = tl.arange(0, PAD[i])
        if NEED_W[i]:
            mask = (n[:, None] < dims[i + 1]) & (k[None, :] < dims[i])
            ptrs = w_part_ptr + pid * stride_w_part + w_offs[i] + n[:, None] * dims[i] + k[None, :]
            tl.store(ptrs, accs[HI - 1 - i], mask=mask)
        if BIAS[i]:
            tl.store(b_part_ptr + pid * stride_b_part + b_offs[i] + n, sums[HI - 1 - i], mask=n < dims[i + 1])


def group_limits(plan: Plan, capability: tuple[int, int] | None) -> tuple[int, int] | None:
    """(accumulator elements, layers) one program may hold for this stack on this capability
    (None: the interpreter, which takes sm_90's), the tightest of its activations'; None where
    one of them does not compile clean at all, or not at this depth."""
    table = ACT_GROUPS[90 if capability is None or capability >= (9, 0) else 80]
    limits = [table.get(a) for a in plan.acts]
    if any(lim is None or plan.depth > lim[2] for lim in limits):
        return None
    layers = min(lim[1] for lim in limits if lim) if plan.depth <= PAIRS_UP_TO else 1
    return min(lim[0] for lim in limits if lim), layers


def group_bounds(plan: Plan, capability: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The layer groups as bounds (0, …, L): from the first layer up, a group takes layers
    while its accumulators and its depth stay within `group_limits` (single layers for a
    stack `fits` refuses, which only a test sends here)."""
    limits = group_limits(plan, capability)
    most_acc, most_layers = limits if limits is not None else (0, 1)  # forced by a test: 1 a group
    bounds, acc, depth = [0], 0, 0
    for i in range(plan.depth):
        size = plan.pad[i + 1] * plan.pad[i]
        if depth and (acc + size > most_acc or depth == most_layers):
            bounds.append(i)
            acc, depth = 0, 0
        acc, depth = acc + size, depth + 1
    return (*bounds, plan.depth)


def group_programs(bounds: tuple[int, ...], depth: int, tiles: int, sms: int) -> list[int]:
    """Programs per group in proportion to its dots per row tile — its own layers' δᵀh and
    δW, and one δW for each layer above it — so that the groups finish together; each
    group gets at least 1 and at most `tiles`."""
    work = [(hi - lo) + (depth - 1 - lo) for lo, hi in zip(bounds, bounds[1:])]
    # rounded down: Σ ≤ sms where every group can have one, so all programs are resident at
    # once (one CTA an SM at these register counts) and none waits for a second wave
    return [max(1, min(tiles, sms * w // sum(work))) for w in work]


def fits(plan: Plan, capability: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> bool:
    """Whether the accumulating sweep takes this stack (it compiles without spills): 16-bit
    (float32's dots are FMA loops over register tiles, which spill beside the accumulators),
    widths ≤ MAX_WIDTH, and every layer's accumulators fit a group of its activations at this
    depth (`ACT_GROUPS`)."""
    limits = group_limits(plan, capability)
    if limits is None or dtype == torch.float32:
        return False
    widest = max(plan.pad[i + 1] * plan.pad[i] for i in range(plan.depth))
    return max(plan.pad) <= MAX_WIDTH and widest <= limits[0]


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
    bounds = group_bounds(plan, _utils.gemm_capability(device))  # launched only where `fits`
    tiles = triton.cdiv(M, block["BLOCK_M"]) if M else 0
    programs = group_programs(bounds, L, tiles, _utils.num_sms(device)) if tiles else [0] * (len(bounds) - 1)
    starts = _offsets(programs)
    # each layer's partials: the rows of its group's programs
    parts = [programs[g] for g in range(len(programs)) for _ in range(bounds[g], bounds[g + 1])]
    bias = [need_bias[i] and plan.has_bias[i] for i in range(L)]
    w_sizes = [dims[i + 1] * dims[i] if need_weight[i] else 0 for i in range(L)]
    b_sizes = [dims[i + 1] if bias[i] else 0 for i in range(L)]
    w_offs, b_offs = _offsets(w_sizes), _offsets(b_sizes)
    rows = max(max(programs), 1)
    w_part = alloc((rows, max(w_offs[-1], 1)), torch.float32, device)
    b_part = alloc((rows, max(b_offs[-1], 1)), torch.float32, device)
    grad_x = alloc((M, dims[0]), dt, device) if need_x else None
    gx = grad_x if grad_x is not None else x  # never written without NEED_X
    kept_t = tuple(k if k is not None else x for k in kept)
    if tiles:
        _utils.traceable(mlp_backward_acc_kernel)[(starts[-1],)](
            grad_out, x, tuple(weights), kept_t, gx, w_part, b_part,
            M, plan.dims, tiles, starts,
            grad_out.stride(0), grad_out.stride(1),
            x.stride(0), x.stride(1),
            tuple(w.stride(0) for w in weights), tuple(w.stride(1) for w in weights),
            tuple(k.stride(0) for k in kept_t), gx.stride(0),
            w_offs[:-1], w_part.stride(0), b_offs[:-1], b_part.stride(0),
            plan.slopes,
            BIAS=tuple(bias), NEED_W=tuple(need_weight), NEED_X=need_x, BOUNDS=bounds,
            **plan.flags(dt), **block,
        )  # fmt: skip
    grad_w = [alloc(tuple(w.shape), dt, device) if need_weight[i] else None for i, w in enumerate(weights)]
    grad_b = [alloc((dims[i + 1],), dt, device) if bias[i] else None for i in range(L)]
    weight_set = (w_part, parts, grad_w, w_offs, w_sizes)
    reduce_partials(weight_set, (b_part, parts, grad_b, b_offs, b_sizes), dt)
    return grad_x, grad_w, grad_b
