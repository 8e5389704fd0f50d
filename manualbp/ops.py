"""The layer and the losses as `torch.library` custom ops, for `torch.compile` and `torch.export`.

Eager code runs the autograd Functions of :mod:`manualbp.functional` directly. While a graph is
being captured (`torch.compiler.is_compiling()`: `torch.compile`, `torch.export`), the functional
API calls the ops below instead. A custom op is opaque to the tracer, so

* Dynamo puts one node in the graph instead of tracing into backend code it cannot follow
  (context variables, Triton launchers, data-dependent checks) — no graph break;
* AOTAutograd takes the backward from `register_autograd`, whose formula calls the backward op:
  the hand-written backward is what runs inside the compiled graph too;
* `register_fake` tells the tracer output shapes, dtypes and strides without running anything;
* `torch.export` records ``manualbp::*`` nodes that a deployment can look up by name.

Ops (schemas inferred from the type hints below; x and grad_out are rows: leading dims flattened):

    manualbp::linear_forward(x, weight, bias?, activation, negative_slope, backend="torch")
        -> (a, z)
    manualbp::linear_backward(grad_out, x, weight, saved, activation, negative_slope,
                              need_input, need_weight, need_bias, backend="torch")
        -> (grad_input, grad_weight, grad_bias)
    manualbp::squared_error_forward(input, target, reduction, scale, per_example) -> loss
    manualbp::squared_error_backward(grad_loss, input, target, reduction, scale, per_example,
                                     need_input, need_target) -> (grad_input, grad_target)
    manualbp::cross_entropy_forward(logits, target, reduction, ignore_index) -> (loss, lse, count)
    manualbp::cross_entropy_backward(grad_loss, logits, target, lse, count, reduction,
                                     ignore_index) -> grad_logits

`backend` is "torch" (the reference) or "triton": the opaque op runs that backend exactly as eager
code does, on any device it supports (also CPU tensors under TRITON_INTERPRET=1). On CUDA the
Triton backend is traced as ``manualbp::triton_linear_forward`` / ``triton_linear_backward``
instead (same schemas less `backend`): `torch.library.triton_op`s. Every launcher in
`manualbp.triton_kernels` launches through `torch.library.wrap_triton` and decides everything
from shapes, strides and dtypes, so AOTAutograd decomposes these ops into the kernel launches
themselves and Inductor sees them (schedules them, autotunes them, CUDA graphs capture them);
`torch.export` keeps them as ``manualbp::triton_linear_*`` nodes. ``MANUALBP_TRITON_OP=0`` (read
when a graph is traced) runs the Triton backend in the opaque op on CUDA too.

Conventions forced by the custom-op rules:

* An activation entry is not a valid op argument; ops take its name and `negative_slope` and look
  the entry up inside (:func:`manualbp.get_activation`).
* Outputs may alias neither inputs nor each other, and cannot be None: a second output that is
  not needed (z for output-derivable activations, a gradient autograd did not ask for) is an
  empty tensor of shape (0,), exactly like the `z` placeholder of the eager Function.
* The backend is chosen when the graph is traced (the `use_backend`/`set_backend` choice in force
  then) and baked into the graph: compiled code does not follow a later `use_backend` switch.
  Call `torch.compiler.reset()` after switching, as for any other traced-in global setting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends
from manualbp.activations import Activation, get_activation
from manualbp.backends import reference

__all__ = [
    "OPS",
    "backend_name",
    "cross_entropy",
    "linear",
    "no_autocast",
    "squared_error",
    "triton_ops_available",
]

_NS = "manualbp"


# --------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Autocast off for the enclosed block: our kernels choose their own accumulation dtype.

    Without it the reference backend's float32 matmul would be cast back down by an enclosing
    `torch.autocast` (and a backward run inside the autocast block would be, too).
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def _entry(activation: str, negative_slope: float) -> Activation:
    # Only leaky_relu carries a slope; get_activation rejects one for any other entry.
    slope = negative_slope if activation == "leaky_relu" else None
    return get_activation(activation, negative_slope=slope)


def _placeholder(like: Tensor) -> Tensor:
    """The (0,)-shaped stand-in for an output that is not needed (ops cannot return None)."""
    return like.new_empty(0)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def backend_name(device_type: str, device_index: int) -> str:
    """Which ops run the backend in force for this device; read once, at trace time.

    "torch" (reference) and "triton" run in the opaque `manualbp::linear_*` ops; "triton_op"
    means the `manualbp::triton_linear_*` ops, which Inductor can see into (CUDA only, see
    `_traceable_launchers`). Marked constant (below), so Dynamo calls this in plain Python — it
    reads a context variable, which Dynamo cannot trace, and registers the Triton ops, which
    must not happen inside a trace — and bakes the answer into the graph. Raises, as in eager,
    when "triton" was asked for where it cannot run.
    """
    device = torch.device(device_type, device_index) if device_index >= 0 else torch.device(device_type)
    if backends.resolve(device) is reference:
        return "torch"
    return "triton_op" if device.type == "cuda" and _traceable_launchers() else "triton"


def traced_backend_name(device: torch.device) -> str:
    """`backend_name` for the device of a tensor being traced."""
    return backend_name(device.type, -1 if device.index is None else device.index)


# What `torch.compiler.assume_constant_result(backend_name)` does, without its import of
# torch._dynamo (seconds at `import manualbp`); tests/test_compile.py fails if Dynamo stops
# honouring the marker (the context-variable read would then break the graph).
backend_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------- linear

def _backend_module(backend: str) -> ModuleType:
    if backend == "torch":
        return reference
    if backend == "triton":
        module = _triton_backend()
        if module is None:
            raise RuntimeError("backend 'triton': manualbp.backends.triton could not be imported")
        return module
    raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")


def _triton_backend() -> ModuleType | None:
    try:
        from manualbp.backends import triton as triton_backend
    except ImportError:
        return None
    return triton_backend


def _linear_forward_with(
    backend: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation
) -> tuple[Tensor, Tensor]:
    with no_autocast(x.device.type):
        out, saved = backend.linear_forward(x, weight, bias, act)
    z = _placeholder(out) if act.uses_output else saved
    return out, z


def _linear_backward_with(
    backend: ModuleType,
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: Activation,
    flags: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:
    need_input, need_weight, need_bias = flags
    with no_autocast(x.device.type):
        grads = backend.linear_backward(
            grad_out,
            x,
            weight,
            saved,
            act,
            need_input=need_input,
            need_weight=need_weight,
            need_bias=need_bias,
        )
    return tuple(_placeholder(x) if g is None else g for g in grads)  # type: ignore[return-value]


@torch.library.custom_op(f"{_NS}::linear_forward", mutates_args=())
def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """(a, z) for rows x (M, K); z is a (0,) placeholder when f′ reads a.

    Opaque to the compiler: it runs the named backend ("torch" or "triton") as in eager.
    """
    act = _entry(activation, negative_slope)
    return _linear_forward_with(_backend_module(backend), x, weight, bias, act)


@torch.library.custom_op(f"{_NS}::linear_backward", mutates_args=())
def linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    activation: str,
    negative_slope: float,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """(δW, δᵀx, Σδ) on the named backend — each a (0,) placeholder when not needed."""
    act = _entry(activation, negative_slope)
    flags = (need_input, need_weight, need_bias)
    module = _backend_module(backend)
    return _linear_backward_with(module, grad_out, x, weight, saved, act, flags)


def _linear_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    negative_slope: float,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    out = x.new_empty((x.shape[0], weight.shape[0]))
    z = _placeholder(out) if get_activation(activation).uses_output else torch.empty_like(out)
    return out, z


def _linear_backward_fake(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    activation: str,
    negative_slope: float,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    grad_input = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_bias = weight.new_empty(weight.shape[0])
    return (
        grad_input if need_input else _placeholder(x),
        grad_weight if need_weight else _placeholder(x),
        grad_bias if need_bias else _placeholder(x),
    )


def _linear_setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, bias, activation, negative_slope, *backend = inputs
    out, z = output
    uses_output = get_activation(activation).uses_output
    ctx.save_for_backward(x, weight, out if uses_output else z)
    ctx.mark_non_differentiable(z)
    ctx.activation, ctx.negative_slope, ctx.has_bias = activation, negative_slope, bias is not None
    # The opaque op's backend name (absent when it is the default, and for the Triton ops).
    ctx.backend_args = tuple(backend)
    ctx.num_inputs = len(inputs)  # backward returns one gradient (or None) per input given


def _make_linear_backward(backward_op: Any) -> Any:
    def backward(ctx: Any, grad_out: Tensor, _grad_z: Tensor) -> tuple:
        x, weight, saved = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        grads = backward_op(
            grad_out, x, weight, saved, ctx.activation, ctx.negative_slope,
            need_input, need_weight, need_bias, *ctx.backend_args,
        )  # fmt: skip
        grad_input, grad_weight, grad_bias = (
            g if needed else None for g, needed in zip(grads, (need_input, need_weight, need_bias))
        )
        return (grad_input, grad_weight, grad_bias) + (None,) * (ctx.num_inputs - 3)

    return backward


linear_forward.register_fake(_linear_forward_fake)
linear_backward.register_fake(_linear_backward_fake)
linear_forward.register_autograd(
    _make_linear_backward(linear_backward), setup_context=_linear_setup_context
)


# ------------------------------------------------------------------------- linear, Triton kernels

_triton_forward: Any = None
_triton_backward: Any = None


def _register_triton_ops() -> bool:
    """Register the Triton ops once, on first use (importing triton is slow and optional).

    `triton_op` traces its body with fake tensors, so the launchers in `manualbp.triton_kernels`
    launch through `torch.library.wrap_triton(kernel)[grid](...)` inside `recorded_launches`
    (and only there: elsewhere that would cost a higher-order-op dispatch per launch) and read no
    tensor data on the host.
    """
    global _triton_forward, _triton_backward
    if _triton_forward is not None:
        return True
    triton_backend = _triton_backend()
    if triton_backend is None:
        return False
    from manualbp.triton_kernels._utils import recorded_launches

    @torch.library.triton_op(f"{_NS}::triton_linear_forward", mutates_args=())
    def triton_linear_forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, negative_slope: float
    ) -> tuple[Tensor, Tensor]:
        act = _entry(activation, negative_slope)
        with recorded_launches():
            return _linear_forward_with(triton_backend, x, weight, bias, act)

    @torch.library.triton_op(f"{_NS}::triton_linear_backward", mutates_args=())
    def triton_linear_backward(
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor,
        saved: Tensor,
        activation: str,
        negative_slope: float,
        need_input: bool,
        need_weight: bool,
        need_bias: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        act = _entry(activation, negative_slope)
        flags = (need_input, need_weight, need_bias)
        with recorded_launches():
            return _linear_backward_with(triton_backend, grad_out, x, weight, saved, act, flags)

    triton_linear_forward.register_autograd(
        _make_linear_backward(triton_linear_backward), setup_context=_linear_setup_context
    )
    _triton_forward, _triton_backward = triton_linear_forward, triton_linear_backward
    return True


def triton_ops_available() -> bool:
    """Whether ``manualbp::triton_linear_*`` are registered (registers them on first call)."""
    return _register_triton_ops()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> Tensor:
    """a = f(x Wᵀ + b) through the ops: what `manualbp.functional.linear` runs while tracing.

    Arguments are already checked (and cast for autocast) by the caller.
    """
    name = traced_backend_name(x.device)
    rows, slope = _rows(x), act.negative_slope
    if name == "triton_op":
        out, _ = _triton_forward(rows, weight, bias, act.name, slope)
    else:
        out, _ = linear_forward(rows, weight, bias, act.name, slope, name)
    return out.view(*x.shape[:-1], weight.shape[0])


def _traceable_launchers() -> bool:
    """Whether CUDA graphs trace the Triton backend as the `triton_op`s (see the module docstring).

    Never under TRITON_INTERPRET=1 (`wrap_triton` hands back the interpreted kernel, which a
    tracer cannot record), nor with ``MANUALBP_TRITON_OP=0``: the Triton backend then runs inside
    the opaque `manualbp::linear_*` ops — still no graph break, but Inductor cannot see the kernels.
    """
    if os.environ.get("MANUALBP_TRITON_OP", "1") == "0" or _triton_interpreted():
        return False
    return _register_triton_ops()


def _triton_interpreted() -> bool:
    module = _triton_backend()
    return module is None or bool(module._INTERPRET)


# --------------------------------------------------------------------------------------- losses


@dataclass
class _BackwardCtx:
    """The fields the autograd Functions' backward reads from ctx: lets the ops reuse that math."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    reduction: str
    scale: float = 1.0
    per_example: bool = False
    ignore_index: int = -100


