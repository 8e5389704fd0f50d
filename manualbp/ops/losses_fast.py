"""`mse_loss` on the eager CPU fast path: one lean node over ATen's own squared-error kernels.

:class:`manualbp.ops.losses.SquaredErrorFunction` is the readable, general form of the quadratic
cost — C = reduce((y − t)²), ∂C/∂y = 2(y − t)·∂reduce, ∂C/∂t = −∂C/∂y — and the oracle the tests
hold this path to. Spelled out in torch ops it is a dozen dispatcher calls and temporaries a step
(the casts, the difference, the scale, the reduction; again in backward), which at the sizes of a
small MLP cost more than the network's GEMMs. Here the forward is ATen's `mse_loss` and the
backward its `mse_loss_backward`, the same equation in one fused pass, so a plain CPU call costs
what native's costs plus one Python node.

:func:`fast_mse_loss` takes the call only when nothing else is in play: plain CPU tensors of one
fast dtype and one shape, no autocast, no torch.func transform, no forward-mode dual level, no
graph capture. Everything else (and every wrong argument, with its clear error) goes to the
general Function. The node keeps y and t by reference, as native does (no difference tensor).
A backward with create_graph stays exact: `mse_loss_backward` is itself differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from manualbp.backends import fast

__all__ = ["FastCrossEntropyFunction", "FastSquaredErrorFunction", "fast_cross_entropy", "fast_mse_loss"]

# torch's reduction codes (torch._Reduction.get_enum).
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_mse = torch._C._nn.mse_loss
_cross_entropy = torch._C._nn.cross_entropy_loss
_mse_backward = torch.ops.aten.mse_loss_backward.default
_transforms_active = torch._C._are_functorch_transforms_active


def fast_mse_loss(input: Any, target: Any, reduction: str) -> Tensor | None:
    """mean/sum/none of (input − target)² on the fast path, or None when the call is not a plain one."""
    code = _REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if code is None or input.__class__ is not Tensor or target.__class__ is not Tensor:
        return None
    dtype = input.dtype
    if dtype not in fast.NETWORK_DTYPES or target.dtype is not dtype:
        return None
    if not (input.is_cpu and target.is_cpu) or input.shape != target.shape:
        return None
    if torch.compiler.is_compiling() or _transforms_active() or torch.is_autocast_enabled("cpu"):
        return None
    if forward_ad._current_level >= 0:  # dual tensors need the general Function's jvp
        return None
    return FastSquaredErrorFunction.apply(input, target, code)


class FastSquaredErrorFunction(torch.autograd.Function):
    """C = reduce((y − t)²) by ATen's kernel; backward ∂C/∂y = mse_loss_backward, ∂C/∂t = −∂C/∂y."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, code: int) -> Tensor:
        ctx.save_for_backward(input, target)
        ctx.code = code
        return _mse(input, target, code)  # type: ignore[arg-type]  # the C binding takes the code

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        input, target = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        if not (need_input or need_target):
            return None, None, None
        grad = _mse_backward(grad_loss, input, target, ctx.code)
        return (grad if need_input else None), (-grad if need_target else None), None


def fast_cross_entropy(rows: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor | None:
    """Cross-entropy of checked rows (M, C) and class indices (M,) on the fast path, or None."""
    if rows.__class__ is not Tensor or target.__class__ is not Tensor or not rows.is_cpu:
        return None
    if rows.dtype not in fast.NETWORK_DTYPES or target.dtype is not torch.long:
        return None
    if _transforms_active() or torch.is_autocast_enabled("cpu") or forward_ad._current_level >= 0:
        return None
    return FastCrossEntropyFunction.apply(rows, target, _REDUCTIONS[reduction], ignore_index)


class FastCrossEntropyFunction(torch.autograd.Function):
    """C_i = logsumexp(z_i) − z_i[t_i] by ATen's kernel; ∂C_i/∂z_i = softmax(z_i) − onehot(t_i).

    Keeps the logits by reference, as :class:`manualbp.ops.losses.CrossEntropyFunction` does
    (native keeps the (M × C) log-probabilities as well): backward recomputes the softmax in one
    pass and writes the gradient into it — the −1 at each target, then each row's scale (g, or
    g / counted rows for "mean"; 0 for ignored rows). create_graph takes the differentiable
    ops of the same formula.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, target: Tensor, code: int, ignore_index: int) -> Tensor:
        ctx.save_for_backward(rows, target)
        ctx.code, ctx.ignore_index = code, ignore_index
        return _cross_entropy(rows, target, None, code, ignore_index, 0.0)  # type: ignore[arg-type]  # the C binding takes the code

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple:
        rows, target = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        valid = target != ctx.ignore_index
        safe_target = torch.where(valid, target, 0).unsqueeze(1)
        g = grad_loss
        if ctx.code == 1:  # mean over the counted rows (0/0 = NaN when none is, as native)
            g = g / valid.sum()
        row_scale = torch.where(valid, g, 0).to(rows.dtype).unsqueeze(1)
        grad = torch.softmax(rows, 1)
        minus_one = torch.full(safe_target.shape, -1.0, dtype=grad.dtype)
        if torch.is_grad_enabled():  # create_graph: out of place, so softmax's backward holds
            return grad.scatter_add(1, safe_target, minus_one) * row_scale, None, None, None
        return grad.scatter_add_(1, safe_target, minus_one).mul_(row_scale), None, None, None
