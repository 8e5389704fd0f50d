"""Shared test helpers: the native-autograd oracle and the relative-error measure of DESIGN.md."""

from __future__ import annotations

import os

import pytest
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


def triton_test_device() -> tuple[torch.device, pytest.MarkDecorator]:
    """(device, module mark) of a Triton kernel test module: CUDA with MANUALBP_CUDA_TESTS=1, else
    the CPU under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Skips the calling
    module, at import, only where the kernels cannot run at all."""
    from manualbp.backends import triton as backend

    device = torch.device("cuda" if os.environ.get("MANUALBP_CUDA_TESTS") == "1" else "cpu")
    ok, why = backend.is_available(device)
    if not ok:
        pytest.skip(f"Triton kernels cannot run here: {why}", allow_module_level=True)
    return device, pytest.mark.interpreter if device.type == "cpu" else pytest.mark.cuda


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
