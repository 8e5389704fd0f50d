"""Swap a model's linear layers for manualbp's in place, and back.

`convert(model)` replaces every module whose type is exactly `torch.nn.Linear` by a
`manualbp.Linear`, every `transformers.pytorch_utils.Conv1D` (GPT-2's y = x W + b, weight stored
(in, out)) by a `manualbp.nn.TransposedLinear` with the same `weight`/`bias`, and — with
`fuse_activations=True` — such a layer and the activation applied directly to its output by one
fused layer; the activation's slot becomes an `nn.Identity`, so every name and state_dict key stays.
With `fuse_activations=True` a gated MLP block (LLaMA-style ``down(act(gate(x)) * up(x))``, timm's
`SwiGLU`) becomes one `manualbp.GatedMLP` with the block's projection names and Parameters
(:mod:`manualbp.convert_gated` says which blocks, and when); its report line is the block's.

Fusion happens only where the equivalence is certain: the activation module comes right after the
layer in an `nn.Sequential` (or a subclass that keeps `Sequential.forward`, as torchvision's
`MLP`), or the parent is one of `_BLOCKS` (Hugging Face BERT/RoBERTa intermediate, pooler and
prediction-head transform, GPT-2's MLP, timm's `Mlp`: fc1 → act → drop1 → norm → fc2), matched
by qualified class name, whose forward applies that attribute to the projection's output and
nothing else to it; and the activation computes exactly a registry entry (`_torch_entry`,
`_LIBRARY_SIMPLE`, `_library_entry`: gelu and gelu_tanh are told apart, Hugging Face's
`FastGELUActivation`/`QuickGELUActivation` are other formulas). A class whose forward was replaced
(on the instance, or by a kernel hub) is not trusted; `inplace=True` is dropped by fusion. Where an
activation-like module follows a converted layer but is not fused, the layer is converted alone
and its report line says why (`Replacement.note`).

The new modules hold the *same* `Parameter` objects as the old ones — not copies — so an
optimizer built before the conversion (and its state) stays valid, and tied weights stay tied.
`revert(model)` undoes it: native layers again and, in each fused slot, the very activation module
that was there. After `convert`, `isinstance(m, Conv1D)` is False for the converted projections
(Hugging Face's `_init_weights` and head pruning look for Conv1D): revert before those.

Left native, with the reason in the report's `skipped`: subclasses of `nn.Linear` or Conv1D
(their type may carry meaning; `nn.MultiheadAttention.out_proj`, a
`NonDynamicallyQuantizableLinear`, is never called — attention reads its weight directly); modules
with hooks, parametrizations (weight_norm, ...) or a forward replaced on the instance; a weight
that is not a floating-point Parameter of the expected shape; zero-sized layers.

`nn.TransformerEncoderLayer`: `linear1`/`linear2` are converted, its activation (a function) is
not fused. In eval mode without autograd PyTorch may run its "fast path", which reads the weights
directly: the results are still equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manualbp.activations import Activation
from manualbp.convert_activations import activation_entry, own_forward, qualname
from manualbp.convert_gated import activation_slot, gated_plan, is_gated_block, to_gated, to_native_block
from manualbp.nn import GatedMLP, Linear, LinearAct, TransposedLinear, has_hooks

__all__ = ["ConversionReport", "Replacement", "convert", "revert"]

_CONV1D = "transformers.pytorch_utils.Conv1D"
_SLOT = "_manualbp_fused_slot"  # on a fused layer: (name of the activation slot, original module)
_NATIVE = "_manualbp_native_type"  # on a TransposedLinear made by convert: the Conv1D class


@dataclass(frozen=True)
class Replacement:
    """One swap: the module at qualified `name`, its old and new types (e.g. "torch.nn.Linear",
    "manualbp.LinearAct(gelu)").

    `activation` is the qualified name of the fused activation slot (now `nn.Identity` after
    convert, the native activation again after revert), or None when nothing was fused. `note`
    says why an activation that follows the layer was not fused into it, or is None.
    """

    name: str
    old: str
    new: str
    activation: str | None = None
    note: str | None = None


@dataclass
class ConversionReport:
    """What `convert`/`revert` did: `replaced` in module order, and `skipped` (name, reason):
    the linear-like modules left native, with why."""

    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    @property
    def names(self) -> list[str]:
        """Qualified names of the replaced modules."""
        return [r.name for r in self.replaced]

    @property
    def fused(self) -> list[Replacement]:
        """The replacements that took an activation in (or gave one back)."""
        return [r for r in self.replaced if r.activation is not None]

    @property
    def unfused(self) -> list[tuple[str, str]]:
        """(name, why) of the layers converted alone although an activation follows them."""
        return [(r.name, r.note) for r in self.replaced if r.note is not None]

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        for r in self.replaced:
            fused = f" (+ {r.activation})" if r.activation else ""
            note = f" (not fused: {r.note})" if r.note else ""
            lines.append(f"  {r.name}: {r.old} -> {r.new}{fused}{note}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ patterns

# Blocks whose forward applies `activation` to `projection`'s output, and to nothing else.
_BLOCKS: dict[str, tuple[str, str]] = {
    "transformers.models.bert.modeling_bert.BertIntermediate": ("dense", "intermediate_act_fn"),
    "transformers.models.bert.modeling_bert.BertPooler": ("dense", "activation"),
    "transformers.models.bert.modeling_bert.BertPredictionHeadTransform": ("dense", "transform_act_fn"),
    "transformers.models.roberta.modeling_roberta.RobertaIntermediate": ("dense", "intermediate_act_fn"),
    "transformers.models.roberta.modeling_roberta.RobertaPooler": ("dense", "activation"),
    "transformers.models.gpt2.modeling_gpt2.GPT2MLP": ("c_fc", "act"),
    "timm.layers.mlp.Mlp": ("fc1", "act"),
}


@dataclass(frozen=True)
class _Plan:
    """For one projection: the activation slot to fuse (and its entry), or why it is not fused."""

    slot: str | None = None
    act: Activation | None = None
    note: str | None = None


def _plan(parent: nn.Module, children: list[tuple[str, nn.Module]]) -> dict[str, _Plan]:
    """Which linear-like children of `parent` take which activation child in."""
    kind = type(parent)
    if is_gated_block(parent):  # only reached when it was not made a GatedMLP: say why
        _, why = gated_plan(parent, _why_not)
        names = [name for name, child in children if _linear_like(child)]
        return {names[0]: _Plan(note=f"{kind.__name__} not made a GatedMLP: {why}")} if names else {}
    if qualname(kind) in _BLOCKS:
        proj, slot = _BLOCKS[qualname(kind)]
        act_module = parent._modules.get(slot)
        if not own_forward(parent):
            return {proj: _Plan(note=f"{kind.__name__}.forward was replaced")}
        if not isinstance(act_module, nn.Module):
            return {proj: _Plan(note=f"{slot} is a function, not a module")}
        return {proj: _decide(slot, act_module)}
    plans: dict[str, _Plan] = {}
    for (name, child), (next_name, next_child) in zip(children, children[1:]):
        if not _linear_like(child) or activation_entry(next_child) == (None, None):
            continue
        if isinstance(parent, nn.Sequential) and _sequential_forward(parent):
            plans[name] = _decide(next_name, next_child)
        elif isinstance(parent, nn.Sequential):
            plans[name] = _Plan(note=f"{kind.__name__} overrides Sequential.forward")
        else:
            plans[name] = _Plan(
                note=f"{next_name} ({type(next_child).__name__}) follows it, but {kind.__name__} is not "
                f"a block whose forward is known to apply it to {name}'s output"
            )
    return plans


def _sequential_forward(parent: nn.Module) -> bool:
    return type(parent).forward is nn.Sequential.forward and "forward" not in parent.__dict__


def _decide(slot: str, module: nn.Module) -> _Plan:
    act, why = activation_entry(module)
    if act is not None:
        return _Plan(slot, act)
    if type(module) is nn.Identity:
        return _Plan()  # nothing to fuse
    return _Plan(note=f"{slot}: {why or f'{type(module).__name__} is not an activation module'}")


# ------------------------------------------------------------------------------------ checks


def _is_conv1d(module: nn.Module) -> bool:
    return any(qualname(c) == _CONV1D for c in type(module).__mro__)


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _why_not(module: nn.Module) -> str | None:
    """Why this linear-like module cannot be handed over, or None if it can."""
    kind = type(module)
    if parametrize.is_parametrized(module):  # checked first: it makes a subclass on the fly
        return "has parametrizations (its weight is computed, not a Parameter)"
    if kind is not nn.Linear and qualname(kind) != _CONV1D:
        return _subclass_reason(module)
    if has_hooks(module):
        return "has hooks (they are bound to the old module)"
    if "forward" in module.__dict__:
        return "its forward was replaced on the instance"
    weight, bias = module.weight, module.bias
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        return f"weight is not a floating-point Parameter ({type(weight).__name__}, {weight.dtype})"
    n_in, n_out = _features(module)
    expected = (n_out, n_in) if kind is nn.Linear else (n_in, n_out)
    bias_shape = tuple(bias.shape) if isinstance(bias, Tensor) else None
    if weight.shape != expected or (bias is not None and bias_shape != (n_out,)):
        return f"weight {tuple(weight.shape)} / bias {bias_shape} do not match {expected} / ({n_out},)"
    if n_in < 1 or n_out < 1:
        return f"zero-sized ({n_in} -> {n_out})"
    return None


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, Conv1D and the manualbp layers."""
    if _is_conv1d(module):
        return cast(int, module.nx), cast(int, module.nf)
    return cast(int, module.in_features), cast(int, module.out_features)


