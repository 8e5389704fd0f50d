"""Which gated MLP blocks `manualbp.convert` turns into one `manualbp.GatedMLP`, and back.

A block is converted only where the equivalence is certain: its class is one of `GATED_BLOCKS`
(matched by qualified name, no import of the library), whose forward is exactly
``down(act(gate(x)) * up(x))`` — Hugging Face's LLaMA-style MLPs, timm's `SwiGLU` with its
dropouts at p=0 and no norm — and runs the forward written in that class; the block has no hooks;
its three projections are plain `nn.Linear`s that `convert` could hand over (no hooks,
parametrizations, ...), with consistent shapes; and its activation computes exactly a registry
entry. The `GatedMLP` gets the block's projection names, so the state_dict keys stay, and holds
the very same Parameters. The native block is kept aside (not a submodule) for `revert`, which
puts it back with the Parameters the GatedMLP holds then.

timm's `GluMlp` (one fc1 whose output is split in halves) is not converted: its gate and up
weights are halves of one Parameter; it is left to the per-layer conversion (fc1 and fc2 alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn

from manualbp.activations import Activation
from manualbp.convert_activations import activation_entry, own_forward, qualname
from manualbp.nn import GatedMLP, has_hooks

__all__ = ["GATED_BLOCKS", "gated_plan", "is_gated_block", "to_gated", "to_native_block"]

_HF_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "act_fn")
#: block class -> (gate, up, down, activation) attribute names; forward down(act(gate(x)) * up(x)).
GATED_BLOCKS: dict[str, tuple[str, str, str, str]] = {
    f"transformers.models.{m}.modeling_{m}.{cls}": _HF_PROJECTIONS
    for m, cls in (
        ("llama", "LlamaMLP"),
        ("mistral", "MistralMLP"),
        ("qwen2", "Qwen2MLP"),
        ("qwen3", "Qwen3MLP"),
        ("gemma", "GemmaMLP"),
        ("gemma2", "Gemma2MLP"),
        ("olmo2", "Olmo2MLP"),
    )
}
GATED_BLOCKS["timm.layers.mlp.SwiGLU"] = ("fc1_g", "fc1_x", "fc2", "act")
# Slots the forward also applies, which must compute the identity for the block to be a GatedMLP.
_IDENTITY_SLOTS = {"timm.layers.mlp.SwiGLU": ("drop1", "norm", "drop2")}
_NATIVE_BLOCK = "_manualbp_native_block"  # on a GatedMLP made by convert: the block it replaced


def is_gated_block(module: nn.Module) -> bool:
    return qualname(type(module)) in GATED_BLOCKS


def _identity_reason(name: str, module: nn.Module | None) -> str | None:
    if type(module) is nn.Identity:
        return None
    if type(module) is nn.Dropout and isinstance(module, nn.Dropout) and module.p == 0:
        return None
    what = type(module).__name__ if module is not None else None
    return f"{name} is {what}, not an identity (nn.Identity, or Dropout(p=0))"


def gated_plan(
    block: nn.Module, why_not: Callable[[nn.Module], str | None]
) -> tuple[Activation | None, str | None]:
    """(the activation entry, None) when `block` can become a GatedMLP, else (None, why not).

    `why_not` is convert's own test of a linear layer (None when it can be handed over).
    """
    kind = type(block)
    gate_name, up_name, down_name, act_name = GATED_BLOCKS[qualname(kind)]
    if not own_forward(block):
        return None, f"{kind.__name__}.forward was replaced"
    if has_hooks(block):
        return None, f"{kind.__name__} has hooks (they are bound to the old module)"
    projections = [block._modules.get(n) for n in (gate_name, up_name, down_name)]
    for name, proj in zip((gate_name, up_name, down_name), projections, strict=True):
        if type(proj) is not nn.Linear or proj is None:
            return None, f"{name} is {type(proj).__name__}, not an nn.Linear"
        reason = why_not(proj)
        if reason is not None:
            return None, f"{name} {reason}"
    gate, up, down = cast(list[nn.Linear], projections)
    if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features:
        return None, (
            f"shapes do not chain: {gate_name} {tuple(gate.weight.shape)}, {up_name} "
            f"{tuple(up.weight.shape)}, {down_name} {tuple(down.weight.shape)}"
        )
    for slot in _IDENTITY_SLOTS.get(qualname(kind), ()):
        reason = _identity_reason(slot, block._modules.get(slot))
        if reason is not None:
            return None, reason
    act_module = getattr(block, act_name, None)
    if not isinstance(act_module, nn.Module):
        return None, f"{act_name} is not a module"
    act, why = activation_entry(act_module)
    if act is None:
        return None, f"{act_name}: {why or f'{type(act_module).__name__} is not an activation module'}"
    return act, None


def to_gated(block: nn.Module, act: Activation) -> GatedMLP:
    """A GatedMLP holding `block`'s very Parameters under its projection names (the block was
    accepted by `gated_plan`); the block is kept aside for `to_native_block`."""
    names = GATED_BLOCKS[qualname(type(block))][:3]
    gate, up, down = (cast(nn.Linear, block._modules[n]) for n in names)
    new = GatedMLP(
        gate.in_features, gate.out_features, down.out_features, act, bias=False, device="meta", names=names
    )
    for name in names:
        old, proj = block._modules[name], new._modules[name]
        assert old is not None and proj is not None
        proj.weight, proj.bias = old.weight, old.bias
    new.train(block.training)
    new.__dict__[_NATIVE_BLOCK] = block  # in __dict__: not a submodule, not in the state_dict
    return new


def to_native_block(layer: GatedMLP) -> nn.Module | None:
    """The block `to_gated` replaced, holding the GatedMLP's Parameters again; None if the
    GatedMLP was not made by convert."""
    block = layer.__dict__.get(_NATIVE_BLOCK)
    if block is None:
        return None
    names = GATED_BLOCKS[qualname(type(block))][:3]
    for name in names:
        old, proj = block._modules[name], layer._modules[name]
        assert old is not None and proj is not None
        old.weight, old.bias = proj.weight, proj.bias
    block.train(layer.training)
    return cast(nn.Module, block)


def activation_slot(block: nn.Module) -> str:
    """The attribute name of the block's activation."""
    return GATED_BLOCKS[qualname(type(block))][3]
