"""The autograd contract of nn.Linear, held by every manualbp op against native autograd (float64):
higher-order gradients, torch.func transforms, in-place ops on outputs, module hooks in network
mode, and the fused head's loss under autocast. The Triton backend runs under the interpreter
(float32 only), so there its second derivatives are compared with native float64 ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import manualbp as mbp
from manualbp.functional import (
    cross_entropy,
    half_mse_loss,
    linear,
    linear_cross_entropy,
    linear_mse_loss,
    mse_loss,
)

from .helpers import TOL, leaf, native_linear_act, rel_err

F64 = torch.float64
ACTS = list(mbp.ACTIVATIONS)
BACKENDS = ["torch", "triton"]


def _native_mlp(model: mbp.MLP) -> nn.Sequential:
    """The same stack from torch modules, sharing the manualbp model's Parameter objects."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin.weight = layer.weight
        if layer.bias is not None:
            lin.bias = layer.bias
        mods += [lin, layer.act.native()]
    return nn.Sequential(*mods)


def _hvp(fn, inputs: list[Tensor], vs: list[Tensor]) -> list[Tensor]:
    """(∂²f/∂θ²) v for every input θ: the double backward of a scalar f."""
    grads = torch.autograd.grad(fn(*inputs), inputs, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs, strict=True))
    return list(torch.autograd.grad(dot, inputs, allow_unused=True, materialize_grads=True))


def _data(dtype, *shape):
    return torch.randn(shape, dtype=dtype)


# ------------------------------------------------------------------------------ higher order


@pytest.mark.parametrize("activation", ACTS)
def test_linear_act_gradgradcheck_reference(activation: str) -> None:
    x, w, b = leaf(_data(F64, 2, 3, 5)), leaf(_data(F64, 4, 5) / 2), leaf(_data(F64, 4))
    f = lambda x, w, b: linear(x, w, b, activation)  # noqa: E731
    with mbp.use_backend("torch"):
        assert gradcheck(f, (x, w, b))
        assert gradgradcheck(f, (x, w, b))


def _second_order_case(fn_ours, fn_native, inputs64: list[Tensor], dtype: torch.dtype, backend: str):
    """HVP of ours (dtype, backend) against native float64, every input, every element."""
    torch.manual_seed(1)
    vs64 = [torch.randn_like(t) for t in inputs64]
    ref = _hvp(fn_native, [leaf(t) for t in inputs64], vs64)
    with mbp.use_backend(backend):
        ours = _hvp(fn_ours, [leaf(t.to(dtype)) for t in inputs64], [v.to(dtype) for v in vs64])
    for o, r in zip(ours, ref, strict=True):
        assert o.requires_grad is False and o.dtype == dtype
        assert rel_err(o, r) <= TOL[dtype] * 10 if dtype != F64 else rel_err(o, r) <= TOL[F64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_linear_act_hvp_matches_native(activation: str, backend: str) -> None:
    dtype = F64 if backend == "torch" else torch.float32
    x, w, b = _data(F64, 6, 5), _data(F64, 4, 5) / 2, _data(F64, 4)
    g = _data(F64, 6, 4)
    ours = lambda x, w, b: (linear(x, w, b, activation) * g.to(x.dtype)).sum()  # noqa: E731
    native = lambda x, w, b: (native_linear_act(x, w, b, activation) * g).sum()  # noqa: E731
    _second_order_case(ours, native, [x, w, b], dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["network", "recompute", "layers"])
@pytest.mark.parametrize("activation", ACTS)
def test_mlp_second_order_matches_native(activation: str, mode: str, backend: str) -> None:
    """HVP over the input and every parameter of a 3-layer MLP, both modes, both backends."""
    dtype = F64 if backend == "torch" else torch.float32
    kw = {"mode": "layers"} if mode == "layers" else {"recompute": mode == "recompute"}
    model = mbp.MLP([4, 5, 6, 3], activation=activation, output_activation="tanh", dtype=F64, **kw)
    native = _native_mlp(model)
    names = [n for n, _ in model.named_parameters()]
    params64 = [p.detach() for p in model.parameters()]
    x = _data(F64, 5, 4)

    def ours(x, *params):
        return functional_call(model.to(x.dtype), dict(zip(names, params, strict=True)), (x,)).sin().sum()

    def reference(x, *params):
        native_params = dict(zip([n for n, _ in native.named_parameters()], params, strict=True))
        return functional_call(native, native_params, (x,)).sin().sum()

    _second_order_case(ours, reference, [x, *params64], dtype, backend)
    model.to(F64)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "sigmoid"])
