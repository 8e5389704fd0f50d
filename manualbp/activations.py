"""The activation registry: each entry's f, its hand-written derivative f′, and what backward saves.

Backpropagation needs f′ at every node (the seed: "the derivatives (f^l)′ evaluated at z^l must be
cached for use during the backwards pass"). Two kinds of activation differ in what must be cached:

* output-derivable ones (identity, relu, leaky_relu, sigmoid, tanh) have f′ written in terms of
  the output a = f(z) — e.g. σ′ = a(1 − a) — so backward keeps only `a`, which the next layer holds
  anyway for its own weight gradient;
* the others (gelu, gelu_tanh, silu, mish, softplus) need the pre-activation `z`.

Every f′ here is written out by hand, no autograd inside; the tests compare each one with
`torch.func.grad` of f in float64. `delta(grad_out, saved)` forms δ = ∂C/∂a ⊙ f′ with the exact
NaN/Inf behaviour of PyTorch's own backward kernels (relu uses a select, not a multiply).

`kernel_id` is the constexpr id of the same activation in the Triton device functions
(`manualbp.triton_kernels`); the two lists must stay in step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "Activation", "get_activation"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus's default: above it, f(z) = z


@dataclass(frozen=True)
class Activation:
    """One registry entry. `f` maps z to a; `act_grad` maps the saved tensor to f′."""

    name: str
    kernel_id: int
    uses_output: bool  # f′ from a = f(z) (True) or from z (False)
    f: Callable[[Tensor, float], Tensor]
    act_grad: Callable[[Tensor, float], Tensor]
    module: Callable[[float], torch.nn.Module]  # the native torch module, for parity and convert()
    negative_slope: float = 0.0  # only meaningful for leaky_relu

    def __call__(self, z: Tensor) -> Tensor:
        return self.f(z, self.negative_slope)

    def derivative(self, saved: Tensor) -> Tensor:
        """f′ evaluated from the saved tensor (`a` if `uses_output`, else `z`)."""
        return self.act_grad(saved, self.negative_slope)

    def delta(self, grad_out: Tensor, saved: Tensor) -> Tensor:
        """δ = grad_out ⊙ f′, with PyTorch's semantics at NaN/Inf for the piecewise ones."""
        if self.name == "identity":
            return grad_out
        if self.name == "relu":
            # Native relu's own backward kernel: where a ≤ 0 the gradient is exactly 0, even if
            # grad_out is Inf or NaN (one fused pass, unlike a compare and a select).
            return torch.ops.aten.threshold_backward(grad_out, saved, 0)
        if self.name == "leaky_relu":
            return torch.where(saved > 0, grad_out, grad_out * self.negative_slope)
        return grad_out * self.derivative(saved)

    def __reduce__(self) -> tuple:
        # Pickle by name: entries hold functions, and a name is what a saved model should keep.
        return _restore, (self.name, self.negative_slope)

    def native(self) -> torch.nn.Module:
        """The torch.nn module computing the same f (used by tests, convert() and benchmarks)."""
        return self.module(self.negative_slope)


def _sigmoid_grad(a: Tensor, _: float) -> Tensor:
    return a * (1 - a)


def _tanh_grad(a: Tensor, _: float) -> Tensor:
    return 1 - a * a


def _gelu_grad(z: Tensor, _: float) -> Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z)
    cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf


def _gelu_tanh_grad(z: Tensor, _: float) -> Tensor:
    # f = ½ z (1 + tanh u), u = √(2/π)(z + c z³); f′ = ½(1 + t) + ½ z (1 − t²) u′
    inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
    t = torch.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * d_inner


def _silu_grad(z: Tensor, _: float) -> Tensor:
    # d/dz [z σ(z)] = σ(z) (1 + z (1 − σ(z)))
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _mish_grad(z: Tensor, _: float) -> Tensor:
    # d/dz [z tanh(softplus z)] = tanh(sp) + z σ(z) (1 − tanh²(sp))
    t = torch.tanh(F.softplus(z))
    return t + z * torch.sigmoid(z) * (1 - t * t)


