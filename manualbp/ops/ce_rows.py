"""The cross-entropy head's per-chunk math — each row's loss, log-sum-exp and ∂C/∂z — with its
options, and their argument checks (:mod:`manualbp.ops.heads` runs it chunk by chunk).

For one row of logits z (C classes), after the optional softcap ẑ = s·tanh(z/s):

    lse = log Σ_c exp ẑ_c,   p = softmax(ẑ),   w = class weights (all 1 when not given)
    class index t, label smoothing ε (as native: the target mixed with the uniform distribution):
        ce = (1−ε) w_t (lse − ẑ_t) + (ε/C) Σ_c w_c (lse − ẑ_c)
        ∂ce/∂ẑ = A p − (1−ε) w_t e_t − (ε/C) w,          A = (1−ε) w_t + (ε/C) Σ_c w_c
    probability target q (that row of the caller's (M, C) target), u = w ⊙ ((1−ε) q + ε/C):
        ce = Σ_c u_c (lse − ẑ_c) = A lse − Σ_c u_c ẑ_c,   ∂ce/∂ẑ = A p − u,   A = Σ_c u_c
    z-loss, λ = lse_square_scale:   zl = λ lse²,   ∂zl/∂ẑ = 2λ lse p
    softcap, by the chain rule:     ∂ẑ/∂z = 1 − tanh²(z/s) = 1 − (ẑ/s)²

With row weights r (of ce) and r_z (of zl) — ∂C/∂ℓ_i — the chunk's gradient is

    ∂C/∂z = [(r A + 2λ r_z lse) p − r B] ⊙ (1 − (ẑ/s)²),   B the part of ∂ce/∂ẑ without p,

formed in the chunk's own logits buffer. Rows whose class target is `ignore_index` get ce = zl = 0
and a gradient of exactly 0. The reductions are native's: "none" gives ℓ_i = ce_i + zl_i, "sum"
Σ_i ℓ_i, and "mean" Σ ce_i / D + Σ zl_i / N, where N counts the rows not ignored and D = Σ w_t
over them (D = N without weights; D = N = M for probability targets, as native divides by M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CEOptions",
    "check_ce_options",
    "check_class_target",
    "denominators",
    "row_scales",
    "rows_reference",
    "rows_triton",
    "valid_rows",
    "z_loss_of",
]


@dataclass(frozen=True)
class CEOptions:
    """The head's loss options (plain cross-entropy: all defaults). softcap 0.0 means none."""

    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float = 0.0
    prob_target: bool = False


# ------------------------------------------------------------------------------ rows and scales


def valid_rows(target: Tensor, ignore_index: int, opts: CEOptions) -> Tensor:
    """The rows that count: all of them for probability targets, else target ≠ ignore_index."""
    if opts.prob_target:
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    return target != ignore_index


def _safe_index(target: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, target, torch.zeros_like(target)).long()


