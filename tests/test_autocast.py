"""manualbp under torch.autocast behaves as the native ops do.

`nn.Linear` is on autocast's "lower precision" list: inside `torch.autocast(device, dtype)` its
float32 arguments are cast to `dtype` and the output has that dtype, while gradients reach the
float32 parameters in float32 (through the casts). float64 tensors are never cast. The losses are
on the "float32" list. The same must hold for manualbp's layers and losses — eager and compiled.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp import functional as MF

from .helpers import TOL, rel_err

BF16 = torch.bfloat16
# Errors are measured against the float64 truth computed from the bf16-rounded operands (what
# autocast hands the op), with DESIGN.md's bfloat16 bound. Comparing with native bf16 directly
# would compare two different sets of intermediate roundings.
BF16_TOL = TOL[BF16]


def _pair(activation: str) -> tuple[nn.Module, nn.Module]:
    """A manualbp layer and its native twin sharing nothing but initial values."""
    ours = mbp.LinearAct(9, 7, activation) if activation != "linear" else mbp.Linear(9, 7)
    native_linear = nn.Linear(9, 7)
    with torch.no_grad():
        native_linear.weight.copy_(ours.weight)
        native_linear.bias.copy_(ours.bias)
    if activation == "linear":
        return ours, native_linear
    return ours, nn.Sequential(native_linear, mbp.get_activation(activation).native())


def _run(module: nn.Module, x: Tensor, *, backward_inside: bool) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    params = list(module.parameters())
    with torch.autocast("cpu", dtype=BF16):
        out = module(x)
        if backward_inside:
            grads = torch.autograd.grad(out.float().square().sum(), [x, *params])
    if not backward_inside:
        grads = torch.autograd.grad(out.float().square().sum(), [x, *params])
    return out, list(grads)


def _truth(native: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The float64 result on the operands autocast rounds to bf16 (a cast's gradient is 1)."""
    native = copy.deepcopy(native)
    with torch.no_grad():
        for p in native.parameters():
            p.data = p.data.to(BF16).double()
    x = x.to(BF16).double().requires_grad_(True)
    out = native(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *native.parameters()])
    return out, list(grads)


def _check_against_native_and_truth(ours: nn.Module, native: nn.Module, x: Tensor, **kw) -> None:
    out, grads = _run(ours, x, **kw)
    native_out, native_grads = _run(native, x, **kw)
    true_out, true_grads = _truth(native, x)
    assert out.dtype == native_out.dtype == BF16
    assert rel_err(out, true_out) <= BF16_TOL
    for grad, native_grad, true_grad in zip(grads, native_grads, true_grads, strict=True):
        assert grad.dtype == native_grad.dtype == torch.float32  # the parameters' dtype
        assert rel_err(grad, true_grad) <= BF16_TOL


@pytest.mark.parametrize("activation", ["linear", "relu", "gelu", "silu"])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_layer_under_cpu_bf16_autocast_matches_nn_linear(activation: str, backward_inside: bool) -> None:
    ours, native = _pair(activation)
    _check_against_native_and_truth(ours, native, torch.randn(3, 4, 9), backward_inside=backward_inside)


def test_autocast_output_is_the_bf16_rounding_of_the_bf16_inputs() -> None:
    """Inside autocast the layer computes from bf16-rounded operands, accumulating in float32."""
    layer = mbp.LinearAct(16, 8, "tanh")
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=BF16):
        out = layer(x)
    w, b = layer.weight.detach().to(BF16).double(), layer.bias.detach().to(BF16).double()
    exact = torch.tanh(x.to(BF16).double() @ w.t() + b)
    # Every element within one bf16 rounding (2⁻⁸ relative) of the exact value.
    assert out.dtype == BF16
    assert bool(((out.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all())


@pytest.mark.parametrize("mode", ["network", "layers"])
def test_mlp_under_cpu_bf16_autocast_matches_native(mode: str) -> None:
    ours = mbp.MLP([9, 8, 7], activation="gelu", mode=mode)
    native = nn.Sequential(nn.Linear(9, 8), nn.GELU(), nn.Linear(8, 7))
    with torch.no_grad():
        for p_native, p_ours in zip(native.parameters(), ours.parameters(), strict=True):
            p_native.copy_(p_ours)
    _check_against_native_and_truth(ours, native, torch.randn(6, 9), backward_inside=False)


def test_float64_is_not_cast_by_autocast() -> None:
    layer = mbp.Linear(4, 3, dtype=torch.float64)
    native = nn.Linear(4, 3, dtype=torch.float64)
    native.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):
        out, ref = layer(x), native(x)
    assert out.dtype == ref.dtype == torch.float64
    assert rel_err(out, ref) <= TOL[torch.float64]


def test_losses_run_in_float32_under_autocast_as_native() -> None:
    logits = torch.randn(6, 5, dtype=BF16, requires_grad=True)
    target = torch.tensor([0, 4, 2, -100, 1, 3])
    values = torch.randn(6, 5, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        ce, ce_ref = MF.cross_entropy(logits, target), nn.functional.cross_entropy(logits, target)
        mse, mse_ref = MF.mse_loss(logits, values), nn.functional.mse_loss(logits, values)
    assert ce.dtype == ce_ref.dtype == torch.float32
    assert mse.dtype == mse_ref.dtype == torch.float32
    assert rel_err(ce, ce_ref) <= TOL[torch.float32] and rel_err(mse, mse_ref) <= TOL[torch.float32]
    (grad,) = torch.autograd.grad(ce + mse, logits)
    (ref_grad,) = torch.autograd.grad(ce_ref + mse_ref, logits)
    assert grad.dtype == ref_grad.dtype == BF16
    assert rel_err(grad, ref_grad) <= BF16_TOL


def test_compiled_layer_under_autocast() -> None:
    torch._dynamo.reset()
    ours, native = _pair("gelu")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    _check_against_native_and_truth(compiled, native, torch.randn(4, 9), backward_inside=False)
