"""Softmax cross-entropy of a block of logit rows: loss, logsumexp and ∂C/∂z in one kernel.

    logits (M, C)   one row per example, any strides, fp32/fp16/bf16
    target (M,)     class indices (int32/int64); rows equal to `ignore_index` are ignored
           (M, C)   or class probabilities (floating; PROB_TARGET)
    weight (C,)     fp32 class weights w (HAS_WEIGHT)
    scale  (M,)     fp32 factor r_i of each row's cross-entropy gradient (1/D for "mean", 1 for
                    "sum", or ∂C/∂loss_i for reduction "none"); z_scale: the same for the z-loss
    loss   (M,)     fp32  the row's cross-entropy ce_i (0 for ignored rows)
    lse    (M,)     fp32  log Σ_c exp ẑ_ic
    grad   (M, C)         ∂C/∂z_i (exactly 0 for ignored rows)

with the options as constexpr flags of the one kernel: label smoothing ε (SMOOTH), class weights
(HAS_WEIGHT), probability targets (PROB_TARGET), z-loss λ lse² (Z_LOSS) and the logit softcap
ẑ = s·tanh(z/s) (SOFTCAP). The formulas are those of `manualbp.ops.ce_rows` (its module doc);
with every flag off, ce = lse − z[t] and grad = (softmax(z) − onehot(t)) · scale.

One program per row, two sweeps over the classes in BLOCK_C tiles (as Liger-Kernel's): the
first keeps a running max m and Σ exp(z − m) (online softmax, so a row of any length needs one
tile of registers), the second reads the logits again and writes the gradient. `grad` may be
`logits` itself: every element is read by the program that then overwrites it, so the fused
linear + cross-entropy head never holds a logits tensor and its gradient at once.

This kernel is the "softmax/loss/gradient part" of `manualbp.fused_loss.linear_cross_entropy`;
the GEMMs around it are the layer kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import INTERPRET, check_device, check_matrix, needs_upcast, upcast
from .activations import tanh

__all__ = ["cross_entropy_rows", "cross_entropy_kernel"]


@triton.jit
def round_for_store(x, UPCAST: tl.constexpr):
    """float32 `x` rounded to the nearest bfloat16 (ties to even) when UPCAST is set.

    Under the interpreter (the only case UPCAST is set) a float32 → bfloat16 store truncates,
    which biases every stored gradient low by ~2⁻⁹ relative; rounding the float32 value first
    makes the truncating store exact. On a GPU the conversion rounds to nearest by itself.
    """
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _capped(z, cap, SOFTCAP: tl.constexpr):
    """ẑ = s·tanh(z/s) when SOFTCAP is set (Gemma-style logit softcap), else z."""
    if SOFTCAP:
        return cap * tanh(z / cap)
    else:
        return z


@triton.jit
def _coef(target_row, weight_ptr, offs, mask, stride_tc, eps_c, eps_keep,
          PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, T_UPCAST: tl.constexpr):  # fmt: skip
    """Per class: u_c = w_c ((1−ε) q_c + ε/C) for probability targets, else w_c (0 off the row)."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        q = upcast(tl.load(target_row + offs * stride_tc, mask=mask, other=0.0), T_UPCAST)
        w = w * (q.to(tl.float32) * eps_keep + eps_c)
    return w


