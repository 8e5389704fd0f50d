"""An `MLP`'s network mode on the CPU fast path, planned once and run with little Python per call.

A train step of a small MLP on a CPU is mostly Python and dispatcher overhead: at 64 × 64 × 4
the GEMMs are a few microseconds each. So everything :func:`manualbp.ops.network.mlp` works out
per call — argument checks, the backend, the flat parameter list, each layer's bound kernels,
which layers backward visits — is worked out here once per module and kept in a
:class:`FastPlan` that the module holds (CPU float32, float64 and bfloat16: the dtypes of
:func:`manualbp.backends.fast.network_ok`).

A plan must never give a wrong number, so before each use :meth:`FastPlan.admits` checks, in a
few dozen attribute reads, everything it was built on: the module's mode, its layer list, each
layer's activation entry, each parameter object (replaced weights, `prune` and `weight_norm`
replace them), each parameter's dtype and device (`module.to()` changes them in place), module
hooks (own and global), torch.compile tracing, torch.func transforms, autocast and the backend
in force, and the input's type, dtype, device and width. Whatever fails runs the general path
(which raises the clear errors; the module then builds a new plan when one fits). What the plan
does not depend on is not checked: `requires_grad` (autograd's `needs_input_grad` picks the
visited layers per call), grad mode, shapes past the first layer (the GEMMs check them).

What it keeps differs from the general path in one way: a GELU-class hidden layer keeps
a = f(z) next to z (native's memory; the general path keeps z alone and recomputes f(z) in
backward, which on a CPU costs about as much as a small layer's GEMMs). Layer 0's kept tensor
is written into the module's workspace buffer (taken in forward, given back by the sweep), so
the buffer kept across steps stands in for an allocation at the step's peak.

The node, :class:`FastMLPFunction`, is :class:`manualbp.ops.network.MLPFunction` with its CPU
fast path only: one output, the kept intermediates on its context (reachable from it alone, so
the sweep may drop and reuse them), x, the parameters and an output kept by the last layer as
saved tensors (autograd checks their versions and frees them). Saved-tensor hooks
(checkpointing, `save_on_cpu`) see every kept tensor, create_graph gets the differentiable
reference loop, forward-mode AD the reference tangents — as from `MLPFunction`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn

from manualbp import backends
from manualbp.backends import fast, reference
from manualbp.ops._common import no_autocast
from manualbp.ops.network import NetworkPlan, differentiable_backward, network_tangent
from manualbp.ops.network_fast import REUSE_BYTES, Sweep, fast_sweep

__all__ = ["FastMLPFunction", "FastPlan", "plan_for"]

_module = nn.modules.module
_GLOBAL_HOOKS = (
    _module._global_forward_hooks,
    _module._global_forward_pre_hooks,
    _module._global_backward_hooks,
    _module._global_backward_pre_hooks,
)
_transforms_active = torch._C._are_functorch_transforms_active
_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_keep_graph = torch._C._autograd._get_current_graph_task_keep_graph
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


class FastPlan:
    """One MLP's fast path: its layers, parameters, dtype and bound kernels, as first seen."""

    def __init__(
        self, container: nn.Module, layers: Sequence[Any], dtype: torch.dtype, workspace: Any
    ) -> None:
        self.container, self.dtype, self.workspace = container, dtype, workspace
        self.depth = len(layers)
        acts = tuple(layer.act for layer in layers)
        biases = [layer._parameters["bias"] for layer in layers]
        self.entries = tuple(
            (layer, layer._parameters["weight"], bias, layer.act) for layer, bias in zip(layers, biases)
        )
        self.params: tuple[Tensor, ...] = tuple(
            p for _, w, b, _ in self.entries for p in ((w,) if b is None else (w, b))
        )
        # What admits() reads, held directly: a module's hook dicts, its parameter dict and its
        # __dict__ are its own for life (registering, replacing or deleting changes their
        # contents), so holding them saves an attribute lookup each per call.
        self.modules, self.layers = container._modules, tuple(layers)
        self.hooks = tuple(
            d
            for layer in layers
            for d in (layer._forward_hooks, layer._forward_pre_hooks, layer._backward_hooks,
                      layer._backward_pre_hooks)
        )  # fmt: skip
        self.checks = tuple(
            (layer._parameters, w, b, layer.__dict__, act) for layer, w, b, act in self.entries
        )
        self.n_in = self.entries[0][1].shape[1]
        self.n_out = self.entries[-1][1].shape[0]
        self.sweep = Sweep(acts, [b is not None for b in biases])
        # Per layer: the bound forward step, where its parameters sit, and whether it keeps its
        # a = f(z) next to z (GELU-class hidden layers: the layer above's weight gradient reads
        # it, as native keeps it, instead of recomputing f(z) in backward).
        self.steps = tuple(
            (fast.layer_forward(act), wi, bi, not act.uses_output and i < self.depth - 1)
            for i, (act, (wi, bi)) in enumerate(zip(acts, self.sweep.index))
        )
        # Layer 0's kept tensor (alive from the start of forward to the end of backward, over
        # the step's peak) is written into the workspace buffer, when it is a hidden layer: the
        # buffer then stands in for an allocation native makes, instead of sitting idle.
        self.first, self.rest = self.steps[0], self.steps[1:]
        self.keeps_inputs = any(step[3] for step in self.steps)
        self.lends = workspace is not None and self.depth > 1
        self.width0 = self.entries[0][1].shape[0]
        self.keeps_last = acts[-1].name != "identity"
        self.last_is_output = self.keeps_last and acts[-1].uses_output
        # The general node's plan: create_graph and forward-mode AD run its reference loops.
        self.reference = NetworkPlan(acts, tuple(b is not None for b in biases), reference)

    def __reduce__(self) -> tuple:
        # Copies and pickles of the module start without a plan (it names the original's objects).
        return _no_plan, ()

    def admits(self, mlp: Any, x: Any) -> bool:
        """Whether this plan computes exactly what the general path would for `mlp(x)` now."""
        if x.__class__ is not Tensor or x.dtype is not self.dtype or not x.is_cpu:
            return False
        shape = x.shape
        if not shape or shape[-1] != self.n_in:
            return False
        if mlp.mode != "network" or mlp.recompute or mlp._modules.get("layers") is not self.container:
            return False
        if any(_GLOBAL_HOOKS) or any(self.hooks) or torch.compiler.is_compiling() or _transforms_active():
            return False
        if torch.is_autocast_enabled("cpu") or backends.get_backend() == "triton":
            return False
        if tuple(self.modules.values()) != self.layers:
            return False
        for params, weight, bias, attrs, act in self.checks:
            if params.get("weight") is not weight or params.get("bias") is not bias:
                return False
            if attrs.get("act") is not act:
                return False
        dtype = self.dtype
        for p in self.params:  # module.to() swaps each parameter's data in place
            if p.dtype is not dtype or not p.is_cpu:
                return False
        return True

    def __call__(self, x: Tensor) -> Tensor:
        x = _unwrap_if_dead(x)  # a tensor left over from a finished torch.func transform
        if x.dim() == 2:
            return _apply(x, self, *self.params)
        out = _apply(x.reshape(-1, self.n_in), self, *self.params)
        return out.view(*x.shape[:-1], self.n_out)


