"""autograd Functions with hand-written backward passes, and the functional API over them.

Each Function's `backward` is the seed's equations, nothing else: PyTorch's autograd only hands it
∂C/∂(output) and collects what it returns. The arithmetic itself lives in a backend
(:mod:`manualbp.backends`) chosen per call, so the same Function runs the plain-PyTorch reference
on the CPU and fused Triton kernels on CUDA.

Functions use the `setup_context` style (forward without ctx), which `torch.func` and
`torch.compile` require of custom Functions.
"""

from __future__ import annotations

import contextlib
import operator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends, ops
from manualbp._autograd import PositionalFunction
from manualbp.activations import Activation, get_activation
from manualbp.backends.reference import cast, compute_dtype

__all__ = [
    "linear",
    "mse_loss",
    "half_mse_loss",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_mse_loss",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------- checks


def _check_tensor(name: str, t: Any, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}; "
            f"expected both the same (cast one, e.g. with .to({ref.dtype}))"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"{name}: on device {t.device} but {ref_name} is on {ref.device}; "
            "expected all tensors on the same device"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _rows(t: Tensor) -> Tensor:
    """All leading dimensions as rows: a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


# --------------------------------------------------------------------------------------- linear


class LinearActFunction(PositionalFunction):
    """a = f(x Wᵀ + b) forward; δ = ∂C/∂a ⊙ f′, δᵀx, Σδ and δW backward.

    Saves x and W by reference (autograd holds them anyway) and one activation-sized tensor:
    `a` for output-derivable activations, `z` for the others.
    """

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation, backend: ModuleType
    ) -> tuple[Tensor, Tensor]:
        out, saved = backend.linear_forward(_rows(x), weight, bias, act)
        out = out.view(*x.shape[:-1], weight.shape[0])
        # z is a second output only when backward needs it; otherwise an empty placeholder.
        z = out.new_empty(0) if act.uses_output else saved.view(out.shape)
        return out, z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        x, weight, bias, act, backend = inputs
        out, z = output
        ctx.save_for_backward(x, weight, out if act.uses_output else z)
        ctx.mark_non_differentiable(z)
        ctx.act, ctx.backend, ctx.has_bias = act, backend, bias is not None

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_z: Tensor) -> tuple:
        x, weight, saved = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        with ops.no_autocast(x.device.type):  # backward called inside an autocast block
            grad_input, grad_weight, grad_bias = ctx.backend.linear_backward(
                _rows(grad_out),
                _rows(x),
                weight,
                _rows(saved),
                ctx.act,
                need_input=need_input,
                need_weight=need_weight,
                need_bias=need_bias and ctx.has_bias,
            )
        if grad_input is not None:
            grad_input = grad_input.view(x.shape)
        return grad_input, grad_weight, grad_bias, None, None


def _check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    _check_tensor("input", x)
    _check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected a 2-D tensor (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.dim() == 0:
        raise ValueError(f"input: expected at least 1 dimension (..., {weight.shape[1]}), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input: last dimension is {x.shape[-1]} (shape {tuple(x.shape)}), expected "
            f"in_features={weight.shape[1]} to match weight of shape {tuple(weight.shape)}"
        )
    _check_same("weight", weight, "input", x)
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias: expected shape ({weight.shape[0]},) to match out_features, "
                f"got {tuple(bias.shape)}"
            )
        _check_same("bias", bias, "input", x)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | Activation = "identity",
    *,
    negative_slope: float | None = None,
) -> Tensor:
    """a = f(x Wᵀ + b) over the last dimension of `x`, with a hand-written backward.

    Same conventions as `torch.nn.functional.linear`: `weight` is (out_features, in_features),
    `x` is (..., in_features). `activation` is a registry name (see `manualbp.ACTIVATIONS`).
    Only the gradients autograd asks for are computed (no grad_input when `x` needs none).
    Under `torch.autocast` it computes in the autocast dtype, as `torch.nn.functional.linear`;
    while a graph is captured (`torch.compile`, `torch.export`) it runs as `manualbp::` ops.
    """
    act = get_activation(activation, negative_slope=negative_slope)
    _check_tensor("input", x)  # before anything reads x.device: a list must get a clear error
    x, weight, bias = ops.autocast_to(x.device.type, None, x, weight, bias)
    _check_linear_args(x, weight, bias)
    if torch.compiler.is_compiling():
        return ops.linear(x, weight, bias, act)
    backend = backends.resolve(x.device)
    with ops.no_autocast(x.device.type):
        out, _ = LinearActFunction.apply(x, weight, bias, act, backend)
    return out


# --------------------------------------------------------------------------------------- losses


def _check_pair(input: Tensor, target: Tensor) -> None:
    _check_tensor("input", input)
    _check_tensor("target", target)
    if target.shape != input.shape:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}; "
            "expected the same shape (no broadcasting)"
        )
    _check_same("target", target, "input", input)


def _reduce(per_item: Tensor, reduction: str, count: int | Tensor) -> Tensor:
    if reduction == "none":
        return per_item
    total = per_item.sum()
    return total / count if reduction == "mean" else total


def _count(input: Tensor, per_example: bool) -> int:
    """What "mean" divides by: examples (first dimension) or elements. 0 gives NaN, as native."""
    return input.shape[0] if per_example and input.dim() > 0 else input.numel()


class SquaredErrorFunction(PositionalFunction):
    """C = scale · Σ (y − t)² reduced; ∂C/∂y = 2·scale·(y − t) · ∂(reduction), ∂C/∂t = −∂C/∂y.

    `per_example` sums over all but the first dimension before a "none" reduction, and "mean"
    then divides by the number of examples instead of the number of elements (the seed's E).
    """

    @staticmethod
    def forward(
        input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
    ) -> Tensor:
        cdt = compute_dtype(input.dtype)
        diff = cast(input, cdt) - cast(target, cdt)
        squares = scale * diff * diff
        if per_example and input.dim() > 1:
            squares = squares.flatten(1).sum(1)
        return cast(_reduce(squares, reduction, _count(input, per_example)), input.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, target, reduction, scale, per_example = inputs
        ctx.save_for_backward(input, target)
        ctx.reduction, ctx.scale, ctx.per_example = reduction, scale, per_example

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
    _check_reduction(reduction)
    if isinstance(input, Tensor) and isinstance(target, Tensor):
        # Autocast runs the losses in float32 (torch's "fp32" op list).
        input, target = ops.autocast_to(input.device.type, torch.float32, input, target)
    _check_pair(input, target)
    if torch.compiler.is_compiling():
        return ops.squared_error(input, target, reduction, scale, per_example)
    return SquaredErrorFunction.apply(input, target, reduction, scale, per_example)


class CrossEntropyFunction(PositionalFunction):
    """Softmax + log-loss fused: C_i = logsumexp(z_i) − z_i[t_i], ∂C_i/∂z_i = softmax(z_i) − onehot(t_i).

    The max trick keeps logsumexp finite: with m = max z_i, log_norm = log Σ exp(z_i − m) and
    log softmax(z_i) = (z_i − m) − log_norm. Forward saves log_norm (one float per row) instead of
    an (M × classes) tensor; backward recomputes m (an exact max) and the softmax from the logits.
    Keeping log_norm apart from m, rather than saving their sum, keeps the gradient as accurate
    as native autograd's in float32: the sum would round away low bits of log_norm.
    """

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
        ctx.mark_non_differentiable(log_norm, count)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _g_log_norm: Tensor, _g_count: Tensor) -> tuple:
        logits, target, log_norm, count = ctx.saved_tensors
        z = cast(logits, log_norm.dtype)
        valid = target != ctx.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        shifted = z - z.amax(dim=1, keepdim=True)
        grad = (shifted - log_norm.unsqueeze(1)).exp()  # softmax = exp(log softmax)
        grad.scatter_add_(1, safe_target.unsqueeze(1), -torch.ones_like(log_norm).unsqueeze(1))
        g = cast(grad_loss, log_norm.dtype)
        if ctx.reduction == "mean":
            g = g / count
        row_scale = torch.where(valid, g, torch.zeros_like(log_norm))  # ignored rows get exactly 0
        grad = grad * row_scale.unsqueeze(1)
        return cast(grad, logits.dtype), None, None, None


def _check_ignore_index(ignore_index: Any) -> int:
    # A str or float would otherwise fail deep inside torch.where, or silently match nothing.
    # Anything with __index__ (numpy ints, 0-d integer tensors) is an int, as native accepts.
    if not isinstance(ignore_index, bool):
        with contextlib.suppress(TypeError):
            return operator.index(ignore_index)
    raise TypeError(
        f"ignore_index: expected an int class index, got {type(ignore_index).__name__} "
        f"{ignore_index!r}"
    )


def cross_entropy(
    logits: Tensor, target: Tensor, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy of class-index targets, as `torch.nn.functional.cross_entropy`.

    `logits` is (N, C), (C,) or (N, C, d1, ...); `target` holds class indices of shape (N,),
    () or (N, d1, ...). Rows whose target equals `ignore_index` contribute neither loss nor
    gradient, and "mean" divides by the number of the other rows.
    """
    _check_reduction(reduction)
    _check_tensor("input", logits)
    _check_tensor("target", target, floating=False)
    (logits,) = ops.autocast_to(logits.device.type, torch.float32, logits)  # fp32, as native
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
    ignore_index = _check_ignore_index(ignore_index)
    # Bring the class dimension last so every row is one example: (rows, C).
    rows = logits.unsqueeze(0) if logits.dim() == 1 else logits.movedim(1, -1)
    rows = rows.reshape(-1, classes)
    if torch.compiler.is_compiling():
        # The class-range check reads values: the op runs it at run time instead.
        loss = ops.cross_entropy(rows, target.reshape(-1), reduction, ignore_index)
    else:
        ops.check_class_range(target, classes, ignore_index)
        loss, _, _ = CrossEntropyFunction.apply(rows, target.reshape(-1), reduction, ignore_index)
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss


# The fused heads (linear layer + loss, chunked over rows) live in their own module; they are part
# of the functional API. Imported last: fused_loss uses this module's checks.
from manualbp.fused_loss import linear_cross_entropy, linear_mse_loss  # noqa: E402