def _subclass_reason(child: nn.Module) -> str:
    if type(child).__name__ == "NonDynamicallyQuantizableLinear":
        return (
            "NonDynamicallyQuantizableLinear (MultiheadAttention.out_proj): attention reads its "
            "weight and bias directly and never calls its forward"
        )
    base = "Conv1D" if _is_conv1d(child) else "nn.Linear"
    return f"{type(child).__name__} is a subclass of {base}, not {base} itself"


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ------------------------------------------------------------------------------------ building


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the very Parameters of `old` (weight, bias) and its train/eval mode."""
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    return new


def _to_manualbp(layer: nn.Module, act: Activation | None) -> nn.Module:
    # Built on the meta device: no memory, no init — the Parameters are handed over next.
    n_in, n_out = _features(layer)
    has_bias = layer.bias is not None
    if not isinstance(layer, nn.Linear):
        new = TransposedLinear(n_out, n_in, act or "identity", bias=has_bias, device="meta")
        setattr(new, _NATIVE, type(layer))
        return _adopt(new, layer)
    if act is None:
        return _adopt(Linear(n_in, n_out, bias=has_bias, device="meta"), layer)
    return _adopt(LinearAct(n_in, n_out, act, bias=has_bias, device="meta"), layer)


def _to_native(layer: nn.Module) -> nn.Module:
    n_in, n_out = _features(layer)
    if isinstance(layer, TransposedLinear):
        with torch.device("meta"):
            native = layer.__dict__[_NATIVE](n_out, n_in)  # Conv1D(nf, nx)
        return _adopt(native, layer)
    return _adopt(nn.Linear(n_in, n_out, bias=layer.bias is not None, device="meta"), layer)


def _describe(module: nn.Module) -> str:
    """A readable type: torch.nn.Linear, manualbp.Linear, manualbp.LinearAct(gelu), ..."""
    if isinstance(module, GatedMLP):
        return f"manualbp.GatedMLP({module.activation})"
    if isinstance(module, LinearAct):
        return f"manualbp.LinearAct({module.activation})"
    if isinstance(module, TransposedLinear):
        act = module.activation
        return "manualbp.nn.TransposedLinear" + (f"({act})" if act != "identity" else "")
    if isinstance(module, Linear):
        return "manualbp.Linear"
    return "torch.nn.Linear" if type(module) is nn.Linear else qualname(type(module))


# ------------------------------------------------------------------------------------ convert


def convert(model: nn.Module, *, fuse_activations: bool = True) -> ConversionReport:
    """Replace `nn.Linear` and Conv1D (and fusable layer + activation pairs) by manualbp layers,
    in place.

    Returns a :class:`ConversionReport`. `model` itself must be a container: a bare `nn.Linear`
    cannot be replaced in place (use `manualbp.Linear` directly, or wrap it in a Sequential).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"fuse_activations: expected a bool, got {type(fuse_activations).__name__}")
    if type(model) is nn.Linear or qualname(type(model)) == _CONV1D:
        bare = "nn.Linear" if type(model) is nn.Linear else "Conv1D"
        raise ValueError(
            f"model: got a bare {bare}, which cannot be replaced in place; expected a "
            "module containing it (e.g. nn.Sequential(linear)), or build a manualbp layer directly"
        )
    report = ConversionReport()
    _convert(model, "", fuse_activations, report)
    return report


