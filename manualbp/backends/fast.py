"""The reference backend's first-order fast path: the same equations, fewer and fused operations.

:mod:`manualbp.backends.reference` is the oracle: short, obvious, every f′ written out by hand in
:mod:`manualbp.activations`. This module runs the very same seed equations with what makes a CPU
step cheap, and nothing else:

* δ = ∂C/∂a ⊙ f′ in one pass, by ATen's own activation-backward kernel (`threshold_backward`,
  `gelu_backward`, ...) — the kernel native autograd runs — instead of the several elementwise
  ops the readable f′ composes. Each kernel has the registry's NaN/Inf/threshold semantics
  (tests/test_fast_path.py holds the fast δ against the oracle's, edge values included);
* the forward's bias add in the GEMM (`addmm`), output-derivable activations applied in place on
  the GEMM's fresh result (one activation-sized allocation per layer instead of two);
* GEMMs that write where the result is needed (`out=`), including back into a reused workspace
  (:class:`Workspace`) for the δ temporaries of the network-mode sweep.

It runs only where it means what the reference means and is cheaper: CPU tensors of float32
and float64, first order (the Functions take the differentiable reference path when grad mode
is on in backward), and never under torch.func transforms (the entry points pick the reference
backend there). The network-mode MLP and the single layer's fast node
(:mod:`manualbp.ops.linear_fast`) also run it for bfloat16 (:func:`network_ok`): ATen's bfloat16
kernels, rounding as native autograd rounds — z after the GEMM, then f(z); δ after the GEMM,
then after f′ (exact for relu) — where the reference computes each layer in float32 and rounds
once (float16 storage, and the general path, still do). Both are held to native within the
bfloat16 tolerances; under autocast the layer keeps the reference's one rounding of
f(x Wᵀ + b) from bfloat16 operands (tests/test_autocast.py).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from manualbp.activations import Activation
from manualbp.backends import reference

__all__ = [
    "Workspace",
    "delta",
    "delta_fresh",
    "delta_into",
    "fast_ok",
    "layer_forward",
    "network_ok",
    "linear_backward",
    "linear_forward",
]

FAST_DTYPES = (torch.float32, torch.float64)
NETWORK_DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_aten = torch.ops.aten
_threshold_bw = _aten.threshold_backward.default
_threshold_bw_out = _aten.threshold_backward.grad_input
_leaky_bw = _aten.leaky_relu_backward.default
_leaky_bw_out = _aten.leaky_relu_backward.grad_input
_sigmoid_bw = _aten.sigmoid_backward.default
_sigmoid_bw_out = _aten.sigmoid_backward.grad_input
_tanh_bw = _aten.tanh_backward.default
_tanh_bw_out = _aten.tanh_backward.grad_input
_gelu_bw = _aten.gelu_backward.default
_gelu_bw_out = _aten.gelu_backward.grad_input
_silu_bw = _aten.silu_backward.default
_silu_bw_out = _aten.silu_backward.grad_input
_mish_bw = _aten.mish_backward.default
_softplus_bw = _aten.softplus_backward.default
_softplus_bw_out = _aten.softplus_backward.grad_input
_SOFTPLUS_THRESHOLD = 20.0  # as activations._softplus_grad and F.softplus's default
# z = x Wᵀ + b as nn.Linear computes it (addmm with the bias, mm without), the transpose taken
# in C++: a Python-level `w.t()` is a tensor object more per layer and call.
_linear = torch._C._nn.linear


def fast_ok(x: Tensor) -> bool:
    """Whether the fast path runs for this input: a CPU tensor of float32 or float64."""
    return x.device.type == "cpu" and x.dtype in FAST_DTYPES


def network_ok(x: Tensor) -> bool:
    """Whether the network-mode fast path runs for this input: CPU float32, float64, bfloat16."""
    return x.device.type == "cpu" and x.dtype in NETWORK_DTYPES


def swap(backend: ModuleType, x: Tensor) -> ModuleType:
    """This module in place of the reference backend where the fast path runs for `x`."""
    return sys.modules[__name__] if backend is reference and fast_ok(x) else backend


# ------------------------------------------------------------------------------ δ = grad ⊙ f′

# Per activation: (grad, saved, out) -> δ. `out` may be None (a fresh tensor) or a tensor of
# grad's shape — also grad itself: the kernels are elementwise, so an exact alias is safe.
_Delta = Callable[[Tensor, Tensor, Tensor | None, float], Tensor]


def _into(fresh: Callable[..., Tensor], into: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(grad: Tensor, saved: Tensor, out: Tensor | None, *args: object) -> Tensor:
        if out is None:
            return fresh(grad, saved, *args)
        return into(grad, saved, *args, grad_input=out)

    return run


def _gelu_tanh(grad: Tensor, saved: Tensor, out: Tensor | None) -> Tensor:
    if out is None:
        return _gelu_bw(grad, saved, approximate="tanh")
    return _gelu_bw_out(grad, saved, approximate="tanh", grad_input=out)


def _mish(grad: Tensor, saved: Tensor, out: Tensor | None, *_: object) -> Tensor:
    d = _mish_bw(grad, saved)  # no out= overload in ATen
    return d if out is None else out.copy_(d)


_relu = _into(_threshold_bw, _threshold_bw_out)
_leaky = _into(_leaky_bw, _leaky_bw_out)
_sigmoid = _into(_sigmoid_bw, _sigmoid_bw_out)
_tanh = _into(_tanh_bw, _tanh_bw_out)
_gelu = _into(_gelu_bw, _gelu_bw_out)
_silu = _into(_silu_bw, _silu_bw_out)
_softplus = _into(_softplus_bw, _softplus_bw_out)

_DELTAS: dict[str, Callable[[Tensor, Tensor, Tensor | None, Activation], Tensor]] = {
    "relu": lambda g, s, o, act: _relu(g, s, o, 0),
    # self_is_result=True: f′ is read from a (slope ≥ 0, so a > 0 ⇔ z > 0), as the registry does.
    "leaky_relu": lambda g, s, o, act: _leaky(g, s, o, act.negative_slope, True),
    "sigmoid": lambda g, s, o, act: _sigmoid(g, s, o),
    "tanh": lambda g, s, o, act: _tanh(g, s, o),
    "gelu": lambda g, s, o, act: _gelu(g, s, o),
    "gelu_tanh": lambda g, s, o, act: _gelu_tanh(g, s, o),
    "silu": lambda g, s, o, act: _silu(g, s, o),
    "mish": lambda g, s, o, act: _mish(g, s, o),
    "softplus": lambda g, s, o, act: _softplus(g, s, o, 1.0, _SOFTPLUS_THRESHOLD),
}


def delta(act: Activation, grad: Tensor, saved: Tensor, out: Tensor | None = None) -> Tensor:
    """δ = grad ⊙ f′(saved) in one ATen kernel; equals `act.delta(grad, saved)` (the oracle).

    Identity returns `grad` itself (or copies it into `out`).
    """
    fn = _DELTAS.get(act.name)
    if fn is None:  # identity
        return grad if out is None else out.copy_(grad)
    return fn(grad, saved, out, act)


DeltaFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def delta_into(act: Activation) -> DeltaFn | None:
    """`delta` for one activation, bound once: (grad, saved, out) -> δ written into `out` (which
    may be `grad` itself). None for identity, whose δ is the gradient itself."""
    name = act.name
    if name == "identity":
        return None
    # The overloads' C++ callables (`_op`): an OpOverload's own __call__ is a Python frame more.
    if name == "relu":
        relu = _threshold_bw_out._op
        return lambda g, s, o: relu(g, s, 0, grad_input=o)
    simple = {"gelu": _gelu_bw_out, "tanh": _tanh_bw_out, "sigmoid": _sigmoid_bw_out, "silu": _silu_bw_out}
    if name in simple:
        op = simple[name]._op
        return lambda g, s, o: op(g, s, grad_input=o)
    fn = _DELTAS[name]
    return lambda g, s, o: fn(g, s, o, act)


def delta_fresh(act: Activation) -> Callable[[Tensor, Tensor], Tensor]:
    """`delta` for one activation, bound once: (grad, saved) -> δ as a fresh tensor."""
    name = act.name
    if name == "relu":
        relu = _threshold_bw._op
        return lambda g, s: relu(g, s, 0)
    simple = {"gelu": _gelu_bw, "tanh": _tanh_bw, "sigmoid": _sigmoid_bw, "silu": _silu_bw}
    if name in simple:
        op = simple[name]._op
        return lambda g, s: op(g, s)
    return lambda g, s: delta(act, g, s)


LayerFn = Callable[..., tuple[Tensor, Tensor]]


def _z(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None) -> Tensor:
    # z = x Wᵀ + b, the bias added by the GEMM: fresh as nn.Linear makes it, or into `out` (a
    # workspace view).
    if out is None:
        return _linear(x, w, b)
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def layer_forward(act: Activation) -> LayerFn:
    """`linear_forward` for one activation, bound once: (x, weight, bias, out=None) -> (a, saved).

    With `out` (rows × out_features, contiguous) z is written there instead of a fresh tensor."""
    inplace = _INPLACE.get(act.name)
    if act.name == "identity":

        def identity(
            x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None
        ) -> tuple[Tensor, Tensor]:
            z = _z(x, w, b, out)
            return z, z

        return identity
    if inplace is not None:

        def output_derivable(
            x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None
        ) -> tuple[Tensor, Tensor]:
            z = _z(x, w, b, out)
            a = inplace(z, act)
            return a, a

        return output_derivable
    f = act.f
    slope = act.negative_slope

    def from_z(
        x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _z(x, w, b, out)
        return f(z, slope), z

    return from_z


# ------------------------------------------------------------------------------ one layer

_INPLACE: dict[str, Callable[[Tensor, Activation], Tensor]] = {
    "relu": lambda z, act: torch.relu_(z),
    "leaky_relu": lambda z, act: torch._C._nn.leaky_relu_(z, act.negative_slope),
    "sigmoid": lambda z, act: torch.sigmoid_(z),
    "tanh": lambda z, act: torch.tanh_(z),
}


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> tuple[Tensor, Tensor]:
    """(a, saved) as :func:`manualbp.backends.reference.linear_forward`, on the fast dtypes.

    z is the GEMM's own fresh result, so output-derivable activations overwrite it in place.
    """
    z = _linear(x, weight, bias)
    if act.name == "identity":
        return z, z
    inplace = _INPLACE.get(act.name)
    if inplace is not None:
        a = inplace(z, act)
        return a, a
    return act(z), z


def linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: Activation,
    *,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """As :func:`manualbp.backends.reference.linear_backward`, with the fused δ."""
    d = delta(act, grad_out, saved)
    grad_input = torch.mm(d, weight) if need_input else None
    grad_weight = torch.mm(d.t(), x) if need_weight else None
    grad_bias = d.sum(0) if need_bias else None
    return grad_input, grad_weight, grad_bias


# ------------------------------------------------------------------------------ workspace


class Workspace:
    """Flat buffers that a backward sweep may reuse across steps for its δ temporaries.

    PyTorch's CPU allocator caches nothing: every activation-sized temporary is a fresh
    allocation (and, past glibc's mmap threshold, fresh zeroed pages). The network-mode sweep
    writes each layer's δ into one of two buffers taken from here and gives them back when it
    returns. A buffer is never handed to the user or to autograd — every gradient returned is a
    fresh tensor — and a taken buffer belongs to one sweep alone: concurrent or re-entrant
    backwards (threads, a backward inside a hook) take distinct buffers or allocate their own.
    Bounded: at most `max_buffers` buffers are kept (the largest ones win); they are released
    with the owner (the module), and copies, pickles and deep copies of the owner start empty.
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self._lock = threading.Lock()
        self._free: list[Tensor] = []

    def take(self, numel: int, like: Tensor) -> Tensor:
        """A flat buffer of at least `numel` elements of `like`'s dtype and device."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.dtype == like.dtype and buf.device == like.device and buf.numel() >= numel:
                    return self._free.pop(i)
        return like.new_empty(numel)

    def give(self, buf: Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.max_buffers:
                self._free.sort(key=Tensor.numel, reverse=True)
                del self._free[self.max_buffers :]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._free)

    def __reduce__(self) -> tuple:
        return Workspace, (self.max_buffers,)

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace(self.max_buffers)

    def __copy__(self) -> Workspace:
        return Workspace(self.max_buffers)
