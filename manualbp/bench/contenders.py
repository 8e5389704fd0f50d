"""The contenders: what builds each implementation of a layer, an MLP and a linear + loss head.

* ``manualbp-triton`` — manualbp's modules under ``mbp.use_backend("triton")``;
* ``manualbp-torch``  — the same modules on the plain-PyTorch reference backend;
* ``manualbp-layers`` — ``mbp.MLP(mode="layers")`` on that backend (mlp suite only): one autograd
  node per layer, against the default whole-network mode of ``manualbp-torch``;
* ``manualbp-fused``  — ``mbp.MLP(mode="fused")`` (mlp suite only): the whole stack in one
  forward and one δ-sweep kernel; where the Triton kernels can run (CUDA, or the interpreter
  with ``--interpreter``) and every width is ≤ 128;
* ``native``          — ``nn.Linear`` + the activation's own torch module, eager (the baseline);
* ``compile``         — ``torch.compile`` of native, default mode;
* ``compile-max-autotune`` — the same in mode ``max-autotune`` (``--max-autotune``).

Every contender receives the same parameters (copied from one master set) and the same inputs.
A contender is a small class so that the tests can add one that is deliberately wrong.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import manualbp as mbp
from manualbp import backends
from manualbp import functional as MF

__all__ = [
    "CONTENDER_NAMES",
    "Contender",
    "LossFn",
    "FusedContender",
    "LayersModeContender",
    "ManualbpContender",
    "NativeContender",
    "copy_linear_params",
    "make_contenders",
]

#: (x, weight, bias, target) -> scalar loss
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

CONTENDER_NAMES: tuple[str, ...] = (
    "manualbp-triton",
    "manualbp-torch",
    "manualbp-fused",
    "manualbp-layers",
    "native",
    "compile",
    "compile-max-autotune",
)


def copy_linear_params(module: nn.Module, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> None:
    """Copy the master parameters into the linear layers of `module`, in module order.

    A linear layer is any submodule with a 2-D `weight` parameter (nn.Linear, mbp.LinearAct).
    """
    layers: list[tuple[Tensor, Tensor | None]] = []  # (weight, bias) of each linear layer
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2:
            layers.append((weight, getattr(m, "bias", None)))
    if len(layers) != len(weights):
        raise RuntimeError(
            f"module: found {len(layers)} linear layers in {type(module).__name__}, "
            f"expected {len(weights)} (one per master weight)"
        )
    with torch.no_grad():
        for (layer_weight, layer_bias), weight, bias in zip(layers, weights, biases):
            layer_weight.copy_(weight)
            if layer_bias is not None:
                layer_bias.copy_(bias)


def fused_linear_cross_entropy() -> Callable[..., Tensor] | None:
    """manualbp's fused head + loss, looked up by name at run time (None while it does not exist):
    the public `manualbp.functional.linear_cross_entropy`, else `manualbp.ops.heads`'s."""
    fused = getattr(MF, "linear_cross_entropy", None)
    if fused is None:
        try:
            from manualbp.ops.heads import linear_cross_entropy as fused
        except ImportError:
            return None
    return fused


