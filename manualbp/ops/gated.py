"""The gated MLP y = W_d (f(W_g x) ⊙ (W_u x)): its checks, eager Function, custom ops, entry point.

For rows x (M, in), gate and up weights W_g, W_u (hidden, in), down weight W_d (out, hidden),
optional biases, and activation f (SwiGLU: silu, GEGLU: gelu / gelu_tanh, ReGLU: relu, GLU:
sigmoid — any registry entry):

    forward    z_g = x W_gᵀ + b_g,   z_u = x W_uᵀ + b_u        (M, hidden)
               h   = f(z_g) ⊙ z_u                              (M, hidden)
               y   = h W_dᵀ + b_d                              (M, out)

    backward, with g = ∂C/∂y, by the chain rule through each of the three products:
               δ_h  = ∂C/∂h   = g W_d                          (y is linear in h)
               ∇W_d = gᵀ h,   ∇b_d = Σ_rows g
               δ_u  = ∂C/∂z_u = δ_h ⊙ f(z_g)                   (∂h/∂z_u = f(z_g))
               δ_g  = ∂C/∂z_g = δ_h ⊙ z_u ⊙ f′(z_g)            (∂h/∂z_g = z_u f′(z_g))
               ∇W_g = δ_gᵀ x, ∇b_g = Σ δ_g,  ∇W_u = δ_uᵀ x, ∇b_u = Σ δ_u
               ∇x   = δ_g W_g + δ_u W_u                       (x feeds both products)

Backward keeps x (by reference: autograd holds it anyway), z_g and z_u — two hidden-sized
tensors; h and f(z_g) are recomputed from them. Native autograd keeps four (z_g for f′, f(z_g)
and z_u for the product, h for W_d's gradient).

The backend is chosen per call as for every op: the reference arithmetic below in torch ops (any
device; 16-bit storage computed in float32 and rounded once), or the Triton backend
(`manualbp.backends.triton.gated_mlp_*`: gate and up in one GEMM sharing the x tiles, δ_g and
δ_u formed in one pass). The autograd contract of the other ops holds: a backward run with grad
mode on recomputes z_g and z_u from the saved inputs in differentiable torch ops (higher order),
`jvp` is written out, the vmap rule is generated (torch.func transforms run the reference).
While a graph is captured (`torch.compile`, `torch.export`) the entry point runs the custom ops

    manualbp::gated_mlp_forward(x, gate_weight, up_weight, down_weight, gate_bias?, up_bias?,
                                down_bias?, activation, negative_slope, backend="torch")
        -> (y, z_g, z_u)
    manualbp::gated_mlp_backward(grad_out, x, gate_weight, up_weight, down_weight, z_g, z_u,
                                 activation, negative_slope, needs, backend="torch")
        -> the seven gradients

opaque ops running the backend named when the graph was traced ("torch" or "triton"; there is
no `triton_op` variant yet, so Inductor does not see into the gated kernels)

(rows in, rows out; a gradient not asked for is a (0,) placeholder), whose autograd formula is
the backward op — the hand-written backward is what runs inside compiled graphs too.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp._autograd import PositionalFunction
from manualbp.activations import Activation, get_activation
from manualbp.backends import reference
from manualbp.backends.reference import cast, up
from manualbp.ops._common import (
    NS,
    autocast_to,
    backend_module,
    check_same,
    check_tensor,
    no_autocast,
    placeholder,
    refuse_create_graph,
    rows,
)
from manualbp.ops.linear_act import eager_backend, tangent_z, traced_backend_name

__all__ = ["GatedMLPFunction", "gated_mlp", "gated_mlp_backward", "gated_mlp_forward", "gated_mlp_op"]

# ------------------------------------------------------------------------------------ checks


def _check_matrix(name: str, w: Any, shape: tuple[int | None, int], what: str, x: Tensor) -> Tensor:
    check_tensor(name, w)
    if w.dim() != 2 or (shape[0] is not None and w.shape[0] != shape[0]) or w.shape[1] != shape[1]:
        rows_text = "hidden_features" if shape[0] is None else str(shape[0])
        raise ValueError(
            f"{name}: expected a 2-D tensor ({rows_text}, {shape[1]}) {what}, got shape {tuple(w.shape)}"
        )
    check_same(name, w, "input", x)
    return w


def _check_bias(name: str, b: Any, size: int, what: str, x: Tensor) -> None:
    if b is None:
        return
    check_tensor(name, b)
    if b.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},) to match {what}, got {tuple(b.shape)}")
    check_same(name, b, "input", x)


def check_gated_args(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
) -> None:
    """x (..., in), W_g and W_u (hidden, in), W_d (out, hidden), biases (hidden,), (hidden,), (out,)."""
    check_tensor("input", x)
    if x.dim() == 0:
        raise ValueError("input: expected at least 1 dimension (..., in_features), got a 0-d tensor")
    n_in = x.shape[-1]
    check_tensor("gate_weight", gate_weight)
    if gate_weight.dim() != 2 or gate_weight.shape[1] != n_in:
        raise ValueError(
            f"gate_weight: expected a 2-D tensor (hidden_features, {n_in}) to match the input's last "
            f"dimension {n_in} (input shape {tuple(x.shape)}), got shape {tuple(gate_weight.shape)}"
        )
    check_same("gate_weight", gate_weight, "input", x)
    hidden = gate_weight.shape[0]
    _check_matrix("up_weight", up_weight, (hidden, n_in), "the same shape as gate_weight", x)
    _check_matrix("down_weight", down_weight, (None, hidden), f"with hidden_features={hidden}", x)
    _check_bias("gate_bias", gate_bias, hidden, f"hidden_features={hidden}", x)
    _check_bias("up_bias", up_bias, hidden, f"hidden_features={hidden}", x)
    _check_bias("down_bias", down_bias, down_weight.shape[0], "out_features (down_weight's rows)", x)


# ------------------------------------------------------------------------------------ the math


def _pre(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ + b for rows x, in the compute dtype."""
    if bias is None:
        return up(x) @ up(weight).t()
    return torch.addmm(up(bias), up(x), up(weight).t())


