"""`PositionalFunction.apply`: the fast path skips the signature binding and changes nothing else."""

from __future__ import annotations

import inspect

import pytest
import torch

import manualbp as mbp
from manualbp import functional as MF
from manualbp._autograd import PositionalFunction

from .helpers import TOL, leaf, rel_err

F64 = torch.float64


def _loss(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return MF.mse_loss(layer(x), torch.ones(4, 3, dtype=F64))


def test_every_function_uses_the_fast_apply() -> None:
    from manualbp.ops import heads as fused_loss
    from manualbp.ops import network

    functions = [
        MF.LinearActFunction, MF.SquaredErrorFunction, MF.CrossEntropyFunction,
        network.MLPFunction, fused_loss.LinearCrossEntropyFunction, fused_loss.LinearMSEFunction,
    ]  # fmt: skip
    for fn in functions:
        assert issubclass(fn, PositionalFunction), fn
        # The fast path needs every forward argument positional and without a default.
        params = inspect.signature(fn.forward).parameters.values()
        assert all(p.default is inspect.Parameter.empty for p in params), fn
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params
                   if p.kind is not inspect.Parameter.VAR_POSITIONAL), fn  # fmt: skip


def test_fast_apply_skips_the_signature_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    layer = mbp.LinearAct(5, 3, "gelu", dtype=F64)
    _loss(layer, torch.randn(4, 5, dtype=F64)).backward()
    assert calls == []
    assert all(p.grad is not None for p in layer.parameters())


def test_fast_and_regular_apply_agree_bitwise() -> None:
    torch.manual_seed(0)
    layer = mbp.LinearAct(5, 3, "silu", dtype=F64)
    x = leaf(torch.randn(4, 5, dtype=F64))
    args = (x, layer.weight, layer.bias, layer.act, mbp.backends.reference)
    fast, _ = MF.LinearActFunction.apply(*args)
    regular, _ = torch.autograd.Function.apply.__func__(MF.LinearActFunction, *args)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, layer.weight, layer.bias], g)
    grads_regular = torch.autograd.grad(regular, [x, layer.weight, layer.bias], g)
    assert torch.equal(fast, regular)
    for a, b in zip(grads_fast, grads_regular, strict=True):
        assert torch.equal(a, b)


def test_functorch_transforms_take_the_regular_path() -> None:
    """Inside torch.func.grad the Function runs as a functorch custom function: still correct."""
    torch.manual_seed(0)
    layer = mbp.LinearAct(5, 3, "tanh", dtype=F64)
    x = torch.randn(4, 5, dtype=F64)

    def loss_of_weight(weight: torch.Tensor) -> torch.Tensor:
        return MF.mse_loss(MF.linear(x, weight, layer.bias, "tanh"), torch.ones(4, 3, dtype=F64))

    ours = torch.func.grad(loss_of_weight)(layer.weight.detach())
    w = leaf(layer.weight)
    native = torch.nn.functional.mse_loss(torch.tanh(torch.nn.functional.linear(x, w, layer.bias)),
                                          torch.ones(4, 3, dtype=F64))  # fmt: skip
    (expected,) = torch.autograd.grad(native, [w])
    assert rel_err(ours, expected) <= TOL[F64]
