"""manualbp — backpropagation by hand, fast.

Drop-in PyTorch layers whose backward pass computes the seed equations directly:
δ = ∂C/∂a ⊙ f′(z), ∇W = δᵀ·a, ∇b = Σδ and the input gradient δ·W, on a plain-PyTorch reference
backend everywhere and fused Triton kernels on CUDA.
"""

from manualbp import functional, jacobian, ops, optim
from manualbp.activations import ACTIVATIONS, Activation, get_activation
from manualbp.backends import BACKENDS, get_backend, set_backend, use_backend
from manualbp.convert import ConversionReport, Replacement, convert, revert
from manualbp.nn import MLP, GatedMLP, Linear, LinearAct, TransposedLinear

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "MLP",
    "Activation",
    "ConversionReport",
    "GatedMLP",
    "Replacement",
    "Linear",
    "LinearAct",
    "TransposedLinear",
    "convert",
    "functional",
    "jacobian",
    "ops",
    "optim",
    "revert",
    "get_activation",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]
