"""What every op family shares: argument checks, autocast handling, the backend modules by name.

Nothing here knows a particular op. The checks raise the errors the public functions promise
(the argument's name, what was given, what was expected), before any backend runs.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends
from manualbp.backends import reference

__all__ = [
    "NS",
    "REDUCTIONS",
    "autocast_on",
    "autocast_to",
    "backend_module",
    "check_class_range",
    "check_ignore_index",
    "check_linear_args",
    "check_reduction",
    "check_same",
    "check_tensor",
    "no_autocast",
    "placeholder",
    "refuse_create_graph",
    "rows",
]

#: The `torch.library` namespace of every manualbp custom op.
NS = "manualbp"

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------- checks


def check_tensor(name: str, t: Any, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}; "
            f"expected both the same (cast one, e.g. with .to({ref.dtype}))"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"{name}: on device {t.device} but {ref_name} is on {ref.device}; "
            "expected all tensors on the same device"
        )


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """x (..., in_features), weight (out_features, in_features), bias (out_features,) or None."""
    check_tensor("input", x)
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected a 2-D tensor (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.dim() == 0:
        raise ValueError(f"input: expected at least 1 dimension (..., {weight.shape[1]}), got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input: last dimension is {x.shape[-1]} (shape {tuple(x.shape)}), expected "
            f"in_features={weight.shape[1]} to match weight of shape {tuple(weight.shape)}"
        )
    check_same("weight", weight, "input", x)
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias: expected shape ({weight.shape[0]},) to match out_features, "
                f"got {tuple(bias.shape)}"
            )
        check_same("bias", bias, "input", x)


def check_ignore_index(ignore_index: Any) -> int:
    # A str or float would otherwise fail deep inside torch.where, or silently match nothing.
    # Anything with __index__ (numpy ints, 0-d integer tensors) is an int, as native accepts.
    if not isinstance(ignore_index, bool):
        with contextlib.suppress(TypeError):
            return operator.index(ignore_index)
    raise TypeError(
        f"ignore_index: expected an int class index, got {type(ignore_index).__name__} "
        f"{ignore_index!r}"
    )


def check_class_range(target: Tensor, classes: int, ignore_index: int) -> None:
    """Every target is a class index in [0, classes) or `ignore_index`; raises ValueError."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise ValueError(
            f"target: class index {value} is out of range; expected 0 <= index < {classes} "
            f"(or ignore_index={ignore_index})"
        )


def rows(t: Tensor) -> Tensor:
    """All leading dimensions as rows: a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def placeholder(like: Tensor) -> Tensor:
    """The (0,)-shaped stand-in for an output that is not needed (ops cannot return None)."""
    return like.new_empty(0)


def refuse_create_graph(op: str) -> None:
    """The custom ops' backward formulas are opaque ops, constants to autograd: with grad mode on
    (create_graph=True) say so, rather than hand back a gradient that drops every higher term."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: higher-order gradients (create_graph=True) are not available through its "
            "custom op (torch.compile / torch.export graphs, or the op called directly); call the "
            "eager entry point (manualbp.functional) for them"
        )


# -------------------------------------------------------------------------------------- autocast


def autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Autocast off for the enclosed block: our kernels choose their own accumulation dtype.

    Without it the reference backend's float32 matmul would be cast back down by an enclosing
    `torch.autocast` (and a backward run inside the autocast block would be, too).
    """
    if autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def _autocast_eligible(t: Tensor | None, dtype: torch.dtype) -> bool:
    # torch.autocast's own rule (cached_cast): floating tensors except float64 are cast.
    return t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)


def autocast_to(device_type: str, dtype: torch.dtype | None, *tensors: Any) -> tuple[Any, ...]:
    """Cast the tensors as `torch.autocast` casts an op's arguments, when it is on for the device.

    `dtype=None` is the op list "lower precision" (linear: the autocast dtype); a dtype is a
    fixed list such as "float32" (the losses). Returns the tensors unchanged when autocast is off.
    """
    if not autocast_on(device_type):
        return tensors
    target = torch.get_autocast_dtype(device_type) if dtype is None else dtype
    return tuple(
        t.to(target) if isinstance(t, Tensor) and _autocast_eligible(t, target) else t
        for t in tensors
    )


# -------------------------------------------------------------------------------------- backends


def backend_module(backend: str) -> ModuleType:
    """The backend module an op runs, from the name recorded in its graph."""
    if backend == "torch":
        return reference
    if backend == "triton":
        module = backends.triton_module()
        if module is None:
            raise RuntimeError("backend 'triton': manualbp.backends.triton could not be imported")
        return module
    raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
