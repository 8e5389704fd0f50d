"""Activation functions f and their derivatives f′ as Triton device functions.

One constexpr id selects the branch at compile time, so every kernel is compiled once per
activation without copies of the kernel body. The ids are a fixed contract with
`manualbp/activations.py`:

    identity=0 relu=1 leaky_relu=2 sigmoid=3 tanh=4      f′ computed from the output a = f(z)
    gelu=5 gelu_tanh=6 silu=7 mish=8 softplus=9           f′ computed from the pre-activation z

`act_grad(grad, saved, ...)` returns δ = grad ⊙ f′, where `saved` is `a` for the first group and
`z` for the second (what the forward saved). All arithmetic is float32; the callers upcast.
Adding an activation means one id (and name) here, one branch in `act_fn`, one in `act_grad`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._utils import upcast

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
LEAKY_RELU: tl.constexpr = tl.constexpr(2)
SIGMOID: tl.constexpr = tl.constexpr(3)
TANH: tl.constexpr = tl.constexpr(4)
GELU: tl.constexpr = tl.constexpr(5)
GELU_TANH: tl.constexpr = tl.constexpr(6)
SILU: tl.constexpr = tl.constexpr(7)
MISH: tl.constexpr = tl.constexpr(8)
SOFTPLUS: tl.constexpr = tl.constexpr(9)

NUM_ACTIVATIONS = 10
NAMES = (
    "identity", "relu", "leaky_relu", "sigmoid", "tanh",
    "gelu", "gelu_tanh", "silu", "mish", "softplus",
)  # fmt: skip
ACTIVATION_IDS = {name: i for i, name in enumerate(NAMES)}


def check_act_id(name: str, act_id: object) -> int:
    if isinstance(act_id, bool) or not isinstance(act_id, int):
        raise TypeError(f"{name}: expected an int activation id, got {type(act_id).__name__}")
    if not 0 <= act_id < NUM_ACTIVATIONS:
        raise ValueError(f"{name}: got {act_id}, expected an id in [0, {NUM_ACTIVATIONS})")
    return act_id


# f′ written in terms of the output a (the forward then saves only a).
OUTPUT_DERIVED = frozenset({0, 1, 2, 3, 4})


def uses_output(act_id: int) -> bool:
    """True when f′ is computed from the output a (ids 0-4), False when it needs z (ids 5-9)."""
    return act_id in OUTPUT_DERIVED


SQRT_HALF: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/√2
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/√(2π)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # √(2/π)
GELU_TANH_C: tl.constexpr = tl.constexpr(0.044715)
GELU_TANH_3C: tl.constexpr = tl.constexpr(3 * 0.044715)  # d/dz of c·z³ is 3c·z²
SOFTPLUS_THRESHOLD: tl.constexpr = tl.constexpr(20.0)  # PyTorch default, beta = 1


@triton.jit
def tanh(x):
    """tanh without overflow or cancellation.

    |x| ≥ 1/8: tanh|x| = (1 − e)/(1 + e) with e = exp(−2|x|) ∈ (0, 0.78], so exp never overflows
    and 1 − e loses at most ~2 bits. |x| < 1/8: the odd Taylor series to x⁷ (truncation error
    below 2e-9 relative), which avoids the cancellation of 1 − e near 0.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def log1p(y):
    """log(1 + y) for y = exp(−|z|) ∈ (0, 1], without division.

    y < 1/32: the series y − y²/2 + … − y⁶/6 (truncation below 2e-10 relative). Above, log(1 + y)
    directly: rounding 1 + y costs at most 2⁻²⁴ absolute, under 2e-6 relative to log1p(y) ≥ 0.03.
    (Goldberg's u = 1 + y, log(u)·y/(u − 1) is as accurate but its division made the 128×128
    forward tile with softplus spill on sm_90.)
    """
    series = y * (1.0 + y * (-0.5 + y * (1.0 / 3.0 + y * (-0.25 + y * (0.2 - y * (1.0 / 6.0))))))
    return tl.where(y < 0.03125, series, tl.log(1.0 + y))