def _convert(parent: nn.Module, prefix: str, fuse: bool, report: ConversionReport) -> None:
    children = list(parent.named_children())  # a snapshot: children are replaced while walking
    plans = _plan(parent, children) if fuse else {}
    fused_slots: set[str] = set()
    for name, child in children:
        qualified = _qualified(prefix, name)
        if name in fused_slots or isinstance(child, (Linear, LinearAct, TransposedLinear, GatedMLP)):
            continue  # the activation just fused, or already ours
        if fuse and is_gated_block(child):
            act, _ = gated_plan(child, _why_not)
            if act is not None:
                setattr(parent, name, gated := to_gated(child, act))
                act_slot, old = _qualified(qualified, activation_slot(child)), qualname(type(child))
                report.replaced.append(Replacement(qualified, old, _describe(gated), act_slot))
                continue
        if not _linear_like(child):
            _convert(child, qualified, fuse, report)
            continue
        reason = _why_not(child)
        if reason is not None:
            report.skipped.append((qualified, reason))
            continue
        plan = plans.get(name, _Plan())
        new = _to_manualbp(child, plan.act)
        setattr(parent, name, new)
        slot = None
        if plan.act is not None and plan.slot is not None:
            setattr(new, _SLOT, (plan.slot, parent._modules[plan.slot]))
            setattr(parent, plan.slot, nn.Identity())
            fused_slots.add(plan.slot)
            slot = _qualified(prefix, plan.slot)
        report.replaced.append(Replacement(qualified, _describe(child), _describe(new), slot, plan.note))


