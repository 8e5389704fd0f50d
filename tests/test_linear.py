"""manualbp.functional.linear and the layer modules against native autograd (reference backend)."""

import pytest
import torch

import manualbp as mbp
from manualbp.functional import linear

from .helpers import TOL, leaf, native_linear_act, rel_err

SIZES = [1, 3, 17, 33, 129]
# Every size appears as rows, in_features and out_features, without the full product.
SHAPES = [(m, SIZES[(i + 1) % 5], SIZES[(i + 3) % 5]) for i, m in enumerate(SIZES)]


def _check_parity(x, weight, bias, activation, dtype, *, lead=(), grad_x=True):
    """Run ours in `dtype`, native in float64 from the same values; compare every output and grad."""
    xs, ws = leaf(x.to(dtype), grad_x), leaf(weight.to(dtype))
    bs = leaf(bias.to(dtype)) if bias is not None else None
    x64, w64 = leaf(x.double(), grad_x), leaf(weight.double())
    b64 = leaf(bias.double()) if bias is not None else None
    out = linear(xs, ws, bs, activation)
    ref = native_linear_act(x64, w64, b64, activation)
    assert out.dtype == dtype and out.shape == ref.shape
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol
    pairs = [(ws, w64), (bs, b64)] + ([(xs, x64)] if grad_x else [])
    for ours, native in pairs:
        if native is None:
            continue
        assert ours.grad is not None, "a parameter received no gradient"
        assert ours.grad.dtype == dtype
        assert rel_err(ours.grad, native.grad) <= tol
    if not grad_x:
        assert xs.grad is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", mbp.ACTIVATIONS)
def test_parity(activation, shape, bias, dtype):
    m, k, n = shape
    x, w = torch.randn(m, k), torch.randn(n, k) / k**0.5
    b = torch.randn(n) if bias else None
    _check_parity(x, w, b, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "softplus"])
def test_parity_16bit(activation, dtype):
    x, w, b = torch.randn(33, 17), torch.randn(29, 17) / 17**0.5, torch.randn(29)
    # Values representable in the 16-bit dtype, so only the arithmetic differs from float64.
    x, w, b = (t.to(dtype).double() for t in (x, w, b))
    _check_parity(x, w, b, activation, dtype)


@pytest.mark.parametrize("activation", ["silu", "leaky_relu", "identity"])
def test_leading_dimensions(activation):
    x, w, b = torch.randn(2, 3, 5, 7), torch.randn(4, 7), torch.randn(4)
    _check_parity(x, w, b, activation, torch.float64)
    _check_parity(torch.randn(7), w, b, activation, torch.float64)  # 1-D input, as nn.Linear


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_rows", "3d_permuted"])
def test_non_contiguous_inputs(layout):
    w, b = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    if layout == "transposed":
        x = torch.randn(9, 11, dtype=torch.float64).t()
    elif layout == "sliced":
        x = torch.randn(22, 20, dtype=torch.float64)[::2, 3:12]
    elif layout == "expanded_rows":
        x = torch.randn(1, 9, dtype=torch.float64).expand(5, 9)
    else:
        x = torch.randn(9, 4, 3, dtype=torch.float64).permute(2, 1, 0)
    assert not x.is_contiguous()
    w_t = torch.randn(9, 6, dtype=torch.float64).t()  # a non-contiguous weight too
    for weight in (w, w_t):
        x_leaf = x.detach().requires_grad_(True)  # keep the layout: no clone
        w_leaf = weight.detach().requires_grad_(True)
        out = linear(x_leaf, w_leaf, b, "gelu")
        x64, w64 = leaf(x), leaf(weight)
        ref = native_linear_act(x64, w64, b, "gelu")
        g = torch.randn(ref.shape, dtype=torch.float64)
        out.backward(g)
        ref.backward(g)
        assert rel_err(out, ref) <= 1e-10
        assert rel_err(x_leaf.grad, x64.grad) <= 1e-10
        assert rel_err(w_leaf.grad, w64.grad) <= 1e-10


def test_no_input_gradient_when_not_required():
    x, w, b = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3)
    _check_parity(x, w, b, "tanh", torch.float64, grad_x=False)


def test_only_requested_gradients_are_computed(monkeypatch):
    from manualbp.backends import fast, reference

    seen = {}

    def spying(real):
        def spy(*args, **kwargs):
            seen.update(kwargs)
            return real(*args, **kwargs)

        return spy

    # Whichever runs: the reference, or its first-order fast path (CPU float32/float64).
    monkeypatch.setattr(reference, "linear_backward", spying(reference.linear_backward))
    monkeypatch.setattr(fast, "linear_backward", spying(fast.linear_backward))
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64)  # frozen bias
    linear(x, w, b, "relu").sum().backward()
    assert seen == {"need_input": False, "need_weight": True, "need_bias": False}


@pytest.mark.parametrize("activation", mbp.ACTIVATIONS)
def test_gradcheck(activation):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # Random points sit on ReLU's kink with probability 0, so finite differences are valid.
    assert torch.autograd.gradcheck(lambda *t: linear(*t, activation), (x, w, b))


def test_empty_batch():
    m, k, n = 0, 3, 2
    x = torch.randn(m, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    out = linear(x, w, b, "gelu")
    assert out.shape == (0, n)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
