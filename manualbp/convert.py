"""Swap a model's `nn.Linear` layers for manualbp's in place, and back.

`convert(model)` walks the module tree and replaces

* every module whose type is exactly `torch.nn.Linear` by a `manualbp.Linear`, and
* with `fuse_activations=True`, an `nn.Linear` directly followed, inside an `nn.Sequential`, by a
  supported activation module by one `manualbp.LinearAct`; the activation's slot becomes an
  `nn.Identity`, so the Sequential keeps its length and every index (and state_dict key) stays
  valid.

The new modules hold the *same* `Parameter` objects as the old ones — not copies — so an
optimizer built before the conversion (and its state: momenta, Adam moments) stays valid, and
tied weights stay tied. `revert(model)` undoes it, again keeping the Parameters.

What is deliberately left alone (listed in the report's `skipped`):

* subclasses of `nn.Linear` (`NonDynamicallyQuantizableLinear`, `LazyLinear`, quantized and
  user subclasses): their type may carry meaning we would lose. In particular
  `nn.MultiheadAttention.out_proj` is a `NonDynamicallyQuantizableLinear` whose `forward` is
  never called — attention reads `out_proj.weight`/`out_proj.bias` directly in
  `F.multi_head_attention_forward` — so replacing it would change nothing but its type;
* modules with hooks or parametrizations (weight_norm, spectral_norm, ...): hooks are bound to
  the old object and a parametrized `weight` is computed, not a Parameter we could hand over;
* a Linear with complex weights, or with a zero in_/out_features.

Activation modules are fused only when they are one of the exact types below with settings the
registry computes identically: ReLU, LeakyReLU (negative_slope ≥ 0), Sigmoid, Tanh, GELU (both
approximations), SiLU, Mish, Softplus (default beta=1 and threshold=20 only). `inplace=True` on
ReLU/LeakyReLU/SiLU is dropped by fusion (the fused layer writes a fresh output).

Note on `nn.TransformerEncoderLayer`: its `linear1`/`linear2` are converted (its activation is
a function, not a module in a Sequential, so it is not fused). In eval mode with autograd off,
PyTorch may run the layer through its fused "fast path", which reads the weights directly and
bypasses the modules: the results are still equal, since the Parameters are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from manualbp.activations import Activation, get_activation
from manualbp.nn import Linear, LinearAct

__all__ = ["ConversionReport", "Replacement", "convert", "revert"]


@dataclass(frozen=True)
class Replacement:
    """One swap: the module at qualified `name`, its old and new types (e.g. "torch.nn.Linear",
    "manualbp.LinearAct(gelu)").

    `activation` is the qualified name of the fused activation slot (now `nn.Identity` after
    convert, the native activation again after revert), or None when nothing was fused.
    """

    name: str
    old: str
    new: str
    activation: str | None = None


@dataclass
class ConversionReport:
    """What `convert`/`revert` did: `replaced` in module order, and `skipped` (name, reason)."""

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

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} replaced, {len(self.skipped)} skipped"]
        for r in self.replaced:
            fused = f" (+ {r.activation})" if r.activation else ""
            lines.append(f"  {r.name}: {r.old} -> {r.new}{fused}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ activations


def _registry_entry(module: nn.Module) -> Activation | None:
    """The registry entry computing exactly what `module` computes, or None."""
    kind = type(module)
    simple = {
        nn.ReLU: "relu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
        nn.SiLU: "silu",
        nn.Mish: "mish",
    }
    if kind in simple:
        return get_activation(simple[kind])
    # isinstance (after the exact-type test) narrows the type for the attribute reads.
    if kind is nn.GELU and isinstance(module, nn.GELU):
        names = {"none": "gelu", "tanh": "gelu_tanh"}
        return get_activation(names[module.approximate]) if module.approximate in names else None
    if kind is nn.LeakyReLU and isinstance(module, nn.LeakyReLU):
        slope = float(module.negative_slope)
        return get_activation("leaky_relu", negative_slope=slope) if slope >= 0 else None
    if kind is nn.Softplus and isinstance(module, nn.Softplus):
        default = module.beta == 1 and module.threshold == 20
        return get_activation("softplus") if default else None
    return None


# ------------------------------------------------------------------------------------ checks


def _has_hooks(module: nn.Module) -> bool:
    return any(
        len(hooks) > 0
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        )
    )


def _why_not(module: nn.Module) -> str | None:
    """Why this `nn.Linear` (or subclass) cannot be handed over, or None if it can."""
    if parametrize.is_parametrized(module):  # checked first: it makes a subclass on the fly
        return "has parametrizations (its weight is computed, not a Parameter)"
    if type(module) is not nn.Linear:
        return _subclass_reason(module)
    if _has_hooks(module):
        return "has hooks (they are bound to the old module)"
    weight = module.weight
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        return f"weight is not a floating-point Parameter ({type(weight).__name__}, {weight.dtype})"
    if module.in_features < 1 or module.out_features < 1:
        return f"zero-sized ({module.in_features} -> {module.out_features})"
    return None


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ------------------------------------------------------------------------------------ building


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` the very Parameters of `old` (weight, bias) and its train/eval mode."""
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    return new


def _to_manualbp(linear: nn.Linear, act: Activation | None) -> nn.Module:
    # Built on the meta device: no memory, no init — the Parameters are handed over next.
    args = (linear.in_features, linear.out_features)
    has_bias = linear.bias is not None
    if act is None:
        return _adopt(Linear(*args, bias=has_bias, device="meta"), linear)
    return _adopt(LinearAct(*args, act, bias=has_bias, device="meta"), linear)


