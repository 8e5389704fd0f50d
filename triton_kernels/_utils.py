"""Shared helpers of the kernels and launchers: interpreter mode, operand upcast, argument checks.

Nothing here knows about a particular kernel. The launchers use the checks so that a wrong
argument fails in Python with a message naming it, never inside a kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at import: Triton decides at `@triton.jit` time whether a function is compiled or
# interpreted, so the variable must be set before `triton` is first imported (tests/conftest.py).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def upcast(x, UPCAST: tl.constexpr):
    """Return `x` in float32 when UPCAST is set, unchanged otherwise.

    Triton's interpreter stores bfloat16 as raw uint16 bits and its `tl.dot` is a NumPy matmul on
    those bits, so the launchers set UPCAST (only when interpreting bfloat16) and every GEMM
    operand and elementwise input goes through this one helper. On a GPU UPCAST is False and
    the tensor cores see the 16-bit tiles directly.
    """
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


def needs_upcast(dtype: torch.dtype) -> bool:
    """UPCAST constexpr for a launch: only bfloat16 under the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact IEEE fp32 unless PyTorch allows TF32 for matmuls.

    16-bit operands ignore it (their products are exact in fp32); it is kept constant for them so
    the float32 setting does not create extra specialisations.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def check_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors when the interpreter is active."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    expected = "a CUDA tensor" + (" or a CPU tensor" if INTERPRET else "")
    hint = "" if INTERPRET else " (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)"
    raise ValueError(f"{name}: got a tensor on {t.device}, expected {expected}{hint}")


def check_tensor(
    name: str,
    t: object,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Type, shape, dtype and device of one tensor argument; raises naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: got dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name}: got device {t.device}, expected {device} (same as the input)")


def check_matrix(name: str, t: object) -> torch.Tensor:
    """A 2-D floating tensor of a supported dtype on a usable device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: got a {t.dim()}-D tensor of shape {tuple(t.shape)}, expected 2-D")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: got dtype {t.dtype}, expected one of float32, float16, bfloat16")
    check_device(name, t)
    return t


def check_act_id(name: str, act_id: object) -> int:
    from .activations import NUM_ACTIVATIONS

    if isinstance(act_id, bool) or not isinstance(act_id, int):
        raise TypeError(f"{name}: expected an int activation id, got {type(act_id).__name__}")
    if not 0 <= act_id < NUM_ACTIVATIONS:
        raise ValueError(f"{name}: got {act_id}, expected an id in [0, {NUM_ACTIVATIONS})")
    return act_id


def check_slope(name: str, slope: object) -> float:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(slope).__name__}")
    if not slope >= 0.0:
        raise ValueError(f"{name}: got {slope}, expected a float >= 0")
    return float(slope)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