def denominators(
    target: Tensor, class_weight: Tensor | None, valid: Tensor, opts: CEOptions, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(D, N) of "mean": Σ w_t over the rows that count (D) and their number (N), in `dtype`."""
    count = valid.sum().to(dtype)
    if opts.prob_target or class_weight is None:
        return count, count
    w_t = class_weight.to(dtype)[_safe_index(target, valid)]
    return torch.where(valid, w_t, torch.zeros_like(w_t)).sum(), count


def row_scales(
    reduction: str, grad_loss: Tensor, d: Tensor, n: Tensor, rows: int
) -> tuple[Tensor, Tensor]:
    """(r, r_z): ∂C/∂ce_i and ∂C/∂zl_i per row for ∂C/∂loss = grad_loss (scalar, or (M,) for
    "none"). 1/0 only where every row is ignored; the kernels select those rows to 0."""
    g = grad_loss.expand(rows)
    if reduction == "mean":
        return g / d, g / n
    return g, g


def z_loss_of(lse: Tensor, valid: Tensor, opts: CEOptions, reduction: str, n: Tensor) -> Tensor:
    """The z-loss term λ lse² of the rows that count, reduced (it is part of the loss already)."""
    rows = opts.lse_square_scale * lse * lse
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    return rows.sum() / n if reduction == "mean" else rows.sum()


# ------------------------------------------------------------------------------ one chunk


def _op(inplace: bool, t: Tensor, name: str, *args: Any, **kwargs: Any) -> Tensor:
    """`t.name_(...)` over the chunk's own buffer, or `t.name(...)` when the formula must stay
    differentiable (a create_graph backward, forward mode): autograd needs its intermediates."""
    return getattr(t, name + "_" if inplace else name)(*args, **kwargs)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_c a_ic b_ic per row, as a batched GEMM (no (rows × C) product tensor)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _lse_softmax(zh: Tensor, inplace: bool) -> tuple[Tensor, Tensor | None]:
    """(lse per row, p = softmax(ẑ) or None). In place: one fused softmax over ẑ's own buffer,
    and lse = m − log max_c p_c with m the row's largest ẑ (max_c p_c = e^{m − lse} ≥ 1/C never
    underflows); else logsumexp, differentiable, with p formed from it by the caller."""
    if not inplace or zh.shape[1] == 0:
        return torch.logsumexp(zh, dim=1), None
    top = zh.amax(1)
    p = torch.softmax(zh, 1, out=zh)
    lse = top - p.amax(1).log()
    return torch.where(top.isinf(), top, lse), p  # a row with ±inf: m itself, as logsumexp


def rows_reference(
    z: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    opts: CEOptions,
    scale: Tensor | None,
    z_scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(ce per row, lse per row, ∂C/∂z or None) of a chunk of logits `z`, in torch ops.

    With grad mode off `z` (the chunk's own buffer, compute dtype) is overwritten by ẑ, then by
    p = softmax(ẑ), then by the gradient; extra chunk-sized buffers: u for probability targets,
    1 − (ẑ/s)² for softcap. (Everything read from ẑ itself is read before the softmax.)
    """
    inplace = not torch.is_grad_enabled()
    rows, classes = z.shape
    eps, lam, cap = opts.label_smoothing, opts.lse_square_scale, opts.softcap
    valid = valid_rows(target, ignore_index, opts)
    cw = None if class_weight is None else class_weight.to(z.dtype)
    zh, slope = z, None
    if cap:
        zh = _op(inplace, _op(inplace, z, "div", cap), "tanh")
        slope = 1 - zh * zh  # 1 − tanh², before ẑ is overwritten
        zh = _op(inplace, zh, "mul", cap)
    if opts.prob_target:
        u = target.to(z.dtype) * (1 - eps)  # a new chunk buffer: the caller's target stays intact
        if eps:
            u.add_(eps / classes)
        if cw is not None:
            u.mul_(cw)
        big_a, u_z = u.sum(1), _rowdot(u, zh)
    else:
        t = _safe_index(target, valid)
        w_t = cw[t] if cw is not None else torch.ones(rows, dtype=z.dtype, device=z.device)
        z_t = zh.gather(1, t.unsqueeze(1)).squeeze(1)
        big_a = w_t
        if eps:
            w_sum = cw.sum() if cw is not None else classes
            w_z = zh @ cw if cw is not None else zh.sum(1)
            big_a = (1 - eps) * w_t + (eps / classes) * w_sum
    lse, p = _lse_softmax(zh, inplace)  # a row of only −inf gives −inf, and a NaN loss, as native
    if opts.prob_target:
        ce = big_a * lse - u_z
    else:
        ce = w_t * (lse - z_t)
        if eps:
            ce = (1 - eps) * ce + (eps / classes) * (w_sum * lse - w_z)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    if scale is None:
        return ce, lse, None
    alpha = scale.to(z.dtype) * big_a
    if lam:
        alpha = alpha + 2 * lam * z_scale.to(z.dtype) * lse  # type: ignore[union-attr]
    r = scale.to(z.dtype).unsqueeze(1)
    grad = p if p is not None else _op(inplace, _op(inplace, zh, "sub", lse.unsqueeze(1)), "exp")
    grad = _op(inplace, grad, "mul", alpha.unsqueeze(1))
    if opts.prob_target:
        grad = _op(inplace, grad, "sub", _op(inplace, u, "mul", r))
    else:
        if eps < 1:
            grad = _op(inplace, grad, "scatter_add", 1, t.unsqueeze(1), -(1 - eps) * r * w_t.unsqueeze(1))
        if eps and cw is not None:
            grad = _op(inplace, grad, "addr", r.squeeze(1), cw, alpha=-eps / classes)
        elif eps:
            grad = _op(inplace, grad, "sub", r * (eps / classes))
    if slope is not None:
        grad = _op(inplace, grad, "mul", slope)
    # Ignored rows get exactly 0 — a select, so a NaN/Inf row or scale cannot leak into them (on
    # CPU skipped, one pass over the chunk less, when no row is ignored).
    if grad.device.type == "cpu" and bool(valid.all()):
        return ce, lse, grad
    return ce, lse, _op(inplace, grad, "masked_fill", ~valid.unsqueeze(1), 0)


