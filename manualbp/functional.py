"""The public functional API: every op of manualbp as a function, over the op families of
:mod:`manualbp.ops`.

Each op's backward is the seed's equations, nothing else: PyTorch's autograd only hands it
∂C/∂(output) and collects what it returns. The arithmetic itself lives in a backend
(:mod:`manualbp.backends`) chosen per call, so the same op runs the plain-PyTorch reference on
the CPU and fused Triton kernels on CUDA. The autograd Functions are offered here too, for
code that wants to call them directly.
"""

from __future__ import annotations

from manualbp.ops._common import REDUCTIONS
from manualbp.ops.fused_mlp import FusedMLPFunction, fused_mlp
from manualbp.ops.gated import GatedMLPFunction, gated_mlp
from manualbp.ops.heads import LinearCrossEntropyFunction, linear_cross_entropy
from manualbp.ops.linear_act import LinearActFunction, linear
from manualbp.ops.linear_mse import LinearMSEFunction, linear_mse_loss
from manualbp.ops.losses import (
    CrossEntropyFunction,
    SquaredErrorFunction,
    cross_entropy,
    half_mse_loss,
    mse_loss,
)
from manualbp.ops.network import MLPFunction, mlp

__all__ = [
    "linear",
    "fused_mlp",
    "gated_mlp",
    "mlp",
    "mse_loss",
    "half_mse_loss",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_mse_loss",
    "REDUCTIONS",
    "CrossEntropyFunction",
    "FusedMLPFunction",
    "GatedMLPFunction",
    "LinearActFunction",
    "LinearCrossEntropyFunction",
    "LinearMSEFunction",
    "MLPFunction",
    "SquaredErrorFunction",
]
