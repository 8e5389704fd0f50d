"""Backend selection: which implementation of the seed equations a call runs on.

* ``"torch"``  — :mod:`manualbp.backends.reference`, plain PyTorch, every device and dtype;
* ``"triton"`` — :mod:`manualbp.backends.triton`, fused Triton kernels (CUDA, or CPU tensors under
  Triton's interpreter with ``TRITON_INTERPRET=1``);
* ``"auto"``   — Triton for CUDA tensors when it can run, the reference otherwise.

The choice is process-wide (:func:`set_backend`, or the environment variable ``MANUALBP_BACKEND``
read at import) and can be overridden locally with :func:`use_backend`, which is context-local
(a :class:`contextvars.ContextVar`), so threads and asyncio tasks do not see each other's choice.
Asking for ``"triton"`` where it cannot run raises; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from manualbp.backends import reference

__all__ = [
    "BACKENDS",
    "get_backend",
    "resolve",
    "set_backend",
    "triton_module",
    "triton_status",
    "use_backend",
]

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name.lower()


def _from_env() -> str:
    value = os.environ.get("MANUALBP_BACKEND", "auto")
    try:
        return _check_name(value)
    except ValueError as err:
        raise ValueError(f"environment variable MANUALBP_BACKEND: {err}") from None


_default = _from_env()
_local: contextvars.ContextVar[str | None] = contextvars.ContextVar("manualbp_backend", default=None)


def get_backend() -> str:
    """The backend name in force here: the innermost `use_backend`, else the global default."""
    local = _local.get()
    return _default if local is None else local


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto", "torch" or "triton")."""
    global _default
    _default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block on backend `name`; context-local, restored on exit."""
    token = _local.set(_check_name(name))
    try:
        yield
    finally:
        _local.reset(token)


def triton_module() -> ModuleType | None:
    """`manualbp.backends.triton`, or None where it cannot be imported (no triton)."""
    try:
        from manualbp.backends import triton as triton_backend
    except ImportError:
        return None
    return triton_backend


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton backend can run on `device`, and why not if it cannot."""
    module = triton_module()
    if module is None:
        return False, "the 'triton' package is not installed (pip install manualbp[triton])"
    return module.is_available(device)


def resolve(device: torch.device, name: str | None = None) -> ModuleType:
    """The backend module for tensors on `device` under the backend in force (or `name`)."""
    name = get_backend() if name is None else _check_name(name)
    if name == "torch":
        return reference
    if name == "auto":
        if device.type != "cuda":
            return reference
        ok, _ = triton_status(device)
        return triton_module() if ok else reference  # type: ignore[return-value]
    ok, reason = triton_status(device)
    if not ok:
        raise RuntimeError(f"backend 'triton' cannot run on device {device}: {reason}")
    return triton_module()  # type: ignore[return-value]