def _no_plan() -> None:
    return None


def plan_for(mlp: Any, x: Tensor, workspace: Any, layer_type: type) -> FastPlan | None:
    """A new plan for `mlp(x)` when the fast path fits it (else None); then ``plan.admits(mlp, x)``.

    Every layer must be exactly `layer_type` (`manualbp.LinearAct`: a subclass may compute
    something else)."""
    if not isinstance(x, Tensor) or not fast.network_ok(x):
        return None
    container = mlp._modules.get("layers")
    layers = list(container._modules.values()) if container is not None else []
    if not layers or any(type(layer) is not layer_type for layer in layers):
        return None
    plain = (nn.Parameter, Tensor)  # not a tensor subclass, which may mean something else
    for layer in layers:
        weight, bias = layer._parameters.get("weight"), layer._parameters.get("bias", False)
        if type(weight) not in plain or (bias is not None and type(bias) not in plain):
            return None  # parametrized or pruned (no weight entry), or a tensor subclass
    plan = FastPlan(container, layers, x.dtype, workspace)
    return plan if plan.admits(mlp, x) else None


class FastMLPFunction(torch.autograd.Function):
    """aᴸ of the stack forward, the fast sweep backward; inputs (x rows, plan, *params)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: FastPlan, *params: Tensor) -> Tensor:
        lent = out = None
        hooked = _saved_hooks(False) is not None  # saved-tensor hooks: they must see every kept tensor
        if plan.lends and not hooked:
            rows = x.shape[0]
            n = rows * plan.width0
            if n * x.element_size() >= REUSE_BYTES:
                lent = plan.workspace.take(n, x)
                out = lent[:n].view(rows, plan.width0)
        fn, wi, bi, keeps_a = plan.first
        a, saved = fn(x, params[wi], None if bi < 0 else params[bi], out)
        kept: list[Tensor | None] = [saved]
        inputs: list[Tensor | None] | None = None
        if plan.keeps_inputs:
            inputs = [a if keeps_a else None]
            for fn, wi, bi, keeps_a in plan.rest:
                a, saved = fn(a, params[wi], None if bi < 0 else params[bi])
                kept.append(saved)
                inputs.append(a if keeps_a else None)
        else:
            for fn, wi, bi, _ in plan.rest:
                a, saved = fn(a, params[wi], None if bi < 0 else params[bi])
                kept.append(saved)
        if not plan.keeps_last:
            kept[-1] = None
        if forward_ad._current_level >= 0:  # only inside a dual level can a tangent arrive
            ctx.save_for_forward(x, *params)
        if not hooked:
            top = None
            if plan.last_is_output:
                top, kept[-1] = kept[-1], None
            ctx.save_for_backward(x, *params, top)
            ctx.state = (plan, kept, inputs, lent)
        else:  # (no workspace buffer then: the hooks may hold on to what they packed)
            ctx.save_for_backward(x, *params, *kept, *(inputs or ()))
            ctx.state = (plan, None, None, None)
        return a

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        saved = ctx.saved_tensors  # first: it raises for a second backward of a freed graph
        state = ctx.state
        plan: FastPlan = state[0]
        kept, inputs, lent = state[1], state[2], state[3]
        n = plan.sweep.n_params
        x, params = saved[0], saved[1 : n + 1]
        release = False
        if kept is None:
            depth = plan.depth
            kept = list(saved[n + 1 : n + 1 + depth])
            inputs = list(saved[n + 1 + depth :]) if plan.keeps_inputs else None
        else:
            release = not _keep_graph()
            if release:  # the sweep holds the only references now, and drops them as it goes
                ctx.state = (plan, None, None, None)
            else:
                kept = list(kept)
                inputs = None if inputs is None else list(inputs)
            if plan.last_is_output:
                kept[-1] = saved[-1]
        if torch.is_grad_enabled():  # create_graph: the differentiable reference loop
            layers = plan.reference.split(params)
            return differentiable_backward(ctx.needs_input_grad, plan.reference, x, kept, layers, grad_out)
        sweep, needs, workspace = plan.sweep, ctx.needs_input_grad, plan.workspace
        if torch.is_autocast_enabled("cpu"):
            with no_autocast("cpu"):
                return fast_sweep(sweep, needs, x, kept, params, grad_out, release, workspace, inputs, lent)
        return fast_sweep(sweep, needs, x, kept, params, grad_out, release, workspace, inputs, lent)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, _plan_t: None, *params_t: Tensor | None) -> Tensor:
        x, *params = ctx.saved_tensors
        return network_tangent(ctx.state[0].reference, x, params, x_t, params_t)


# What PositionalFunction.apply runs outside torch.func transforms (FastPlan.admits has ruled
# them out; x is unwrapped in FastPlan.__call__, parameters are never functorch wrappers):
# Function.apply without its per-call signature binding.
_apply = super(torch.autograd.Function, FastMLPFunction).apply
