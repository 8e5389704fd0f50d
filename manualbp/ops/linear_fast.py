"""The eager CPU fast path of one layer a = f(x Wᵀ + b), for the modules `Linear` and `LinearAct`.

:func:`manualbp.ops.linear_act.linear` is general: any backend, autocast, torch.compile, torch.func
transforms, clear errors for every wrong argument. For a plain CPU call of float32, float64 or bfloat16
(:mod:`manualbp.backends.fast`) most of that is settled by a few attribute reads, and the node
needs one output, not two. :func:`fast_linear` makes those reads and, when they all hold, runs
:class:`FastLinearActFunction`; otherwise it returns None and the caller runs `linear`, which
raises the errors. The node keeps what :class:`~manualbp.ops.linear_act.LinearActFunction`
keeps (x, W, b by reference, and `a` or `z`) under the same names on its context, so its
backward and jvp are that Function's own: the fused first-order backward, the differentiable
reference one under create_graph, the reference tangents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn

from manualbp import backends
from manualbp.activations import Activation
from manualbp.backends import fast
from manualbp.ops.linear_act import LinearActFunction

__all__ = ["FastLinearActFunction", "fast_linear"]

_PLAIN = (Tensor, nn.Parameter)
_transforms_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead  # a tensor left by a finished transform


def fast_linear(x: Any, weight: Tensor, bias: Tensor | None, act: Activation) -> Tensor | None:
    """f(x Wᵀ + b) on the fast path, or None when the call is not a plain fast-path one."""
    if x.__class__ is not Tensor or not x.is_cpu or x.dtype not in fast.NETWORK_DTYPES:
        return None
    shape, dtype = x.shape, x.dtype
    if not shape or weight.__class__ not in _PLAIN or weight.dtype is not dtype or not weight.is_cpu:
        return None
    if weight.dim() != 2 or shape[-1] != weight.shape[1]:
        return None
    if bias is not None and (
        bias.__class__ not in _PLAIN or bias.dtype is not dtype or not bias.is_cpu
        or bias.shape != (weight.shape[0],)
    ):  # fmt: skip
        return None
    if torch.compiler.is_compiling() or _transforms_active() or torch.is_autocast_enabled("cpu"):
        return None
    if backends.get_backend() == "triton":
        return None
    out = _apply(_unwrap_if_dead(x), weight, bias, act, _bound(act))
    return out if len(shape) == 2 else out.view(*shape[:-1], weight.shape[0])


# What identity keeps: an empty stand-in (as LinearActFunction), shared, so a Linear call
# allocates no tensor for it; it is never written to.
_NOTHING = torch.empty(0)

_Bound = tuple[Callable[..., tuple[Tensor, Tensor]], Callable[[Tensor, Tensor], Tensor] | None]
# id(entry) -> (entry, its bound kernels); the entry is held, so its id is never reused.
_BOUND: dict[int, tuple[Activation, _Bound]] = {}


def _bound(act: Activation) -> _Bound:
    """The activation's forward step and fresh δ kernel, bound once per entry."""
    found = _BOUND.get(id(act))
    if found is None or found[0] is not act:
        if len(_BOUND) > 256:  # entries made on the fly (leaky_relu slopes): keep it bounded
            _BOUND.clear()
        delta = None if act.name == "identity" else fast.delta_fresh(act)
        found = _BOUND[id(act)] = (act, (fast.layer_forward(act), delta))
    return found[1]


class FastLinearActFunction(torch.autograd.Function):
    """LinearActFunction on the fast path with one output (inputs x, weight, bias, act, bound)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation, bound: _Bound
    ) -> Tensor:
        x_rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out, saved = bound[0](x_rows, weight, bias)
        # As LinearActFunction: identity keeps nothing (an empty stand-in), the others a or z.
        kept = saved if act.name != "identity" else _NOTHING
        ctx.save_for_backward(x, weight, bias, kept)
        if forward_ad._current_level >= 0:  # only inside a dual level can a tangent arrive
            ctx.save_for_forward(x, weight, bias, kept)
        ctx.act, ctx.backend, ctx.delta = act, fast, bound[1]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            return LinearActFunction.backward(ctx, grad_out, None)  # type: ignore[arg-type]
        x, weight, bias, kept = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        delta = ctx.delta
        d = grad_out if delta is None else delta(grad_out, kept)
        grad_input = None
        if need_input:
            grad_input = torch.mm(d, weight)
            if x.dim() != 2:
                grad_input = grad_input.view(x.shape)
        if need_weight:
            x_rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            grad_weight = torch.mm(d.t(), x_rows)
        else:
            grad_weight = None
        grad_bias = d.sum(0) if need_bias and bias is not None else None
        return grad_input, grad_weight, grad_bias, None, None

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        return LinearActFunction.jvp(ctx, *tangents)[0]


# Function.apply without its per-call signature binding (see manualbp._autograd): fast_linear
# has ruled torch.func transforms out and unwraps x; parameters are never functorch wrappers.
_apply = super(torch.autograd.Function, FastLinearActFunction).apply
