"""The layer a = f(x Wᵀ + b): its checks, its eager autograd Function, its custom ops, its entry point.

Eager calls run :class:`LinearActFunction`, whose backward is the seed's equations on the backend
chosen per call (:mod:`manualbp.backends`). While a graph is being captured
(`torch.compiler.is_compiling()`: `torch.compile`, `torch.export`) the same layer runs as the
`torch.library` custom ops below instead. A custom op is opaque to the tracer, so

* Dynamo puts one node in the graph instead of tracing into backend code it cannot follow
  (context variables, Triton launchers, data-dependent checks) — no graph break;
* AOTAutograd takes the backward from `register_autograd`, whose formula calls the backward op:
  the hand-written backward is what runs inside the compiled graph too;
* `register_fake` tells the tracer output shapes, dtypes and strides without running anything;
* `torch.export` records ``manualbp::*`` nodes that a deployment can look up by name.

Both paths run the same backend functions (`linear_forward` / `linear_backward` of the backend);
they stay two definitions because a custom op costs a dispatcher round trip per call that the
eager CPU step does not pay. Ops (x and grad_out are rows: leading dims flattened):

    manualbp::linear_forward(x, weight, bias?, activation, negative_slope, backend="torch")
        -> (a, z)
    manualbp::linear_backward(grad_out, x, weight, saved, activation, negative_slope,
                              need_input, need_weight, need_bias, backend="torch")
        -> (grad_input, grad_weight, grad_bias)

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

import os
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends
from manualbp._autograd import PositionalFunction
from manualbp.activations import Activation, get_activation
from manualbp.backends import reference
from manualbp.backends.reference import cast, up
from manualbp.ops._common import (
    NS,
    autocast_to,
    backend_module,
    check_linear_args,
    check_tensor,
    no_autocast,
    placeholder,
    refuse_create_graph,
    rows,
)

__all__ = [
    "LinearActFunction",
    "backend_name",
    "linear",
    "linear_backward",
    "linear_forward",
    "linear_op",
    "traced_backend_name",
    "triton_ops_available",
]

IDENTITY = get_activation("identity")


# ------------------------------------------------------------------------------ eager Function


class LinearActFunction(PositionalFunction):
    """a = f(x Wᵀ + b) forward; δ = ∂C/∂a ⊙ f′, δᵀx, Σδ and δW backward.

    Takes x of any shape (..., in) and returns the rows (M, out) — the caller restores the leading
    dimensions, so the output is never a view made in here and in-place ops on it are legal.
    Saves x, W and b by reference (autograd holds them anyway) and at most one activation-sized
    tensor: `a` for output-derivable activations, `z` for the others, nothing for identity.

    The autograd contract (DESIGN.md):

    * a backward run with grad mode on (`create_graph=True`) is itself differentiable: it runs the
      reference equations in torch ops, on any backend and device, with z recomputed from the
      saved inputs (the kept z is a constant to autograd), so f″ terms are not lost;
    * forward-mode AD (`jvp`): ȧ = f′(z) ⊙ (ẋ Wᵀ + x Ẇᵀ + ḃ), from the same kept tensor;
    * `vmap`: generated from forward/backward, which are torch ops on the reference backend (the
      entry point picks it whenever a torch.func transform is active).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation, backend: ModuleType
    ) -> tuple[Tensor, Tensor]:
        out, saved = backend.linear_forward(rows(x), weight, bias, act)
        # z is a second output only when backward needs it; otherwise an empty placeholder.
        return out, (placeholder(out) if act.uses_output else saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        x, weight, bias, act, backend = inputs
        out, z = output
        # f′ of identity is 1: keep nothing (the empty z), so the output is free to be modified.
        kept = out if act.uses_output and act.name != "identity" else z
        ctx.save_for_backward(x, weight, bias, kept)
        ctx.save_for_forward(x, weight, bias, kept)
        ctx.mark_non_differentiable(z)
        ctx.act, ctx.backend = act, backend

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_z: Tensor) -> tuple:
        x, weight, bias, kept = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        backend, x_rows = ctx.backend, rows(x)
        with no_autocast(x.device.type):  # backward called inside an autocast block
            if torch.is_grad_enabled():  # create_graph: differentiable torch ops (class docstring)
                backend = reference
                if not ctx.act.uses_output:
                    kept = recompute_z(x_rows, weight, bias)
            grad_input, grad_weight, grad_bias = backend.linear_backward(
                grad_out,
                x_rows,
                weight,
                kept,
                ctx.act,
                need_input=need_input,
                need_weight=need_weight,
                need_bias=need_bias and bias is not None,
            )
        if grad_input is not None:
            grad_input = grad_input.view(x.shape)
        return grad_input, grad_weight, grad_bias, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, *_: Any) -> tuple:
        x, weight, bias, kept = ctx.saved_tensors
        z_t = tangent_z(rows(x), weight, rows(x_t) if x_t is not None else None, weight_t, bias_t)
        return cast(ctx.act.delta(z_t, up(kept)), x.dtype), None


