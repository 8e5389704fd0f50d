"""The op families: one module per op, each holding its argument checks, its eager autograd
Function, its `torch.library` custom ops (for `torch.compile` / `torch.export`) and its entry point.

    linear_act   a = f(x Wᵀ + b)                        `manualbp.functional.linear`
    losses       mse_loss, half_mse_loss, cross_entropy
    heads        linear_cross_entropy (fused head)      and linear_mse (the squared-error head)
    chunked      the heads' chunk loop and GEMMs
    gated        the gated MLP y = W_d (f(W_g x) ⊙ W_u x)  `manualbp.functional.gated_mlp`
    network      the whole MLP as one autograd node (the seed's δ recursion)
    _common      checks, autocast handling, backend modules by name

Dependencies point one way: `manualbp.functional` and `manualbp.nn` use these modules, which use
`manualbp.backends` and `manualbp.activations`. This package's own namespace keeps the names
`manualbp.ops` always offered: the custom ops by name (`OPS`), the ops-path entry points
`linear`, `squared_error` and `cross_entropy` (what the functional API runs while a graph is
traced; arguments already checked), and the trace-time helpers.
"""

from __future__ import annotations

from typing import Any

from manualbp.ops import linear_act
from manualbp.ops._common import autocast_to, check_class_range, no_autocast
from manualbp.ops.gated import gated_mlp_backward, gated_mlp_forward
from manualbp.ops.linear_act import (
    backend_name,
    linear_backward,
    linear_forward,
    traced_backend_name,
    triton_ops_available,
)
from manualbp.ops.linear_act import linear_op as linear
from manualbp.ops.losses import (
    cross_entropy_backward,
    cross_entropy_forward,
    squared_error_backward,
    squared_error_forward,
)
from manualbp.ops.losses import cross_entropy_op as cross_entropy
from manualbp.ops.losses import squared_error_op as squared_error

__all__ = [
    "OPS",
    "autocast_to",
    "backend_name",
    "check_class_range",
    "cross_entropy",
    "linear",
    "no_autocast",
    "squared_error",
    "traced_backend_name",
    "triton_ops_available",
]

#: The reference-backend ops, by name (the Triton ones register lazily: `triton_ops_available`).
OPS: dict[str, Any] = {
    "linear_forward": linear_forward,
    "linear_backward": linear_backward,
    "squared_error_forward": squared_error_forward,
    "squared_error_backward": squared_error_backward,
    "cross_entropy_forward": cross_entropy_forward,
    "cross_entropy_backward": cross_entropy_backward,
    "gated_mlp_forward": gated_mlp_forward,
    "gated_mlp_backward": gated_mlp_backward,
}


def __getattr__(name: str) -> Any:
    # The Triton ops and their switch live in linear_act and are bound lazily (first use).
    if name in ("_triton_forward", "_triton_backward", "_traceable_launchers"):
        return getattr(linear_act, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
