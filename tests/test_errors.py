"""Bad input to the foundation's API: each gets an error naming the argument, given and expected."""

import pytest
import torch

from manualbp.functional import cross_entropy, half_mse_loss, linear, mse_loss

X = torch.randn(4, 3)
W = torch.randn(2, 3)
B = torch.randn(2)

LINEAR_CASES = [
    ("last dim", (torch.randn(4, 5), W, B), ValueError, r"input: last dimension is 5 .* in_features=3"),
    ("0-d", (torch.tensor(1.0), W, B), ValueError, "input: expected at least 1 dimension"),
    (
        "int input",
        (torch.ones(4, 3, dtype=torch.long), W, B),
        TypeError,
        "input: expected a floating-point tensor, got dtype torch.int64",
    ),
    ("bool input", (torch.ones(4, 3, dtype=torch.bool), W, B), TypeError, "input: expected a floating-point"),
    ("not a tensor", ([[1.0, 2.0, 3.0]], W, B), TypeError, "input: expected a torch.Tensor, got list"),
    ("weight 1-D", (X, torch.randn(3), B), ValueError, r"weight: expected a 2-D tensor .* got shape \(3,\)"),
    ("bias shape", (X, W, torch.randn(3)), ValueError, r"bias: expected shape \(2,\) .* got \(3,\)"),
    (
        "dtype mismatch",
        (X, W.double(), B),
        TypeError,
        "weight: dtype torch.float64 does not match input dtype torch.float32",
    ),
    ("bias dtype", (X, W, B.half()), TypeError, "bias: dtype torch.float16 does not match input"),
    ("device mismatch", (X, W.to("meta"), B), RuntimeError, "weight: on device meta but input is on cpu"),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_bad_input(case):
    _, args, error, match = case
    with pytest.raises(error, match=match):
        linear(*args)


def test_linear_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown name 'relu6'; expected one of identity, relu"):
        linear(X, W, B, "relu6")


@pytest.mark.parametrize("fn", [mse_loss, half_mse_loss])
def test_squared_error_bad_input(fn):
    with pytest.raises(ValueError, match=r"target: shape \(4, 2\) does not match input shape \(4, 3\)"):
        fn(X, torch.randn(4, 2))
    with pytest.raises(TypeError, match="target: expected a floating-point tensor"):
        fn(X, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="target: dtype torch.float64 does not match input"):
        fn(X, X.double())
    with pytest.raises(ValueError, match="reduction: expected one of mean, sum, none, got 'avg'"):
        fn(X, X, "avg")


def test_cross_entropy_bad_input():
    logits = torch.randn(4, 3)
    fit = r"target: shape \(5,\) does not fit logits of shape \(4, 3\); expected \(4,\)"
    with pytest.raises(ValueError, match=fit):
        cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target: class index 3 is out of range; expected 0 <= index < 3"):
        cross_entropy(logits, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="class index -1 is out of range"):
        cross_entropy(logits, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="target: expected integer class indices"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="input: expected a floating-point tensor"):
        cross_entropy(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="batchmean")
