"""The base class of manualbp's autograd Functions: `torch.autograd.Function` with a cheaper `apply`.

`torch.autograd.Function.apply` binds its arguments to `forward`'s signature with
`inspect.signature` on every call, to fill in defaults for `setup_context`. That costs about
40 µs per call on a CPU — more than a 64 × 64 layer's three GEMMs — and buys nothing here: every
manualbp Function's `forward` takes all its arguments positionally and has no defaults. Outside
functorch transforms (`torch.func.grad`, `vmap`, ...) `apply` therefore goes straight to the C++
`_FunctionBase.apply`, as `torch.autograd.Function.apply` itself does after the binding; inside
them it takes the regular path, which those transforms need.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._functorch.utils import unwrap_dead_wrappers

__all__ = ["PositionalFunction"]


class PositionalFunction(torch.autograd.Function):
    """An autograd Function whose `apply` takes positional arguments only (see the module doc)."""

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        # What Function.apply does after binding: drop wrappers of finished transforms.
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))  # type: ignore[misc]
