"""The fused heads' shared machinery: the chunk loop over rows, its GEMMs per backend, and what
the heads' Functions and custom ops keep and return (:mod:`manualbp.ops.heads` states the math).

Both heads — linear + cross-entropy (:mod:`manualbp.ops.heads`) and linear + squared error
(:mod:`manualbp.ops.linear_mse`) — run `run_chunks` with their own per-chunk `Head`, which turns
a chunk's output y = x_c Wᵀ + b into ∂C/∂y; the loop then forms that chunk's three gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp.backends import reference
from manualbp.backends.reference import cast, compute_dtype, up
from manualbp.ops._common import check_linear_args, check_reduction, no_autocast, refuse_create_graph
from manualbp.ops.chunked_inplace import run_chunks_inplace
from manualbp.ops.linear_act import traced_backend_name

__all__ = [
    "Head",
    "HeadCtx",
    "check_chunk",
    "check_head",
    "default_chunk_size",
    "fake_grads",
    "filled",
    "gemms_for",
    "grads_from",
    "head_backward",
    "logits",
    "no_graph_backward",
    "op_grads",
    "or_placeholder",
    "requested",
    "run_chunks",
    "save_head",
    "save_op_head",
    "scaled_all",
    "scaled_or_same",
    "split_saved",
    "traced_backend",
    "only_wanted",
]


# ------------------------------------------------------------------------------ GEMMs per backend


class ReferenceGemms:
    """The head's three GEMMs in torch ops, in the compute dtype (float32 for 16-bit storage)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        cdt = compute_dtype(x.dtype)
        if bias is None:
            return x.to(cdt) @ weight.to(cdt).t()
        return torch.addmm(bias.to(cdt), x.to(cdt), weight.to(cdt).t())  # bias in the GEMM

    @staticmethod
    def grad_input(grad: Tensor, weight: Tensor, out: Tensor) -> None:
        if out.dtype == grad.dtype and out.is_contiguous() and not torch.is_grad_enabled():
            torch.mm(grad, weight.to(grad.dtype), out=out)  # straight into the rows of grad_x
        else:
            out.copy_(grad @ weight.to(grad.dtype))

    @staticmethod
    def accumulate(grad: Tensor, x: Tensor, acc_w: Tensor | None, acc_b: Tensor | None) -> None:
        """acc_w += gradᵀ x and acc_b += Σ grad, the GEMM adding into the accumulator itself."""
        if acc_w is not None:
            acc_w.addmm_(grad.t(), x.to(grad.dtype))
        if acc_b is not None:
            acc_b += grad.sum(0)

    @staticmethod
    def grad_weight(
        grad: Tensor, x: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_weight = grad.t() @ x.to(grad.dtype) if need_weight else None
        grad_bias = grad.sum(0) if need_bias else None
        return grad_weight, grad_bias


class TritonGemms:
    """The same GEMMs on the layer kernels (identity activation), outputs in the input dtype."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        from manualbp.triton_kernels.linear_forward import linear_forward

        return linear_forward(x, weight, bias, 0)[0]

    @staticmethod
    def grad_input(grad: Tensor, weight: Tensor, out: Tensor) -> None:
        from manualbp.triton_kernels.linear_grad_input import linear_grad_input

        # The kernel writes straight into the rows of the full gradient: no chunk-sized copy.
        linear_grad_input(grad, weight, alloc=lambda shape, dtype, device: out)

    @staticmethod
    def grad_weight(
        grad: Tensor, x: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        from manualbp.triton_kernels.linear_grad_weight import linear_grad_weight

        return linear_grad_weight(grad, x, need_weight=need_weight, need_bias=need_bias)


def gemms_for(backend: ModuleType) -> Any:
    return ReferenceGemms if backend is reference else TritonGemms


# Per chunk: y (rows, N) and the row slice → ∂C/∂y for those rows (or None: no gradient wanted).
Head = Callable[[Tensor, slice], Tensor | None]


def run_chunks(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_size: int,
    gemms: Any,
    head: Head,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop shared by both heads: y = x_c Wᵀ + b, G = head(y), then G's three GEMMs.

    Returns (grad_x, grad_weight, grad_bias) for the gradients in `needs`; the weight and bias
    gradients are summed over chunks in the compute dtype and rounded once.
    """
    if gemms is ReferenceGemms and not torch.is_grad_enabled():
        return run_chunks_inplace(x, weight, bias, chunk_size, head, needs)
    need_x, need_weight, need_bias = needs
    M, K = x.shape
    N = weight.shape[0]
    acc_dtype = compute_dtype(x.dtype)
    grad_x = x.new_empty((M, K)) if need_x else None
    acc_w = weight.new_zeros((N, K), dtype=acc_dtype) if need_weight else None
    acc_b = weight.new_zeros((N,), dtype=acc_dtype) if need_bias else None
    # In place into the float32/float64 accumulators (the reference GEMMs; not under a graph).
    accumulate = getattr(gemms, "accumulate", None) if not torch.is_grad_enabled() else None
    for start in range(0, M, chunk_size):
        rows = slice(start, min(start + chunk_size, M))
        x_c = x[rows]
        grad = head(gemms.forward(x_c, weight, bias), rows)
        if grad is None:
            continue
        if grad_x is not None:
            gemms.grad_input(grad, weight, grad_x[rows])
        if (need_weight or need_bias) and accumulate is not None:
            accumulate(grad, x_c, acc_w, acc_b)
        elif need_weight or need_bias:
            g_w, g_b = gemms.grad_weight(grad, x_c, need_weight, need_bias)
            if acc_w is not None:
                acc_w += g_w
            if acc_b is not None:
                acc_b += g_b
        del grad  # the chunk's (rows × N) buffer is free before the next one is allocated
    grad_weight = acc_w.to(weight.dtype) if acc_w is not None else None
    grad_bias = acc_b.to(weight.dtype) if acc_b is not None else None
    return grad_x, grad_weight, grad_bias


def scaled_all(grads: tuple[Tensor, ...], needs: tuple[bool, ...], g: Tensor) -> list:
    """The precomputed gradients that were wanted, times the incoming scalar ∂C/∂loss."""
    out: list[Tensor | None] = []
    for grad, need in zip(grads, needs, strict=True):
        cdt = compute_dtype(grad.dtype)
        out.append((grad.to(cdt) * g.to(cdt)).to(grad.dtype) if need else None)
    return out


def scaled_or_same(grads: tuple[Tensor, ...], needs: tuple[bool, ...], g: Tensor) -> list:
    """`scaled_all`, but for ∂C/∂loss = 1 on CPU (`loss.backward()`) the precomputed gradients
    themselves: no gradient-sized copy at the step's peak. Eager Functions only.

    Safe to hand out: with retain_graph=False the engine frees this node's saved tensors before
    the gradients reach AccumulateGrad, which then keeps them as .grad; with the graph retained
    they are still saved, so AccumulateGrad (or an in-place accumulation) copies them instead.
    """
    if g.device.type == "cpu" and g.numel() == 1 and bool(g == 1):
        return [grad if need else None for grad, need in zip(grads, needs, strict=True)]
    return scaled_all(grads, needs, g)


def or_placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def save_head(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
               reduction: str, grads: list[Tensor], also: tuple[Tensor, ...] = ()) -> None:
    """What both heads keep: the chunked gradients for mean/sum (backward only scales them), and
    the inputs by reference — for "none" (backward reruns the chunks with per-row weights) and
    for a differentiable backward (create_graph), which recomputes from them. `also`: further
    non-differentiable outputs (the cross-entropy head's log-sum-exp)."""
    ctx.mark_non_differentiable(*grads, *also)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    kept = grads if reduction != "none" else []
    ctx.save_for_backward(*kept, x, weight, bias, target)
    ctx.save_for_forward(x, weight, bias, target)  # jvp
    ctx.n_grads = len(kept)


def split_saved(ctx: Any) -> tuple[tuple, tuple]:
    """(precomputed gradients, inputs) of what `save_head` kept (the ops' HeadCtx: inputs only)."""
    saved, n = ctx.saved_tensors, getattr(ctx, "n_grads", 0)
    return saved[:n], saved[n:]


def head_backward(
    first_order: Callable[[Any, Tensor], tuple],
    differentiable: Callable[[Any, Tensor], tuple],
    ctx: Any,
    grad_loss: Tensor | None,
) -> tuple:
    """The heads' backward: the chunked one, or with grad mode on (create_graph) the equations
    in differentiable torch ops — the precomputed gradients are constants to autograd."""
    if grad_loss is None:
        return (None,) * len(ctx.needs_input_grad)
    with no_autocast(grad_loss.device.type):  # backward may run inside autocast
        if torch.is_grad_enabled():
            return differentiable(ctx, grad_loss)
        return first_order(ctx, grad_loss)


def no_graph_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    """The custom ops' stand-in for a differentiable backward: a clear error, never a constant."""
    refuse_create_graph("fused head")
    raise AssertionError("unreachable: head_backward calls this with grad mode on")


def grads_from(
    grad_y: Tensor, x: Tensor, weight: Tensor, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """G W, Gᵀ x and Σ G for G = ∂C/∂y (compute dtype) in torch ops: the differentiable backward."""
    need_x, need_weight, need_bias = needs
    grad_x = cast(grad_y @ up(weight), x.dtype) if need_x else None
    grad_weight = cast(grad_y.t() @ up(x), weight.dtype) if need_weight else None
    grad_bias = cast(grad_y.sum(0), weight.dtype) if need_bias else None
    return grad_x, grad_weight, grad_bias


def logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """y = x Wᵀ + b for all rows at once, in the compute dtype (differentiable)."""
    y = up(x) @ up(weight).t()
    return y if bias is None else y + up(bias)


# ------------------------------------------------------------------------------ for the custom ops


@dataclass
class HeadCtx:
    """The ctx fields the Functions' `_backward` reads ("none" path): the backward ops call it."""

    saved_tensors: tuple[Tensor | None, ...]
    needs: tuple[bool, ...]
    backend: ModuleType
    chunk_size: int
    ignore_index: int = -100
    reduction: str = "none"


def filled(grads: Any, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(or_placeholder(g, like) for g in grads)


def fake_grads(
    x: Tensor, weight: Tensor, target: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor, ...]:
    """Fakes of (grad_x, grad_weight, grad_bias[, grad_target]) as `run_chunks` allocates them."""
    wanted = [
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[:1]),
    ]
    if target is not None:
        wanted.append(torch.empty_like(target))
    return tuple(g if need else x.new_empty(0) for g, need in zip(wanted, needs, strict=True))


def only_wanted(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


def save_op_head(ctx: Any, inputs: tuple, reduction: str, grads: tuple, needs: tuple,
                 also: tuple = ()) -> None:
    """What the ops keep: the gradients forward precomputed, plus the inputs (by reference).

    The inputs only when backward must run the chunk loop for a gradient autograd wants that
    forward did not precompute: reduction "none", or an exported program run with other
    `requires_grad` than it was traced with (the need flags are baked into its graph).
    """
    precomputed = needs if reduction != "none" else (False,) * len(needs)
    wanted = ctx.needs_input_grad[: len(needs)]
    late = any(w and not p for w, p in zip(wanted, precomputed, strict=True))
    ctx.mark_non_differentiable(*grads, *also)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(*grads, *(inputs if late else ()))
    ctx.precomputed, ctx.reduction = precomputed, reduction


def op_grads(ctx: Any, grad_loss: Tensor, late_op: Callable[[Tensor, tuple], tuple]) -> list:
    """The gradients autograd wants: precomputed ones scaled, the others from `late_op`."""
    n = len(ctx.precomputed)
    wanted = ctx.needs_input_grad[:n]
    grads = scaled_all(ctx.saved_tensors[:n], ctx.precomputed, grad_loss)
    late = tuple(w and not p for w, p in zip(wanted, ctx.precomputed, strict=True))
    if any(late):
        late_grads = late_op(grad_loss, late)
        grads = [g if need else p for p, g, need in zip(grads, late_grads, late, strict=True)]
    return only_wanted(grads, wanted)


# ------------------------------------------------------------------------------ arguments


#: On CPU (the in-place loop of `manualbp.ops.chunked_inplace`) a chunk has this many rows per
#: intra-op thread, at most K (the hidden size) and at least this many, or the whole batch when
#: smaller. Fewer rows make the weight-gradient GEMM, whose inner dimension is the chunk's rows,
#: add into the (C × K) accumulator too often for its FLOPs (128 rows: 2-6 % slower, 64 rows:
#: slower than unfused, one thread); with two threads 256-row chunks ran at 0.87× unfused and
#: 512-row ones at 1.07× (2048 × 512 → 8192). At most K rows: the chunk's logits are then no
#: larger than the weight gradient, which keeps the step's peak under torch's
#: F.linear_cross_entropy, plain and chunked (experiments/results/heads_cpu.md).
CPU_CHUNK_ROWS = 256


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _pow2_at_least(n: int) -> int:
    return max(1, 1 << max(0, n - 1).bit_length())


def default_chunk_size(rows: int, in_features: int, classes: int, *, cpu: bool = False,
                       threads: int = 1) -> int:  # fmt: skip
    """Rows per chunk: on GPU so that a chunk's (rows × classes) logits are about the size of x;
    on CPU (`cpu=True`) :data:`CPU_CHUNK_ROWS` per thread (`threads`: the intra-op threads),
    at most the power of two ≤ K but never fewer than CPU_CHUNK_ROWS, and never more than the
    next power of two ≥ `rows` (one chunk for a small batch).

    GPU, Liger-Kernel's rule: chunk = next power of two ≥ M / ⌈C / K⌉. For a head with C ≤ K the
    whole batch is one chunk; for C = 32·K it is M/32 rows.
    """
    if cpu:
        per_threads = CPU_CHUNK_ROWS * _pow2_at_most(max(threads, 1))
        chunk = max(CPU_CHUNK_ROWS, min(per_threads, _pow2_at_most(max(in_features, 1))))
        return min(chunk, _pow2_at_least(rows))
    factor = max(1, math.ceil(classes / max(in_features, 1)))
    return _pow2_at_least(math.ceil(rows / factor))


def check_chunk(chunk_size: Any, rows: int, in_features: int, classes: int, *, cpu: bool = False) -> int:
    if chunk_size is None:
        # Read at call time; a traced graph bakes one thread's chunk in (Dynamo cannot trace
        # get_num_threads, and the chunk is an argument of the heads' custom ops).
        threads = torch.get_num_threads() if cpu and not torch.compiler.is_compiling() else 1
        return default_chunk_size(rows, in_features, classes, cpu=cpu, threads=threads)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size: expected a positive int or None, got {type(chunk_size).__name__} "
            f"{chunk_size!r}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size}")
    return chunk_size


def requested(*tensors: Tensor | None) -> tuple[bool, ...]:
    """Which of the tensors autograd will want a gradient for (read when the head is called)."""
    grad_on = torch.is_grad_enabled()
    return tuple(bool(grad_on and t is not None and t.requires_grad) for t in tensors)


def check_head(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str) -> None:
    check_reduction(reduction)
    check_linear_args(x, weight, bias)


def traced_backend(device: torch.device) -> str:
    """The backend in force, read at trace time; the heads have no `triton_op` form."""
    name = traced_backend_name(device)
    return "triton" if name == "triton_op" else name