# ------------------------------------------------------------------------------------ revert


def revert(model: nn.Module) -> ConversionReport:
    """Put native modules back where `convert` put manualbp ones, keeping the Parameters.

    A `manualbp.Linear` becomes an `nn.Linear`, a `TransposedLinear` made by convert the Conv1D it
    replaced. A fused layer gets its activation slot back (now `nn.Identity`) with the very module
    that was there: the slot convert recorded or, for a `LinearAct` you built, the `nn.Identity`
    after it in a Sequential (then filled with the registry's native module). A fused layer with
    no such slot (those of `manualbp.MLP`, say) is reported as skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (Linear, LinearAct, TransposedLinear)):
        raise ValueError(
            f"model: got a bare {type(model).__name__}, which cannot be replaced in place; "
            "expected a module containing it"
        )
    report = ConversionReport()
    _revert(model, "", report)
    return report


def _revert(parent: nn.Module, prefix: str, report: ConversionReport) -> None:
    children = list(parent.named_children())
    for i, (name, layer) in enumerate(children):
        qualified = _qualified(prefix, name)
        if type(layer) is GatedMLP:
            _revert_gated(parent, name, qualified, layer, report)
            continue
        if type(layer) not in (Linear, LinearAct, TransposedLinear):
            _revert(layer, qualified, report)
            continue
        if isinstance(layer, TransposedLinear) and _NATIVE not in layer.__dict__:
            report.skipped.append((qualified, "TransposedLinear not made by convert: no Conv1D recorded"))
            continue
        fused = isinstance(layer, LinearAct) or getattr(layer, "activation", "identity") != "identity"
        slot = _find_slot(parent, children, i) if fused else None
        if fused and slot is None:
            what = "its recorded activation slot is no longer an nn.Identity"
            if _SLOT not in layer.__dict__:
                what = "no nn.Identity slot after it in a Sequential"
            report.skipped.append((qualified, f"{type(layer).__name__} with {what}"))
            continue
        native = _to_native(layer)
        setattr(parent, name, native)
        if slot is not None:
            slot_name, act = slot
            setattr(parent, slot_name, act.train(parent.get_submodule(slot_name).training))
        act_name = _qualified(prefix, slot[0]) if slot is not None else None
        report.replaced.append(Replacement(qualified, _describe(layer), _describe(native), act_name))


def _find_slot(
    parent: nn.Module, children: list[tuple[str, nn.Module]], i: int
) -> tuple[str, nn.Module] | None:
    """The fused layer's activation slot (an nn.Identity now) and the module to put back."""
    layer = children[i][1]
    recorded = layer.__dict__.get(_SLOT)
    if recorded is not None:
        return recorded if type(parent._modules.get(recorded[0])) is nn.Identity else None
    following = children[i + 1] if isinstance(parent, nn.Sequential) and i + 1 < len(children) else None
    if following is None or type(following[1]) is not nn.Identity or not isinstance(layer, LinearAct):
        return None
    return following[0], layer.act.native()


def _revert_gated(
    parent: nn.Module, name: str, qualified: str, layer: GatedMLP, report: ConversionReport
) -> None:
    block = to_native_block(layer)
    if block is None:
        report.skipped.append((qualified, "GatedMLP not made by convert: no native block recorded"))
        return
    setattr(parent, name, block)
    slot = _qualified(qualified, activation_slot(block))
    report.replaced.append(Replacement(qualified, _describe(layer), qualname(type(block)), slot))