def recompute_z(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = x Wᵀ + b in torch ops (differentiable), rounded to the storage dtype as the kept z is."""
    return reference.linear_forward(x, weight, bias, IDENTITY)[0]


def tangent_z(
    x: Tensor, weight: Tensor, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None
) -> Tensor:
    """ż = ẋ Wᵀ + x Ẇᵀ + ḃ for rows x, in the compute dtype (absent tangents are zero)."""
    terms = []
    if x_t is not None:
        terms.append(up(x_t) @ up(weight).t())
    if weight_t is not None:
        terms.append(up(x) @ up(weight_t).t())
    if bias_t is not None:
        terms.append(up(bias_t).expand(x.shape[0], weight.shape[0]))
    if not terms:
        return up(x).new_zeros(x.shape[0], weight.shape[0])
    return sum(terms[1:], terms[0])


def eager_backend(device: torch.device) -> ModuleType:
    """The backend an eager call runs: the one in force, or the reference under a torch.func
    transform (vmap, jvp, grad, ...), whose batched and dual tensors only torch ops can take."""
    return reference if torch._C._are_functorch_transforms_active() else backends.resolve(device)


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
    check_tensor("input", x)  # before anything reads x.device: a list must get a clear error
    x, weight, bias = autocast_to(x.device.type, None, x, weight, bias)
    check_linear_args(x, weight, bias)
    if torch.compiler.is_compiling():
        return linear_op(x, weight, bias, act)
    backend = eager_backend(x.device)
    with no_autocast(x.device.type):
        out, _ = LinearActFunction.apply(x, weight, bias, act, backend)
    # The leading dimensions come back outside the Function: its output is never a view.
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------ custom ops


def _entry(activation: str, negative_slope: float) -> Activation:
    # Only leaky_relu carries a slope; get_activation rejects one for any other entry.
    slope = negative_slope if activation == "leaky_relu" else None
    return get_activation(activation, negative_slope=slope)


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


# ------------------------------------------------------------------------------ op bodies


def _linear_forward_with(
    backend: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation
) -> tuple[Tensor, Tensor]:
    with no_autocast(x.device.type):
        out, saved = backend.linear_forward(x, weight, bias, act)
    z = placeholder(out) if act.uses_output else saved
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
    return tuple(placeholder(x) if g is None else g for g in grads)  # type: ignore[return-value]


@torch.library.custom_op(f"{NS}::linear_forward", mutates_args=())
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
    return _linear_forward_with(backend_module(backend), x, weight, bias, act)


@torch.library.custom_op(f"{NS}::linear_backward", mutates_args=())
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
    module = backend_module(backend)
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
    z = placeholder(out) if get_activation(activation).uses_output else torch.empty_like(out)
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
        grad_input if need_input else placeholder(x),
        grad_weight if need_weight else placeholder(x),
        grad_bias if need_bias else placeholder(x),
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
        refuse_create_graph("manualbp::linear_forward")
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
    triton_backend = backends.triton_module()
    if triton_backend is None:
        return False
    from manualbp.triton_kernels._utils import recorded_launches

    @torch.library.triton_op(f"{NS}::triton_linear_forward", mutates_args=())
    def triton_linear_forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, negative_slope: float
    ) -> tuple[Tensor, Tensor]:
        act = _entry(activation, negative_slope)
        with recorded_launches():
            return _linear_forward_with(triton_backend, x, weight, bias, act)

    @torch.library.triton_op(f"{NS}::triton_linear_backward", mutates_args=())
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


def linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> Tensor:
    """a = f(x Wᵀ + b) through the ops: what :func:`linear` runs while a graph is traced.

    Arguments are already checked (and cast for autocast) by the caller.
    """
    name = traced_backend_name(x.device)
    x_rows, slope = rows(x), act.negative_slope
    if name == "triton_op":
        out, _ = _triton_forward(x_rows, weight, bias, act.name, slope)
    else:
        out, _ = linear_forward(x_rows, weight, bias, act.name, slope, name)
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
    module = backends.triton_module()
    return module is None or bool(module._INTERPRET)