class Contender:
    """Base class: one implementation measured by the harness."""

    name: str = "contender"

    #: the suites whose cases this contender takes part in
    suites: tuple[str, ...] = ("layer", "mlp", "loss")

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this contender cannot run on `device`, or None when it can."""
        return None

    def case_reason(self, device: torch.device, case: Any) -> str | None:
        """Why this contender sits out `case` (a `cases.Case`) on `device`, or None."""
        if case.suite not in self.suites:
            return f"{self.name} takes part in the {', '.join(self.suites)} suite only"
        return self.unavailable_reason(device)

    def context(self) -> AbstractContextManager[None]:
        """Entered around building, checking and timing (e.g. the manualbp backend in force)."""
        return contextlib.nullcontext()

    def finalize(self, module: nn.Module) -> nn.Module:
        """Last transformation of a built module (torch.compile for the compiled contenders)."""
        return module

    def finalize_fn(self, fn: LossFn) -> LossFn:
        return fn

    def layer_module(self, in_features: int, out_features: int, activation: str) -> nn.Module:
        raise NotImplementedError

    def mlp_module(self, sizes: Sequence[int], activation: str) -> nn.Module:
        raise NotImplementedError

    def mse(self, prediction: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_variants(self) -> dict[str, LossFn | None]:
        """variant name -> fused/unfused linear + cross-entropy (None: not available)."""
        raise NotImplementedError

    def build_layer(self, weight: Tensor, bias: Tensor, activation: str) -> nn.Module:
        """One linear layer + activation holding copies of `weight` and `bias`."""
        out_features, in_features = weight.shape
        module = self.layer_module(in_features, out_features, activation)
        module = module.to(device=weight.device, dtype=weight.dtype)
        copy_linear_params(module, [weight], [bias])
        return self.finalize(module)

    def build_mlp(
        self, weights: Sequence[Tensor], biases: Sequence[Tensor], activation: str
    ) -> tuple[nn.Module, list[nn.Parameter]]:
        """The MLP (maybe compiled) and its parameters (of the eager module, for the optimizer)."""
        sizes = [weights[0].shape[1], *(w.shape[0] for w in weights)]
        module = self.mlp_module(sizes, activation)
        module = module.to(device=weights[0].device, dtype=weights[0].dtype)
        copy_linear_params(module, weights, biases)
        return self.finalize(module), list(module.parameters())


class ManualbpContender(Contender):
    """manualbp's modules and losses on one backend ("triton" or "torch")."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"manualbp-{backend}"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.backend != "triton":
            return None
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "Triton kernels need CUDA (pass --interpreter to run them on CPU, slowly)"
        ok, reason = backends.triton_status(device)
        return None if ok else reason

    def context(self) -> AbstractContextManager[None]:
        return mbp.use_backend(self.backend)

    def layer_module(self, in_features: int, out_features: int, activation: str) -> nn.Module:
        return mbp.LinearAct(in_features, out_features, activation)

    def mlp_module(self, sizes: Sequence[int], activation: str) -> nn.Module:
        return mbp.MLP(list(sizes), activation=activation)

    def mse(self, prediction: Tensor, target: Tensor) -> Tensor:
        return MF.mse_loss(prediction, target)

    def loss_variants(self) -> dict[str, LossFn | None]:
        fused = fused_linear_cross_entropy()
        return {
            "fused": None if fused is None else (lambda x, w, b, t: fused(x, w, b, t)),
            "unfused": lambda x, w, b, t: MF.cross_entropy(MF.linear(x, w, b), t),
        }


class FusedContender(ManualbpContender):
    """`mbp.MLP(mode="fused")`: the fused MLP kernels, in the mlp suite."""

    suites = ("mlp",)

    def __init__(self) -> None:
        super().__init__("triton")
        self.name = "manualbp-fused"

    def case_reason(self, device: torch.device, case: Any) -> str | None:
        reason = super().case_reason(device, case)
        if reason is None:
            from manualbp.ops.fused_mlp import check_fused_sizes

            try:
                check_fused_sizes(case.sizes())
            except ValueError as e:
                return str(e)
        return reason

    def mlp_module(self, sizes: Sequence[int], activation: str) -> nn.Module:
        return mbp.MLP(list(sizes), activation=activation, mode="fused")


class LayersModeContender(ManualbpContender):
    """`mbp.MLP(mode="layers")` on the reference backend, in the mlp suite."""

    suites = ("mlp",)

    def __init__(self) -> None:
        super().__init__("torch")
        self.name = "manualbp-layers"

    def mlp_module(self, sizes: Sequence[int], activation: str) -> nn.Module:
        return mbp.MLP(list(sizes), activation=activation, mode="layers")


