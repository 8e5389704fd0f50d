"""The gated MLP y = W_d (f(W_g x) ⊙ W_u x) (`manualbp.functional.gated_mlp`, `mbp.GatedMLP`)
against native autograd in float64: every gradient, odd shapes, leading dimensions, bias on and
off, each activation; gradcheck and gradgradcheck; jvp and vmap; what backward keeps; errors;
torch.compile(fullgraph=True), torch.export and opcheck of its custom ops."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

import manualbp as mbp
from manualbp import functional as MF
from manualbp import ops
from manualbp.activations import get_activation
from manualbp.ops.network import saved_tensor_bytes

from .helpers import TOL, leaf, rel_err

F64 = torch.float64
GATED = ("silu", "gelu", "gelu_tanh")
# Every other registry entry works too (ReGLU: relu, GLU: sigmoid, ...).
OTHERS = ("relu", "sigmoid", "leaky_relu", "tanh", "identity", "mish", "softplus")


def native_gated(x, wg, wu, wd, bg=None, bu=None, bd=None, activation="silu"):
    act = get_activation(activation).native()
    return F.linear(act(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def _params(n_in: int, hidden: int, n_out: int, bias: bool, dtype=F64) -> list[Tensor | None]:
    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    weights = [t(hidden, n_in), t(hidden, n_in), t(n_out, hidden)]
    biases = [t(hidden), t(hidden), t(n_out)] if bias else [None, None, None]
    return weights + biases


def _grads(out: Tensor, inputs: list[Tensor | None], seed: Tensor) -> list[Tensor]:
    present = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, present, seed))


@pytest.mark.parametrize("activation", GATED + OTHERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_matches_native_every_gradient(activation: str, bias: bool, lead: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*lead, 7, 5, dtype=F64, requires_grad=True)  # odd sizes: 5 -> 11 -> 3
    params = _params(5, 11, 3, bias)
    ours = MF.gated_mlp(x, *params, activation=activation)
    ref = native_gated(x, *params, activation=activation)
    assert ours.shape == ref.shape == (*lead, 7, 3)
    assert rel_err(ours, ref) <= TOL[F64]
    seed = torch.randn_like(ref)
    for a, b in zip(_grads(ours, [x, *params], seed), _grads(ref, [x, *params], seed), strict=True):
        assert rel_err(a, b) <= TOL[F64]


def test_non_contiguous_input_and_partial_requires_grad() -> None:
    x = torch.randn(5, 9, dtype=F64).t()  # (9, 5), non-contiguous
    wg, wu, wd, bg, bu, bd = _params(5, 6, 4, True)
    wu.requires_grad_(False)
    bg.requires_grad_(False)
    ours = MF.gated_mlp(x, wg, wu, wd, bg, bu, bd)
    ref = native_gated(x, wg, wu, wd, bg, bu, bd)
    seed = torch.randn_like(ref)
    wanted = [wg, wd, bu, bd]
    got, want = torch.autograd.grad(ours, wanted, seed), torch.autograd.grad(ref, wanted, seed)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= TOL[F64]


@pytest.mark.parametrize("activation", GATED)
def test_gradcheck_and_gradgradcheck(activation: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    params = _params(4, 5, 3, True)

    def f(*t: Tensor) -> Tensor:
        return MF.gated_mlp(*t, activation=activation)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_hessian_vector_product_matches_native() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    params = _params(5, 6, 2, True)
    v = [torch.randn_like(t) for t in (x, *params)]

    def hvp(fn) -> list[Tensor]:
        loss = fn(x, *params).square().sum()
        first = torch.autograd.grad(loss, [x, *params], create_graph=True)
        dot = sum((g * w).sum() for g, w in zip(first, v, strict=True))
        return list(torch.autograd.grad(dot, [x, *params]))

    for a, b in zip(hvp(MF.gated_mlp), hvp(native_gated), strict=True):
        assert rel_err(a, b) <= TOL[F64]


@pytest.mark.parametrize("activation", GATED)
def test_jvp_matches_native(activation: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, dtype=F64)
    params = [t.detach() for t in _params(5, 6, 3, True)]
    primals = (x, *params)
    tangents = tuple(torch.randn_like(t) for t in primals)
    out, out_t = jvp(lambda *t: MF.gated_mlp(*t, activation=activation), primals, tangents)
    ref, ref_t = jvp(lambda *t: native_gated(*t, activation=activation), primals, tangents)
    assert rel_err(out, ref) <= TOL[F64] and rel_err(out_t, ref_t) <= TOL[F64]


def test_vmap_per_sample_gradients_match_native() -> None:
    torch.manual_seed(4)
    params = [t.detach() for t in _params(5, 6, 3, True)]
    x, target = torch.randn(7, 5, dtype=F64), torch.randn(7, 3, dtype=F64)

    def per_sample(fn):
        def loss(p, xi, ti):
            return (fn(xi.unsqueeze(0), *p) - ti).square().sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    for a, b in zip(per_sample(MF.gated_mlp), per_sample(native_gated), strict=True):
        assert a.shape == (7, *b.shape[1:]) and rel_err(a, b) <= TOL[F64]


@pytest.mark.parametrize("bias", [True, False])
def test_backward_keeps_at_most_0_6_of_native_bytes(bias: bool) -> None:
    x = torch.randn(4, 16, 32, requires_grad=True)
    params = _params(32, 88, 32, bias, dtype=torch.float32)
    exclude = [x, *(p for p in params if p is not None)]
    ours = saved_tensor_bytes(lambda: MF.gated_mlp(x, *params), exclude)
    native = saved_tensor_bytes(lambda: native_gated(x, *params), exclude)
    hidden_bytes = 4 * 16 * 88 * 4
    assert ours.total == 2 * hidden_bytes  # z_g and z_u
    assert native.total == 4 * hidden_bytes  # z_g, f(z_g), z_u, h
    assert ours.total <= 0.6 * native.total


def test_module_keeps_linear_layout_and_matches_native() -> None:
    torch.manual_seed(5)
    layer = mbp.GatedMLP(5, 8, 4, activation="gelu_tanh", bias=True, dtype=F64)
    assert list(layer.state_dict()) == [
        f"{p}.{k}" for p in ("gate_proj", "up_proj", "down_proj") for k in ("weight", "bias")
    ]
    assert (layer.in_features, layer.hidden_features, layer.out_features) == (5, 8, 4)
    assert layer.activation == "gelu_tanh" and all(type(m) is mbp.Linear for m in layer.projections)
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    g, u, d = layer.projections
    ref = native_gated(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias, "gelu_tanh")
    out = layer(x)
    assert rel_err(out, ref) <= TOL[F64]
    params = [x, *layer.parameters()]
    seed = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, params, seed), torch.autograd.grad(ref, params, seed)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= TOL[F64]
    named = mbp.GatedMLP(5, 8, 4, names=("fc1_g", "fc1_x", "fc2"))
    assert list(named.state_dict()) == ["fc1_g.weight", "fc1_x.weight", "fc2.weight"]
    assert "activation=gelu_tanh" in repr(layer)


def test_module_with_hooks_calls_its_projections() -> None:
    layer = mbp.GatedMLP(4, 6, 3, dtype=F64)
    seen: list[str] = []
    layer.up_proj.register_forward_hook(lambda *_: seen.append("up"))
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)
    g, u, d = layer.projections
    assert rel_err(layer(x), native_gated(x, g.weight, u.weight, d.weight)) <= TOL[F64]
    assert seen == ["up"]


def test_bad_arguments_raise_clear_errors() -> None:
    x = torch.randn(3, 4, dtype=F64)
    wg, wu, wd = torch.randn(6, 4, dtype=F64), torch.randn(6, 4, dtype=F64), torch.randn(2, 6, dtype=F64)
    with pytest.raises(TypeError, match="input: expected a torch.Tensor"):
        MF.gated_mlp([1.0], wg, wu, wd)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"gate_weight: .*\(hidden_features, 4\)"):
        MF.gated_mlp(x, wg[:, :3], wu, wd)
    with pytest.raises(ValueError, match=r"up_weight: .*\(6, 4\).*got shape \(5, 4\)"):
        MF.gated_mlp(x, wg, wu[:5], wd)
    with pytest.raises(ValueError, match=r"down_weight: .*hidden_features=6.*got shape \(2, 5\)"):
        MF.gated_mlp(x, wg, wu, wd[:, :5])
    with pytest.raises(ValueError, match=r"up_bias: expected shape \(6,\)"):
        MF.gated_mlp(x, wg, wu, wd, up_bias=torch.randn(5, dtype=F64))
    with pytest.raises(ValueError, match=r"down_bias: expected shape \(2,\)"):
        MF.gated_mlp(x, wg, wu, wd, down_bias=torch.randn(6, dtype=F64))
    with pytest.raises(TypeError, match="down_weight: dtype torch.float32 does not match input"):
        MF.gated_mlp(x, wg, wu, wd.float())
    with pytest.raises(ValueError, match="activation: unknown name 'swiglu'"):
        MF.gated_mlp(x, wg, wu, wd, activation="swiglu")
    with pytest.raises(ValueError, match="hidden_features: expected a positive int, got 0"):
        mbp.GatedMLP(4, 0, 2)
    with pytest.raises(ValueError, match="names: expected three different names"):
        mbp.GatedMLP(4, 6, 2, names=("a", "a", "b"))


def test_float32_and_bfloat16_storage() -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 4, 8)
    params = _params(8, 16, 8, True, dtype=torch.float32)
    ref = native_gated(x.double(), *(p.double() for p in params))
    assert rel_err(MF.gated_mlp(x, *params), ref) <= TOL[torch.float32]
    bf = [p.detach().bfloat16() for p in params]
    out = MF.gated_mlp(x.bfloat16(), *bf)
    assert out.dtype == torch.bfloat16
    ref16 = native_gated(x.bfloat16().double(), *(p.double() for p in bf))
    assert rel_err(out, ref16) <= TOL[torch.bfloat16]


def test_autocast_computes_in_the_autocast_dtype() -> None:
    torch.manual_seed(8)
    layer = mbp.GatedMLP(8, 16, 4, bias=True)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(out.float().sum(), params)
    assert all(g.dtype == torch.float32 for g in grads)
    rounded = [t.detach().bfloat16().double().requires_grad_() for t in params]
    x64, wg, bg, wu, bu, wd, bd = rounded  # parameters() order: weight, bias per projection
    assert rel_err(out, native_gated(x64, wg, wu, wd, bg, bu, bd)) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------ compile


def test_compile_fullgraph_matches_native_float64() -> None:
    torch._dynamo.reset()
    torch.manual_seed(7)
    layer = mbp.GatedMLP(5, 7, 3, bias=True, dtype=F64)
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)

    def step(m: nn.Module, x: Tensor) -> Tensor:
        return m(x).sin().sum()

    compiled = torch.compile(step, fullgraph=True)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(compiled(layer, x), params)
    g, u, d = layer.projections
    ref_loss = native_gated(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias).sin().sum()
    assert rel_err(compiled(layer, x), ref_loss) <= TOL[F64]
    for a, b in zip(got, torch.autograd.grad(ref_loss, params), strict=True):
        assert rel_err(a, b) <= TOL[F64]


def test_export_records_the_gated_op_and_its_backward() -> None:
    layer = mbp.GatedMLP(4, 6, 3, activation="gelu", bias=True, dtype=F64)
    x = torch.randn(2, 4, dtype=F64)
    program = torch.export.export(layer, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("manualbp.gated_mlp_forward.default") == 1
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    y = torch.randn(2, 4, dtype=F64, requires_grad=True)  # the exported (static) shape
    assert rel_err(loaded(y), layer(y)) <= TOL[F64]
    exported = program.module()
    got = torch.autograd.grad(exported(y).square().sum(), [y, *exported.parameters()])
    want = torch.autograd.grad(layer(y).square().sum(), [y, *layer.parameters()])
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= TOL[F64]


def test_custom_op_refuses_create_graph() -> None:
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    wg, wu, wd = (leaf(torch.randn(s, dtype=F64)) for s in ((5, 4), (5, 4), (2, 5)))
    y, _, _ = ops.OPS["gated_mlp_forward"](x, wg, wu, wd, None, None, None, "silu", 0.0)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_opcheck_gated_ops() -> None:
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    wg, wu, wd, bg, bu, bd = _params(3, 4, 2, True)
    samples = [(x, wg, wu, wd, bg, bu, bd, "silu", 0.0), (x, wg, wu, wd, None, None, None, "leaky_relu", 0.2)]
    for args in samples:
        torch.library.opcheck(ops.OPS["gated_mlp_forward"], args)
    g = torch.randn(5, 2, dtype=F64)
    z = torch.randn(5, 4, dtype=F64)
    for needs in ([True] * 7, [False, True, False, True, False, False, True]):
        args = (g, x.detach(), wg.detach(), wu.detach(), wd.detach(), z, z.clone(), "gelu", 0.0, needs)
        torch.library.opcheck(ops.OPS["gated_mlp_backward"], args)