def gated_forward_math(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    act: Activation,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, z_g, z_u) for rows x, each in x's dtype (computed in the compute dtype)."""
    z_g, z_u = _pre(x, gate_weight, gate_bias), _pre(x, up_weight, up_bias)
    y = _pre(act(z_g) * z_u, down_weight, down_bias)
    return cast(y, x.dtype), cast(z_g, x.dtype), cast(z_u, x.dtype)


def gated_backward_math(
    grad_out: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    z_g: Tensor,
    z_u: Tensor,
    act: Activation,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The seven gradients (x, W_g, W_u, W_d, b_g, b_u, b_d) of the module docstring, None where
    `needs` says not needed. Rows in; differentiable torch ops (the create_graph path runs it)."""
    need_x, need_wg, need_wu, need_wd, need_bg, need_bu, need_bd = needs
    g, zg, zu = up(grad_out), up(z_g), up(z_u)
    fz = act(zg)  # f(z_g), recomputed
    grads: list[Tensor | None] = [None] * 7
    if need_wd:
        grads[3] = cast(g.t() @ (fz * zu), down_weight.dtype)  # ∇W_d = gᵀ h
    if need_bd:
        grads[6] = cast(g.sum(0), down_weight.dtype)
    if need_x or need_wg or need_wu or need_bg or need_bu:
        delta_h = g @ up(down_weight)
        delta_u = delta_h * fz
        delta_g = act.delta(delta_h * zu, fz if act.uses_output else zg)
        if need_x:
            grad_x = torch.addmm(delta_u @ up(up_weight), delta_g, up(gate_weight))
            grads[0] = cast(grad_x, x.dtype)
        if need_wg:
            grads[1] = cast(delta_g.t() @ up(x), gate_weight.dtype)
        if need_wu:
            grads[2] = cast(delta_u.t() @ up(x), up_weight.dtype)
        if need_bg:
            grads[4] = cast(delta_g.sum(0), gate_weight.dtype)
        if need_bu:
            grads[5] = cast(delta_u.sum(0), up_weight.dtype)
    return tuple(grads)


def _forward_with(backend: ModuleType, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    if backend is reference:
        return gated_forward_math(*args)
    return backend.gated_mlp_forward(*args)


def _backward_with(backend: ModuleType, *args: Any) -> tuple[Tensor | None, ...]:
    if backend is reference:
        return gated_backward_math(*args)
    return backend.gated_mlp_backward(*args)


# ------------------------------------------------------------------------------ eager Function


class GatedMLPFunction(PositionalFunction):
    """y = W_d (f(W_g x + b_g) ⊙ (W_u x + b_u)) + b_d with the backward of the module docstring.

    Takes x of any shape (..., in) and returns (y, z_g, z_u) as rows; z_g and z_u are outputs only
    so that they can be saved (non-differentiable; the entry point drops them). Saves x and the
    weights by reference, z_g and z_u; h and f(z_g) are recomputed in backward.

    * create_graph: the backward recomputes z_g, z_u from the saved inputs in differentiable
      torch ops (the kept ones are constants to autograd), so f″ and every cross term survive;
    * jvp: ẏ = ḣ W_dᵀ + h Ẇ_dᵀ + ḃ_d, ḣ = f′(z_g) ż_g ⊙ z_u + f(z_g) ⊙ ż_u;
    * vmap: generated (forward and backward are torch ops).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        gate_weight: Tensor,
        up_weight: Tensor,
        down_weight: Tensor,
        gate_bias: Tensor | None,
        up_bias: Tensor | None,
        down_bias: Tensor | None,
        act: Activation,
        backend: ModuleType,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _forward_with(
            backend, rows(x), gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, act
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, act, backend = inputs
        _, z_g, z_u = output
        saved = (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, z_g, z_u)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(z_g, z_u)
        ctx.act, ctx.backend = act, backend

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_zg: Tensor, _grad_zu: Tensor) -> tuple:
        x, wg, wu, wd, bg, bu, bd, z_g, z_u = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:7])
        needs = needs[:4] + tuple(n and b is not None for n, b in zip(needs[4:], (bg, bu, bd)))
        x_rows, backend = rows(x), ctx.backend
        with no_autocast(x.device.type):
            if torch.is_grad_enabled():  # create_graph: z_g, z_u as functions of the inputs
                backend = reference
                z_g, z_u = _pre(x_rows, wg, bg), _pre(x_rows, wu, bu)
            grads = _backward_with(backend, grad_out, x_rows, wg, wu, wd, z_g, z_u, ctx.act, needs)
        grad_x = grads[0].view(x.shape) if grads[0] is not None else None
        return (grad_x, *grads[1:], None, None)

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: Tensor | None,
        wg_t: Tensor | None,
        wu_t: Tensor | None,
        wd_t: Tensor | None,
        bg_t: Tensor | None,
        bu_t: Tensor | None,
        bd_t: Tensor | None,
        *_: Any,
    ) -> tuple:
        x, wg, wu, wd, _bg, _bu, _bd, z_g, z_u = ctx.saved_tensors
        x_rows = rows(x)
        xt_rows = rows(x_t) if x_t is not None else None
        zg_t = tangent_z(x_rows, wg, xt_rows, wg_t, bg_t)
        zu_t = tangent_z(x_rows, wu, xt_rows, wu_t, bu_t)
        zg, zu = up(z_g), up(z_u)
        fz = ctx.act(zg)
        deriv = ctx.act.derivative(fz if ctx.act.uses_output else zg)
        h_t = deriv * zg_t * zu + fz * zu_t
        y_t = tangent_z(fz * zu, wd, h_t, wd_t, bd_t)  # ḣ W_dᵀ + h Ẇ_dᵀ + ḃ_d
        return cast(y_t, x.dtype), None, None


