"""Drop-in modules: `Linear` (for `nn.Linear`), `LinearAct` (Linear + activation, fused), `MLP`,
`GatedMLP` (LLaMA's MLP block, SwiGLU / GEGLU) and `TransposedLinear` (for Hugging Face's
`Conv1D`, GPT-2's transposed-weight linear).

They hold parameters exactly as `torch.nn.Linear` does (`TransposedLinear`: as `Conv1D`) — same
names, shapes, initialisation and state_dict keys — and call :func:`manualbp.functional.linear`,
whose backward is hand-written.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from manualbp import functional as MF
from manualbp.activations import Activation, get_activation
from manualbp.backends.fast import Workspace
from manualbp.ops.fused_mlp import check_fused_sizes
from manualbp.ops.linear_fast import fast_linear
from manualbp.ops.network_plan import plan_for

__all__ = ["GatedMLP", "Linear", "LinearAct", "MLP", "TransposedLinear"]

_IDENTITY = get_activation("identity")


def _check_features(name: str, value: Any) -> int:
    # Anything with __index__ (numpy integers, as nn.Linear takes them), but not bool or float.
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _reset_linear(weight: Tensor, bias: Tensor | None) -> None:
    # nn.Linear's initialisation, so a seeded model starts from the very same weights.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _fast_layer(layer: nn.Module, input: Tensor, act: Activation) -> Tensor | None:
    """The layer on the CPU fast path (manualbp.ops.linear_fast), or None where it does not run.

    The parameters are read from the layer's own dict (no nn.Module.__getattr__); a weight or
    bias that is not there (parametrized, pruned) sends the call down the general path."""
    params = layer._parameters
    if "weight" not in params or "bias" not in params:
        return None
    return fast_linear(input, params["weight"], params["bias"], act)  # type: ignore[arg-type]


class Linear(nn.Linear):
    """y = x Wᵀ + b with a hand-written backward: a true drop-in for `torch.nn.Linear`.

    It *is* an `nn.Linear` (same constructor, `device`/`dtype` factory kwargs, initialisation,
    `reset_parameters`, `extra_repr` and state_dict keys), so code that inspects modules by type
    keeps working; only `forward` differs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            _check_features("in_features", in_features),
            _check_features("out_features", out_features),
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor) -> Tensor:
        out = _fast_layer(self, input, _IDENTITY)
        return MF.linear(input, self.weight, self.bias) if out is None else out


