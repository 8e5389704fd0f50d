"""Whole-network backpropagation: the seed's δ recursion as one autograd Function.

A per-layer MLP is L autograd nodes, each handing a (M, in) input gradient to the next, which
multiplies it by its f′. Here the stack is one node and its backward is the seed's loop itself,
from the last layer to the first:

    δᴸ     = ∂C/∂aᴸ ⊙ f′ᴸ
    ∇Wˡ    = δˡᵀ aˡ⁻¹          (aˡ⁻¹ is the layer's input; a⁰ = x)
    ∇bˡ    = Σ_rows δˡ
    δˡ⁻¹   = f′ˡ⁻¹ ⊙ (δˡ Wˡ)    formed at once, in the epilogue of the input-gradient GEMM on Triton

Only what autograd asks for is computed: the loop stops at the lowest layer that owns a parameter
needing a gradient (or at the input, when it requires grad).

What forward keeps (DESIGN.md, "What the backward saves"): at most one activation-sized tensor per
layer, the one f′ is read from — `a` for output-derivable activations (which is also the next
layer's input, so its weight gradient costs nothing more) and `z` for GELU-class ones, whose `a`
is recomputed as f(z) when the next layer's weight gradient needs it. The last layer with an
identity activation keeps nothing at all. Native autograd keeps both z and a for GELU-class
layers, so this is half its activation memory. With `recompute=True` only the block input is kept
and backward reruns the forward first (activation checkpointing of the whole block). The `MLP`
module's cached CPU plan (:mod:`manualbp.ops.network_plan`) trades the other way: it keeps a next
to z for GELU-class hidden layers (native's memory, no recompute in backward).

Peak memory: on the CPU fast path (:mod:`manualbp.ops.network_fast`, float32/float64/bfloat16,
first order, graph not retained) each layer's kept tensor is dropped as soon as the sweep has used it,
and its storage may take the next δ, so the kept tensors do not pile up next to the parameter
gradients; experiments/bench_memory.py measures the peak at or below native's. Elsewhere (the
Triton and float16 paths, retain_graph=True, saved-tensor hooks active) the kept tensors are saved
tensors, released when this node's backward returns.

On the reference path, for 16-bit storage the recomputed a = f(z) starts from the stored
(rounded) z, where forward rounded f of the float32 z: the two can differ in the last bit. In
float32/float64, and on the bfloat16 fast path (which rounds z first, as native), they are equal.
`MLP` modules run the fast path through a cached plan (:mod:`manualbp.ops.network_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp._autograd import PositionalFunction
from manualbp.activations import Activation, get_activation
from manualbp.backends import fast, reference
from manualbp.backends.reference import cast, compute_dtype, up
from manualbp.ops._common import (
    autocast_on,
    autocast_to,
    check_linear_args,
    check_same,
    check_tensor,
    no_autocast,
)
from manualbp.ops.linear_act import eager_backend, tangent_z
from manualbp.ops.network_fast import fast_sweep, sweep_for
from manualbp.ops.saved_bytes import SavedBytes, saved_tensor_bytes

__all__ = [
    "MLPFunction",
    "NetworkPlan",
    "SavedBytes",
    "differentiable_backward",
    "mlp",
    "mlp_network",
    "network_tangent",
    "reference_step",
    "saved_tensor_bytes",
    "step_for",
]


@dataclass(frozen=True)
class NetworkPlan:
    """The static description of a stack: activations, which layers have a bias, the backend."""

    acts: tuple[Activation, ...]
    has_bias: tuple[bool, ...]
    backend: ModuleType
    recompute: bool = False
    # The owner's reusable δ buffers (fast path only; see manualbp.backends.fast.Workspace).
    workspace: Any = field(default=None, compare=False)

    @property
    def depth(self) -> int:
        return len(self.acts)

    def keeps(self, layer: int) -> bool:
        """Whether layer `layer` keeps its `a`/`z` for backward: all but an identity last layer."""
        return not (layer == self.depth - 1 and self.acts[layer].name == "identity")

    def split(self, params: Sequence[Any]) -> list[tuple[Any, Any]]:
        """(weight, bias) per layer from the flat parameter list [W1, b1?, W2, b2?, ...]."""
        out: list[tuple[Tensor, Tensor | None]] = []
        i = 0
        for has_bias in self.has_bias:
            weight, i = params[i], i + 1
            bias: Tensor | None = None
            if has_bias:
                bias, i = params[i], i + 1
            out.append((weight, bias))
        return out


# ------------------------------------------------------------------------------ backend steps
#
# One step of the backward loop, for layer l:
#     δ          = grad ⊙ f′(saved)   (act is identity when `grad` already is δ)
#     grad_weight = δᵀ x,  grad_bias = Σ δ
#     grad_prev   = δ W ⊙ f′_prev(prev_saved)   (prev_act None: the plain input gradient δ W)
# Every tensor is 2-D (rows flattened); the step returns its results in the storage dtypes.

Step = Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]]


def reference_step(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    act: Activation,
    prev_saved: Tensor | None,
    prev_act: Activation | None,
    *,
    need_prev: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The step in plain PyTorch; 16-bit operands are computed in float32 and rounded once."""
    cdt = compute_dtype(grad.dtype)
    grad_c = cast(grad, cdt)
    delta = grad_c if saved is None else act.delta(grad_c, cast(saved, cdt))
    grad_weight = cast(delta.t() @ cast(x, cdt), weight.dtype) if need_weight else None
    grad_bias = cast(delta.sum(0), weight.dtype) if need_bias else None
    grad_prev = None
    if need_prev:
        grad_prev = delta @ cast(weight, cdt)
        if prev_act is not None:
            # δˡ⁻¹ = f′ˡ⁻¹ ⊙ (δˡ Wˡ): rounded once, after the product, as the fused epilogue does.
            grad_prev = prev_act.delta(grad_prev, cast(prev_saved, cdt))  # type: ignore[arg-type]
        grad_prev = cast(grad_prev, x.dtype)
    return grad_prev, grad_weight, grad_bias


