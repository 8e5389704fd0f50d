"""The losses — squared error (`mse_loss`, the seed's `half_mse_loss`) and `cross_entropy` — each
with its checks, its eager autograd Function, its custom ops for compile/export and its entry point.

Eager calls run the Functions; while a graph is captured (`torch.compiler.is_compiling()`) the
entry points call the custom ops instead, whose bodies are the Functions' own forward and
backward (see :mod:`manualbp.ops.linear_act` for why the two paths are kept side by side):

    manualbp::squared_error_forward(input, target, reduction, scale, per_example) -> loss
    manualbp::squared_error_backward(grad_loss, input, target, reduction, scale, per_example,
                                     need_input, need_target) -> (grad_input, grad_target)
    manualbp::cross_entropy_forward(logits, target, reduction, ignore_index) -> (loss, lse, count)
    manualbp::cross_entropy_backward(grad_loss, logits, target, lse, count, reduction,
                                     ignore_index) -> grad_logits

The class-range check of cross-entropy targets reads their values, which a tracer cannot: the
eager entry point runs it before the Function, and the forward op runs it inside, at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from manualbp._autograd import PositionalFunction
from manualbp.backends.reference import cast, compute_dtype, up
from manualbp.ops._common import (
    NS,
    autocast_to,
    check_class_range,
    check_ignore_index,
    check_reduction,
    check_same,
    check_tensor,
    no_autocast,
    placeholder,
    refuse_create_graph,
)
from manualbp.ops.losses_fast import fast_cross_entropy, fast_mse_loss

__all__ = [
    "CrossEntropyFunction",
    "SquaredErrorFunction",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "cross_entropy_op",
    "half_mse_loss",
    "mse_loss",
    "squared_error_backward",
    "squared_error_forward",
    "squared_error_op",
]


# ------------------------------------------------------------------------------ squared error


def _check_pair(input: Tensor, target: Tensor) -> None:
    check_tensor("input", input)
    check_tensor("target", target)
    if target.shape != input.shape:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}; "
            "expected the same shape (no broadcasting)"
        )
    check_same("target", target, "input", input)


def _reduce(per_item: Tensor, reduction: str, count: int | Tensor) -> Tensor:
    if reduction == "none":
        return per_item
    total = per_item.sum()
    return total / count if reduction == "mean" else total


def _reduce_items(items: Tensor, input: Tensor, reduction: str, per_example: bool) -> Tensor:
    """Per-element terms → the loss: per-example sums first when asked, then the reduction."""
    if per_example and input.dim() > 1:
        items = items.flatten(1).sum(1)
    return cast(_reduce(items, reduction, _count(input, per_example)), input.dtype)


def _count(input: Tensor, per_example: bool) -> int:
    """What "mean" divides by: examples (first dimension) or elements. 0 gives NaN, as native."""
    return input.shape[0] if per_example and input.dim() > 0 else input.numel()


class SquaredErrorFunction(PositionalFunction):
    """C = scale · Σ (y − t)² reduced; ∂C/∂y = 2·scale·(y − t) · ∂(reduction), ∂C/∂t = −∂C/∂y.

    `per_example` sums over all but the first dimension before a "none" reduction, and "mean"
    then divides by the number of examples instead of the number of elements (the seed's E).

    Backward is torch ops on the saved inputs, so it is differentiable as it stands; forward
    mode: Ċ = reduce(2·scale·(y − t)(ẏ − ṫ)); vmap is generated.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
    ) -> Tensor:
        diff = up(input) - up(target)
        return _reduce_items(scale * diff * diff, input, reduction, per_example)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, target, reduction, scale, per_example = inputs
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)
        ctx.reduction, ctx.scale, ctx.per_example = reduction, scale, per_example

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor | None, target_t: Tensor | None, *_: Any) -> Tensor:
        input, target = ctx.saved_tensors
        diff = up(input) - up(target)
        diff_t = torch.zeros_like(diff)
        if input_t is not None:
            diff_t = diff_t + up(input_t)
        if target_t is not None:
            diff_t = diff_t - up(target_t)
        return _reduce_items(2 * ctx.scale * diff * diff_t, input, ctx.reduction, ctx.per_example)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        input, target = ctx.saved_tensors
        cdt = compute_dtype(input.dtype)
        diff = cast(input, cdt) - cast(target, cdt)
        grad = 2 * ctx.scale * diff
        g = cast(grad_loss, cdt)
        if ctx.reduction == "none":
            if ctx.per_example and input.dim() > 1:
                g = g.view(-1, *([1] * (input.dim() - 1)))
            grad = grad * g
        else:
            count = _count(input, ctx.per_example)
            grad = grad * (g / count if ctx.reduction == "mean" else g)
        grad_input = cast(grad, input.dtype) if ctx.needs_input_grad[0] else None
        grad_target = cast(-grad, target.dtype) if ctx.needs_input_grad[1] else None
        return grad_input, grad_target, None, None, None


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared error, as `torch.nn.functional.mse_loss` (same reductions, no broadcasting)."""
    fast_loss = fast_mse_loss(input, target, reduction)  # a plain CPU call: ATen's kernels
    if fast_loss is not None:
        return fast_loss
    return _squared_error(input, target, reduction, 1.0, False)


def half_mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The seed's error E = 1/(2n) Σₓ ‖y(x) − y′(x)‖², n = number of examples (first dimension).

    Its gradient is simply (y − y′)/n — the ½ cancels the square's 2. "sum" gives ½ Σ‖·‖² and
    "none" the per-example ½‖y − y′‖², shape (n,).
    """
    return _squared_error(input, target, reduction, 0.5, True)


