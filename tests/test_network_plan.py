"""The MLP's cached fast plan (manualbp.ops.network_plan) never gives a stale answer.

Each test runs the model once (so a plan is made and cached), changes something the plan was
built on, and compares the next call — output, input gradient, every parameter gradient —
with native autograd in float64 on a torch.nn copy that gets the same change.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import manualbp as mbp
from manualbp.activations import get_activation
from manualbp.ops.network_plan import FastPlan

F64 = torch.float64


def _native(model: mbp.MLP) -> nn.Sequential:
    """A torch.nn copy of `model` with the same values, dtype and requires_grad flags."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin = lin.to(layer.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        lin.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            lin.bias.requires_grad_(layer.bias.requires_grad)
        mods += [lin, layer.act.native()]
    return nn.Sequential(*mods)


def _run(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    xi = x.detach().clone().requires_grad_()
    out = model(xi)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return [out.detach(), xi.grad, *(p.grad for p in params)]


def _check(ours: list, ref: list, tol: float = 1e-12) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if b is None:
            assert a is None, f"result {i}: a gradient where native has none"
            continue
        assert a is not None, f"result {i}: no gradient where native has one"
        assert a.dtype == b.dtype and a.shape == b.shape, f"result {i}"
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"result {i}")


def _model(activation: str = "relu", dtype: torch.dtype = F64) -> mbp.MLP:
    torch.manual_seed(0)
    return mbp.MLP([5, 7, 6, 3], activation, dtype=dtype)


def _x(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _warm(model: mbp.MLP, x: torch.Tensor) -> None:
    _run(model, x)
    assert isinstance(model.__dict__.get("_plan"), FastPlan)  # the fast plan is what is tested


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_plan_matches_native(activation):
    model, x = _model(activation), _x()
    _warm(model, x)
    _check(_run(model, x), _run(_native(model), x))


def test_weight_replaced():
    model, x = _model(), _x()
    _warm(model, x)
    model.layers[1].weight = nn.Parameter(torch.randn(6, 7, dtype=F64))
    model.layers[2].bias = nn.Parameter(torch.randn(3, dtype=F64))
    _check(_run(model, x), _run(_native(model), x))


def test_weight_values_changed_in_place():
    model, x = _model(), _x()
    _warm(model, x)
    with torch.no_grad():
        model.layers[0].weight.mul_(-2)
    _check(_run(model, x), _run(_native(model), x))


@pytest.mark.parametrize("to", ["float32", "bfloat16"])
def test_dtype_changed(to):
    model, x = _model("gelu"), _x()
    _warm(model, x)
    dtype = getattr(torch, to)
    model.to(dtype)  # same Parameter objects, new dtype (param.data is replaced)
    xd = x.to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    ours = _run(model, xd)
    ref = _run(_native(model).double(), xd.double())
    _check([t.double() for t in ours], ref, tol=tol)
    assert ours[0].dtype == dtype


def test_one_layer_dtype_changed_is_refused():
    model, x = _model(), _x()
    _warm(model, x)
    model.layers[1].float()
    with pytest.raises(TypeError, match=r"layers\.1\.weight: dtype torch\.float32 does not match"):
        model(x)


def test_input_dtype_or_width_changed():
    model, x = _model(), _x()
    _warm(model, x)
    with pytest.raises(TypeError, match="dtype"):
        model(x.float())
    with pytest.raises(ValueError, match="in_features"):
        model(torch.randn(4, 6, dtype=F64))
    _check(_run(model, x), _run(_native(model), x))  # and the plan still serves the right input


def test_requires_grad_toggled():
    model, x = _model(), _x()
    _warm(model, x)
    model.layers[0].requires_grad_(False)
    model.layers[2].bias.requires_grad_(False)
    _check(_run(model, x), _run(_native(model), x))
    model.requires_grad_(True)
    _check(_run(model, x), _run(_native(model), x))


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "backward_hook", "global_hook"])
def test_hook_added_after_first_call(how):
    model, x = _model("tanh"), _x()
    _warm(model, x)
    native = _native(model)
    handles = []
    if how == "forward_hook":  # on a = f(z): LinearAct's output, native's activation module's
        for module in (model.layers[1], native[3]):
            handles.append(module.register_forward_hook(lambda m, i, o: o * 2))
    for layer in (model.layers[1], native[2]):
        if how == "pre_hook":
            handles.append(layer.register_forward_pre_hook(lambda m, i: (i[0] + 1,)))
        elif how == "backward_hook":
            handles.append(layer.register_full_backward_hook(lambda m, gi, go: (gi[0] * 3,)))
    if how == "global_hook":
        # Shifts the input of every layer (Linear and LinearAct see the same input).
        def shift(m, i):
            return (i[0] + 1,) if isinstance(m, (nn.Linear, mbp.LinearAct)) else None

        handles.append(nn.modules.module.register_module_forward_pre_hook(shift))
    try:
        _check(_run(model, x), _run(native, x))
    finally:
        for h in handles:
            h.remove()
    _check(_run(model, x), _run(_native(model), x))  # and after the hooks are gone


def test_prune_after_first_call():
    model, x = _model(), _x()
    _warm(model, x)
    torch.nn.utils.prune.l1_unstructured(model.layers[1], "weight", amount=0.5)
    native = _native(model)  # copies the pruned weight (weight_orig ⊙ mask)
    torch.nn.utils.prune.custom_from_mask(native[2], "weight", model.layers[1].weight_mask)
    ours, ref = _run(model, x), _run(native, x)
    _check(ours, ref)


def test_weight_norm_after_first_call():
    model, x = _model("gelu"), _x()
    _warm(model, x)
    torch.nn.utils.parametrizations.weight_norm(model.layers[0])
    native = _native(model)
    torch.nn.utils.parametrizations.weight_norm(native[0])
    _check(_run(model, x), _run(native, x))


def test_activation_and_layers_changed():
    model, x = _model(), _x()
    _warm(model, x)
    model.layers[0].act = get_activation("sigmoid")
    _check(_run(model, x), _run(_native(model), x))
    torch.manual_seed(5)
    model.layers[2] = mbp.LinearAct(6, 3, "tanh", dtype=F64)
    _check(_run(model, x), _run(_native(model), x))
    model.layers.append(mbp.LinearAct(3, 2, "identity", dtype=F64))
    _check(_run(model, x), _run(_native(model), x))


def test_mode_changed():
    model, x = _model(), _x()
    _warm(model, x)
    model.mode = "layers"
    _check(_run(model, x), _run(_native(model), x))
    model.mode = "network"
    _check(_run(model, x), _run(_native(model), x))


def test_copies_do_not_share_the_plan():
    model, x = _model(), _x()
    _warm(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.__dict__.get("_plan") is None
        with torch.no_grad():
            model.layers[0].weight.add_(1)  # the original changes; the clone must not see it
        _check(_run(clone, x), _run(_native(clone), x))