def step_for(backend: ModuleType) -> Step:
    """The backward step of `backend`: :func:`reference_step`, or the backend's own `network_step`
    (same signature; the Triton backend forms δˡ⁻¹ in the input-gradient GEMM's epilogue).
    """
    return reference_step if backend is reference else backend.network_step


# ------------------------------------------------------------------------------ forward pieces


def _forward_layers(
    x: Tensor, plan: NetworkPlan, layers: list[tuple[Tensor, Tensor | None]]
) -> tuple[Tensor, list[Tensor | None]]:
    """Run the stack; returns the output and, per layer, the tensor backward keeps (or None)."""
    kept: list[Tensor | None] = []
    a, forward = x, plan.backend.linear_forward
    for act, (weight, bias) in zip(plan.acts, layers, strict=True):
        a, saved = forward(a, weight, bias, act)
        kept.append(saved)
    if not plan.keeps(len(kept) - 1):
        kept[-1] = None
    return a, kept


def _layer_input(x: Tensor, plan: NetworkPlan, kept: Sequence[Tensor | None], layer: int) -> Tensor:
    """aˡ⁻¹, the input of layer `layer`: x, the kept a, or f(z) recomputed from the kept z."""
    if layer == 0:
        return x
    prev_act, prev = plan.acts[layer - 1], kept[layer - 1]
    assert prev is not None  # every layer but an identity last one keeps its tensor
    if prev_act.uses_output:
        return prev
    return cast(prev_act(cast(prev, compute_dtype(prev.dtype))), prev.dtype)


def _lowest_needed(needs_x: bool, needs_layer: Sequence[bool]) -> int:
    """The lowest layer the backward loop must reach (−1 when the input needs a gradient)."""
    if needs_x:
        return -1
    return next((i for i, need in enumerate(needs_layer) if need), len(needs_layer))


# ------------------------------------------------------------------------------ the Function