@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_gradgradcheck(activation: str, recompute: bool) -> None:
    model = mbp.MLP([3, 4, 2], activation=activation, dtype=F64, recompute=recompute)
    names = [n for n, _ in model.named_parameters()]
    f = lambda x, *p: functional_call(model, dict(zip(names, p, strict=True)), (x,))  # noqa: E731
    inputs = (leaf(_data(F64, 4, 3)), *(leaf(p.detach()) for p in model.parameters()))
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


def test_wgan_gp_parameter_gradients_match_native() -> None:
    """The gradient penalty (‖∂D/∂x‖ − 1)² trains D's parameters: its gradient must reach them."""
    critic = mbp.MLP([6, 8, 8, 1], activation="gelu", dtype=F64)  # f″ ≠ 0: every parameter counts
    native = _native_mlp(critic)
    x = _data(F64, 7, 6)
    results = []
    for model in (critic, native):
        xi = leaf(x)
        (gx,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        penalty = ((gx.norm(dim=1) - 1) ** 2).mean()
        assert penalty.requires_grad
        # The output bias does not move ∂D/∂x: its gradient is exactly zero, both ways.
        results.append(torch.autograd.grad(penalty, list(critic.parameters()), materialize_grads=True))
    assert all(g.abs().sum() > 0 for g in results[1][:-1])
    for ours, ref in zip(*results, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


def test_pinn_second_derivative_of_an_mlp() -> None:
    """u(x) = MLP(x); u″(x) per point, and the gradient of a residual loss on it."""
    u = mbp.MLP([1, 16, 16, 1], activation="tanh", dtype=F64)
    native = _native_mlp(u)
    x = torch.linspace(-1, 1, 9, dtype=F64).unsqueeze(1)
    results = []
    for model in (u, native):
        xi = leaf(x)
        (du,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), xi, create_graph=True)
        residual = (d2u + torch.sin(xi)).pow(2).mean()
        grads = torch.autograd.grad(residual, list(u.parameters()), materialize_grads=True)
        results.append((d2u.detach(), *grads))
    for ours, ref in zip(*results, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


@pytest.mark.parametrize("mode", ["network", "layers"])
def test_autograd_functional_hessian_of_an_mlp(mode: str) -> None:
    model = mbp.MLP([3, 5, 2], activation="gelu", dtype=F64, mode=mode)
    native = _native_mlp(model)
    x = _data(F64, 2, 3)
    ours = torch.autograd.functional.hessian(lambda t: model(t).pow(2).sum(), x)
    ref = torch.autograd.functional.hessian(lambda t: native(t).pow(2).sum(), x)
    assert ref.abs().sum() > 0
    assert rel_err(ours, ref) <= TOL[F64]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_losses_and_heads_second_order(reduction: str) -> None:
    x, w, b = _data(F64, 2, 4, 5), _data(F64, 7, 5) / 2, _data(F64, 7)
    t = torch.randint(0, 7, (2, 4))
    t[0, 1] = -100
    y = _data(F64, 2, 4, 7)
    cases = [
        (lambda x, w, b: linear_cross_entropy(x, w, b, t, reduction, chunk_size=3),
         lambda x, w, b: F.cross_entropy(F.linear(x, w, b).flatten(0, 1), t.flatten(),
                                         reduction=reduction).view(t.shape if reduction == "none" else ())),
        (lambda x, w, b: linear_mse_loss(x, w, b, y, reduction, chunk_size=3),
         lambda x, w, b: F.mse_loss(F.linear(x, w, b), y, reduction=reduction)),
        (lambda x, w, b: cross_entropy(F.linear(x, w, b).flatten(0, 1), t.flatten(), reduction),
         lambda x, w, b: F.cross_entropy(F.linear(x, w, b).flatten(0, 1), t.flatten(), reduction=reduction)),
        (lambda x, w, b: mse_loss(F.linear(x, w, b), y, reduction),
         lambda x, w, b: F.mse_loss(F.linear(x, w, b), y, reduction=reduction)),
    ]  # fmt: skip
    for ours, native in cases:
        assert gradgradcheck(ours, (leaf(x), leaf(w), leaf(b)))
        weight = _data(F64, *native(x, w, b).shape)
        ours_sum = lambda *a, f=ours, c=weight: (f(*a) * c).sum()  # noqa: E731
        native_sum = lambda *a, f=native, c=weight: (f(*a) * c).sum()  # noqa: E731
        _second_order_case(ours_sum, native_sum, [x, w, b], F64, "torch")
    half = lambda x: half_mse_loss(x, y.flatten(0, 1), reduction)  # noqa: E731
    assert gradgradcheck(half, (leaf(_data(F64, 8, 7)),))


@pytest.mark.parametrize("head", ["ce", "mse"])
def test_heads_create_graph_on_triton_backend(head: str) -> None:
    """The Triton backend's head takes the differentiable path under create_graph (interpreter)."""
    x, w, b = _data(F64, 6, 5), _data(F64, 9, 5) / 2, _data(F64, 9)
    t, y = torch.randint(0, 9, (6,)), _data(F64, 6, 9)
    if head == "ce":
        ours, native = (lambda x, w, b: linear_cross_entropy(x, w, b, t.to(x.device)),
                        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t))  # fmt: skip
    else:
        ours, native = (lambda x, w, b: linear_mse_loss(x, w, b, y.to(x.dtype)),
                        lambda x, w, b: F.mse_loss(F.linear(x, w, b), y))  # fmt: skip
    _second_order_case(ours, native, [x, w, b], torch.float32, "triton")


def test_compiled_op_refuses_create_graph() -> None:
    """Through the custom op (what compiled graphs run) a second derivative is an error."""
    x, w = leaf(_data(F64, 3, 4)), leaf(_data(F64, 2, 4))
    out, _ = mbp.ops.linear_forward(x, w, None, "gelu", 0.0, "torch")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=False)
    assert gx.shape == x.shape
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


