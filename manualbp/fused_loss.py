"""Fused output heads: the last linear layer and its loss, chunk by chunk over the rows.

`F.cross_entropy(F.linear(x, W, b), t)` materialises the (M × C) logits, keeps them for backward
and then allocates their (M × C) gradient — for a language-model head (C = 50k-250k classes) that
dwarfs every other activation. Here the rows are processed `chunk_size` at a time, and for each
chunk forward already computes everything backward needs (as Liger-Kernel's fused linear
cross-entropy does):

    z   = x_c Wᵀ + b                         (chunk × C), the only class-sized buffer
    ℓ_i = logsumexp(z_i) − z_i[t_i]          the seed's cost for one example
    G   = (softmax(z) − onehot(t)) · s_i     ∂C/∂z, written over z (s_i = 1/count for "mean")
    grad_x[c] = G W,   grad_W += Gᵀ x_c,   grad_b += Σ_rows G

so backward only multiplies the precomputed gradients by the incoming scalar ∂C/∂loss. Peak
extra memory is O(chunk × C) plus the gradients themselves (the sizes of x, W and b); no
(M × C) tensor is ever allocated or saved. With reduction="none" the row weights ∂C/∂ℓ_i are
unknown until backward, so forward keeps only its inputs and backward runs the same chunk loop
with them (one more pass of the forward GEMM).

`linear_mse_loss` is the same head for a regression output: G = 2 (y − t) · s.

Backends: the reference computes in torch ops (16-bit inputs in float32, rounded once at the end);
the Triton backend runs the layer GEMM kernels and, for cross-entropy, the softmax/loss/gradient
kernel of `manualbp.triton_kernels.cross_entropy`. On the Triton backend the logits and their
gradient are stored in the input dtype (as native F.linear would), and for 16-bit inputs each
chunk's weight gradient is rounded to the storage dtype before the float32 sum over chunks.

torch.compile / torch.export: eager calls run the autograd Functions below. While a graph is
captured (`torch.compiler.is_compiling()`) the heads call `torch.library` custom ops instead,
opaque to the tracer as the layer's ops of `manualbp.ops` are (no graph break, and an exported
program records them by name):

    manualbp::linear_cross_entropy_forward(x, weight, bias?, target, reduction, ignore_index,
        chunk_size, need_x, need_weight, need_bias, backend) -> (loss, grad_x, grad_weight, grad_bias)
    manualbp::linear_cross_entropy_backward(grad_loss, x, weight, bias?, target, ignore_index,
        chunk_size, need_x, need_weight, need_bias, backend) -> (grad_x, grad_weight, grad_bias)
    manualbp::linear_mse_forward(x, weight, bias?, target, reduction, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (loss, 4 gradients)
    manualbp::linear_mse_backward(grad_loss, x, weight, bias?, target, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (4 gradients)

They run the Functions' own forward/backward bodies. The forward op precomputes the gradients
named by its need flags (read from `requires_grad` at trace time); for "mean"/"sum" the compiled
backward only scales them (plain torch ops). The backward op runs the chunk loop again with
per-row weights ∂C/∂ℓ_i: for reduction "none", and for any gradient autograd wants that forward
did not precompute (an exported program run with other `requires_grad` than it was traced with —
only then are the inputs saved too). Unneeded gradients are (0,)-shaped placeholders (ops return
neither None nor aliases). The class-range check of the targets reads their values, so it runs
inside the forward op at run time. `backend` ("torch" or "triton") is the one in force at trace
time, baked into the graph as for `manualbp.ops`; the Triton backend runs inside the opaque op
(the heads have no `triton_op` form that Inductor could see into).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from manualbp import backends, ops
from manualbp._autograd import PositionalFunction
from manualbp.backends import reference
from manualbp.backends.reference import compute_dtype

__all__ = ["linear_cross_entropy", "linear_mse_loss", "default_chunk_size"]

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------ GEMMs per backend


class _ReferenceGemms:
    """The head's three GEMMs in torch ops, in the compute dtype (float32 for 16-bit storage)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        cdt = compute_dtype(x.dtype)
        z = x.to(cdt) @ weight.to(cdt).t()
        return z if bias is None else z + bias.to(cdt)

    @staticmethod
    def grad_input(grad: Tensor, weight: Tensor, out: Tensor) -> None:
        out.copy_(grad @ weight.to(grad.dtype))

    @staticmethod
    def grad_weight(
        grad: Tensor, x: Tensor, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        grad_weight = grad.t() @ x.to(grad.dtype) if need_weight else None
        grad_bias = grad.sum(0) if need_bias else None
        return grad_weight, grad_bias


class _TritonGemms:
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


def _gemms(backend: ModuleType) -> Any:
    return _ReferenceGemms if backend is reference else _TritonGemms


# Per chunk: y (rows, N) and the row slice → ∂C/∂y for those rows (or None: no gradient wanted).
Head = Callable[[Tensor, slice], Tensor | None]


def _run_chunks(
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
    need_x, need_weight, need_bias = needs
    M, K = x.shape
    N = weight.shape[0]
    acc_dtype = compute_dtype(x.dtype)
    grad_x = x.new_empty((M, K)) if need_x else None
    acc_w = weight.new_zeros((N, K), dtype=acc_dtype) if need_weight else None
    acc_b = weight.new_zeros((N,), dtype=acc_dtype) if need_bias else None
    for start in range(0, M, chunk_size):
        rows = slice(start, min(start + chunk_size, M))
        x_c = x[rows]
        grad = head(gemms.forward(x_c, weight, bias), rows)
        if grad is None:
            continue
        if grad_x is not None:
            gemms.grad_input(grad, weight, grad_x[rows])
        if need_weight or need_bias:
            g_w, g_b = gemms.grad_weight(grad, x_c, need_weight, need_bias)
            if acc_w is not None:
                acc_w += g_w
            if acc_b is not None:
                acc_b += g_b
        del grad  # the chunk's (rows × N) buffer is free before the next one is allocated
    grad_weight = acc_w.to(weight.dtype) if acc_w is not None else None
    grad_bias = acc_b.to(weight.dtype) if acc_b is not None else None
    return grad_x, grad_weight, grad_bias


def _scaled_all(grads: tuple[Tensor, ...], needs: tuple[bool, ...], g: Tensor) -> list:
    """The precomputed gradients that were wanted, times the incoming scalar ∂C/∂loss."""
    out: list[Tensor | None] = []
    for grad, need in zip(grads, needs, strict=True):
        cdt = compute_dtype(grad.dtype)
        out.append((grad.to(cdt) * g.to(cdt)).to(grad.dtype) if need else None)
    return out


def _placeholder(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# ------------------------------------------------------------------------------ cross-entropy


def _ce_reference(
    z: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss and (softmax − onehot)·scale of a chunk, in torch ops.

    `z` is the chunk's own logits buffer (compute dtype): the gradient is formed in it, in place,
    so the chunk needs no second (rows × C) buffer.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)  # a row of only −inf gives −inf, and a NaN loss, as native
    loss = torch.where(valid, lse - z.gather(1, safe_target).squeeze(1), torch.zeros_like(lse))
    if scale is None:
        return loss, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()  # softmax
    grad.scatter_add_(1, safe_target, -torch.ones_like(lse).unsqueeze(1))
    grad.mul_(scale.to(z.dtype).unsqueeze(1))
    # Ignored rows get exactly 0 — a select, so a NaN/Inf row or scale cannot leak into them.
    return loss, grad.masked_fill_(~valid.unsqueeze(1), 0)


def _ce_triton(
    z: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    from manualbp.triton_kernels.cross_entropy import cross_entropy_rows

    scale32 = None if scale is None else scale.float().contiguous()
    loss, _ = cross_entropy_rows(z, target, scale32, ignore_index)  # gradient written over z
    return loss, (None if scale is None else z)


def _ce_head(
    backend: ModuleType,
    target: Tensor,
    ignore_index: int,
    losses: Tensor,
    row_scale: Tensor | None,
) -> Head:
    """Head closure: writes each chunk's per-row losses into `losses`, returns its ∂C/∂z."""
    rows_fn = _ce_reference if backend is reference else _ce_triton

    def head(z: Tensor, rows: slice) -> Tensor | None:
        scale = None if row_scale is None else row_scale[rows]
        loss, grad = rows_fn(z, target[rows], ignore_index, scale)
        losses[rows] = loss
        return grad

    return head


def _save_head(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
               reduction: str, grads: list[Tensor]) -> None:
    """What both heads keep: the chunked gradients for mean/sum (backward only scales them), or
    the inputs by reference for "none" (backward reruns the chunks with per-row weights)."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, target)  # inputs: held by reference
    else:
        ctx.save_for_backward(*grads)


def _head_backward(backward: Callable[[Any, Tensor], tuple], ctx: Any, grad_loss: Tensor | None) -> tuple:
    if grad_loss is None:
        return (None,) * len(ctx.needs_input_grad)
    with ops.no_autocast(grad_loss.device.type):  # backward may run inside autocast
        return backward(ctx, grad_loss)


class LinearCrossEntropyFunction(PositionalFunction):
    """C = reduce_i [logsumexp(x_i Wᵀ + b) − (x_i Wᵀ + b)[t_i]], gradients precomputed per chunk.

    Inputs are flattened: x (M, K), target (M,). Outputs: the loss and the three precomputed
    gradients (non-differentiable; empty when not wanted or when reduction="none").
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        reduction: str,
        ignore_index: int,
        chunk_size: int,
        needs: tuple[bool, bool, bool],
        backend: ModuleType,
    ) -> tuple[Tensor, ...]:
        cdt = compute_dtype(x.dtype)
        valid = target != ignore_index
        count = valid.sum()
        losses = x.new_empty(x.shape[0], dtype=cdt)
        precompute = reduction != "none" and any(needs)
        row_scale = None
        if precompute:
            ones = torch.ones_like(losses)
            row_scale = ones / count if reduction == "mean" else ones  # 1/0 only on ignored rows
        head = _ce_head(backend, target, ignore_index, losses, row_scale)
        grads = _run_chunks(
            x, weight, bias, chunk_size, _gemms(backend), head, needs if precompute else (False,) * 3
        )
        if reduction == "none":
            loss = losses
        elif reduction == "sum":
            loss = losses.sum()
        else:
            loss = losses.sum() / count  # 0/0 = NaN when every row is ignored, as native
        return (loss.to(x.dtype), *(_placeholder(g, x) for g in grads))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, target, reduction, ignore_index, chunk_size, needs, backend = inputs
        _, *grads = output
        _save_head(ctx, x, weight, bias, target, reduction, grads)
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        ctx.needs, ctx.backend = needs, backend

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor) -> tuple:
        return _head_backward(LinearCrossEntropyFunction._backward, ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple:
        if ctx.reduction != "none":
            grad_x, grad_weight, grad_bias = _scaled_all(ctx.saved_tensors, ctx.needs, grad_loss)
        else:
            x, weight, bias, target = ctx.saved_tensors
            losses = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
            head = _ce_head(ctx.backend, target, ctx.ignore_index, losses, grad_loss)
            grad_x, grad_weight, grad_bias = _run_chunks(
                x, weight, bias, ctx.chunk_size, _gemms(ctx.backend), head, ctx.needs
            )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


# ------------------------------------------------------------------------------ squared error


def _mse_head(
    target: Tensor, losses: Tensor, scale: Tensor | float | None, grad_target: Tensor | None
) -> Head:
    """Head closure: per-element (y − t)² into `losses`, ∂C/∂y = 2 (y − t) · scale returned.

    `scale` is a number ("mean"/"sum") or the (M, N) ∂C/∂loss of reduction "none"; `grad_target`
    (−∂C/∂y) is filled when the target requires grad.
    """

    def head(y: Tensor, rows: slice) -> Tensor | None:
        cdt = compute_dtype(y.dtype)
        diff = y.to(cdt) - target[rows].to(cdt)
        losses[rows] = diff * diff
        if scale is None:
            return None
        s = scale if isinstance(scale, float) else scale[rows].to(cdt)
        grad = 2 * diff * s
        if grad_target is not None:
            grad_target[rows] = -grad
        return grad.to(y.dtype)

    return head


class LinearMSEFunction(PositionalFunction):
    """C = reduce (x Wᵀ + b − t)², chunk by chunk; gradients precomputed for "mean"/"sum"."""

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        reduction: str,
        chunk_size: int,
        needs: tuple[bool, bool, bool, bool],
        backend: ModuleType,
    ) -> tuple[Tensor, ...]:
        cdt = compute_dtype(x.dtype)
        losses = target.new_empty(target.shape, dtype=cdt)
        precompute = reduction != "none" and any(needs)
        scale = None
        if precompute:
            # (No rows: nothing is scaled, and "mean" below is 0/0 = NaN, as native.)
            scale = 1.0 / max(target.numel(), 1) if reduction == "mean" else 1.0
        grad_target = torch.empty_like(target) if precompute and needs[3] else None
        head = _mse_head(target, losses, scale, grad_target)
        param_needs = needs[:3] if precompute else (False,) * 3
        grads = _run_chunks(x, weight, bias, chunk_size, _gemms(backend), head, param_needs)
        if reduction == "none":
            loss = losses
        else:
            loss = losses.sum() / target.numel() if reduction == "mean" else losses.sum()
        return (loss.to(x.dtype), *(_placeholder(g, x) for g in (*grads, grad_target)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, target, reduction, chunk_size, needs, backend = inputs
        _, *grads = output
        _save_head(ctx, x, weight, bias, target, reduction, grads)
        ctx.reduction, ctx.chunk_size, ctx.needs, ctx.backend = reduction, chunk_size, needs, backend

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor) -> tuple:
        return _head_backward(LinearMSEFunction._backward, ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple:
        if ctx.reduction != "none":
            grads = _scaled_all(ctx.saved_tensors, ctx.needs, grad_loss)
        else:
            x, weight, bias, target = ctx.saved_tensors
            losses = torch.empty_like(target, dtype=compute_dtype(x.dtype))
            grad_target = torch.empty_like(target) if ctx.needs[3] else None
            head = _mse_head(target, losses, grad_loss, grad_target)
            grads = [
                *_run_chunks(x, weight, bias, ctx.chunk_size, _gemms(ctx.backend), head, ctx.needs[:3]),
                grad_target,
            ]
        return (*grads, None, None, None, None)


# ------------------------------------------------------------------------------ custom ops

# While a graph is captured the heads run as these ops (see the module docstring): opaque to the
# tracer, they run the Functions' own forward and backward bodies. Unneeded gradients are (0,)
# placeholders (ops return neither None nor aliases); `backend` is "torch" or "triton".


@dataclass
class _HeadCtx:
    """The ctx fields the Functions' `_backward` reads ("none" path): the backward ops call it."""

    saved_tensors: tuple[Tensor | None, ...]
    needs: tuple[bool, ...]
    backend: ModuleType
    chunk_size: int
    ignore_index: int = -100
    reduction: str = "none"


def _filled(grads: Any, like: Tensor) -> tuple[Tensor, ...]:
    return tuple(_placeholder(g, like) for g in grads)


def _fake_grads(
    x: Tensor, weight: Tensor, target: Tensor | None, needs: tuple[bool, ...]
) -> tuple[Tensor, ...]:
    """Fakes of (grad_x, grad_weight, grad_bias[, grad_target]) as `_run_chunks` allocates them."""
    wanted = [
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[:1]),
    ]
    if target is not None:
        wanted.append(torch.empty_like(target))
    return tuple(g if need else x.new_empty(0) for g, need in zip(wanted, needs, strict=True))


def _wanted(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


@torch.library.custom_op(f"{ops._NS}::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_weight, grad_bias) of `LinearCrossEntropyFunction.forward`."""
    # The range check reads target values, which a tracer cannot: it runs here, at run time.
    ops.check_class_range(target, weight.shape[0], ignore_index)
    needs = (need_x, need_weight, need_bias)
    module = ops._backend_module(backend)
    with ops.no_autocast(x.device.type):
        return LinearCrossEntropyFunction.forward(  # type: ignore[return-value]
            x, weight, bias, target, reduction, ignore_index, chunk_size, needs, module
        )


@torch.library.custom_op(f"{ops._NS}::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) for row weights ∂C/∂ℓ_i = grad_loss[i] (shape (M,)).

    The chunk loop of reduction "none"; also what the autograd formula calls (with the weights of
    "mean"/"sum") for a gradient that forward did not precompute.
    """
    needs = (need_x, need_weight, need_bias)
    ctx = _HeadCtx((x, weight, bias, target), needs, ops._backend_module(backend), chunk_size,
                   ignore_index)  # fmt: skip
    with ops.no_autocast(x.device.type):
        grads = LinearCrossEntropyFunction._backward(ctx, grad_loss)[:3]
    return _filled(grads, x)  # type: ignore[return-value]


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    none = reduction == "none"
    loss = x.new_empty(x.shape[:1] if none else ())
    needs = (False,) * 3 if none else (need_x, need_weight, need_bias)
    return (loss, *_fake_grads(x, weight, None, needs))  # type: ignore[return-value]


@linear_cross_entropy_backward.register_fake
def _linear_cross_entropy_backward_fake(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _fake_grads(x, weight, None, (need_x, need_weight, need_bias))  # type: ignore[return-value]


def _save_op_head(ctx: Any, inputs: tuple, reduction: str, grads: tuple, needs: tuple) -> None:
    """What the ops keep: the gradients forward precomputed, plus the inputs (by reference).

    The inputs only when backward must run the chunk loop for a gradient autograd wants that
    forward did not precompute: reduction "none", or an exported program run with other
    `requires_grad` than it was traced with (the need flags are baked into its graph).
    """
    precomputed = needs if reduction != "none" else (False,) * len(needs)
    wanted = ctx.needs_input_grad[: len(needs)]
    late = any(w and not p for w, p in zip(wanted, precomputed, strict=True))
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(*grads, *(inputs if late else ()))
    ctx.precomputed, ctx.reduction = precomputed, reduction


def _op_grads(ctx: Any, grad_loss: Tensor, late_op: Callable[[Tensor, tuple], tuple]) -> list:
    """The gradients autograd wants: precomputed ones scaled, the others from `late_op`."""
    n = len(ctx.precomputed)
    wanted = ctx.needs_input_grad[:n]
    grads = _scaled_all(ctx.saved_tensors[:n], ctx.precomputed, grad_loss)
    late = tuple(w and not p for w, p in zip(wanted, ctx.precomputed, strict=True))
    if any(late):
        late_grads = late_op(grad_loss, late)
        grads = [g if need else p for p, g, need in zip(grads, late_grads, late, strict=True)]
    return _wanted(grads, wanted)


def _ce_op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, target, reduction, ignore_index, chunk_size, *needs, backend = inputs
    _save_op_head(ctx, (x, weight, bias, target), reduction, output[1:], tuple(needs))
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend


def _ce_op_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    def late_op(grad_loss: Tensor, late: tuple) -> tuple:
        x, weight, bias, target = ctx.saved_tensors[3:]
        row_grad = grad_loss.to(compute_dtype(x.dtype))  # ∂C/∂ℓ_i per row
        if ctx.reduction == "mean":
            row_grad = row_grad / (target != ctx.ignore_index).sum()
        return linear_cross_entropy_backward(
            row_grad.expand(target.shape), x, weight, bias, target, ctx.ignore_index,
            ctx.chunk_size, *late, ctx.backend,
        )  # fmt: skip

    return (*_op_grads(ctx, grad_loss, late_op), *(None,) * 8)


linear_cross_entropy_forward.register_autograd(
    lambda ctx, grad_loss, *_: _head_backward(_ce_op_backward, ctx, grad_loss),
    setup_context=_ce_op_setup_context,
)


@torch.library.custom_op(f"{ops._NS}::linear_mse_forward", mutates_args=())
def linear_mse_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_target: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_weight, grad_bias, grad_target) of `LinearMSEFunction.forward`."""
    needs = (need_x, need_weight, need_bias, need_target)
    module = ops._backend_module(backend)
    with ops.no_autocast(x.device.type):
        return LinearMSEFunction.forward(  # type: ignore[return-value]
            x, weight, bias, target, reduction, chunk_size, needs, module
        )


@torch.library.custom_op(f"{ops._NS}::linear_mse_backward", mutates_args=())
def linear_mse_backward(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_target: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_target) for element weights grad_loss (M, N)."""
    needs = (need_x, need_weight, need_bias, need_target)
    ctx = _HeadCtx((x, weight, bias, target), needs, ops._backend_module(backend), chunk_size)
    with ops.no_autocast(x.device.type):
        grads = LinearMSEFunction._backward(ctx, grad_loss)[:4]
    return _filled(grads, x)  # type: ignore[return-value]


@linear_mse_forward.register_fake
def _linear_mse_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_target: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    none = reduction == "none"
    loss = x.new_empty(target.shape if none else ())
    needs = (False,) * 4 if none else (need_x, need_weight, need_bias, need_target)
    return (loss, *_fake_grads(x, weight, target, needs))  # type: ignore[return-value]


@linear_mse_backward.register_fake
def _linear_mse_backward_fake(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    need_target: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_x, need_weight, need_bias, need_target)
    return _fake_grads(x, weight, target, needs)  # type: ignore[return-value]


def _mse_op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, target, reduction, chunk_size, *needs, backend = inputs
    _save_op_head(ctx, (x, weight, bias, target), reduction, output[1:], tuple(needs))
    ctx.chunk_size, ctx.backend = chunk_size, backend


def _mse_op_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    def late_op(grad_loss: Tensor, late: tuple) -> tuple:
        x, weight, bias, target = ctx.saved_tensors[4:]
        elem_grad = grad_loss.to(compute_dtype(x.dtype))  # ∂C/∂ℓ per element
        if ctx.reduction == "mean":
            elem_grad = elem_grad / target.numel()
        return linear_mse_backward(
            elem_grad.expand(target.shape), x, weight, bias, target, ctx.chunk_size, *late, ctx.backend
        )

    return (*_op_grads(ctx, grad_loss, late_op), *(None,) * 7)


linear_mse_forward.register_autograd(
    lambda ctx, grad_loss, *_: _head_backward(_mse_op_backward, ctx, grad_loss),
    setup_context=_mse_op_setup_context,
)


def _traced_backend(device: torch.device) -> str:
    """The backend in force, read at trace time; the heads have no `triton_op` form."""
    name = ops.traced_backend_name(device)
    return "triton" if name == "triton_op" else name


# ------------------------------------------------------------------------------ public API


def default_chunk_size(rows: int, in_features: int, classes: int) -> int:
    """Rows per chunk so that a chunk's (rows × classes) logits are about the size of x.

    Liger-Kernel's rule: chunk = next power of two ≥ M / ⌈C / K⌉. For a head with C ≤ K the whole
    batch is one chunk; for C = 32·K it is M/32 rows.
    """
    factor = max(1, math.ceil(classes / max(in_features, 1)))
    return max(1, 1 << max(0, math.ceil(rows / factor) - 1).bit_length())


def _check_chunk(chunk_size: Any, rows: int, in_features: int, classes: int) -> int:
    if chunk_size is None:
        return default_chunk_size(rows, in_features, classes)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size: expected a positive int or None, got {type(chunk_size).__name__} "
            f"{chunk_size!r}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size}")
    return chunk_size


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _needs(*tensors: Tensor | None) -> tuple[bool, ...]:
    grad_on = torch.is_grad_enabled()
    return tuple(bool(grad_on and t is not None and t.requires_grad) for t in tensors)


def _check_head(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str) -> None:
    # Lazy: manualbp.functional re-exports this module's functions (no import cycle at load).
    from manualbp import functional as MF

    MF._check_reduction(reduction)
    MF._check_linear_args(x, weight, bias)


def _check_class_target(target: Any, x: Tensor, ignore_index: int) -> Tensor:
    """The checks of `manualbp.functional.cross_entropy`, for targets of shape x.shape[:-1].

    All but the class range, which reads values: the caller (eager) or the op (compiled) runs it.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target: expected integer class indices (e.g. torch.long), got dtype {target.dtype}; "
            "class-probability targets are not supported"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    expected = tuple(x.shape[:-1])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not fit input of shape {tuple(x.shape)}; "
            f"expected {expected} (one class index per row of input)"
        )
    if target.device != x.device:
        raise RuntimeError(
            f"target: on device {target.device} but input is on {x.device}; "
            "expected all tensors on the same device"
        )
    return target


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """`F.cross_entropy(F.linear(x, weight, bias), target, ...)` without the (M × C) logits.

    `x` is (..., in_features), `weight` (classes, in_features), `target` holds one class index
    per row of `x` (shape x.shape[:-1]). Rows whose target is `ignore_index` contribute neither
    loss nor gradient; "mean" divides by the number of the other rows. `chunk_size` rows are
    processed at a time (default: `default_chunk_size`), so peak extra memory is
    O(chunk_size × classes). Gradients are computed in forward; backward scales them.

    Under `torch.autocast` the GEMMs run in the autocast dtype and the loss is float32, as
    `F.cross_entropy(F.linear(...))` gives there.
    """
    from manualbp import functional as MF

    MF._check_tensor("input", x)
    autocast_on = _autocast_on(x.device.type)
    x, weight, bias = ops.autocast_to(x.device.type, None, x, weight, bias)
    _check_head(x, weight, bias, reduction)
    _check_class_target(target, x, ignore_index)
    rows = x.reshape(-1, x.shape[-1])
    chunk = _check_chunk(chunk_size, rows.shape[0], weight.shape[1], weight.shape[0])
    args = (rows, weight, bias, target.reshape(-1), reduction, int(ignore_index), chunk)
    needs = _needs(x, weight, bias)
    with ops.no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            loss, *_ = linear_cross_entropy_forward(*args, *needs, _traced_backend(x.device))
        else:
            ops.check_class_range(target, weight.shape[0], ignore_index)
            loss, *_ = LinearCrossEntropyFunction.apply(*args, needs, backends.resolve(x.device))
        if autocast_on:
            loss = loss.float()
    return loss.view(target.shape) if reduction == "none" else loss


def linear_mse_loss(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """`F.mse_loss(F.linear(x, weight, bias), target, reduction)`, chunk by chunk over the rows.

    `target` has the output's shape (..., out_features), no broadcasting. "mean" divides by the
    number of elements. The output y = x Wᵀ + b is never kept for backward: gradients for x, W,
    b (and the target, if it requires grad) are computed in forward and scaled in backward.
    It runs in the dtype of its arguments, also inside `torch.autocast` (not cast there).
    """
    _check_head(x, weight, bias, reduction)
    from manualbp import functional as MF

    MF._check_tensor("target", target)
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not match the output shape {expected}; "
            "expected the same shape (no broadcasting)"
        )
    MF._check_same("target", target, "input", x)
    rows = x.reshape(-1, x.shape[-1])
    chunk = _check_chunk(chunk_size, rows.shape[0], weight.shape[1], weight.shape[0])
    args = (rows, weight, bias, target.reshape(-1, weight.shape[0]), reduction, chunk)
    needs = _needs(x, weight, bias, target)
    with ops.no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            loss, *_ = linear_mse_forward(*args, *needs, _traced_backend(x.device))
        else:
            loss, *_ = LinearMSEFunction.apply(*args, needs, backends.resolve(x.device))
    return loss.view(target.shape) if reduction == "none" else loss