class MLPFunction(PositionalFunction):
    """aᴸ = fᴸ(Wᴸ ⋯ f¹(W¹x + b¹) ⋯ + bᴸ) forward; the seed's δ recursion backward.

    Inputs: `x` (M, in) — already flattened to rows —, the plan, and the parameters as a flat
    list [W1, b1?, W2, b2?, ...]. Outputs: the network output and the kept tensors (returned so
    that `setup_context` can save them; non-differentiable).

    Higher order, forward mode and vmap as :class:`manualbp.ops.linear_act.LinearActFunction`:
    a backward with grad mode on reruns the forward from the saved inputs and the loop in torch
    ops (differentiable); `jvp` pushes tangents through the layers; vmap is generated.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, plan: NetworkPlan, *params: Tensor) -> tuple[Tensor, ...]:
        out, kept = _forward_layers(x, plan, plan.split(params))
        if plan.recompute:
            kept = [None] * plan.depth  # dropped here; backward reruns the forward
        # A kept tensor that is the output itself (last layer, f′ from a) is not returned twice:
        # setup_context takes it from the output.
        empty = out.new_empty(0)
        return (out, *(empty if k is None or k is out else k for k in kept))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        x, plan, *params = inputs
        out, kept = output[0], list(output[1:])
        ctx.mark_non_differentiable(*kept)
        # The kept outputs never receive a gradient: without this autograd would allocate an
        # (M × width) tensor of zeros for each of them at the start of backward.
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        depth = len(kept)
        saved: list[Tensor | None] = [None] * depth
        last_a = False
        if not plan.recompute:
            saved = [k if k.dim() == 2 else None for k in kept]  # (0,) placeholders: none kept
            if plan.keeps(depth - 1) and plan.acts[-1].uses_output:
                last_a, saved[-1] = True, out
        ctx.save_for_forward(x, *params)
        ctx.kept = None
        if plan.backend is fast and torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            # The fast sweep frees each layer's kept tensor as soon as it has used it, which
            # saved tensors cannot do (autograd frees them all when backward returns). The kept
            # intermediates are reachable from this node alone (mlp_network drops the extra
            # outputs), so nothing can modify them in place; their versions are still checked,
            # as saved tensors would be. The output itself (kept by the last layer) stays a saved
            # tensor: on ctx it would make a reference cycle, and the caller may modify it.
            # With saved-tensor hooks active (save_on_cpu, checkpointing, measuring) everything
            # goes through save_for_backward, so the hooks see it.
            top = saved[-1] if last_a else None
            ctx.save_for_backward(x, *params, top)
            ctx.kept = [None if last_a and i == plan.depth - 1 else k for i, k in enumerate(saved)]
            ctx.versions = [None if k is None else k._version for k in ctx.kept]
        else:
            ctx.save_for_backward(x, *params, *saved)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, *_grad_kept: Tensor) -> tuple:
        plan: NetworkPlan = ctx.plan
        x, *rest = ctx.saved_tensors
        if grad_out is None:  # possible only without materialized grads: nothing flows back
            return (None,) * (len(ctx.needs_input_grad))
        fast_kept = ctx.kept is not None
        if fast_kept:
            params, kept = rest[:-1], _take_kept(ctx, rest[-1])
        else:
            n_params = len(rest) - plan.depth
            params, kept = rest[:n_params], list(rest[n_params:])
        layers = plan.split(params)
        if plan.backend is fast and not torch.is_grad_enabled():
            release = fast_kept and not _keep_graph()
            if plan.recompute:
                _, kept = _forward_layers(x, plan, layers)
            spec = sweep_for(plan.acts, plan.has_bias)
            with no_autocast("cpu"):  # backward may run inside an autocast block
                return fast_sweep(
                    spec, ctx.needs_input_grad, x, kept, params, grad_out, release, plan.workspace
                )
        return differentiable_backward(ctx.needs_input_grad, plan, x, kept, layers, grad_out)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, _plan_t: None, *params_t: Tensor | None) -> tuple:
        """Forward mode, layer by layer: żˡ = ȧˡ⁻¹ Wˡᵀ + aˡ⁻¹ Ẇˡᵀ + ḃˡ, ȧˡ = f′ˡ ⊙ żˡ."""
        plan: NetworkPlan = ctx.plan
        x, *params = ctx.saved_tensors
        return (network_tangent(plan, x, params, x_t, params_t), *(None,) * plan.depth)


def network_tangent(
    plan: NetworkPlan, x: Tensor, params: Sequence[Tensor], x_t: Tensor | None,
    params_t: Sequence[Tensor | None],
) -> Tensor:  # fmt: skip
    """ȧᴸ of the stack: the tangents pushed through the layers in reference torch ops."""
    a, a_t = x, x_t
    for act, (weight, bias), (weight_t, bias_t) in zip(
        plan.acts, plan.split(params), plan.split(params_t), strict=True
    ):
        z_t = tangent_z(a, weight, a_t, weight_t, bias_t)
        a, saved = reference.linear_forward(a, weight, bias, act)
        a_t = act.delta(z_t, up(saved))
    assert a_t is not None
    return cast(a_t, x.dtype)


def differentiable_backward(
    needs_input_grad: tuple[bool, ...],
    plan: NetworkPlan,
    x: Tensor,
    kept: list[Tensor | None],
    layers: list[tuple[Tensor, Tensor | None]],
    grad_out: Tensor,
) -> tuple:
    """The loop off the fast path: the plan's backend (Triton, or 16-bit reference), or — with
    grad mode on (create_graph) — a differentiable loop: the kept tensors are constants to
    autograd, so the forward is rerun from the saved inputs and every step runs the reference
    equations in torch ops (any backend, same device)."""
    with no_autocast(x.device.type):  # backward may run inside an autocast block
        if torch.is_grad_enabled():
            plan = dataclasses.replace(plan, backend=reference, recompute=True)
        return _backward_loop(needs_input_grad, plan, x, kept, layers, grad_out)

def _take_kept(ctx: Any, top: Tensor | None) -> list[Tensor | None]:
    """The kept tensors from ctx, version-checked as saved tensors are (see setup_context)."""
    kept = list(ctx.kept)
    if top is not None:
        kept[-1] = top
    for i, (k, v) in enumerate(zip(ctx.kept, ctx.versions, strict=True)):
        if k is not None and k._version != v:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: the tensor kept by layer {i} of MLPFunctionBackward is at "
                f"version {k._version}; expected version {v} instead."
            )
    if not _keep_graph():
        ctx.kept = None  # the sweep holds the only references now, and drops them as it goes
    return kept


def _keep_graph() -> bool:
    """Whether this backward was asked to keep the graph (retain_graph=True)."""
    return bool(torch._C._autograd._get_current_graph_task_keep_graph())


def _backward_loop(
    needs_input_grad: tuple[bool, ...],
    plan: NetworkPlan,
    x: Tensor,
    kept: list[Tensor | None],
    layers: list[tuple[Tensor, Tensor | None]],
    grad_out: Tensor,
) -> tuple:
    """The seed's loop from the last layer down to the lowest one a gradient is wanted for."""
    if plan.recompute:  # (grad mode is on here only for a differentiable backward)
        _, kept = _forward_layers(x, plan, layers)
    # Which gradients autograd wants, per layer: (weight, bias).
    flags = needs_input_grad[2:]
    wants = [(bool(flags[j]), bool(flags[j + 1]) if b else False) for j, b in _offsets(plan)]
    lowest = _lowest_needed(bool(needs_input_grad[0]), [w or b for w, b in wants])
    step = step_for(plan.backend)

    grads: list[Tensor | None] = [None] * len(flags)
    grad_x = None
    grad: Tensor | None = grad_out
    top = plan.depth - 1
    for layer in range(top, max(lowest, 0) - 1, -1):
        weight, _ = layers[layer]
        need_weight, need_bias = wants[layer]
        has_prev = layer > 0
        need_prev = layer - 1 >= lowest
        assert grad is not None  # every step above this one was asked for δ (need_prev)
        grad, grad_weight, grad_bias = step(
            grad,
            _layer_input(x, plan, kept, layer),
            weight,
            kept[layer] if layer == top else None,
            plan.acts[layer] if layer == top else _IDENTITY,
            kept[layer - 1] if has_prev and need_prev else None,
            plan.acts[layer - 1] if has_prev else None,
            need_prev=need_prev,
            need_weight=need_weight,
            need_bias=need_bias,
        )
        j, has_bias = _offsets(plan)[layer]
        grads[j] = grad_weight
        if has_bias:
            grads[j + 1] = grad_bias
        if layer == 0:
            grad_x = grad
    return (grad_x, None, *grads)