# ------------------------------------------------------------------------------ torch.func


@pytest.mark.parametrize("activation", ACTS)
def test_func_transforms_on_linear_act(activation: str) -> None:
    x, w, b = _data(F64, 6, 5), _data(F64, 4, 5) / 2, _data(F64, 4)
    ours = lambda x, w, b: linear(x, w, b, activation)  # noqa: E731
    native = lambda x, w, b: native_linear_act(x, w, b, activation)  # noqa: E731
    for transform in (jacfwd, jacrev):
        for o, r in zip(transform(ours, argnums=(0, 1, 2))(x, w, b),
                        transform(native, argnums=(0, 1, 2))(x, w, b), strict=True):  # fmt: skip
            assert rel_err(o, r) <= TOL[F64]
    tangents = (_data(F64, 6, 5), _data(F64, 4, 5), _data(F64, 4))
    (out, out_t), (ref, ref_t) = jvp(ours, (x, w, b), tangents), jvp(native, (x, w, b), tangents)
    assert rel_err(out, ref) <= TOL[F64] and rel_err(out_t, ref_t) <= TOL[F64]
    h = hessian(lambda x: ours(x, w, b).sum())(x)
    assert rel_err(h, hessian(lambda x: native(x, w, b).sum())(x)) <= TOL[F64]


@pytest.mark.parametrize("mode", ["network", "layers"])
def test_vmap_per_sample_gradients_match_native(mode: str) -> None:
    """Opacus-style per-sample gradients: vmap(grad) over examples, every parameter."""
    model = mbp.MLP([5, 6, 3], activation="gelu", dtype=F64, mode=mode)
    native = _native_mlp(model)
    x, t = _data(F64, 8, 5), torch.randint(0, 3, (8,))

    def per_sample(module, loss_fn):
        params = {n: p.detach() for n, p in module.named_parameters()}

        def loss(p, xi, ti):
            return loss_fn(functional_call(module, p, (xi.unsqueeze(0),)), ti.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)

    ours = per_sample(model, cross_entropy)
    ref = per_sample(native, F.cross_entropy)
    native_names = [n for n, _ in native.named_parameters()]
    for name, native_name in zip([n for n, _ in model.named_parameters()], native_names, strict=True):
        assert ours[name].shape[0] == 8
        assert rel_err(ours[name], ref[native_name]) <= TOL[F64]


