"""The drop-in modules: nn.Linear's contract (constructor, init, state_dict, repr), LinearAct, MLP."""

import io

import pytest
import torch
from torch import nn

import manualbp as mbp

from .helpers import TOL, rel_err


def test_linear_is_a_drop_in_for_nn_linear():
    torch.manual_seed(3)
    native = nn.Linear(7, 5)
    torch.manual_seed(3)
    ours = mbp.Linear(7, 5)
    assert isinstance(ours, nn.Linear)
    assert repr(ours) == "Linear(in_features=7, out_features=5, bias=True)"
    for (n1, p1), (n2, p2) in zip(native.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)  # same initialisation from the same seed
    assert list(ours.state_dict()) == ["weight", "bias"]
    assert mbp.Linear(3, 2, bias=False).bias is None


def test_state_dict_round_trip_with_nn_linear():
    native, ours = nn.Linear(4, 3), mbp.Linear(4, 3)
    ours.load_state_dict(native.state_dict())
    back = nn.Linear(4, 3)
    back.load_state_dict(ours.state_dict())
    for p, q in zip(native.parameters(), back.parameters()):
        assert torch.equal(p, q)
    x = torch.randn(2, 4)
    assert torch.allclose(ours(x), native(x), rtol=1e-6, atol=1e-6)


def test_factory_kwargs_and_reset_parameters():
    layer = mbp.LinearAct(4, 3, "tanh", dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.device.type == "cpu"
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    torch.manual_seed(1)
    ref = nn.Linear(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    same = mbp.LinearAct(4, 3, "tanh", dtype=torch.float64)
    assert torch.equal(ref.weight, same.weight) and torch.equal(ref.bias, same.bias)
    assert list(same.state_dict()) == ["weight", "bias"]
    assert repr(same) == "LinearAct(in_features=4, out_features=3, bias=True, activation=tanh)"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_depth_4_matches_native(dtype, bias):
    sizes = [13, 17, 9, 33, 5]
    model = mbp.MLP(sizes, activation="gelu", bias=bias, dtype=dtype)
    native = nn.Sequential()
    for i, layer in enumerate(model.layers):
        lin = nn.Linear(layer.in_features, layer.out_features, bias=bias, dtype=torch.float64)
        lin.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        native.append(lin)
        if i < len(model.layers) - 1:
            native.append(nn.GELU())
    x = torch.randn(3, 7, 13)
    out, ref = model(x.to(dtype)), native(x.double())
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g.to(dtype))
    ref.backward(g)
    assert rel_err(out, ref) <= TOL[dtype]
    ours_params = list(model.parameters())
    assert len(ours_params) == (8 if bias else 4)
    for p, q in zip(ours_params, native.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) <= TOL[dtype]


def test_mlp_structure_and_state_dict_keys():
    model = mbp.MLP([4, 8, 3], activation="silu", output_activation="sigmoid")
    assert [layer.activation for layer in model.layers] == ["silu", "sigmoid"]
    keys = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    assert list(model.state_dict()) == keys


def test_modules_save_and_load():
    model = mbp.MLP([3, 5, 2], activation="leaky_relu", negative_slope=0.2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 3)
    assert torch.equal(loaded(x), model(x))
    assert loaded.layers[0].act.negative_slope == 0.2


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((0, 3), ValueError, "in_features: expected a positive int, got 0"),
        ((3, -1), ValueError, "out_features: expected a positive int, got -1"),
        ((3.0, 2), TypeError, "in_features: expected a positive int, got float"),
    ],
)
def test_constructor_errors(args, error, match):
    with pytest.raises(error, match=match):
        mbp.Linear(*args)
    with pytest.raises(error, match=match):
        mbp.LinearAct(*args)


def test_mlp_constructor_errors():
    with pytest.raises(ValueError, match="at least"):
        mbp.MLP([3])
    with pytest.raises(ValueError, match=r"sizes\[1\]: expected a positive int, got 0"):
        mbp.MLP([3, 0, 2])
    with pytest.raises(TypeError, match="sizes"):
        mbp.MLP(5)
    with pytest.raises(ValueError, match="unknown name 'nope'"):
        mbp.MLP([2, 2], activation="nope")