# ------------------------------------------------------------------------------ entry point


def gated_mlp(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
    activation: str | Activation = "silu",
    *,
    negative_slope: float | None = None,
) -> Tensor:
    """y = (f(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u)) W_dᵀ + b_d over the last dimension of `x`.

    Weights as `nn.Linear` stores them: `gate_weight` and `up_weight` (hidden, in),
    `down_weight` (out, hidden). `activation` is a registry name ("silu" for SwiGLU / LLaMA,
    "gelu" or "gelu_tanh" for GEGLU). The backward is hand-written (module docstring) and keeps
    x, z_g and z_u only. Under `torch.autocast` it computes in the autocast dtype; while a graph
    is captured it runs as the ``manualbp::gated_mlp_*`` custom ops.
    """
    act = get_activation(activation, negative_slope=negative_slope)
    check_tensor("input", x)
    x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias = autocast_to(
        x.device.type, None, x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias
    )
    check_gated_args(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    args = (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    if torch.compiler.is_compiling():
        return gated_mlp_op(*args, act)
    backend = eager_backend(x.device)
    with no_autocast(x.device.type):
        y, _, _ = GatedMLPFunction.apply(*args, act, backend)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], down_weight.shape[0])


# ------------------------------------------------------------------------------ custom ops


def _entry(activation: str, negative_slope: float) -> Activation:
    slope = negative_slope if activation == "leaky_relu" else None
    return get_activation(activation, negative_slope=slope)