@triton.jit
def cross_entropy_kernel(
    logits_ptr, target_ptr, weight_ptr, scale_ptr, z_scale_ptr, loss_ptr, lse_ptr, grad_ptr,
    C, ignore_index, label_smoothing, lse_square_scale, softcap,
    stride_lm, stride_lc,
    stride_tm, stride_tc,
    stride_gm, stride_gc,
    HAS_GRAD: tl.constexpr,
    PROB_TARGET: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    T_UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_lm
    target_row = target_ptr + row * stride_tm
    cols = tl.arange(0, BLOCK_C)
    eps_c = label_smoothing / C  # ε/C, the uniform part of the smoothed target
    eps_keep = 1.0 - label_smoothing
    if PROB_TARGET:
        valid = row >= 0  # every row counts
        safe_target = 0
    else:
        target = tl.load(target_ptr + row).to(tl.int64)
        valid = target != ignore_index
        safe_target = tl.where(valid, target, 0)

    # Sweep 1: running max m and running sum d = Σ exp(ẑ − m), and for smoothing / probability
    # targets the sums Σ u_c ẑ_c and Σ u_c. exp(−inf) terms (masked lanes, or −inf logits) are
    # selected to 0 rather than computed, since −inf − (−inf) is NaN.
    m = -float("inf")
    d = 0.0
    coef_z = 0.0
    coef_sum = 0.0
    for start in range(0, C, BLOCK_C):
        offs = start + cols
        mask = offs < C
        z = upcast(tl.load(logits_row + offs * stride_lc, mask=mask, other=-float("inf")), UPCAST)
        z = tl.where(mask, _capped(z.to(tl.float32), softcap, SOFTCAP), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        terms = tl.where(z == -float("inf"), 0.0, tl.exp(z - m_new))
        d = d * alpha + tl.sum(terms, 0)
        m = m_new
        if PROB_TARGET or SMOOTH:
            u = _coef(target_row, weight_ptr, offs, mask, stride_tc, eps_c, eps_keep,
                      PROB_TARGET, HAS_WEIGHT, T_UPCAST)  # fmt: skip
            coef_z += tl.sum(u * tl.where(mask, z, 0.0), 0)  # masked lanes: 0, not 0 · −inf
            coef_sum += tl.sum(u, 0)
    lse = m + tl.log(d)  # a row of only −inf gives −inf here and a NaN loss, as PyTorch

    # ce and A (the factor of p in ∂ce/∂ẑ), as the module doc of manualbp.ops.ce_rows states.
    w_t = 1.0
    if PROB_TARGET:
        big_a = coef_sum
        ce = coef_sum * lse - coef_z
    else:
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + safe_target)
        picked = upcast(tl.load(logits_row + safe_target * stride_lc), UPCAST).to(tl.float32)
        ce = w_t * (lse - _capped(picked, softcap, SOFTCAP))
        big_a = w_t
        if SMOOTH:
            ce = eps_keep * ce + eps_c * (coef_sum * lse - coef_z)
            big_a = eps_keep * w_t + eps_c * coef_sum
    tl.store(loss_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(lse_ptr + row, lse)

    if HAS_GRAD:
        # ∂C/∂z = [(r A + 2λ r_z lse) p − r B] ⊙ (1 − tanh²(z/s)). Ignored rows get exactly 0
        # (a select, so a NaN/Inf row or scale cannot leak into them).
        r = tl.load(scale_ptr + row).to(tl.float32)
        p_coef = r * big_a
        if Z_LOSS:
            p_coef += 2.0 * lse_square_scale * tl.load(z_scale_ptr + row).to(tl.float32) * lse
        grad_row = grad_ptr + row * stride_gm
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            z = upcast(tl.load(logits_row + offs * stride_lc, mask=mask, other=0.0), UPCAST)
            z = z.to(tl.float32)
            if SOFTCAP:
                th = tanh(z / softcap)
                zh = softcap * th
            else:
                zh = z
            g = tl.exp(zh - lse) * p_coef
            if PROB_TARGET or SMOOTH:
                u = _coef(target_row, weight_ptr, offs, mask, stride_tc, eps_c, eps_keep,
                          PROB_TARGET, HAS_WEIGHT, T_UPCAST)  # fmt: skip
                if PROB_TARGET:
                    g -= r * u
                else:
                    g -= (r * eps_c) * u
            if not PROB_TARGET:
                g = tl.where(offs == safe_target, g - r * eps_keep * w_t, g)
            if SOFTCAP:
                g *= 1.0 - th * th
            g = tl.where(valid, g, 0.0)
            g = round_for_store(g, UPCAST).to(grad_ptr.dtype.element_ty)
            tl.store(grad_row + offs * stride_gc, g, mask=mask)


def _block_c(C: int, *, softcap_grad: bool = False) -> int:
    # Under the interpreter every tile is a NumPy array: small tiles keep the tests quick and
    # still exercise the multi-tile loop. On a GPU one 4096-wide fp32 tile is 16 KiB of registers
    # spread over the program's warps. The softcap's gradient sweep keeps tanh's intermediates
    # of a whole tile live: at 4096 it spilled on sm_90 (aot_ce.py found it), at 2048 it does not.
    cap = 64 if INTERPRET else (2048 if softcap_grad else 4096)
    return max(16, min(cap, triton.next_power_of_2(max(C, 1))))


def _check_vector(name: str, t: torch.Tensor | None, n: int, device: torch.device) -> None:
    if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (n,) or t.device != device
                          or t.stride(0) != 1):  # fmt: skip
        raise ValueError(
            f"{name}: got {t.dtype} of shape {tuple(t.shape)} on {t.device}, expected contiguous "
            f"float32 of shape ({n},) on {device}"
        )


def _check_target(target: torch.Tensor, M: int, C: int, device: torch.device) -> None:
    if not isinstance(target, torch.Tensor) or not (
        target.dtype in (torch.int32, torch.int64) or target.is_floating_point()
    ):
        got = type(target).__name__ if not isinstance(target, torch.Tensor) else target.dtype
        raise TypeError(f"target: got {got}, expected an int32/int64 or a floating tensor")
    expected = (M, C) if target.is_floating_point() else (M,)
    if tuple(target.shape) != expected or target.device != device:
        raise ValueError(
            f"target: got shape {tuple(target.shape)} on {target.device}, expected {expected} "
            f"on {device} ({'class probabilities' if len(expected) == 2 else 'class indices'})"
        )
    check_device("target", target)


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None,
    ignore_index: int = -100,
    *,
    grad: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    z_scale: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Returns (loss, lse), both fp32 of shape (M,).

    With `scale` given the gradient ∂C/∂z for row weights `scale` (and `z_scale` for the z-loss
    term, needed when lse_square_scale ≠ 0) is written into `grad` (default: into `logits`
    itself, in place). Without it only loss and lse are computed. `loss` is the cross-entropy
    part only (the z-loss λ lse² is the caller's to add). Class-index targets must already be
    checked to lie in [0, C) or equal `ignore_index`; a floating target is (M, C) probabilities.
    """
    check_matrix("logits", logits)
    M, C = logits.shape
    device = logits.device
    _check_target(target, M, C, device)
    if C < 1:
        raise ValueError(f"logits: got {C} classes (shape {tuple(logits.shape)}), expected >= 1")
    _check_vector("weight", weight, C, device)
    if not 0.0 <= label_smoothing <= 1.0 or lse_square_scale < 0.0 or softcap < 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing}, lse_square_scale={lse_square_scale}, "
            f"softcap={softcap}: expected 0 <= label_smoothing <= 1, lse_square_scale >= 0 and "
            "softcap >= 0 (0: no softcap)"
        )
    has_grad = scale is not None
    z_loss = has_grad and lse_square_scale != 0.0
    if has_grad:
        _check_vector("scale", scale, M, device)
        if z_loss and z_scale is None:
            raise ValueError("z_scale: required (float32 of shape (M,)) when lse_square_scale != 0")
        _check_vector("z_scale", z_scale, M, device)
        grad = logits if grad is None else grad
        check_matrix("grad", grad)
        if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != device:
            raise ValueError(
                f"grad: got {grad.dtype} of shape {tuple(grad.shape)}, expected {logits.dtype} "
                f"of shape {tuple(logits.shape)} on {device}"
            )
    loss = torch.empty(M, dtype=torch.float32, device=device)
    lse = torch.empty(M, dtype=torch.float32, device=device)
    if M == 0:
        return loss, lse
    prob = target.is_floating_point()
    g = grad if has_grad and grad is not None else logits  # placeholder: unwritten without HAS_GRAD
    _utils.traceable(cross_entropy_kernel)[(M,)](
        logits, target, loss if weight is None else weight,
        scale if has_grad else loss, z_scale if z_loss else loss, loss, lse, g,
        C, int(ignore_index), float(label_smoothing), float(lse_square_scale), float(softcap),
        logits.stride(0), logits.stride(1),
        target.stride(0), target.stride(1) if prob else 0,
        g.stride(0), g.stride(1),
        HAS_GRAD=has_grad,
        PROB_TARGET=prob,
        HAS_WEIGHT=weight is not None,
        SMOOTH=label_smoothing != 0.0,
        Z_LOSS=z_loss,
        SOFTCAP=softcap != 0.0,
        UPCAST=needs_upcast(logits.dtype),
        T_UPCAST=needs_upcast(target.dtype),
        BLOCK_C=_block_c(C, softcap_grad=has_grad and softcap != 0.0),
        num_warps=4 if C <= 8192 else 8,
    )  # fmt: skip
    return loss, lse
