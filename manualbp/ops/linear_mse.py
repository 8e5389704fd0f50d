"""The squared-error head `linear_mse_loss`: C = reduce (x Wᵀ + b − t)², chunk by chunk over the
rows — its eager Function, its custom ops and its entry point.

The same head as `linear_cross_entropy` (:mod:`manualbp.ops.heads` states the chunking and the
custom-op conventions) for a regression output: per chunk, G = ∂C/∂y = 2 (y − t) · s with s the
reduction's scale, and the loop of :mod:`manualbp.ops.chunked` forms G W, Gᵀ x_c and Σ G.

    manualbp::linear_mse_forward(x, weight, bias?, target, reduction, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (loss, 4 gradients)
    manualbp::linear_mse_backward(grad_loss, x, weight, bias?, target, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (4 gradients)
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends
from manualbp._autograd import PositionalFunction
from manualbp.backends.reference import cast, compute_dtype, up
from manualbp.ops._common import NS, backend_module, check_same, check_tensor, no_autocast
from manualbp.ops.chunked import (
    Head,
    HeadCtx,
    check_chunk,
    check_head,
    fake_grads,
    filled,
    gemms_for,
    grads_from,
    head_backward,
    logits,
    no_graph_backward,
    op_grads,
    or_placeholder,
    requested,
    run_chunks,
    save_head,
    save_op_head,
    scaled_or_same,
    split_saved,
    traced_backend,
)
from manualbp.ops.linear_act import linear, tangent_z
from manualbp.ops.losses import mse_loss

__all__ = ["LinearMSEFunction", "linear_mse_backward", "linear_mse_forward", "linear_mse_loss"]


# ------------------------------------------------------------------------------ eager Function


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
        grads = run_chunks(x, weight, bias, chunk_size, gemms_for(backend), head, param_needs)
        if reduction == "none":
            loss = losses
        else:
            loss = losses.sum() / target.numel() if reduction == "mean" else losses.sum()
        return (loss.to(x.dtype), *(or_placeholder(g, x) for g in (*grads, grad_target)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, target, reduction, chunk_size, needs, backend = inputs
        _, *grads = output
        save_head(ctx, x, weight, bias, target, reduction, grads)
        ctx.reduction, ctx.chunk_size, ctx.needs, ctx.backend = reduction, chunk_size, needs, backend

    @staticmethod
    def jvp(
        ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None,
        target_t: Tensor | None, *_: Any,
    ) -> tuple:  # fmt: skip
        """Forward mode: ℓ̇ = 2 (y − t)(ẏ − ṫ), reduced."""
        x, weight, bias, target = ctx.saved_tensors
        diff_t = tangent_z(x, weight, x_t, weight_t, bias_t)
        if target_t is not None:
            diff_t = diff_t - up(target_t)
        loss_t = 2 * (logits(x, weight, bias) - up(target)) * diff_t
        if ctx.reduction != "none":
            loss_t = loss_t.sum() / (target.numel() if ctx.reduction == "mean" else 1)
        return cast(loss_t, x.dtype), None, None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor) -> tuple:
        return head_backward(LinearMSEFunction._backward, _mse_differentiable_backward, ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple:
        saved_grads, inputs = split_saved(ctx)
        if ctx.reduction != "none":
            grads = scaled_or_same(saved_grads, ctx.needs, grad_loss)
        else:
            x, weight, bias, target = inputs
            losses = torch.empty_like(target, dtype=compute_dtype(x.dtype))
            grad_target = torch.empty_like(target) if ctx.needs[3] else None
            head = _mse_head(target, losses, grad_loss, grad_target)
            grads = [
                *run_chunks(x, weight, bias, ctx.chunk_size, gemms_for(ctx.backend), head, ctx.needs[:3]),
                grad_target,
            ]
        return (*grads, None, None, None, None)


def _mse_differentiable_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    """G = 2 (y − t) · ∂C/∂ℓ for all rows at once, in differentiable torch ops."""
    _, (x, weight, bias, target) = split_saved(ctx)
    grad_elem = up(grad_loss)
    if ctx.reduction == "mean":
        grad_elem = grad_elem / target.numel()
    grad_y = 2 * (logits(x, weight, bias) - up(target)) * grad_elem
    grads = grads_from(grad_y, x, weight, ctx.needs_input_grad[:3])
    grad_target = cast(-grad_y, target.dtype) if ctx.needs_input_grad[3] else None
    return (*grads, grad_target, None, None, None, None)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f"{NS}::linear_mse_forward", mutates_args=())
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
    module = backend_module(backend)
    with no_autocast(x.device.type):
        return LinearMSEFunction.forward(  # type: ignore[return-value]
            x, weight, bias, target, reduction, chunk_size, needs, module
        )


@torch.library.custom_op(f"{NS}::linear_mse_backward", mutates_args=())
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
    ctx = HeadCtx((x, weight, bias, target), needs, backend_module(backend), chunk_size)
    with no_autocast(x.device.type):
        grads = LinearMSEFunction._backward(ctx, grad_loss)[:4]
    return filled(grads, x)  # type: ignore[return-value]


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
    return (loss, *fake_grads(x, weight, target, needs))  # type: ignore[return-value]


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
    return fake_grads(x, weight, target, needs)  # type: ignore[return-value]


def _mse_op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, target, reduction, chunk_size, *needs, backend = inputs
    save_op_head(ctx, (x, weight, bias, target), reduction, output[1:], tuple(needs))
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

    return (*op_grads(ctx, grad_loss, late_op), *(None,) * 7)


linear_mse_forward.register_autograd(
    lambda ctx, grad_loss, *_: head_backward(_mse_op_backward, no_graph_backward, ctx, grad_loss),
    setup_context=_mse_op_setup_context,
)


# ------------------------------------------------------------------------------ entry point


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
    check_head(x, weight, bias, reduction)
    check_tensor("target", target)
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not match the output shape {expected}; "
            "expected the same shape (no broadcasting)"
        )
    check_same("target", target, "input", x)
    rows = x.reshape(-1, x.shape[-1])
    chunk = check_chunk(chunk_size, rows.shape[0], weight.shape[1], weight.shape[0],
                        cpu=rows.device.type == "cpu")  # fmt: skip
    args = (rows, weight, bias, target.reshape(-1, weight.shape[0]), reduction, chunk)
    if torch._C._are_functorch_transforms_active():
        # vmap / jvp / grad transforms: the layer and the loss as two Functions (they support
        # them); y is materialised. Not cast under autocast, as this head never is.
        with no_autocast(x.device.type):
            return mse_loss(linear(x, weight, bias), target, reduction)
    needs = requested(x, weight, bias, target)
    with no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            loss, *_ = linear_mse_forward(*args, *needs, traced_backend(x.device))
        else:
            loss, *_ = LinearMSEFunction.apply(*args, needs, backends.resolve(x.device))
    return loss.view(target.shape) if reduction == "none" else loss