class NativeContender(Contender):
    """nn.Linear + the activation's torch module; eager, or torch.compile'd in `compile_mode`."""

    def __init__(self, compile_mode: str | None = None) -> None:
        self.compile_mode = compile_mode
        if compile_mode is None:
            self.name = "native"
        elif compile_mode == "default":
            self.name = "compile"
        else:
            self.name = f"compile-{compile_mode}"

    def context(self) -> AbstractContextManager[None]:
        if self.compile_mode is None:
            return contextlib.nullcontext()
        # AOTAutograd "donates" saved buffers to the backward, which then refuses retain_graph=True;
        # the harness times backward alone by replaying a retained graph, so donation is off.
        import torch._functorch.config as functorch_config

        if not hasattr(functorch_config, "donated_buffer"):
            return contextlib.nullcontext()
        return functorch_config.patch(donated_buffer=False)

    def finalize(self, module: nn.Module) -> nn.Module:
        if self.compile_mode is None:
            return module
        # A fresh compile per case: the case's shapes are static, and dynamo's per-code-object
        # recompile limit would otherwise silently send later cases back to eager.
        torch._dynamo.reset()
        return torch.compile(module, mode=self.compile_mode)  # type: ignore[return-value]

    def finalize_fn(self, fn: LossFn) -> LossFn:
        if self.compile_mode is None:
            return fn
        torch._dynamo.reset()
        return torch.compile(fn, mode=self.compile_mode)

    def layer_module(self, in_features: int, out_features: int, activation: str) -> nn.Module:
        return nn.Sequential(nn.Linear(in_features, out_features), mbp.get_activation(activation).native())

    def mlp_module(self, sizes: Sequence[int], activation: str) -> nn.Module:
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:  # identity after the last layer, as mbp.MLP's default
                layers.append(mbp.get_activation(activation).native())
        return nn.Sequential(*layers)

    def mse(self, prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    def loss_variants(self) -> dict[str, LossFn | None]:
        unfused: LossFn = lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t)
        variants: dict[str, LossFn | None] = {"unfused": self.finalize_fn(unfused)}
        if self.compile_mode is None:
            variants.update(torch_linear_cross_entropy())
        return variants


def torch_linear_cross_entropy() -> dict[str, LossFn | None]:
    """torch's own `F.linear_cross_entropy` (torch ≥ 2.13), plain and chunked: variants "torch-fused"
    (`options=None`, its reference path) and "torch-chunked" (`LinearCrossEntropyOptions()`);
    None where this torch has no such function."""
    fn = getattr(F, "linear_cross_entropy", None)
    options_cls = getattr(nn, "LinearCrossEntropyOptions", None)
    if fn is None:
        return {"torch-fused": None, "torch-chunked": None}
    plain: LossFn = lambda x, w, b, t: fn(x, w, t, linear_bias=b)
    chunked: LossFn | None = None
    if options_cls is not None:
        chunked = lambda x, w, b, t: fn(x, w, t, linear_bias=b, options=options_cls())  # noqa: E731
    return {"torch-fused": plain, "torch-chunked": chunked}


def make_contenders(names: Sequence[str]) -> list[Contender]:
    """Contender objects for `names` (see CONTENDER_NAMES), in the order given."""
    contenders: list[Contender] = []
    for name in names:
        if name == "manualbp-triton":
            contenders.append(ManualbpContender("triton"))
        elif name == "manualbp-torch":
            contenders.append(ManualbpContender("torch"))
        elif name == "manualbp-fused":
            contenders.append(FusedContender())
        elif name == "manualbp-layers":
            contenders.append(LayersModeContender())
        elif name == "native":
            contenders.append(NativeContender(None))
        elif name == "compile":
            contenders.append(NativeContender("default"))
        elif name == "compile-max-autotune":
            contenders.append(NativeContender("max-autotune"))
        else:
            raise ValueError(
                f"contenders: unknown name {name!r}; expected some of {', '.join(CONTENDER_NAMES)}"
            )
    return contenders
