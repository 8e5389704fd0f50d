"""mse_loss, half_mse_loss and cross_entropy against torch.nn.functional, every reduction."""

import pytest
import torch
import torch.nn.functional as F

from manualbp.functional import cross_entropy, half_mse_loss, mse_loss

from .helpers import TOL, leaf, rel_err

REDUCTIONS = ["mean", "sum", "none"]


def _compare(ours_fn, native_fn, inputs, dtype, grad_index=(0,)):
    ours_in = [leaf(t.to(dtype), t.is_floating_point()) if t.is_floating_point() else t for t in inputs]
    ref_in = [leaf(t.double(), True) if t.is_floating_point() else t for t in inputs]
    out, ref = ours_fn(*ours_in), native_fn(*ref_in)
    assert out.dtype == dtype and out.shape == ref.shape
    g = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    out.backward(g.to(dtype))
    ref.backward(g)
    assert rel_err(out, ref) <= TOL[dtype]
    for i in grad_index:
        assert ours_in[i].grad is not None
        assert rel_err(ours_in[i].grad, ref_in[i].grad) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7,), (17, 3), (4, 5, 6)])
def test_mse_loss(shape, reduction, dtype):
    y, t = torch.randn(shape), torch.randn(shape)
    _compare(
        lambda a, b: mse_loss(a, b, reduction),
        lambda a, b: F.mse_loss(a, b, reduction=reduction),
        [y, t],
        dtype,
        grad_index=(0, 1),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_mse_is_the_seeds_error(reduction):
    y, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def seed_error(a, b):  # E = 1/(2n) Σₓ ‖y(x) − y′(x)‖²
        per_example = 0.5 * ((a - b) ** 2).sum(1)
        return {"mean": per_example.mean(), "sum": per_example.sum(), "none": per_example}[reduction]

    _compare(lambda a, b: half_mse_loss(a, b, reduction), seed_error, [y, t], torch.float64, (0, 1))


def test_half_mse_gradient_is_y_minus_t_over_n():
    y = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, dtype=torch.float64)
    half_mse_loss(y, t).backward()
    torch.testing.assert_close(y.grad, (y.detach() - t) / 5, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(1, 2), (17, 3), (33, 129), (130, 10)])
def test_cross_entropy(shape, reduction, dtype):
    n, c = shape
    logits, target = torch.randn(n, c) * 3, torch.randint(0, c, (n,))
    _compare(
        lambda z, t: cross_entropy(z, t, reduction),
        lambda z, t: F.cross_entropy(z, t, reduction=reduction),
        [logits, target],
        dtype,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_ignore_index(reduction):
    logits, target = torch.randn(9, 5), torch.randint(0, 5, (9,))
    target[::3] = -100
    _compare(
        lambda z, t: cross_entropy(z, t, reduction),
        lambda z, t: F.cross_entropy(z, t, reduction=reduction),
        [logits, target],
        torch.float64,
    )
    target[target == -100] = 7  # a custom ignore_index outside the class range
    _compare(
        lambda z, t: cross_entropy(z, t, reduction, ignore_index=7),
        lambda z, t: F.cross_entropy(z, t, reduction=reduction, ignore_index=7),
        [logits, target],
        torch.float64,
    )


def test_cross_entropy_extra_dims_and_single_example():
    logits, target = torch.randn(3, 4, 5, 2), torch.randint(0, 4, (3, 5, 2))
    for reduction in REDUCTIONS:
        _compare(
            lambda z, t, r=reduction: cross_entropy(z, t, r),
            lambda z, t, r=reduction: F.cross_entropy(z, t, reduction=r),
            [logits, target],
            torch.float64,
        )
    _compare(cross_entropy, F.cross_entropy, [torch.randn(6), torch.tensor(2)], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_16bit(dtype):
    logits, target = torch.randn(33, 11).to(dtype).double(), torch.randint(0, 11, (33,))
    _compare(cross_entropy, F.cross_entropy, [logits, target], dtype)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    ref_logits = logits.detach().clone().requires_grad_(True)
    loss, ref = cross_entropy(logits, target), F.cross_entropy(ref_logits, target)
    loss.backward()
    ref.backward()
    assert torch.isfinite(loss) and torch.allclose(loss, ref)
    assert torch.allclose(logits.grad, ref_logits.grad)


def test_cross_entropy_all_ignored_matches_native():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.full((3,), -100)
    loss = cross_entropy(logits, target)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits.detach(), target))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