class LinearAct(nn.Module):
    """a = f(x Wᵀ + b): a linear layer and its activation as one fused op.

    Parameters and initialisation are those of `nn.Linear(in_features, out_features, bias)`;
    `activation` is a name from `manualbp.ACTIVATIONS` (`negative_slope` for leaky_relu).
    Backward keeps one activation-sized tensor: `a` or `z`, whichever f′ needs.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.act = get_activation(activation, negative_slope=negative_slope)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def activation(self) -> str:
        return self.act.name

    def reset_parameters(self) -> None:
        _reset_linear(self.weight, self.bias)

    def forward(self, input: Tensor) -> Tensor:
        out = _fast_layer(self, input, self.act)
        return MF.linear(input, self.weight, self.bias, self.act) if out is None else out

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.act.name}"
        )
        if self.act.name == "leaky_relu":
            text += f", negative_slope={self.act.negative_slope}"
        return text


def _must_call(layers: Iterable[nn.Module]) -> bool:
    """Whether network mode would bypass something the layers' own calls run: module hooks
    (forward, pre-forward, backward; also the global ones — `prune`, the old `weight_norm` and
    `spectral_norm`, FSDP2's `fully_shard` are hooks), or parametrizations of their weights."""
    if (
        nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    ):
        return True
    for layer in layers:
        if (
            layer._forward_hooks
            or layer._forward_pre_hooks
            or layer._backward_hooks
            or layer._backward_pre_hooks
            or "parametrizations" in layer._modules  # what parametrize.is_parametrized reads
        ):
            return True
    return False


def has_hooks(module: nn.Module) -> bool:
    """Whether the module has its own forward, pre-forward or backward hooks."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    return any(len(h) > 0 for h in (*hooks, module._backward_pre_hooks))


class MLP(nn.Module):
    """A stack of `LinearAct` layers: sizes [in, h1, ..., out], `activation` on the hidden
    layers, `output_activation` on the last. State_dict keys are ``layers.{i}.weight`` and
    ``layers.{i}.bias``.

    mode="network" (default) runs the whole stack as one autograd node whose backward is the seed's
    δ recursion (:mod:`manualbp.ops.network`): one activation-sized tensor kept per layer at most.
    mode="layers" chains the layers' own autograd nodes (one per `LinearAct`), for comparison.
    Network mode reads the layers' parameters without calling the layers, so whenever a layer
    has module hooks (also global ones: pruning, spectral_norm, FSDP2's `fully_shard` are hooks)
    or parametrizations (`weight_norm`, ...), the MLP calls its layers instead — the result is
    then exactly mode="layers".
    mode="fused" runs the same network as one autograd node on the fused Triton kernels
    (:mod:`manualbp.ops.fused_mlp`): the whole forward in one launch, the whole δ sweep in one;
    for small widths (every size ≤ 128, 1 to 8 layers), CUDA (or the Triton interpreter),
    float32/float16/bfloat16 — elsewhere a clear error that names the limit.
    recompute=True (network and fused modes) keeps just the block input and reruns the forward
    in backward, trading one forward pass for the activations' memory.

    Memory against speed, network mode: on the CPU fast path (float32/float64/bfloat16, the
    module's cached plan) a GELU-class hidden layer (gelu, gelu_tanh, silu, mish, softplus) keeps
    both z (for f′) and a = f(z) (the next layer's weight-gradient input) — what native autograd
    keeps, so backward makes no recompute; output-derivable layers keep a alone (half native's
    for leaky_relu). The general path (`manualbp.functional.mlp`, Triton, float16) keeps z alone
    and recomputes a = f(z) in backward: half native's memory for GELU-class, one elementwise
    pass more. recompute=True is the memory-lean choice for the module: nothing kept but the
    block input. Layer 0's kept tensor is written into the module's reusable workspace buffer
    (at 256 KiB and more), so the buffer held across steps replaces an allocation of the step.
    """

    MODES = ("network", "layers", "fused")

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Activation = "relu",
        output_activation: str | Activation = "identity",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
        mode: str = "network",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"sizes: expected a sequence of ints [in, h1, ..., out], got {sizes!r}")
        if len(sizes) < 2:
            raise ValueError(
                f"sizes: expected at least [in_features, out_features], got {list(sizes)}"
            )
        for i, size in enumerate(sizes):
            _check_features(f"sizes[{i}]", size)
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {', '.join(self.MODES)}, got {mode!r}")
        if not isinstance(recompute, bool):
            raise TypeError(
                f"recompute: expected a bool, got {type(recompute).__name__} {recompute!r}"
            )
        if recompute and mode == "layers":
            raise ValueError(f"recompute: True needs mode='network' or 'fused', got mode={mode!r}")
        if mode == "fused":
            check_fused_sizes(sizes)
        self.mode, self.recompute = mode, recompute
        # Network mode's reusable δ buffers (CPU fast path): bounded, never handed out, dropped
        # with the module; copies and pickles of the module start with an empty one.
        self._workspace = Workspace(max_buffers=1)
        self.sizes = [int(s) for s in sizes]
        hidden = get_activation(activation, negative_slope=negative_slope)
        last = get_activation(output_activation)
        self.layers = nn.ModuleList(
            LinearAct(
                n_in,
                n_out,
                hidden if i < len(sizes) - 2 else last,
                bias=bias,
                device=device,
                dtype=dtype,
            )
            for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        )

    def reset_parameters(self) -> None:
        for layer in cast(list[LinearAct], list(self.layers)):
            layer.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        # The CPU fast path, planned once (manualbp.ops.network_plan): the plan checks that it
        # still holds (parameters, dtypes, hooks, mode, ...) and otherwise the general path runs.
        plan = self.__dict__.get("_plan")
        if plan is not None and plan.admits(self, input):
            return plan(input)
        plan = plan_for(self, input, getattr(self, "_workspace", None), LinearAct)
        self.__dict__["_plan"] = plan
        if plan is not None:
            return plan(input)
        # While a graph is captured (torch.compile/export) the per-layer path runs: each layer is
        # then one `manualbp::` custom op, which the tracer can handle. So it does when a layer
        # must be called as a module (hooks, parametrizations, pruning, FSDP).
        if self.mode == "layers" or torch.compiler.is_compiling() or _must_call(self.layers):
            for layer in self.layers:
                input = layer(input)
            return input
        # The parameters straight from each layer's dict: no parametrizations here (_must_call).
        layers = cast(list[LinearAct], list(self.layers._modules.values()))
        params: list[dict[str, Any]] = [layer._parameters for layer in layers]
        if self.mode == "fused":
            return MF.fused_mlp(
                input,
                [p["weight"] for p in params],
                [p["bias"] for p in params],
                [layer.act for layer in layers],
                recompute=self.recompute,
            )
        return MF.mlp(
            input,
            [p["weight"] for p in params],
            [p["bias"] for p in params],
            [layer.act for layer in layers],
            recompute=self.recompute,
            workspace=getattr(self, "_workspace", None),
        )

    def extra_repr(self) -> str:
        text = f"sizes={self.sizes}"
        if self.mode != "network" or self.recompute:
            text += f", mode={self.mode}, recompute={self.recompute}"
        return text


class TransposedLinear(nn.Module):
    """a = f(x W + b) with W stored as (in_features, out_features), and a hand-written backward.

    The replacement of `transformers.pytorch_utils.Conv1D` (GPT-2's projections): the same
    parameters (`weight` (nx, nf), `bias` (nf,)), state_dict keys, `nf`/`nx` attributes and
    initialisation; `activation` optionally fuses the activation that follows. The forward hands
    the view `weight.t()` (no copy) to `manualbp.functional.linear`.
    """

    def __init__(
        self,
        nf: int,
        nx: int,
        activation: str | Activation = "identity",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        self.nf, self.nx = _check_features("nf", nf), _check_features("nx", nx)
        self.act = get_activation(activation, negative_slope=negative_slope)
        self.weight = nn.Parameter(torch.empty(self.nx, self.nf, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.nf, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        nn.init.normal_(self.weight, std=0.02)  # Conv1D's own initialisation

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    @property
    def activation(self) -> str:
        return self.act.name

    def forward(self, input: Tensor) -> Tensor:
        return MF.linear(input, self.weight.t(), self.bias, self.act)

    def extra_repr(self) -> str:
        text = f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}, activation={self.act.name}"
        return text + (f", negative_slope={self.act.negative_slope}" if self.act.name == "leaky_relu" else "")


class GatedMLP(nn.Module):
    """y = down(f(gate(x)) ⊙ up(x)): the gated MLP block (LLaMA, Mistral, Qwen: SwiGLU; GEGLU).

    Three `manualbp.Linear` children hold the parameters — by default ``gate_proj``,
    ``up_proj``, ``down_proj``, as in Hugging Face's `LlamaMLP`, so its state_dict keys are
    ``gate_proj.weight`` and so on; `names` picks others (``("fc1_g", "fc1_x", "fc2")`` for timm's
    `SwiGLU`). The forward is one op, :func:`manualbp.functional.gated_mlp`, whose hand-written
    backward keeps x, z_g and z_u only. When a projection has hooks or parametrizations, or
    global module hooks are installed, the projections are called as modules instead (so the
    hooks run), exactly as the native block computes it.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        activation: str | Activation = "silu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
        names: Sequence[str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        if isinstance(names, str) or len(names) != 3 or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"names: expected three attribute names (gate, up, down), got {names!r}")
        if len(set(names)) != 3:
            raise ValueError(f"names: expected three different names, got {tuple(names)}")
        self.act = get_activation(activation, negative_slope=negative_slope)
        n_in = _check_features("in_features", in_features)
        hidden = _check_features("hidden_features", hidden_features)
        n_out = _check_features("out_features", out_features)
        self._names = tuple(names)
        factory: dict[str, Any] = {"bias": bias, "device": device, "dtype": dtype}
        for name, (a, b) in zip(self._names, ((n_in, hidden), (n_in, hidden), (hidden, n_out))):
            self.add_module(name, Linear(a, b, **factory))

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The (gate, up, down) projections, whatever their attribute names."""
        gate, up, down = (cast(nn.Linear, self._modules[n]) for n in self._names)
        return gate, up, down

    @property
    def activation(self) -> str:
        return self.act.name

    @property
    def in_features(self) -> int:
        return self.projections[0].in_features

    @property
    def hidden_features(self) -> int:
        return self.projections[0].out_features

    @property
    def out_features(self) -> int:
        return self.projections[2].out_features

    def reset_parameters(self) -> None:
        for proj in self.projections:
            proj.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        gate, up, down = self.projections
        if _must_call((gate, up, down)):
            return down(self.act(gate(input)) * up(input))
        return MF.gated_mlp(
            input, gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias, self.act
        )

    def extra_repr(self) -> str:
        text = f"activation={self.act.name}"
        if self.act.name == "leaky_relu":
            text += f", negative_slope={self.act.negative_slope}"
        return text
