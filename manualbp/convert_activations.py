"""Which activation modules `manualbp.convert` may fuse, and as which registry entry.

torch's own modules, and those of Hugging Face transformers and timm, matched by qualified class
name (no import of either library). Only exact equivalents are mapped: `gelu` and `gelu_tanh` are
different entries, and a module whose formula or forward differs in any way is reported with the
reason instead (`activation_entry` returns it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch.nn.functional as F
from torch import nn

from manualbp.activations import Activation, get_activation
from manualbp.nn import has_hooks

__all__ = ["activation_entry", "own_forward", "qualname"]


_TORCH_SIMPLE = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SiLU: "silu", nn.Mish: "mish"}
# Library activation classes whose forward alone fixes the formula.
_LIBRARY_SIMPLE = {
    "transformers.activations.NewGELUActivation": "gelu_tanh",
    "transformers.activations.SiLUActivation": "silu",
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations.Tanh": "tanh",
    "timm.layers.activations.Mish": "mish",
}
_NOT_EXACT = {
    "transformers.activations.FastGELUActivation": (
        "FastGELUActivation is tanh-GELU with the rounded constant 0.7978845608 for sqrt(2/pi): "
        "no registry entry computes it exactly"
    ),
    "transformers.activations.QuickGELUActivation": "QuickGELUActivation is x*sigmoid(1.702x)",
    "timm.layers.activations.QuickGELU": "QuickGELU is x*sigmoid(1.702x)",
}
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations", "timm.layers.activations")


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def own_forward(module: nn.Module) -> bool:
    """Whether `module` runs the forward written in its own class (not one replaced later)."""
    cls = type(module)
    fn = cls.__dict__.get("forward")
    return (
        "forward" not in module.__dict__
        and getattr(fn, "__qualname__", None) == f"{cls.__qualname__}.forward"
        and getattr(fn, "__module__", None) == cls.__module__
    )


def _is_method(value: Any, module: nn.Module, name: str) -> bool:
    return getattr(value, "__self__", None) is module and getattr(value, "__func__", None) is getattr(
        type(module), name, None
    )


def _library_entry(module: nn.Module, name: str) -> tuple[str | None, str | None]:
    """Registry name for a Hugging Face / timm activation instance, or (None, why)."""
    if name in _LIBRARY_SIMPLE:
        return _LIBRARY_SIMPLE[name], None
    if name in _NOT_EXACT:
        return None, _NOT_EXACT[name]
    act, short = getattr(module, "act", None), type(module).__name__
    if name == "transformers.activations.GELUActivation":
        exact = act is F.gelu or _is_method(act, module, "_gelu_python")
        return ("gelu", None) if exact else (None, f"{short}.act is {act!r}, not the erf GELU")
    if name == "transformers.activations.GELUTanh":
        exact = _is_method(act, module, "_gelu_tanh_python") or (
            isinstance(act, functools.partial)
            and (act.func, act.args, act.keywords) == (F.gelu, (), {"approximate": "tanh"})
        )
        return ("gelu_tanh", None) if exact else (None, f"{short}.act is {act!r}, not the tanh GELU")
    if name == "transformers.activations.AccurateGELUActivation":
        exact = getattr(module, "precomputed_constant", None) == math.sqrt(2 / math.pi)
        return ("gelu_tanh", None) if exact else (None, f"{short}.precomputed_constant is not sqrt(2/pi)")
    if name == "transformers.activations.MishActivation":
        exact = act is F.mish or _is_method(act, module, "_mish_python")
        return ("mish", None) if exact else (None, f"{short}.act is {act!r}, not Mish")
    return None, f"{short} is not in the registry"


def _torch_entry(module: nn.Module) -> tuple[Activation | None, str | None]:
    kind = type(module)
    if kind in _TORCH_SIMPLE:
        return get_activation(_TORCH_SIMPLE[kind]), None
    # isinstance (after the exact-type test) narrows the type for the attribute reads.
    if kind is nn.GELU and isinstance(module, nn.GELU):
        names = {"none": "gelu", "tanh": "gelu_tanh"}
        if module.approximate in names:
            return get_activation(names[module.approximate]), None
        return None, f"GELU(approximate={module.approximate!r}) is not in the registry"
    if kind is nn.LeakyReLU and isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        if slope >= 0:
            return get_activation("leaky_relu", negative_slope=slope), None
        return None, f"LeakyReLU(negative_slope={slope}): the registry needs a slope >= 0"
    if kind is nn.Softplus and isinstance(module, nn.Softplus):
        if module.beta == 1 and module.threshold == 20:
            return get_activation("softplus"), None
        return None, (
            f"Softplus(beta={module.beta}, threshold={module.threshold}): the registry's softplus "
            "has beta=1, threshold=20"
        )
    return None, f"{kind.__name__} is not in the registry"


def activation_entry(module: nn.Module) -> tuple[Activation | None, str | None]:
    """(registry entry computing exactly what `module` computes, None), or (None, why not) for
    an activation-like module, or (None, None) for anything else (Dropout, LayerNorm, ...)."""
    kind = type(module)
    if isinstance(module, nn.MultiheadAttention) or not any(
        c.__module__ in _ACTIVATION_MODULES for c in kind.__mro__
    ):
        return None, None
    name = qualname(kind)
    if kind.__module__ not in _ACTIVATION_MODULES:
        return None, f"{kind.__name__} subclasses a library activation: its forward may differ"
    if has_hooks(module):
        return None, f"{kind.__name__} has hooks (they would no longer run)"
    if not own_forward(module):
        return None, f"{kind.__name__}.forward was replaced (e.g. by a kernel hub)"
    if kind.__module__ == "torch.nn.modules.activation":
        return _torch_entry(module)
    entry, why = _library_entry(module, name)
    return (get_activation(entry), None) if entry is not None else (None, why)
