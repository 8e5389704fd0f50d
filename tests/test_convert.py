"""manualbp.convert / manualbp.revert: in-place swaps that keep Parameters, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp.convert import ConversionReport, Replacement, convert, revert

from .helpers import TOL, rel_err

F64 = torch.float64


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.GELU(approximate="tanh"),
        nn.Linear(8, 8, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(8, 8),
        nn.Softplus(beta=2.0),  # not the registry's softplus: stays, its Linear is not fused
        nn.Linear(8, 8),
        nn.Sequential(nn.Linear(8, 8), nn.Mish(), nn.Dropout(0.0)),
        nn.Linear(8, 8),
        nn.SiLU(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.GELU(),
        nn.Linear(8, 3),
    ).to(F64)


def _outputs_and_grads(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    params = list(model.parameters())
    # A non-uniform upstream gradient, so every element of every gradient is exercised.
    weights = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out, list(grads)


def _assert_same(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]]) -> None:
    assert a[0].dtype == b[0].dtype == F64
    assert rel_err(a[0], b[0]) <= TOL[F64]
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        assert rel_err(ga, gb) <= TOL[F64]


def test_convert_plain_mlp_fuses_and_keeps_parameters() -> None:
    model = _mlp()
    params_before = list(model.parameters())
    names_before = [name for name, _ in model.named_parameters()]
    x = torch.randn(5, 6, dtype=F64)
    before = _outputs_and_grads(model, x)

    report = convert(model)

    assert isinstance(report, ConversionReport)
    assert report.fused == [r for r in report.replaced if r.activation is not None]
    assert [(r.name, r.new, r.activation) for r in report.replaced] == [
        ("0", "manualbp.LinearAct(relu)", "1"),
        ("2", "manualbp.LinearAct(gelu_tanh)", "3"),
        ("4", "manualbp.LinearAct(leaky_relu)", "5"),
        ("6", "manualbp.Linear", None),
        ("8", "manualbp.Linear", None),
        ("9.0", "manualbp.LinearAct(mish)", "9.1"),
        ("10", "manualbp.LinearAct(silu)", "11"),
        ("12", "manualbp.LinearAct(sigmoid)", "13"),
        ("14", "manualbp.LinearAct(tanh)", "15"),
        ("16", "manualbp.LinearAct(gelu)", "17"),
        ("18", "manualbp.Linear", None),
    ]
    assert all(r.old == "torch.nn.Linear" for r in report.replaced)
    assert report.skipped == []
    assert type(model[1]) is nn.Identity and type(model[9][1]) is nn.Identity
    assert type(model[7]) is nn.Softplus and type(model[6]) is mbp.Linear
    assert model[4].act.negative_slope == 0.2 and model[4].bias is None
    # The very same Parameter objects, under the same names: optimizer state stays valid.
    assert [name for name, _ in model.named_parameters()] == names_before
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    _assert_same(_outputs_and_grads(model, x), before)

    back = revert(model)
    assert len(back) == len(report)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.ReLU
    assert type(model[3]) is nn.GELU and model[3].approximate == "tanh"
    assert type(model[5]) is nn.LeakyReLU and model[5].negative_slope == 0.2
    assert type(model[9][0]) is nn.Linear and type(model[9][1]) is nn.Mish
    assert not any(isinstance(m, (mbp.Linear, mbp.LinearAct)) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    _assert_same(_outputs_and_grads(model, x), before)


def test_convert_runs_the_hand_written_backward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).to(F64)
    convert(model)
    out = model(torch.randn(2, 3, dtype=F64, requires_grad=True))
    assert "LinearActFunction" in type(out.grad_fn).__name__


def test_convert_without_fusion() -> None:
    model = _mlp()
    x = torch.randn(4, 6, dtype=F64)
    before = _outputs_and_grads(model, x)
    report = convert(model, fuse_activations=False)
    assert report.fused == [] and len(report) == 11
    assert all(type(m) is not nn.Identity for m in model.modules())
    _assert_same(_outputs_and_grads(model, x), before)


def test_optimizer_state_survives_conversion() -> None:
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    b = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=0.1) for m in (a, b))
    x, y = torch.randn(8, 4, dtype=F64), torch.randn(8, 2, dtype=F64)
    for step in range(3):
        if step == 1:
            convert(b)  # mid-training: Adam's moments are keyed by the (same) Parameters
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert type(b[0]) is mbp.LinearAct
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert rel_err(pb, pa) <= TOL[F64]


def test_transformer_encoder_layer() -> None:
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=F64
    )
    params_before = list(layer.parameters())
    x = torch.randn(2, 3, 8, dtype=F64)
    before = _outputs_and_grads(layer, x)
    report = convert(layer)
    assert report.names == ["linear1", "linear2"]
    assert report.skipped[0][0] == "self_attn.out_proj"
    assert "NonDynamicallyQuantizableLinear" in report.skipped[0][1]
    assert type(layer.linear1) is mbp.Linear and type(layer.linear2) is mbp.Linear
    assert all(a is b for a, b in zip(layer.parameters(), params_before, strict=True))
    _assert_same(_outputs_and_grads(layer, x), before)
    revert(layer)
    assert type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear
    _assert_same(_outputs_and_grads(layer, x), before)


def test_what_is_left_alone() -> None:
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda *_: None)
    normed = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    act_hooked = nn.ReLU()
    act_hooked.register_forward_hook(lambda *_: None)
    model = nn.Sequential(
        hooked,
        normed,
        nn.Linear(3, 3),
        nn.LeakyReLU(-0.5),  # negative slope: not in the registry, Linear alone is converted
        nn.Linear(3, 3),
        act_hooked,  # a hooked activation is not fused away
        nn.LazyLinear(3),
    )
    report = convert(model)
    assert [name for name, _ in report.skipped] == ["0", "1", "6"]
    assert "hooks" in report.skipped[0][1] and "parametrizations" in report.skipped[1][1]
    # Converted alone, and the report says why the activation after each stayed.
    assert report.replaced == [
        Replacement(
            "2",
            "torch.nn.Linear",
            "manualbp.Linear",
            note="3: LeakyReLU(negative_slope=-0.5): the registry needs a slope >= 0",
        ),
        Replacement(
            "4", "torch.nn.Linear", "manualbp.Linear", note="5: ReLU has hooks (they would no longer run)"
        ),
    ]
    assert report.unfused == [(r.name, r.note) for r in report.replaced]
    assert model[5] is act_hooked and type(model[3]) is nn.LeakyReLU
    assert "2: torch.nn.Linear -> manualbp.Linear (not fused: 3: LeakyReLU(" in str(report)


def test_convert_is_idempotent_and_revert_skips_foreign_linear_act() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), mbp.MLP([4, 2]))
    assert len(convert(model)) == 1
    assert len(convert(model)) == 0
    report = revert(model)
    assert report.names == ["0"]
    assert report.skipped == [("2.layers.0", "LinearAct with no nn.Identity slot after it in a Sequential")]


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        convert("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model: got a bare nn.Linear"):
        convert(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fuse_activations: expected a bool"):
        convert(nn.Sequential(), fuse_activations="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model: got a bare LinearAct"):
        revert(mbp.LinearAct(2, 2))
