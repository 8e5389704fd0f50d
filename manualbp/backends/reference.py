"""The reference backend: the seed's matrix equations in plain PyTorch, any device and dtype.

For rows x (M, K), weight W (N, K), bias b (N,) and activation f:

    forward    z = x Wᵀ + b,          a = f(z)
    backward   δ = ∂C/∂a ⊙ f′          (M, N)   "the error at this layer"
               grad_weight = δᵀ x      (N, K)   the seed's ∇W = δ aᵀ, summed over the rows
               grad_bias   = Σ_rows δ  (N,)     bias = a weight on a constant input of 1
               grad_input  = δ W       (M, K)   the seed's Wᵀδ, handed to the layer below

No autograd runs in here: these functions are what the autograd Functions call. 16-bit inputs are
computed in float32 (the accumulation dtype) and rounded once at the end, so the reference is as
accurate as the storage dtype allows. This module is also the oracle the Triton kernels are tested
against, so it stays short and obvious rather than fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manualbp.activations import Activation

__all__ = ["linear_forward", "linear_backward", "compute_dtype", "cast", "up"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float32 for 16-bit storage, the storage dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def up(t: Tensor) -> Tensor:
    """`t` in its compute dtype (float32 for 16-bit storage)."""
    return cast(t, compute_dtype(t.dtype))


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t.to(dtype)`, skipped when `t` already has that dtype."""
    # A same-dtype `.to` returns `t` but still costs a dispatcher round trip (~1 µs): at small
    # widths the ~30 of them per training step of a 3-layer MLP are a measurable share.
    return t if t.dtype == dtype else t.to(dtype)


def linear_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation
) -> tuple[Tensor, Tensor]:
    """Returns (a, saved): saved is `a` itself when f′ is read from the output, else z."""
    if bias is None:
        z = up(x) @ up(weight).t()
    else:
        z = torch.addmm(up(bias), up(x), up(weight).t())  # the bias add fused into the GEMM
    a = act(z)
    out = cast(a, x.dtype)
    saved = out if act.uses_output else cast(z, x.dtype)
    return out, saved


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
    """δ = grad_out ⊙ f′(saved); then only the gradients that autograd asked for."""
    delta = act.delta(up(grad_out), up(saved))
    grad_input = cast(delta @ up(weight), x.dtype) if need_input else None
    grad_weight = cast(delta.t() @ up(x), weight.dtype) if need_weight else None
    grad_bias = cast(delta.sum(0), weight.dtype) if need_bias else None
    return grad_input, grad_weight, grad_bias