def _squared_error(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    check_reduction(reduction)
    if isinstance(input, Tensor) and isinstance(target, Tensor):
        # Autocast runs the losses in float32 (torch's "fp32" op list).
        input, target = autocast_to(input.device.type, torch.float32, input, target)
    _check_pair(input, target)
    if torch.compiler.is_compiling():
        return squared_error_op(input, target, reduction, scale, per_example)
    return SquaredErrorFunction.apply(input, target, reduction, scale, per_example)


# ------------------------------------------------------------------------------ cross-entropy


class CrossEntropyFunction(PositionalFunction):
    """Softmax + log-loss fused: C_i = logsumexp(z_i) − z_i[t_i], ∂C_i/∂z_i = softmax(z_i) − onehot(t_i).

    The max trick keeps logsumexp finite: with m = max z_i, log_norm = log Σ exp(z_i − m) and
    log softmax(z_i) = (z_i − m) − log_norm. Forward saves log_norm (one float per row) instead of
    an (M × classes) tensor; backward recomputes m (an exact max) and the softmax from the logits.
    Keeping log_norm apart from m, rather than saving their sum, keeps the gradient as accurate
    as native autograd's in float32: the sum would round away low bits of log_norm.

    A backward with grad mode on (create_graph) recomputes log_norm from the logits, so the
    softmax it returns is differentiable (the saved one is a constant to autograd). Forward mode:
    Ċ_i = Σ_c softmax(z_i)_c ż_ic − ż_i[t_i], reduced; vmap is generated.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, target: Tensor, reduction: str, ignore_index: int) -> tuple:
        z = cast(logits, compute_dtype(logits.dtype))
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        shifted = z - z.amax(dim=1, keepdim=True)  # all -inf rows give NaN, exactly as native
        log_norm = shifted.exp().sum(1).log()
        picked = shifted.gather(1, safe_target.unsqueeze(1)).squeeze(1)
        losses = torch.where(valid, log_norm - picked, torch.zeros_like(log_norm))
        count = valid.sum()
        loss = _reduce(losses, reduction, count)  # mean: 0/0 = NaN if every row is ignored, as native
        return cast(loss, logits.dtype), log_norm, count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, target, reduction, ignore_index = inputs
        _, log_norm, count = output
        ctx.save_for_backward(logits, target, log_norm, count)
        ctx.save_for_forward(logits, target, log_norm, count)
        ctx.mark_non_differentiable(log_norm, count)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _g_log_norm: Tensor, _g_count: Tensor) -> tuple:
        logits, target, log_norm, count = ctx.saved_tensors
        z = cast(logits, log_norm.dtype)
        valid = target != ctx.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
        # m only shifts: the softmax does not depend on it, so it is a constant to autograd.
        shifted = z - z.amax(dim=1, keepdim=True).detach()
        differentiable = torch.is_grad_enabled()
        if differentiable:
            log_norm = shifted.exp().sum(1).log()
        grad = (shifted - log_norm.unsqueeze(1)).exp()  # softmax = exp(log softmax)
        minus_one = -torch.ones_like(log_norm).unsqueeze(1)
        if differentiable:  # out of place: exp's backward needs its own output unchanged
            grad = grad.scatter_add(1, safe_target, minus_one)
        else:
            grad.scatter_add_(1, safe_target, minus_one)
        g = cast(grad_loss, log_norm.dtype)
        if ctx.reduction == "mean":
            g = g / count
        row_scale = torch.where(valid, g, torch.zeros_like(log_norm))  # ignored rows get exactly 0
        grad = grad * row_scale.unsqueeze(1)
        return cast(grad, logits.dtype), None, None, None

    @staticmethod
    def jvp(ctx: Any, logits_t: Tensor | None, *_: Any) -> tuple:
        logits, target, log_norm, count = ctx.saved_tensors
        z, z_t = cast(logits, log_norm.dtype), cast(logits_t, log_norm.dtype)  # type: ignore[arg-type]
        valid = target != ctx.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
        softmax = (z - z.amax(dim=1, keepdim=True) - log_norm.unsqueeze(1)).exp()
        losses_t = (softmax * z_t).sum(1) - z_t.gather(1, safe_target).squeeze(1)
        losses_t = torch.where(valid, losses_t, torch.zeros_like(losses_t))
        return cast(_reduce(losses_t, ctx.reduction, count), logits.dtype), None, None


def cross_entropy(
    logits: Tensor, target: Tensor, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy of class-index targets, as `torch.nn.functional.cross_entropy`.

    `logits` is (N, C), (C,) or (N, C, d1, ...); `target` holds class indices of shape (N,),
    () or (N, d1, ...). Rows whose target equals `ignore_index` contribute neither loss nor
    gradient, and "mean" divides by the number of the other rows.
    """
    check_reduction(reduction)
    check_tensor("input", logits)
    check_tensor("target", target, floating=False)
    (logits,) = autocast_to(logits.device.type, torch.float32, logits)  # fp32, as native
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target: expected integer class indices (e.g. torch.long), got dtype {target.dtype}; "
            "class-probability targets are not supported"
        )
    if logits.dim() == 0:
        raise ValueError("input: expected logits of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else torch.Size()
    if tuple(target.shape) != tuple(expected):
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not fit logits of shape {tuple(logits.shape)}; "
            f"expected {tuple(expected)}"
        )
    if target.device != logits.device:
        raise RuntimeError(
            f"target: on device {target.device} but input is on {logits.device}; "
            "expected all tensors on the same device"
        )
    classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    if classes == 0:
        raise ValueError(
            f"input: logits of shape {tuple(logits.shape)} have 0 classes; expected C >= 1 "
            "in the class dimension (dim 1, or dim 0 for 1-D logits)"
        )
    ignore_index = check_ignore_index(ignore_index)
    # Bring the class dimension last so every row is one example: (rows, C).
    rows = logits.unsqueeze(0) if logits.dim() == 1 else logits.movedim(1, -1)
    rows = rows.reshape(-1, classes)
    if torch.compiler.is_compiling():
        # The class-range check reads values: the op runs it at run time instead.
        loss = cross_entropy_op(rows, target.reshape(-1), reduction, ignore_index)
    else:
        if not torch._C._are_functorch_transforms_active():  # vmap cannot read values on the host
            check_class_range(target, classes, ignore_index)
        fast_loss = fast_cross_entropy(rows, target.reshape(-1), reduction, ignore_index)
        if fast_loss is not None:  # a plain CPU call: ATen's loss kernel, one lean node
            loss = fast_loss
        else:
            loss, _, _ = CrossEntropyFunction.apply(rows, target.reshape(-1), reduction, ignore_index)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss


# ------------------------------------------------------------------------------ custom ops


@dataclass
class _BackwardCtx:
    """The fields the autograd Functions' backward reads from ctx: lets the ops reuse that math."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    reduction: str
    scale: float = 1.0
    per_example: bool = False
    ignore_index: int = -100


@torch.library.custom_op(f"{NS}::squared_error_forward", mutates_args=())
def squared_error_forward(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    with no_autocast(input.device.type):
        return SquaredErrorFunction.forward(input, target, reduction, scale, per_example)


@torch.library.custom_op(f"{NS}::squared_error_backward", mutates_args=())
def squared_error_backward(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    reduction: str,
    scale: float,
    per_example: bool,
    need_input: bool,
    need_target: bool,
) -> tuple[Tensor, Tensor]:
    ctx = _BackwardCtx((input, target), (need_input, need_target), reduction, scale, per_example)
    with no_autocast(input.device.type):
        grad_input, grad_target, *_ = SquaredErrorFunction.backward(ctx, grad_loss)
    return (
        placeholder(input) if grad_input is None else grad_input,
        placeholder(input) if grad_target is None else grad_target,
    )


@squared_error_forward.register_fake
def _squared_error_forward_fake(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    if reduction != "none":
        return input.new_empty(())
    shape = input.shape[:1] if per_example and input.dim() > 1 else input.shape
    return input.new_empty(shape)


@squared_error_backward.register_fake
def _squared_error_backward_fake(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    reduction: str,
    scale: float,
    per_example: bool,
    need_input: bool,
    need_target: bool,
) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format)
        if need_input
        else placeholder(input),
        torch.empty_like(target, memory_format=torch.contiguous_format)
        if need_target
        else placeholder(input),
    )


def _squared_error_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, target, reduction, scale, per_example = inputs
    ctx.save_for_backward(input, target)
    ctx.reduction, ctx.scale, ctx.per_example = reduction, scale, per_example


def _squared_error_backward_formula(ctx: Any, grad_loss: Tensor) -> tuple:
    refuse_create_graph("manualbp::squared_error_forward")
    input, target = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[:2]
    grad_input, grad_target = squared_error_backward(
        grad_loss, input, target, ctx.reduction, ctx.scale, ctx.per_example, need_input, need_target
    )
    return (
        grad_input if need_input else None,
        grad_target if need_target else None,
        None,
        None,
        None,
    )


squared_error_forward.register_autograd(
    _squared_error_backward_formula, setup_context=_squared_error_setup_context
)


def squared_error_op(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    """The squared-error loss through the ops (arguments already checked by the caller)."""
    return squared_error_forward(input, target, reduction, scale, per_example)


@torch.library.custom_op(f"{NS}::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor, target: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-row logsumexp, number of counted rows) for rows (M, C) and targets (M,)."""
    # The range check reads target values, which a tracer cannot: it runs here, at run time.
    check_class_range(target, logits.shape[1], ignore_index)
    with no_autocast(logits.device.type):
        return CrossEntropyFunction.forward(logits, target, reduction, ignore_index)