def _offsets(plan: NetworkPlan) -> list[tuple[int, bool]]:
    """Per layer: index of its weight in the flat parameter list, and whether a bias follows."""
    out, j = [], 0
    for has_bias in plan.has_bias:
        out.append((j, has_bias))
        j += 2 if has_bias else 1
    return out


_IDENTITY = get_activation("identity")


def mlp_network(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    acts: Sequence[Activation],
    *,
    backend: ModuleType,
    recompute: bool = False,
    workspace: fast.Workspace | None = None,
) -> Tensor:
    """The stack as one autograd node. `x` is (..., in); leading dimensions are kept.

    The caller checks shapes and dtypes (the modules do); `backend` is a resolved backend module.
    The reference backend runs its first-order fast path (:mod:`manualbp.backends.fast`) for
    CPU float32/float64/bfloat16 inputs; `workspace` (the module's) lends it its δ buffers.
    """
    if backend is reference and fast.network_ok(x):
        backend = fast
    if not (len(weights) == len(biases) == len(acts) > 0):
        raise ValueError(
            f"weights/biases/acts: expected the same positive length, got "
            f"{len(weights)}/{len(biases)}/{len(acts)}"
        )
    plan = NetworkPlan(
        acts=tuple(acts),
        has_bias=tuple(b is not None for b in biases),
        backend=backend,
        recompute=bool(recompute),
        workspace=workspace,
    )
    params: list[Tensor] = []
    for weight, bias in zip(weights, biases, strict=True):
        params.append(weight)
        if bias is not None:
            params.append(bias)
    if x.dim() == 2:
        return MLPFunction.apply(x, plan, *params)[0]
    out, *_ = MLPFunction.apply(x.reshape(-1, x.shape[-1]), plan, *params)
    return out.view(*x.shape[:-1], out.shape[-1])


