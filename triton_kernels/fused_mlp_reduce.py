"""The fused MLP's deterministic cross-program reduction (`fused_mlp.py`, `fused_mlp_acc.py`).

    mlp_reduce_kernel  Σ_p partial[p] in a fixed order, cast to the parameter dtype, for the
                       weight and the bias partials in one launch: the same inputs give
                       bitwise-identical gradients (no atomics). Each layer has its own count
                       of partial rows (the accumulating sweep's layer groups have their own
                       numbers of programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import INTERPRET, downcast, needs_upcast

REDUCE_BLOCK = 256


@triton.jit
def _reduce_set(part_ptr, out_ptrs, sizes, part_offs, n_parts, stride_part, c, L: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    for i in tl.static_range(L):
        mask = c < sizes[i]
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in range(n_parts[i]):  # a fixed order: deterministic
            acc += tl.load(part_ptr + p * stride_part + part_offs[i] + c, mask=mask, other=0.0)
        tl.store(out_ptrs[i] + c, downcast(acc, out_ptrs[i].dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def mlp_reduce_kernel(
    w_part_ptr, w_ptrs, w_sizes, w_offs, w_parts, stride_w_part,
    b_part_ptr, b_ptrs, b_sizes, b_offs, b_parts, stride_b_part,
    L: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Both reductions in one launch: the weight partials (one row per weight-gradient program)
    and the bias partials (one row per δ-sweep program)."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _reduce_set(w_part_ptr, w_ptrs, w_sizes, w_offs, w_parts, stride_w_part, c, L, UPCAST, BLOCK)
    _reduce_set(b_part_ptr, b_ptrs, b_sizes, b_offs, b_parts, stride_b_part, c, L, UPCAST, BLOCK)


def reduce_partials(weight_set: tuple, bias_set: tuple, dt: torch.dtype) -> None:
    """outs[l] (contiguous) = Σ_{p < n_parts[l]} part[p, offs[l] : offs[l] + sizes[l]] for both
    sets (part, n_parts — one count, or one per layer —, outs, offs, sizes), in a fixed order,
    in one launch."""
    args = []
    widest = 0
    for part, n_parts, outs, offs, sizes in (weight_set, bias_set):
        counts = list(n_parts) if isinstance(n_parts, (list, tuple)) else [n_parts] * len(outs)
        sizes = [s if o is not None and n else 0 for s, o, n in zip(sizes, outs, counts)]
        for o, n in zip(outs, counts):
            if o is not None and n == 0:  # no rows: the gradient is 0
                o.zero_()
        widest = max(widest, *sizes)
        stand_in = bias_set[0]  # never written: its sizes are 0
        part = part if part is not None else stand_in
        outs_t = tuple(o if o is not None else stand_in for o in outs)
        args += [part, outs_t, tuple(sizes), offs[:-1], tuple(counts), part.stride(0)]
    if widest == 0:
        return
    grid = (triton.cdiv(widest, REDUCE_BLOCK),)
    _utils.traceable(mlp_reduce_kernel)[grid](
        *args, L=len(weight_set[2]), UPCAST=needs_upcast(dt), BLOCK=REDUCE_BLOCK,
        **({} if INTERPRET else {"num_warps": 4}),
    )  # fmt: skip