def test_jacfwd_and_hessian_of_mlp_and_losses() -> None:
    model = mbp.MLP([3, 4, 2], activation="silu", dtype=F64)
    native = _native_mlp(model)
    x, t = _data(F64, 5, 3), torch.randint(0, 2, (5,))
    assert rel_err(jacfwd(model)(x), jacfwd(native)(x)) <= TOL[F64]
    ours = hessian(lambda x: cross_entropy(model(x), t))(x)
    assert rel_err(ours, hessian(lambda x: F.cross_entropy(native(x), t))(x)) <= TOL[F64]
    y = _data(F64, 5, 2)
    ours = hessian(lambda x: mse_loss(model(x), y))(x)
    assert rel_err(ours, hessian(lambda x: F.mse_loss(native(x), y))(x)) <= TOL[F64]
    w, b, tt = _data(F64, 6, 3), _data(F64, 6), torch.randint(0, 6, (5,))
    ours = jacfwd(lambda w: linear_cross_entropy(x, w, b, tt, "none"))(w)
    ref = jacfwd(lambda w: F.cross_entropy(F.linear(x, w, b), tt, reduction="none"))(w)
    assert rel_err(ours, ref) <= TOL[F64]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_ad_dual_tensors_match_native(reduction: str) -> None:
    """torch.autograd.forward_ad outside torch.func: the Functions' own jvp, every op."""
    import torch.autograd.forward_ad as fwAD

    x, w, b = _data(F64, 6, 3), _data(F64, 5, 3), _data(F64, 5)
    y, t = _data(F64, 6, 5), torch.randint(0, 5, (6,))
    t[1] = -100
    mlp = mbp.MLP([3, 4, 5], activation="gelu", dtype=F64)
    native_mlp = _native_mlp(mlp)
    ops = [
        (lambda x, w, b, y: linear_cross_entropy(x, w, b, t, reduction),
         lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction)),
        (lambda x, w, b, y: linear_mse_loss(x, w, b, y, reduction),
         lambda x, w, b, y: F.mse_loss(F.linear(x, w, b), y, reduction=reduction)),
        (lambda x, w, b, y: cross_entropy(linear(x, w, b, "silu"), t, reduction),
         lambda x, w, b, y: F.cross_entropy(F.silu(F.linear(x, w, b)), t, reduction=reduction)),
        (lambda x, w, b, y: mse_loss(linear(x, w, b, "tanh"), y, reduction),
         lambda x, w, b, y: F.mse_loss(torch.tanh(F.linear(x, w, b)), y, reduction=reduction)),
        (lambda x, w, b, y: mlp(x), lambda x, w, b, y: native_mlp(x)),
    ]  # fmt: skip
    tangents = [torch.randn_like(v) for v in (x, w, b, y)]
    for ours, native in ops:
        results = []
        for fn in (ours, native):
            with fwAD.dual_level():
                duals = [fwAD.make_dual(v, tv) for v, tv in zip((x, w, b, y), tangents, strict=True)]
                results.append(fwAD.unpack_dual(fn(*duals)).tangent)
        assert rel_err(results[0], results[1]) <= TOL[F64]


# ------------------------------------------------------------------------------ in-place, hooks


def test_in_place_ops_on_outputs_give_native_gradients() -> None:
    """h = fc(x); h += x; ReLU/Hardswish/Dropout(inplace=True) after a converted Linear."""
    torch.manual_seed(0)
    native = nn.Sequential(
        nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.Hardswish(inplace=True),
        nn.Linear(5, 5), nn.Dropout(p=0.0, inplace=True),
    ).to(F64)  # fmt: skip
    x = _data(F64, 2, 3, 5)
    results = []
    converted = _copy(native)
    mbp.convert(converted, fuse_activations=False)
    assert all(type(m) is not nn.Linear for m in converted.modules())
    for model in (native, converted):
        xi = leaf(x)
        h = model(xi)
        h += xi
        h.mul_(2)
        results.append([h.detach(), *torch.autograd.grad(h.pow(2).sum(), [xi, *model.parameters()])])
    for ours, ref in zip(*results[::-1], strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "backward_hook", "prune", "weight_norm",
                                 "spectral_norm"])  # fmt: skip