def _to_native(layer: Linear | LinearAct) -> nn.Linear:
    has_bias = layer.bias is not None
    linear = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device="meta")
    _adopt(linear, layer)
    return linear


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # A snapshot: the loops below replace children while walking them.
    return iter(list(module.named_children()))


# ------------------------------------------------------------------------------------ convert


def convert(model: nn.Module, *, fuse_activations: bool = True) -> ConversionReport:
    """Replace `nn.Linear` (and fusable Linear + activation pairs) by manualbp layers, in place.

    Returns a :class:`ConversionReport`. `model` itself must be a container: a bare `nn.Linear`
    cannot be replaced in place (use `manualbp.Linear` directly, or wrap it in a Sequential).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"fuse_activations: expected a bool, got {type(fuse_activations).__name__}")
    if type(model) is nn.Linear:
        raise ValueError(
            "model: got a bare nn.Linear, which cannot be replaced in place; expected a module "
            "containing it (e.g. nn.Sequential(linear)), or build a manualbp.Linear directly"
        )
    report = ConversionReport()
    _convert(model, "", fuse_activations, report)
    return report


def _convert(parent: nn.Module, prefix: str, fuse: bool, report: ConversionReport) -> None:
    children = list(_children(parent))
    skip_next = False
    for i, (name, child) in enumerate(children):
        if skip_next:  # the activation we just fused
            skip_next = False
            continue
        qualified = _qualified(prefix, name)
        if isinstance(child, (Linear, LinearAct)):
            continue  # already ours
        if isinstance(child, nn.Linear):
            reason = _why_not(child)
            if reason is not None:
                report.skipped.append((qualified, reason))
                continue
            act_name, act = _fusable_next(parent, children, i) if fuse else (None, None)
            new = _to_manualbp(child, act)
            setattr(parent, name, new)
            if act is not None and act_name is not None:
                setattr(parent, act_name, nn.Identity())
                skip_next = True
            report.replaced.append(
                Replacement(
                    qualified,
                    _describe(child),
                    _describe(new),
                    _qualified(prefix, act_name) if act is not None and act_name else None,
                )
            )
            continue
        _convert(child, qualified, fuse, report)


def _subclass_reason(child: nn.Module) -> str:
    if type(child).__name__ == "NonDynamicallyQuantizableLinear":
        return (
            "NonDynamicallyQuantizableLinear (MultiheadAttention.out_proj): attention reads its "
            "weight and bias directly and never calls its forward"
        )
    return f"{type(child).__name__} is a subclass of nn.Linear, not nn.Linear itself"


def _fusable_next(
    parent: nn.Module, children: list[tuple[str, nn.Module]], i: int
) -> tuple[str | None, Activation | None]:
    """The next sibling's name and registry entry when it can be fused into child i."""
    if not isinstance(parent, nn.Sequential) or i + 1 >= len(children):
        return None, None
    next_name, next_module = children[i + 1]
    if _has_hooks(next_module):
        return None, None
    act = _registry_entry(next_module)
    return (next_name, act) if act is not None else (None, None)


def _describe(module: nn.Module) -> str:
    """A readable type: torch.nn.Linear, manualbp.Linear or manualbp.LinearAct(gelu)."""
    if isinstance(module, LinearAct):
        return f"manualbp.LinearAct({module.activation})"
    return "manualbp.Linear" if isinstance(module, Linear) else "torch.nn.Linear"


# ------------------------------------------------------------------------------------ revert


def revert(model: nn.Module) -> ConversionReport:
    """Put native modules back where `convert` put manualbp ones, keeping the Parameters.

    A `manualbp.Linear` becomes an `nn.Linear`; a `LinearAct` followed in its Sequential by an
    `nn.Identity` (the layout `convert` leaves) becomes an `nn.Linear` and, in that slot, the
    native activation module. A `LinearAct` anywhere else (one you built yourself, or those of
    `manualbp.MLP`) has no slot for its activation and is reported as skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (Linear, LinearAct)):
        raise ValueError(
            f"model: got a bare {type(model).__name__}, which cannot be replaced in place; "
            "expected a module containing it"
        )
    report = ConversionReport()
    _revert(model, "", report)
    return report


def _revert(parent: nn.Module, prefix: str, report: ConversionReport) -> None:
    children = list(_children(parent))
    for i, (name, child) in enumerate(children):
        qualified = _qualified(prefix, name)
        if type(child) is Linear:
            setattr(parent, name, _to_native(child))
            report.replaced.append(Replacement(qualified, _describe(child), "torch.nn.Linear"))
        elif type(child) is LinearAct:
            _revert_fused(parent, children, i, prefix, report)
        else:
            _revert(child, qualified, report)


def _revert_fused(
    parent: nn.Module,
    children: list[tuple[str, nn.Module]],
    i: int,
    prefix: str,
    report: ConversionReport,
) -> None:
    name, layer = children[i]
    qualified = _qualified(prefix, name)
    slot = children[i + 1] if isinstance(parent, nn.Sequential) and i + 1 < len(children) else None
    if slot is None or type(slot[1]) is not nn.Identity:
        report.skipped.append(
            (qualified, "LinearAct with no nn.Identity slot after it in a Sequential")
        )
        return
    assert isinstance(layer, LinearAct)
    native_act = layer.act.native().train(slot[1].training)
    setattr(parent, name, _to_native(layer))
    setattr(parent, slot[0], native_act)
    report.replaced.append(
        Replacement(qualified, _describe(layer), "torch.nn.Linear", _qualified(prefix, slot[0]))
    )