@torch.library.custom_op(f"{_NS}::squared_error_forward", mutates_args=())
def squared_error_forward(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    from manualbp.functional import SquaredErrorFunction

    with no_autocast(input.device.type):
        return SquaredErrorFunction.forward(input, target, reduction, scale, per_example)


@torch.library.custom_op(f"{_NS}::squared_error_backward", mutates_args=())
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
    from manualbp.functional import SquaredErrorFunction

    ctx = _BackwardCtx((input, target), (need_input, need_target), reduction, scale, per_example)
    with no_autocast(input.device.type):
        grad_input, grad_target, *_ = SquaredErrorFunction.backward(ctx, grad_loss)
    return (
        _placeholder(input) if grad_input is None else grad_input,
        _placeholder(input) if grad_target is None else grad_target,
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
        else _placeholder(input),
        torch.empty_like(target, memory_format=torch.contiguous_format)
        if need_target
        else _placeholder(input),
    )


def _squared_error_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, target, reduction, scale, per_example = inputs
    ctx.save_for_backward(input, target)
    ctx.reduction, ctx.scale, ctx.per_example = reduction, scale, per_example


def _squared_error_backward_formula(ctx: Any, grad_loss: Tensor) -> tuple:
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


def squared_error(
    input: Tensor, target: Tensor, reduction: str, scale: float, per_example: bool
) -> Tensor:
    """The squared-error loss through the ops (arguments already checked by the caller)."""
    return squared_error_forward(input, target, reduction, scale, per_example)


def check_class_range(target: Tensor, classes: int, ignore_index: int) -> None:
    """Every target is a class index in [0, classes) or `ignore_index`; raises ValueError."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target: class index {value} is out of range; expected 0 <= index < {classes} "
            f"(or ignore_index={ignore_index})"
        )


@torch.library.custom_op(f"{_NS}::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor, target: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-row logsumexp, number of counted rows) for rows (M, C) and targets (M,)."""
    from manualbp.functional import CrossEntropyFunction

    # The range check reads target values, which a tracer cannot: it runs here, at run time.
    check_class_range(target, logits.shape[1], ignore_index)
    with no_autocast(logits.device.type):
        return CrossEntropyFunction.forward(logits, target, reduction, ignore_index)


@torch.library.custom_op(f"{_NS}::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    count: Tensor,
    reduction: str,
    ignore_index: int,
) -> Tensor:
    from manualbp.functional import CrossEntropyFunction

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
    stats_dtype = reference.compute_dtype(logits.dtype)
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
    logits, target, lse, count = ctx.saved_tensors
    grad = cross_entropy_backward(
        grad_loss, logits, target, lse, count, ctx.reduction, ctx.ignore_index
    )
    return grad, None, None, None


cross_entropy_forward.register_autograd(
    _cross_entropy_backward_formula, setup_context=_cross_entropy_setup_context
)


def cross_entropy(logits: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    """Cross-entropy of rows (M, C) through the ops (shapes already checked by the caller)."""
    loss, _, _ = cross_entropy_forward(logits, target, reduction, ignore_index)
    return loss


#: The reference-backend ops, by name (the Triton ones register lazily: `triton_ops_available`).
OPS: dict[str, Any] = {
    "linear_forward": linear_forward,
    "linear_backward": linear_backward,
    "squared_error_forward": squared_error_forward,
    "squared_error_backward": squared_error_backward,
    "cross_entropy_forward": cross_entropy_forward,
    "cross_entropy_backward": cross_entropy_backward,
}


# -------------------------------------------------------------------------------------- autocast


def _autocast_eligible(t: Tensor | None, dtype: torch.dtype) -> bool:
    # torch.autocast's own rule (cached_cast): floating tensors except float64 are cast.
    return t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)


def autocast_to(device_type: str, dtype: torch.dtype | None, *tensors: Any) -> tuple[Any, ...]:
    """Cast the tensors as `torch.autocast` casts an op's arguments, when it is on for the device.

    `dtype=None` is the op list "lower precision" (linear: the autocast dtype); a dtype is a
    fixed list such as "float32" (the losses). Returns the tensors unchanged when autocast is off.
    """
    if not (
        torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    ):
        return tensors
    target = torch.get_autocast_dtype(device_type) if dtype is None else dtype
    return tuple(
        t.to(target) if isinstance(t, Tensor) and _autocast_eligible(t, target) else t
        for t in tensors
    )