def checked_stack(
    input: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None]
) -> tuple[Tensor, list[Tensor], list[Tensor | None], bool]:
    """The stack's arguments checked (and cast to the autocast dtype under `torch.autocast`), as
    the entry points of network and fused mode take them: (input, weights, biases, autocast)."""
    check_tensor("input", input)
    device = input.device
    autocast = autocast_on(device.type)
    if autocast:
        input, *weights = autocast_to(device.type, None, input, *weights)
        biases = list(autocast_to(device.type, None, *biases))
    dtype = input.dtype
    check_linear_args(input, weights[0], biases[0])
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        # The names are formatted only for an error message (this runs every call).
        if weight.dtype != dtype or weight.device != device:
            check_same(f"layers.{i}.weight", weight, "input", input)
        if bias is not None and (bias.dtype != dtype or bias.device != device):
            check_same(f"layers.{i}.bias", bias, "input", input)
    return input, list(weights), list(biases), autocast


def mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    acts: Sequence[Activation],
    *,
    recompute: bool = False,
    workspace: fast.Workspace | None = None,
) -> Tensor:
    """aᴸ of the stack, as one autograd node on the backend in force for `input`'s device.

    `weights[l]` is (out, in) and `biases[l]` (out,) or None, as for :func:`manualbp.functional.linear`.
    Under `torch.autocast` every layer computes in the autocast dtype, as `nn.Linear` would there.
    """
    input, weights, biases, autocast = checked_stack(input, weights, biases)
    device = input.device
    backend = eager_backend(device)
    if not autocast:
        return mlp_network(input, weights, biases, acts, backend=backend, recompute=recompute,
                           workspace=workspace)  # fmt: skip
    with no_autocast(device.type):
        return mlp_network(input, weights, biases, acts, backend=backend, recompute=recompute,
                           workspace=workspace)  # fmt: skip
