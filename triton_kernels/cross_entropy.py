"""Softmax cross-entropy of a block of logit rows: loss, logsumexp and ∂C/∂z in one kernel.

    logits (M, C)   one row per example, any strides, fp32/fp16/bf16
    target (M,)     class indices (int32/int64); rows equal to `ignore_index` are ignored
    scale  (M,)     fp32 factor of each row's gradient (1/count for "mean", 1 for "sum", or
                    ∂C/∂loss_i for reduction "none")
    loss   (M,)     fp32  lse_i − z_i[t_i]   (0 for ignored rows)
    lse    (M,)     fp32  log Σ_c exp z_ic
    grad   (M, C)         (softmax(z_i) − onehot(t_i)) · scale_i   (exactly 0 for ignored rows)

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
def cross_entropy_kernel(
    logits_ptr, target_ptr, scale_ptr, loss_ptr, lse_ptr, grad_ptr,
    C, ignore_index,
    stride_lm, stride_lc,
    stride_gm, stride_gc,
    HAS_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_lm
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_C)

    # Sweep 1: running max m and running sum d = Σ exp(z − m). exp(−inf) terms (masked lanes,
    # or −inf logits) are selected to 0 rather than computed, since −inf − (−inf) is NaN.
    m = -float("inf")
    d = 0.0
    for start in range(0, C, BLOCK_C):
        offs = start + cols
        mask = offs < C
        z = upcast(tl.load(logits_row + offs * stride_lc, mask=mask, other=-float("inf")), UPCAST)
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        terms = tl.where(z == -float("inf"), 0.0, tl.exp(z - m_new))
        d = d * alpha + tl.sum(terms, 0)
        m = m_new
    lse = m + tl.log(d)  # a row of only −inf gives −inf here and a NaN loss, as PyTorch

    safe_target = tl.where(valid, target, 0)
    picked = upcast(tl.load(logits_row + safe_target * stride_lc), UPCAST).to(tl.float32)
    loss = tl.where(valid, lse - picked, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if HAS_GRAD:
        # Ignored rows get exactly 0 (a select, so a NaN/Inf row or scale cannot leak into them).
        scale = tl.load(scale_ptr + row).to(tl.float32)
        grad_row = grad_ptr + row * stride_gm
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            z = upcast(tl.load(logits_row + offs * stride_lc, mask=mask, other=0.0), UPCAST)
            p = tl.exp(z.to(tl.float32) - lse)
            g = tl.where(offs == safe_target, p - 1.0, p) * scale
            g = tl.where(valid, g, 0.0)
            g = round_for_store(g, UPCAST).to(grad_ptr.dtype.element_ty)
            tl.store(grad_row + offs * stride_gc, g, mask=mask)


def _block_c(C: int) -> int:
    # Under the interpreter every tile is a NumPy array: small tiles keep the tests quick and
    # still exercise the multi-tile loop. On a GPU one 4096-wide fp32 tile is 16 KiB of registers
    # spread over the program's warps.
    cap = 64 if INTERPRET else 4096
    return max(16, min(cap, triton.next_power_of_2(max(C, 1))))


def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor | None,
    ignore_index: int = -100,
    *,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Returns (loss, lse), both fp32 of shape (M,).

    With `scale` given the gradient (softmax − onehot) · scale is written into `grad`
    (default: into `logits` itself, in place). Without it only loss and lse are computed.
    Target values must already be checked to lie in [0, C) or equal `ignore_index`.
    """
    check_matrix("logits", logits)
    M, C = logits.shape
    device = logits.device
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int32, torch.int64):
        got = type(target).__name__ if not isinstance(target, torch.Tensor) else target.dtype
        raise TypeError(f"target: got {got}, expected an int32 or int64 tensor")
    if tuple(target.shape) != (M,) or target.device != device:
        raise ValueError(
            f"target: got shape {tuple(target.shape)} on {target.device}, expected ({M},) on {device}"
        )
    check_device("target", target)
    if C < 1:
        raise ValueError(f"logits: got {C} classes (shape {tuple(logits.shape)}), expected >= 1")
    has_grad = scale is not None
    if has_grad:
        if scale.dtype != torch.float32 or tuple(scale.shape) != (M,) or scale.device != device:
            raise ValueError(
                f"scale: got {scale.dtype} of shape {tuple(scale.shape)} on {scale.device}, "
                f"expected float32 of shape ({M},) on {device}"
            )
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
    g = grad if has_grad else logits  # placeholder pointer, never written without HAS_GRAD
    _utils.traceable(cross_entropy_kernel)[(M,)](
        logits, target, scale if has_grad else loss, loss, lse, g,
        C, int(ignore_index),
        logits.stride(0), logits.stride(1),
        g.stride(0), g.stride(1),
        HAS_GRAD=has_grad,
        UPCAST=needs_upcast(logits.dtype),
        BLOCK_C=_block_c(C),
        num_warps=4 if C <= 8192 else 8,
    )  # fmt: skip
    return loss, lse
