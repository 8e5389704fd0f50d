"""Shared test helpers: the native-autograd oracle and the relative-error measure of DESIGN.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from manualbp.activations import get_activation

#: Relative-error bounds per dtype (DESIGN.md). Never loosen these.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64; exact equality of zero tensors counts as 0."""
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours64, ref64 = ours.detach().double(), ref.detach().double()
    assert torch.isfinite(ours64).all(), "non-finite values in result"
    den = ref64.norm()
    num = (ours64 - ref64).norm()
    return float(num / den) if den > 0 else float(num)


def native_linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, **kw) -> Tensor:
    """The native-autograd oracle: F.linear followed by the torch activation module."""
    return get_activation(activation, **kw).native()(F.linear(x, weight, bias))


def leaf(t: Tensor, requires_grad: bool = True) -> Tensor:
    return t.detach().clone().requires_grad_(requires_grad)