def test_network_mode_honours_hooks_and_parametrizations(how: str) -> None:
    torch.manual_seed(0)
    models = [mbp.MLP([4, 6, 3], activation="tanh", dtype=F64, mode=m) for m in ("network", "layers")]
    models[1].load_state_dict(models[0].state_dict())
    calls: list[str] = []
    for model in models:
        layer = model.layers[0]
        torch.manual_seed(2)  # spectral_norm draws its power-iteration vector here
        if how == "forward_hook":
            layer.register_forward_hook(lambda m, i, o: o * 2)
        elif how == "pre_hook":
            layer.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
        elif how == "backward_hook":
            layer.register_full_backward_hook(lambda m, gi, go: calls.append("bw") or (gi[0] * 3,))
        elif how == "prune":
            torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
        elif how == "weight_norm":
            torch.nn.utils.parametrizations.weight_norm(layer)
        else:
            torch.nn.utils.spectral_norm(layer)
    x = _data(F64, 5, 4)
    results = []
    for model in models:
        torch.manual_seed(3)  # spectral_norm's power iteration
        xi = leaf(x)
        out = model(xi)
        grads = torch.autograd.grad(out.pow(2).sum(), [xi, *model.parameters()])
        results.append([out.detach(), *grads])
    for ours, ref in zip(*results, strict=True):
        assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    if how == "backward_hook":
        assert calls == ["bw", "bw"]


@pytest.mark.slow
def test_fsdp2_per_layer_sharding_of_a_network_mode_mlp(tmp_path) -> None:
    """fully_shard on every layer and the root (two gloo ranks on 127.0.0.1): every gathered
    gradient equals the unsharded model's."""
    import json
    import sys
    from pathlib import Path

    from tests.processes import loopback_dist_env, run_bounded

    env = loopback_dist_env()
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "tests.fsdp_mlp", tmp_path]
    done = run_bounded(command, cwd=root, env=env, idle_timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(record["errors"]) == 6
        for name, error in record["errors"]:
            assert error <= TOL[F64], (rank, name, error)


def test_network_mode_without_hooks_stays_one_node() -> None:
    model = mbp.MLP([4, 6, 3], dtype=F64)
    out = model(_data(F64, 2, 4).requires_grad_())
    assert "MLPFunction" in type(out.grad_fn).__name__


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_around_layers_matches_native(use_reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(mbp.LinearAct(4, 6, "gelu"), mbp.MLP([6, 5, 3], activation="silu")).to(F64)
    native = nn.Sequential(_native_mlp(model[1]))
    layer = model[0]
    x = _data(F64, 7, 4)
    xi = leaf(x)
    ref = native(native_linear_act(xi, layer.weight, layer.bias, "gelu"))
    expected = torch.autograd.grad(ref.pow(2).sum(), [xi, *model.parameters()])
    xi = leaf(x)
    h = checkpoint(layer, xi, use_reentrant=use_reentrant)
    out = checkpoint(model[1], h, use_reentrant=use_reentrant)
    out.pow(2).sum().backward()  # (reentrant checkpointing does not take autograd.grad)
    ours = [xi.grad, *(p.grad for p in model.parameters())]
    for o, e in zip(ours, expected, strict=True):
        assert rel_err(o, e) <= TOL[F64]


# ------------------------------------------------------------------------------ autocast


def test_fused_head_loss_under_autocast_is_float32_accurate() -> None:
    """The loss is computed and returned in float32, as F.cross_entropy(F.linear(...)) there."""
    torch.manual_seed(0)
    x, w, b = torch.randn(64, 32), torch.randn(1000, 32) / 5, torch.randn(1000)
    t = torch.randint(0, 1000, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(x, w, b, t)
        native = F.cross_entropy(F.linear(x, w, b), t)
    rounded = [v.to(torch.bfloat16).double() for v in (x, w, b)]
    exact = F.cross_entropy(F.linear(*rounded).to(torch.bfloat16).double(), t)
    assert ours.dtype == native.dtype == torch.float32
    assert abs(float(native) - float(exact)) / float(exact) <= 1e-4
    assert abs(float(ours) - float(exact)) / float(exact) <= 1e-4
