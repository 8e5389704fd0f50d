"""Determinism: the same inputs give bitwise-identical outputs and gradients, call after call.

DESIGN.md: no atomics in reductions, so the weight and bias gradients (sums over M) come out the
same every time, on every backend. Each case runs forward and backward REPEATS times on fresh
copies of the same tensors and compares every result bit for bit (`torch.equal` on the raw bits,
so NaN payloads and the sign of zero count too). It also checks that nothing is written into the
caller's tensors (inputs, parameters, upstream gradient), which would make a second call differ.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import manualbp as mbp
from manualbp.functional import cross_entropy, half_mse_loss, linear, mse_loss

BACKENDS = ["torch", "triton"]
DTYPES = {
    "torch": [torch.float64, torch.float32, torch.bfloat16],
    "triton": [torch.float32, torch.float16, torch.bfloat16],
}
REPEATS = 2
# Odd sizes that span two of the interpreter's 32-wide tiles in every dimension.
M, K, N = 45, 37, 35


def _bits(t: Tensor) -> Tensor:
    """The raw bits of a floating tensor, so that equality is bitwise (NaN == NaN, -0 != +0)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(view)


def _assert_bitwise(runs: list[list[Tensor]], what: str) -> None:
    first = runs[0]
    for i, run in enumerate(runs[1:], start=2):
        for j, (a, b) in enumerate(zip(first, run, strict=True)):
            assert torch.equal(_bits(a), _bits(b)), f"{what}: result {j} of call {i} differs from call 1"


def _repeat(step: Callable[[], list[Tensor]], inputs: list[Tensor], backend: str) -> list[list[Tensor]]:
    """Run `step` REPEATS times; the caller's `inputs` must come out bit-for-bit untouched."""
    before = [t.detach().clone() for t in inputs]
    runs = []
    for _ in range(REPEATS):
        with mbp.use_backend(backend):
            runs.append(step())
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(_bits(t), _bits(b)), "an input was modified in place"
    return runs


def _linear_step(x: Tensor, w: Tensor, b: Tensor, grad_out: Tensor, activation: str) -> list[Tensor]:
    xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    out = linear(xs, ws, bs, activation)
    out.backward(grad_out)
    return [out.detach(), xs.grad, ws.grad, bs.grad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_every_activation_bitwise(backend: str) -> None:
    """Every activation, each in one dtype taken in turn (the reductions, where order could vary,
    are the same for all activations; f′ is elementwise)."""
    dtypes = DTYPES[backend]
    for i, activation in enumerate(mbp.ACTIVATIONS):
        dtype = dtypes[i % len(dtypes)]
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        grad_out = torch.randn(M, N)
        args = [t.to(dtype) for t in (x, w, b, grad_out)]
        runs = _repeat(lambda a=args, f=activation: _linear_step(*a, f), args, backend)
        _assert_bitwise(runs, f"{backend} {dtype} {activation}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["network", "layers", "recompute"])
def test_mlp_bitwise(backend: str, mode: str) -> None:
    """A 3-layer MLP, forward and backward, in each mode: outputs and every parameter gradient."""
    kw = {"mode": "network", "recompute": True} if mode == "recompute" else {"mode": mode}
    model = mbp.MLP([K, 33, 35, N], "gelu", "sigmoid", **kw)
    x = torch.randn(M, K)

    def step() -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        out = model(xs)
        out.square().mean().backward()
        return [out.detach(), xs.grad] + [p.grad for p in model.parameters()]

    params = [p.detach() for p in model.parameters()]
    _assert_bitwise(_repeat(step, [x, *params], backend), f"{backend} MLP {mode}")


def test_losses_bitwise() -> None:
    """The losses have one implementation (no backend): deterministic reductions all the same."""
    logits, target = torch.randn(M, N), torch.randint(0, N, (M,))
    target[::5] = -100
    y, t = torch.randn(M, N), torch.randn(M, N)
    for reduction in ("mean", "sum", "none"):
        for fn, args in ((cross_entropy, (logits, target)), (mse_loss, (y, t)), (half_mse_loss, (y, t))):

            def step(fn=fn, args=args, reduction=reduction) -> list[Tensor]:
                a = args[0].clone().requires_grad_(True)
                loss = fn(a, args[1], reduction=reduction)
                loss.backward(torch.ones_like(loss))
                return [loss.detach(), a.grad]

            _assert_bitwise(_repeat(step, list(args), "torch"), f"{fn.__name__} {reduction}")


def test_split_weight_gradient_is_bitwise_and_close_to_unsplit() -> None:
    """The weight-gradient kernel's split over M (fp32 partials, reduced in a fixed order) is
    repeatable bit for bit; against the unsplit kernel it only reorders the sum."""
    from manualbp.triton_kernels.linear_grad_weight import linear_grad_weight

    rows = 130  # two 64-row quanta and a remainder: a split of 3 ranges
    grad_out, x = torch.randn(rows, N), torch.randn(rows, K)
    for split in (1, 3):
        step = lambda s=split: list(linear_grad_weight(grad_out, x, split_k=s))  # noqa: E731
        runs = _repeat(step, [grad_out, x], "triton")
        _assert_bitwise(runs, f"grad_weight split_k={split}")
    split_w, split_b = linear_grad_weight(grad_out, x, split_k=3)
    whole_w, whole_b = linear_grad_weight(grad_out, x, split_k=1)
    exact_w, exact_b = grad_out.double().t() @ x.double(), grad_out.double().sum(0)
    for ours, exact in ((split_w, exact_w), (whole_w, exact_w), (split_b, exact_b), (whole_b, exact_b)):
        assert float((ours.double() - exact).norm() / exact.norm()) <= 1e-5