@torch.library.custom_op(f"{NS}::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    count: Tensor,
    reduction: str,
    ignore_index: int,
) -> Tensor:
    ctx = _BackwardCtx(
        (logits, target, lse, count), (True, False), reduction, ignore_index=ignore_index
    )
    with no_autocast(logits.device.type):
        grad_logits, *_ = CrossEntropyFunction.backward(ctx, grad_loss, lse, count)
    return grad_logits


@cross_entropy_forward.register_fake
def _cross_entropy_forward_fake(
    logits: Tensor, target: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor]:
    loss_shape = logits.shape[:1] if reduction == "none" else ()
    stats_dtype = compute_dtype(logits.dtype)
    lse = logits.new_empty(logits.shape[:1], dtype=stats_dtype)
    count = target.new_empty((), dtype=torch.int64)
    return logits.new_empty(loss_shape), lse, count  # type: ignore[return-value]


@cross_entropy_backward.register_fake
def _cross_entropy_backward_fake(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    count: Tensor,
    reduction: str,
    ignore_index: int,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _cross_entropy_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    logits, target, reduction, ignore_index = inputs
    _, lse, count = output
    ctx.save_for_backward(logits, target, lse, count)
    ctx.mark_non_differentiable(lse, count)
    ctx.reduction, ctx.ignore_index = reduction, ignore_index


def _cross_entropy_backward_formula(
    ctx: Any, grad_loss: Tensor, _g_lse: Tensor, _g_count: Tensor
) -> tuple:
    refuse_create_graph("manualbp::cross_entropy_forward")
    logits, target, lse, count = ctx.saved_tensors
    grad = cross_entropy_backward(
        grad_loss, logits, target, lse, count, ctx.reduction, ctx.ignore_index
    )
    return grad, None, None, None


cross_entropy_forward.register_autograd(
    _cross_entropy_backward_formula, setup_context=_cross_entropy_setup_context
)


def cross_entropy_op(logits: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    """Cross-entropy of rows (M, C) through the ops (shapes already checked by the caller)."""
    loss, _, _ = cross_entropy_forward(logits, target, reduction, ignore_index)
    return loss
