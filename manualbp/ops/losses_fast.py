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

__all__ = ["FastSquaredErrorFunction", "fast_mse_loss"]

# torch's reduction codes (torch._Reduction.get_enum).
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_mse = torch._C._nn.mse_loss
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