def _softplus_grad(z: Tensor, _: float) -> Tensor:
    # Above the threshold torch's softplus is the identity, so its derivative is exactly 1 there.
    return torch.where(z > _SOFTPLUS_THRESHOLD, torch.ones((), dtype=z.dtype), torch.sigmoid(z))


def _ones_like(a: Tensor, _: float) -> Tensor:
    return torch.ones_like(a)


def _relu_grad(a: Tensor, _: float) -> Tensor:
    return (a > 0).to(a.dtype)


def _leaky_relu_grad(a: Tensor, slope: float) -> Tensor:
    return torch.where(a > 0, torch.ones((), dtype=a.dtype), torch.full((), slope, dtype=a.dtype))


_ENTRIES = (
    Activation("identity", 0, True, lambda z, _: z, _ones_like, lambda _: torch.nn.Identity()),
    Activation("relu", 1, True, lambda z, _: torch.relu(z), _relu_grad, lambda _: torch.nn.ReLU()),
    Activation(
        "leaky_relu",
        2,
        True,
        lambda z, s: F.leaky_relu(z, s),
        _leaky_relu_grad,
        lambda s: torch.nn.LeakyReLU(s),
        negative_slope=0.01,
    ),
    Activation(
        "sigmoid", 3, True, lambda z, _: torch.sigmoid(z), _sigmoid_grad, lambda _: torch.nn.Sigmoid()
    ),
    Activation("tanh", 4, True, lambda z, _: torch.tanh(z), _tanh_grad, lambda _: torch.nn.Tanh()),
    Activation("gelu", 5, False, lambda z, _: F.gelu(z), _gelu_grad, lambda _: torch.nn.GELU()),
    Activation(
        "gelu_tanh",
        6,
        False,
        lambda z, _: F.gelu(z, approximate="tanh"),
        _gelu_tanh_grad,
        lambda _: torch.nn.GELU(approximate="tanh"),
    ),
    Activation("silu", 7, False, lambda z, _: F.silu(z), _silu_grad, lambda _: torch.nn.SiLU()),
    Activation("mish", 8, False, lambda z, _: F.mish(z), _mish_grad, lambda _: torch.nn.Mish()),
    Activation(
        "softplus", 9, False, lambda z, _: F.softplus(z), _softplus_grad, lambda _: torch.nn.Softplus()
    ),
)

_REGISTRY: dict[str, Activation] = {entry.name: entry for entry in _ENTRIES}
_ALIASES = {"linear": "identity", "none": "identity", "swish": "silu"}

#: The registry's names, in kernel-id order.
ACTIVATIONS: tuple[str, ...] = tuple(entry.name for entry in _ENTRIES)


def _restore(name: str, negative_slope: float) -> Activation:
    return dataclasses.replace(_REGISTRY[name], negative_slope=negative_slope)


def get_activation(activation: str | Activation, *, negative_slope: float | None = None) -> Activation:
    """Look an activation up by name ("gelu", "swish", ...) or pass an entry through.

    `negative_slope` is accepted for leaky_relu only (default 0.01, as torch). It must be ≥ 0:
    f′ is read from the output `a`, and a > 0 ⇔ z > 0 only holds for a non-negative slope.
    """
    if isinstance(activation, Activation):
        entry = activation
    elif isinstance(activation, str):
        key = _ALIASES.get(activation.lower(), activation.lower())
        if key not in _REGISTRY:
            raise ValueError(
                f"activation: unknown name {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
                f" (aliases: {', '.join(sorted(_ALIASES))})"
            )
        entry = _REGISTRY[key]
    else:
        raise TypeError(
            f"activation: expected a name (str) or an Activation, got {type(activation).__name__}"
        )
    if negative_slope is None:
        return entry
    if entry.name != "leaky_relu":
        raise ValueError(
            f"negative_slope: only leaky_relu takes a slope, got negative_slope={negative_slope} "
            f"for activation {entry.name!r}"
        )
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(
            f"negative_slope: expected a float >= 0, got {type(negative_slope).__name__} "
            f"{negative_slope!r}"
        )
    slope = float(negative_slope)
    if not math.isfinite(slope) or slope < 0:
        raise ValueError(
            f"negative_slope: expected a finite value >= 0 (f' is read from the output), got {slope}"
        )
    return dataclasses.replace(entry, negative_slope=slope)