@triton.jit
def softplus(z):
    """log(1 + eᶻ) = max(z, 0) + log1p(e^−|z|), and z itself above PyTorch's threshold 20."""
    sp = tl.maximum(z, 0.0) + log1p(tl.exp(-tl.abs(z)))
    return tl.where(z > SOFTPLUS_THRESHOLD, z, sp)


@triton.jit
def act_fn(z, ACT: tl.constexpr, negative_slope):
    """a = f(z) for the activation ACT, in float32."""
    if ACT == IDENTITY:
        return z
    elif ACT == RELU:
        # `z <= 0` is False for NaN, so NaN propagates like torch.relu.
        return tl.where(z <= 0.0, 0.0, z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0.0, z, z * negative_slope)
    elif ACT == SIGMOID:
        return tl.sigmoid(z)
    elif ACT == TANH:
        return tanh(z)
    elif ACT == GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))
    elif ACT == GELU_TANH:
        inner = SQRT_2_OVER_PI * (z + GELU_TANH_C * z * z * z)
        return 0.5 * z * (1.0 + tanh(inner))
    elif ACT == SILU:
        return z * tl.sigmoid(z)
    elif ACT == MISH:
        return z * tanh(softplus(z))
    else:
        tl.static_assert(ACT == SOFTPLUS, "unknown activation id")
        return softplus(z)


@triton.jit
def act_grad(grad, saved, ACT: tl.constexpr, negative_slope):
    """δ = grad ⊙ f′, in float32. `saved` is a for ids 0-4 and z for ids 5-9.

    relu and leaky_relu select with `tl.where` instead of multiplying by a 0/1 mask so that
    NaN/Inf in `grad` behave as in PyTorch's threshold_backward / leaky_relu_backward
    (0 · Inf would be NaN; a select gives 0).
    """
    if ACT == IDENTITY:
        return grad
    elif ACT == RELU:
        # threshold_backward: a <= 0 ? 0 : grad
        return tl.where(saved <= 0.0, 0.0, grad)
    elif ACT == LEAKY_RELU:
        # leaky_relu_backward: a > 0 ? grad : grad * slope (a and z have the same sign)
        return tl.where(saved > 0.0, grad, grad * negative_slope)
    elif ACT == SIGMOID:
        return grad * (saved * (1.0 - saved))
    elif ACT == TANH:
        return grad * (1.0 - saved * saved)
    elif ACT == GELU:
        # d/dz [z Φ(z)] = Φ(z) + z φ(z)
        cdf = 0.5 * (1.0 + tl.math.erf(saved * SQRT_HALF))
        pdf = INV_SQRT_2PI * tl.exp(-0.5 * saved * saved)
        return grad * (cdf + saved * pdf)
    elif ACT == GELU_TANH:
        z2 = saved * saved
        t = tanh(saved * (1.0 + z2 * GELU_TANH_C) * SQRT_2_OVER_PI)
        dinner = (1.0 + z2 * GELU_TANH_3C) * SQRT_2_OVER_PI
        return grad * (0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * dinner)
    elif ACT == SILU:
        s = tl.sigmoid(saved)
        return grad * (s * (1.0 + saved * (1.0 - s)))
    elif ACT == MISH:
        # d/dz [z tanh(sp(z))] = tanh(sp) + z σ(z) (1 − tanh²(sp))
        t = tanh(softplus(saved))
        return grad * (t + saved * tl.sigmoid(saved) * (1.0 - t * t))
    else:
        tl.static_assert(ACT == SOFTPLUS, "unknown activation id")
        # softplus_backward: z > threshold ? grad : grad * σ(z)
        return tl.where(saved > SOFTPLUS_THRESHOLD, grad, grad * tl.sigmoid(saved))


@triton.jit
def delta_tile(grad, saved, ACT: tl.constexpr, negative_slope, UPCAST: tl.constexpr):
    """δ = grad ⊙ f′(saved) in float32 from two loaded storage-dtype tiles: the one prologue of
    the δ pass and of both backward GEMMs (bf16 tiles are upcast under the interpreter)."""
    return act_grad(
        upcast(grad, UPCAST).to(tl.float32), upcast(saved, UPCAST).to(tl.float32), ACT, negative_slope
    )