def rows_triton(
    z: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    opts: CEOptions,
    scale: Tensor | None,
    z_scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The same on the kernel of `manualbp.triton_kernels.cross_entropy` (gradient over `z`)."""
    from manualbp.triton_kernels.cross_entropy import cross_entropy_rows

    def f32(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float().contiguous()

    ce, lse = cross_entropy_rows(
        z, target, f32(scale), ignore_index, weight=f32(class_weight),
        label_smoothing=opts.label_smoothing, lse_square_scale=opts.lse_square_scale,
        z_scale=f32(z_scale), softcap=opts.softcap,
    )  # fmt: skip
    return ce, lse, (None if scale is None else z)


# ------------------------------------------------------------------------------ argument checks


def _real(name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < low or value > high or (open_low and value == low):
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name}: expected a finite float {bound}, got {value!r}")
    return float(value)


def check_class_target(target: Any, x: Tensor, ignore_index: int) -> Tensor:
    """The checks of `manualbp.functional.cross_entropy`, for targets of shape x.shape[:-1].

    All but the class range, which reads values: the caller (eager) or the op (compiled) runs it.
    """
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target: expected integer class indices (e.g. torch.long) or floating class "
            f"probabilities, got dtype {target.dtype}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    expected = tuple(x.shape[:-1])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not fit input of shape {tuple(x.shape)}; "
            f"expected {expected} (one class index per row of input) or {(*expected, 'classes')} "
            "(class probabilities)"
        )
    return target


def _check_prob_target(target: Tensor, x: Tensor, classes: int, ignore_index: int) -> None:
    expected = (*x.shape[:-1], classes)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: floating (class-probability) target of shape {tuple(target.shape)} does not "
            f"fit input of shape {tuple(x.shape)} and {classes} classes; expected {expected}"
        )
    if ignore_index >= 0:  # native's rule: a negative ignore_index (the default) is accepted
        raise RuntimeError(
            f"ignore_index={ignore_index}: ignore_index is not supported for probability "
            "(floating-point) targets; pass class indices, or leave ignore_index negative"
        )
    if target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "target: the fused head gives no gradient for a probability target that requires "
            "grad; detach it, or use F.cross_entropy(F.linear(...))"
        )


def check_ce_options(
    x: Tensor,
    weight: Tensor,
    target: Any,
    ignore_index: int,
    class_weight: Any,
    label_smoothing: Any,
    lse_square_scale: Any,
    softcap: Any,
) -> CEOptions:
    """The target and the options of the head, checked; returns them as a `CEOptions`."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.device != x.device:
        raise RuntimeError(
            f"target: on device {target.device} but input is on {x.device}; "
            "expected all tensors on the same device"
        )
    classes = weight.shape[0]
    prob = target.is_floating_point()
    if prob:
        _check_prob_target(target, x, classes, ignore_index)
    else:
        check_class_target(target, x, ignore_index)
    if class_weight is not None:
        if not isinstance(class_weight, Tensor) or not class_weight.is_floating_point():
            got = class_weight.dtype if isinstance(class_weight, Tensor) else type(class_weight).__name__
            raise TypeError(f"class_weight: expected a floating tensor of shape ({classes},), got {got}")
        if tuple(class_weight.shape) != (classes,) or class_weight.device != x.device:
            raise ValueError(
                f"class_weight: got shape {tuple(class_weight.shape)} on {class_weight.device}; "
                f"expected one weight per class, shape ({classes},), on {x.device}"
            )
        if class_weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "class_weight: requires grad, but the class weights get no gradient (as in "
                "F.cross_entropy); detach them"
            )
    cap = 0.0 if softcap is None else _real("softcap", softcap, 0.0, open_low=True)
    return CEOptions(
        label_smoothing=_real("label_smoothing", label_smoothing, 0.0, 1.0),
        lse_square_scale=_real("lse_square_scale", lse_square_scale, 0.0),
        softcap=cap,
        prob_target=prob,
    )
