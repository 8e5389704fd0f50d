"""The activation registry: hand-written f′ against torch.func.grad of the torch f, in float64."""

import pytest
import torch
from torch.func import grad, vmap

import manualbp as mbp
from manualbp.activations import get_activation

# Points at and around 0 (ReLU's kink), moderate and large magnitudes, softplus's threshold.
POINTS = torch.tensor(
    [-30.0, -20.5, -8.0, -3.0, -1.0, -0.5, -1e-7, 0.0, 1e-7, 0.5, 1.0, 3.0, 8.0, 19.9, 20.0, 20.1, 30.0],
    dtype=torch.float64,
)


@pytest.mark.parametrize("name", mbp.ACTIVATIONS)
def test_derivative_matches_autograd(name):
    act = get_activation(name)
    z = torch.cat([POINTS, torch.linspace(-6, 6, 241, dtype=torch.float64)])
    expected = vmap(grad(lambda t: act.native()(t)))(z)
    saved = act(z) if act.uses_output else z
    ours = act.derivative(saved)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", mbp.ACTIVATIONS)
def test_forward_matches_torch_module(name):
    act = get_activation(name)
    z = torch.linspace(-10, 10, 101, dtype=torch.float64)
    torch.testing.assert_close(act(z), act.native()(z), rtol=0, atol=0)


def test_relu_derivative_at_zero_is_pytorchs_choice():
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch.relu(z).sum().backward()
    act = get_activation("relu")
    assert torch.equal(act.derivative(act(z.detach())), z.grad)
    assert z.grad.eq(0).all()


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, 1.5])
def test_leaky_relu_slope(slope):
    act = get_activation("leaky_relu", negative_slope=slope)
    z = torch.cat([POINTS, -POINTS])
    expected = vmap(grad(lambda t: torch.nn.functional.leaky_relu(t, slope)))(z)
    torch.testing.assert_close(act.derivative(act(z)), expected, rtol=0, atol=0)
    assert "negative_slope" not in repr(mbp.LinearAct(2, 2, "relu"))
    assert f"negative_slope={slope}" in repr(mbp.LinearAct(2, 2, act))


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_piecewise_delta_keeps_native_nan_inf_semantics(name):
    act = get_activation(name)
    z = torch.tensor([-1.0, 0.0, 2.0, float("nan"), -float("inf"), float("inf")], dtype=torch.float64)
    grad_out = torch.tensor([float("inf"), float("nan"), 1.0, 2.0, 3.0, float("-inf")], dtype=torch.float64)
    z_leaf = z.clone().requires_grad_(True)
    act.native()(z_leaf).backward(grad_out)
    torch.testing.assert_close(act.delta(grad_out, act(z)), z_leaf.grad, equal_nan=True)


def test_aliases_and_order():
    assert mbp.ACTIVATIONS[0] == "identity" and len(mbp.ACTIVATIONS) == 10
    assert [get_activation(n).kernel_id for n in mbp.ACTIVATIONS] == list(range(10))
    assert get_activation("swish").name == "silu"
    assert get_activation("GELU").name == "gelu"
    uses_z = {n for n in mbp.ACTIVATIONS if not get_activation(n).uses_output}
    assert uses_z == {"gelu", "gelu_tanh", "silu", "mish", "softplus"}


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown name 'gelux'.*identity, relu, leaky_relu"):
        get_activation("gelux")
    with pytest.raises(TypeError, match="activation: expected a name"):
        get_activation(3)


@pytest.mark.parametrize("slope", [-0.1, float("nan"), float("inf")])
def test_bad_slope(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        get_activation("leaky_relu", negative_slope=slope)


def test_slope_only_for_leaky_relu():
    with pytest.raises(ValueError, match="only leaky_relu takes a slope"):
        get_activation("relu", negative_slope=0.1)