@torch.library.custom_op(f"{NS}::gated_mlp_forward", mutates_args=())
def gated_mlp_forward(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    activation: str,
    negative_slope: float,
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, z_g, z_u) for rows x (M, in), on the named backend."""
    act = _entry(activation, negative_slope)
    module = backend_module(backend)
    with no_autocast(x.device.type):
        args = (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, act)
        return _forward_with(module, *args)


@torch.library.custom_op(f"{NS}::gated_mlp_backward", mutates_args=())
def gated_mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    z_g: Tensor,
    z_u: Tensor,
    activation: str,
    negative_slope: float,
    needs: list[bool],
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (x, W_g, W_u, W_d, b_g, b_u, b_d); a (0,) placeholder where not needed."""
    act = _entry(activation, negative_slope)
    module = backend_module(backend)
    with no_autocast(x.device.type):
        grads = _backward_with(
            module, grad_out, x, gate_weight, up_weight, down_weight, z_g, z_u, act, tuple(needs)
        )
    return tuple(placeholder(x) if g is None else g for g in grads)  # type: ignore[return-value]


@gated_mlp_forward.register_fake
def _forward_fake(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    activation: str,
    negative_slope: float,
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    rows_, hidden = x.shape[0], gate_weight.shape[0]
    return (
        x.new_empty((rows_, down_weight.shape[0])),
        x.new_empty((rows_, hidden)),
        x.new_empty((rows_, hidden)),
    )


@gated_mlp_backward.register_fake
def _backward_fake(
    grad_out: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    z_g: Tensor,
    z_u: Tensor,
    activation: str,
    negative_slope: float,
    needs: list[bool],
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden, n_out = gate_weight.shape[0], down_weight.shape[0]
    shapes = [tuple(x.shape), tuple(gate_weight.shape), tuple(up_weight.shape),
              tuple(down_weight.shape), (hidden,), (hidden,), (n_out,)]  # fmt: skip
    dtypes = [x.dtype, gate_weight.dtype, up_weight.dtype, down_weight.dtype,
              gate_weight.dtype, up_weight.dtype, down_weight.dtype]  # fmt: skip
    return tuple(  # type: ignore[return-value]
        x.new_empty(shape, dtype=dtype) if need else placeholder(x)
        for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    x, wg, wu, wd, bg, bu, bd, activation, negative_slope, *backend = inputs
    _, z_g, z_u = output
    ctx.save_for_backward(x, wg, wu, wd, z_g, z_u)
    ctx.mark_non_differentiable(z_g, z_u)
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.has_bias = (bg is not None, bu is not None, bd is not None)
    ctx.backend_args, ctx.num_inputs = tuple(backend), len(inputs)


def _backward(ctx: Any, grad_out: Tensor, _grad_zg: Tensor, _grad_zu: Tensor) -> tuple:
    refuse_create_graph("manualbp::gated_mlp_forward")
    x, wg, wu, wd, z_g, z_u = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4]) + [
        n and has for n, has in zip(ctx.needs_input_grad[4:7], ctx.has_bias)
    ]
    grads = gated_mlp_backward(
        grad_out, x, wg, wu, wd, z_g, z_u, ctx.activation, ctx.negative_slope, needs, *ctx.backend_args
    )
    return (*(g if need else None for g, need in zip(grads, needs)), *[None] * (ctx.num_inputs - 7))


gated_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


def gated_mlp_op(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    act: Activation,
) -> Tensor:
    """The gated MLP through the custom ops: what :func:`gated_mlp` runs while a graph is traced.

    Arguments are already checked (and cast for autocast) by the caller.
    """
    # "triton_op" (CUDA graphs that Inductor sees into) has no gated variant: the opaque op runs
    # the Triton backend then.
    name = "torch" if traced_backend_name(x.device) == "torch" else "triton"
    y, _, _ = gated_mlp_forward(
        rows(x), gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
        act.name, act.negative_slope, name,
    )  # fmt: skip
    return y.view(*x.shape[:-1], down_weight.shape[0])

