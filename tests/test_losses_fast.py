"""`mse_loss`'s CPU fast node (manualbp.ops.losses_fast) and `LinearAct`'s in bfloat16.

The fast node runs ATen's squared-error kernels; the readable SquaredErrorFunction stays the
oracle. Here the node is held to it and to native autograd in float64 — values, both gradients,
second order — and every call it must not take (dual tensors, transforms, autocast, wrong
arguments) is checked to go to the general path, with its errors.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import manualbp as mbp
import manualbp.functional as MF
from manualbp.activations import get_activation
from manualbp.ops.losses import SquaredErrorFunction

F64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]


def _pair(shape=(5, 3), dtype=F64):
    torch.manual_seed(0)
    y = torch.randn(*shape, dtype=dtype, requires_grad=True)
    t = torch.randn(*shape, dtype=dtype, requires_grad=True)
    return y, t


def _node(loss):
    return type(loss.grad_fn).__name__


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5, 3), (7,), (2, 3, 4), (0, 3)])
def test_fast_mse_matches_native_and_oracle(reduction, shape):
    y, t = _pair(shape)
    ours = MF.mse_loss(y, t, reduction)
    assert _node(ours) == "FastSquaredErrorFunctionBackward"
    native = F.mse_loss(y, t, reduction=reduction)
    oracle = SquaredErrorFunction.apply(y, t, reduction, 1.0, False)
    torch.testing.assert_close(ours, native, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12, equal_nan=True)
    seed = torch.randn_like(ours)
    got = torch.autograd.grad(ours, [y, t], seed)
    want = torch.autograd.grad(oracle, [y, t], seed)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fast_mse_second_order(reduction):
    y, t = _pair()
    assert torch.autograd.gradcheck(lambda a, b: MF.mse_loss(a, b, reduction), (y, t))
    assert torch.autograd.gradgradcheck(lambda a, b: MF.mse_loss(a, b, reduction), (y, t))
    # A Hessian-vector product through the fast node equals native's.
    v = torch.randn_like(y)
    hvps = []
    for fn in (MF.mse_loss, F.mse_loss):
        (g,) = torch.autograd.grad(fn(y, t, reduction=reduction).sum(), y, create_graph=True)
        hvps.append(torch.autograd.grad(g, y, v)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)


def test_fast_mse_wants_only_what_is_asked():
    y, t = _pair()
    t.requires_grad_(False)
    loss = MF.mse_loss(y, t)
    (g,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(g, 2 * (y - t).detach() / y.numel(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fast_mse_low_precision_is_native(dtype, tol):
    y, t = _pair((64, 33), dtype)
    ours = MF.mse_loss(y, t)
    assert _node(ours) == "FastSquaredErrorFunctionBackward"
    torch.testing.assert_close(ours, F.mse_loss(y, t), rtol=0, atol=0)
    exact = F.mse_loss(y.double(), t.double())
    torch.testing.assert_close(ours.double(), exact, rtol=tol, atol=0)
    (g,) = torch.autograd.grad(ours, y)
    (g_native,) = torch.autograd.grad(F.mse_loss(y, t), y)
    torch.testing.assert_close(g, g_native, rtol=0, atol=0)


def test_fast_mse_version_check():
    y, t = _pair()
    loss = MF.mse_loss(y * 1, t)
    with torch.no_grad():
        t.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_general_path_under_forward_ad_vmap_and_autocast():
    y, t = _pair()
    with fwAD.dual_level():
        tangent = torch.randn_like(y)
        got = fwAD.unpack_dual(MF.mse_loss(fwAD.make_dual(y.detach(), tangent), t.detach())).tangent
        want = fwAD.unpack_dual(F.mse_loss(fwAD.make_dual(y.detach(), tangent), t.detach())).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    per_row = torch.func.vmap(MF.mse_loss)(y.detach(), t.detach())
    torch.testing.assert_close(per_row, ((y - t) ** 2).mean(1).detach(), rtol=1e-12, atol=1e-12)
    x32 = y.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MF.mse_loss(x32, t.detach().float())
    assert _node(loss) != "FastSquaredErrorFunctionBackward"
    assert loss.dtype == torch.float32


def test_wrong_arguments_keep_their_errors():
    y, t = _pair()
    with pytest.raises(ValueError, match="does not match input shape"):
        MF.mse_loss(y, t[:1])  # no broadcasting, as before
    with pytest.raises(ValueError, match="reduction"):
        MF.mse_loss(y, t, "average")
    with pytest.raises((TypeError, ValueError), match="dtype"):
        MF.mse_loss(y, t.float())
    with pytest.raises(TypeError):
        MF.mse_loss(y, [1.0, 2.0])


@pytest.mark.parametrize("name", ["relu", "gelu", "tanh", "identity"])
def test_linear_act_bfloat16_takes_the_fast_node(name):
    """bfloat16 LinearAct runs the CPU fast node, computing as native does (bfloat16 GEMMs and
    ATen's activation kernels): its error against float64 is native's, not a float32 upcast's."""
    torch.manual_seed(0)
    layer = mbp.LinearAct(48, 40, name, dtype=torch.bfloat16)
    native = torch.nn.Sequential(torch.nn.Linear(48, 40, dtype=torch.bfloat16),
                                 get_activation(name).native())  # fmt: skip
    with torch.no_grad():
        native[0].weight.copy_(layer.weight)
        native[0].bias.copy_(layer.bias)
    x = torch.randn(33, 48, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FastLinearActFunctionBackward"
    ref = native(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    seed = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, layer.weight, layer.bias], seed)
    theirs = torch.autograd.grad(ref, [x, native[0].weight, native[0].bias], seed)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _logits(rows=9, classes=7, dtype=F64):
    torch.manual_seed(1)
    z = (3 * torch.randn(rows, classes, dtype=dtype)).requires_grad_()
    t = torch.randint(0, classes, (rows,))
    t[::4] = -100  # some ignored rows
    return z, t


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_fast_cross_entropy_matches_native_and_oracle(reduction, ignore_index):
    from manualbp.ops.losses import CrossEntropyFunction

    z, t = _logits()
    t[t == -100] = ignore_index
    t[1] = 3
    ours = MF.cross_entropy(z, t, reduction, ignore_index)
    node = ours.grad_fn if reduction != "none" else ours.grad_fn.next_functions[0][0]  # behind the view
    assert type(node).__name__ == "FastCrossEntropyFunctionBackward"
    native = F.cross_entropy(z, t, reduction=reduction, ignore_index=ignore_index)
    oracle = CrossEntropyFunction.apply(z, t, reduction, ignore_index)[0]
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(ours)
    got = torch.autograd.grad(ours, z, seed)[0]
    torch.testing.assert_close(got, torch.autograd.grad(native, z, seed)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, torch.autograd.grad(oracle, z, seed)[0], rtol=1e-12, atol=1e-12)
    assert bool((got[t == ignore_index] == 0).all())  # ignored rows get exactly 0


def test_fast_cross_entropy_second_order_and_all_ignored():
    z, t = _logits()
    for reduction in REDUCTIONS:
        fn = lambda a, r=reduction: MF.cross_entropy(a, t, r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z,))
        assert torch.autograd.gradgradcheck(fn, (z,))
    v = torch.randn_like(z)
    hvps = []
    for fn in (MF.cross_entropy, F.cross_entropy):
        (g,) = torch.autograd.grad(fn(z, t), z, create_graph=True)
        hvps.append(torch.autograd.grad(g, z, v)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)
    every = torch.full_like(t, -100)
    loss = MF.cross_entropy(z, every)  # mean over no rows: NaN, zero gradients, as native
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(z, every))
    assert bool((torch.autograd.grad(loss, z)[0] == 0).all())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fast_cross_entropy_low_precision(dtype, tol):
    z, t = _logits(64, 33, dtype)
    ours = MF.cross_entropy(z, t)
    assert _node(ours) == "FastCrossEntropyFunctionBackward"
    torch.testing.assert_close(ours, F.cross_entropy(z, t), rtol=0, atol=0)
    exact_z = z.detach().double().requires_grad_()
    exact = F.cross_entropy(exact_z, t)
    (g,) = torch.autograd.grad(ours, z)
    (g_exact,) = torch.autograd.grad(exact, exact_z)
    (g_native,) = torch.autograd.grad(F.cross_entropy(z, t), z)
    assert g.dtype == dtype
    err, native_err = (g.double() - g_exact).abs().max(), (g_native.double() - g_exact).abs().max()
    assert err <= max(2 * native_err, tol * g_exact.abs().max())


def test_cross_entropy_general_path_where_the_fast_one_does_not_apply():
    z, t = _logits()
    with fwAD.dual_level():
        tangent = torch.randn_like(z)
        got = fwAD.unpack_dual(MF.cross_entropy(fwAD.make_dual(z.detach(), tangent), t)).tangent
        want = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(z.detach(), tangent), t)).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    z3 = torch.randn(2, 5, 3, dtype=F64, requires_grad=True)  # (N, C, d1): rows made by movedim
    t3 = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(MF.cross_entropy(z3, t3), F.cross_entropy(z3, t3), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="class"):
        MF.cross_entropy(z, torch.full_like(t, 7))  # out of range: the clear error, not ATen's
