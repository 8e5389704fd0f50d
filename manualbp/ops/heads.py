"""Fused output heads: the last linear layer and its loss, chunk by chunk over the rows.

`F.cross_entropy(F.linear(x, W, b), t)` materialises the (M × C) logits, keeps them for backward
and then allocates their (M × C) gradient — for a language-model head (C = 50k-250k classes) that
dwarfs every other activation. Here the rows are processed `chunk_size` at a time, and for each
chunk forward already computes everything backward needs (as Liger-Kernel's fused linear
cross-entropy does):

    z   = x_c Wᵀ + b                         (chunk × C), the only class-sized buffer
    ℓ_i = logsumexp(z_i) − z_i[t_i]          the seed's cost for one example
    G   = (softmax(z) − onehot(t)) · s_i     ∂C/∂z, written over z (s_i = 1/count for "mean")
    grad_x[c] = G W,   grad_W += Gᵀ x_c,   grad_b += Σ_rows G

so backward only multiplies the precomputed gradients by the incoming scalar ∂C/∂loss. Peak
extra memory is O(chunk × C) plus the gradients themselves (the sizes of x, W and b); no
(M × C) tensor is ever allocated or saved. With reduction="none" the row weights ∂C/∂ℓ_i are
unknown until backward, so forward keeps only its inputs and backward runs the same chunk loop
with them (one more pass of the forward GEMM).

`linear_mse_loss` is the same head for a regression output: G = 2 (y − t) · s.

Backends: the reference computes in torch ops (16-bit inputs in float32, rounded once at the end);
the Triton backend runs the layer GEMM kernels and, for cross-entropy, the softmax/loss/gradient
kernel of `manualbp.triton_kernels.cross_entropy`. On the Triton backend the logits and their
gradient are stored in the input dtype (as native F.linear would), and for 16-bit inputs each
chunk's weight gradient is rounded to the storage dtype before the float32 sum over chunks.

torch.compile / torch.export: eager calls run the autograd Functions below. While a graph is
captured (`torch.compiler.is_compiling()`) the heads call `torch.library` custom ops instead,
opaque to the tracer as the layer's ops of `manualbp.ops` are (no graph break, and an exported
program records them by name):

    manualbp::linear_cross_entropy_forward(x, weight, bias?, target, reduction, ignore_index,
        chunk_size, need_x, need_weight, need_bias, backend) -> (loss, grad_x, grad_weight, grad_bias)
    manualbp::linear_cross_entropy_backward(grad_loss, x, weight, bias?, target, ignore_index,
        chunk_size, need_x, need_weight, need_bias, backend) -> (grad_x, grad_weight, grad_bias)
    manualbp::linear_mse_forward(x, weight, bias?, target, reduction, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (loss, 4 gradients)
    manualbp::linear_mse_backward(grad_loss, x, weight, bias?, target, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (4 gradients)

They run the Functions' own forward/backward bodies. The forward op precomputes the gradients
named by its need flags (read from `requires_grad` at trace time); for "mean"/"sum" the compiled
backward only scales them (plain torch ops). The backward op runs the chunk loop again with
per-row weights ∂C/∂ℓ_i: for reduction "none", and for any gradient autograd wants that forward
did not precompute (an exported program run with other `requires_grad` than it was traced with —
only then are the inputs saved too). Unneeded gradients are (0,)-shaped placeholders (ops return
neither None nor aliases). The class-range check of the targets reads their values, so it runs
inside the forward op at run time. `backend` ("torch" or "triton") is the one in force at trace
time, baked into the graph as for `manualbp.ops`; the Triton backend runs inside the opaque op
(the heads have no `triton_op` form that Inductor could see into).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from manualbp import backends
from manualbp._autograd import PositionalFunction
from manualbp.backends import reference
from manualbp.backends.reference import compute_dtype, up
from manualbp.ops._common import (
    NS,
    autocast_on,
    autocast_to,
    backend_module,
    check_class_range,
    check_tensor,
    no_autocast,
)
from manualbp.ops.chunked import (
    Head,
    HeadCtx,
    check_chunk,
    check_head,
    default_chunk_size,
    fake_grads,
    filled,
    gemms_for,
    grads_from,
    head_backward,
    logits,
    no_graph_backward,
    op_grads,
    or_placeholder,
    requested,
    run_chunks,
    save_head,
    save_op_head,
    scaled_all,
    split_saved,
    traced_backend,
)
from manualbp.ops.linear_act import linear, tangent_z

# The squared-error head is its own family; the heads' namespace offers both.
from manualbp.ops.linear_mse import (
    LinearMSEFunction,
    linear_mse_backward,
    linear_mse_forward,
    linear_mse_loss,
)
from manualbp.ops.losses import cross_entropy

__all__ = [
    "LinearCrossEntropyFunction",
    "LinearMSEFunction",
    "default_chunk_size",
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_mse_backward",
    "linear_mse_forward",
    "linear_mse_loss",
]


# ------------------------------------------------------------------------------ cross-entropy


def _ce_reference(
    z: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss and (softmax − onehot)·scale of a chunk, in torch ops.

    `z` is the chunk's own logits buffer (compute dtype): the gradient is formed in it, in place,
    so the chunk needs no second (rows × C) buffer.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
    lse = torch.logsumexp(z, dim=1)  # a row of only −inf gives −inf, and a NaN loss, as native
    loss = torch.where(valid, lse - z.gather(1, safe_target).squeeze(1), torch.zeros_like(lse))
    if scale is None:
        return loss, None
    grad = z.sub_(lse.unsqueeze(1)).exp_()  # softmax
    grad.scatter_add_(1, safe_target, -torch.ones_like(lse).unsqueeze(1))
    grad.mul_(scale.to(z.dtype).unsqueeze(1))
    # Ignored rows get exactly 0 — a select, so a NaN/Inf row or scale cannot leak into them.
    return loss, grad.masked_fill_(~valid.unsqueeze(1), 0)


def _ce_triton(
    z: Tensor, target: Tensor, ignore_index: int, scale: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    from manualbp.triton_kernels.cross_entropy import cross_entropy_rows

    scale32 = None if scale is None else scale.float().contiguous()
    loss, _ = cross_entropy_rows(z, target, scale32, ignore_index)  # gradient written over z
    return loss, (None if scale is None else z)


def _ce_head(
    backend: ModuleType,
    target: Tensor,
    ignore_index: int,
    losses: Tensor,
    row_scale: Tensor | None,
) -> Head:
    """Head closure: writes each chunk's per-row losses into `losses`, returns its ∂C/∂z."""
    rows_fn = _ce_reference if backend is reference else _ce_triton

    def head(z: Tensor, rows: slice) -> Tensor | None:
        scale = None if row_scale is None else row_scale[rows]
        loss, grad = rows_fn(z, target[rows], ignore_index, scale)
        losses[rows] = loss
        return grad

    return head


class LinearCrossEntropyFunction(PositionalFunction):
    """C = reduce_i [logsumexp(x_i Wᵀ + b) − (x_i Wᵀ + b)[t_i]], gradients precomputed per chunk.

    Inputs are flattened: x (M, K), target (M,). Outputs: the loss and the three precomputed
    gradients (non-differentiable; empty when not wanted or when reduction="none").
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target: Tensor,
        reduction: str,
        ignore_index: int,
        chunk_size: int,
        needs: tuple[bool, bool, bool],
        backend: ModuleType,
    ) -> tuple[Tensor, ...]:
        cdt = compute_dtype(x.dtype)
        valid = target != ignore_index
        count = valid.sum()
        losses = x.new_empty(x.shape[0], dtype=cdt)
        precompute = reduction != "none" and any(needs)
        row_scale = None
        if precompute:
            ones = torch.ones_like(losses)
            row_scale = ones / count if reduction == "mean" else ones  # 1/0 only on ignored rows
        head = _ce_head(backend, target, ignore_index, losses, row_scale)
        grads = run_chunks(
            x, weight, bias, chunk_size, gemms_for(backend), head, needs if precompute else (False,) * 3
        )
        if reduction == "none":
            loss = losses
        elif reduction == "sum":
            loss = losses.sum()
        else:
            loss = losses.sum() / count  # 0/0 = NaN when every row is ignored, as native
        # In the compute dtype: the entry point rounds it to x's dtype unless autocast is on.
        return (loss, *(or_placeholder(g, x) for g in grads))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, target, reduction, ignore_index, chunk_size, needs, backend = inputs
        _, *grads = output
        save_head(ctx, x, weight, bias, target, reduction, grads)
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        ctx.needs, ctx.backend = needs, backend

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, *_: Any) -> tuple:
        """Forward mode: ℓ̇_i = Σ_c softmax(z_i)_c ż_ic − ż_i[t_i], for all rows at once."""
        x, weight, bias, target = ctx.saved_tensors
        z, z_t = logits(x, weight, bias), tangent_z(x, weight, x_t, weight_t, bias_t)
        valid = target != ctx.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
        losses_t = (torch.softmax(z, dim=1) * z_t).sum(1) - z_t.gather(1, safe_target).squeeze(1)
        losses_t = torch.where(valid, losses_t, torch.zeros_like(losses_t))
        if ctx.reduction != "none":
            losses_t = losses_t.sum() / (valid.sum() if ctx.reduction == "mean" else 1)
        return losses_t, None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor) -> tuple:
        return head_backward(
            LinearCrossEntropyFunction._backward, _ce_differentiable_backward, ctx, grad_loss
        )

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple:
        grads, inputs = split_saved(ctx)
        if ctx.reduction != "none":
            grad_x, grad_weight, grad_bias = scaled_all(grads, ctx.needs, grad_loss)
        else:
            x, weight, bias, target = inputs
            losses = torch.empty(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
            head = _ce_head(ctx.backend, target, ctx.ignore_index, losses, grad_loss)
            grad_x, grad_weight, grad_bias = run_chunks(
                x, weight, bias, ctx.chunk_size, gemms_for(ctx.backend), head, ctx.needs
            )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _ce_differentiable_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    """G = (softmax(z) − onehot(t)) · ∂C/∂ℓ_i for all rows at once, in differentiable torch ops."""
    _, (x, weight, bias, target) = split_saved(ctx)
    z = logits(x, weight, bias)
    valid = target != ctx.ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long().unsqueeze(1)
    onehot = torch.zeros_like(z).scatter(1, safe_target, 1.0)
    row_grad = up(grad_loss).expand(target.shape)
    if ctx.reduction == "mean":
        row_grad = row_grad / valid.sum()
    row_grad = torch.where(valid, row_grad, torch.zeros_like(row_grad))  # ignored rows: exactly 0
    grad_z = (torch.softmax(z, dim=1) - onehot) * row_grad.unsqueeze(1)
    grads = grads_from(grad_z, x, weight, ctx.needs_input_grad[:3])
    return (*grads, None, None, None, None, None, None)


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f"{NS}::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_weight, grad_bias) of `LinearCrossEntropyFunction.forward`."""
    # The range check reads target values, which a tracer cannot: it runs here, at run time.
    check_class_range(target, weight.shape[0], ignore_index)
    needs = (need_x, need_weight, need_bias)
    module = backend_module(backend)
    with no_autocast(x.device.type):
        return LinearCrossEntropyFunction.forward(  # type: ignore[return-value]
            x, weight, bias, target, reduction, ignore_index, chunk_size, needs, module
        )


@torch.library.custom_op(f"{NS}::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) for row weights ∂C/∂ℓ_i = grad_loss[i] (shape (M,)).

    The chunk loop of reduction "none"; also what the autograd formula calls (with the weights of
    "mean"/"sum") for a gradient that forward did not precompute.
    """
    needs = (need_x, need_weight, need_bias)
    ctx = HeadCtx((x, weight, bias, target), needs, backend_module(backend), chunk_size,
                   ignore_index)  # fmt: skip
    with no_autocast(x.device.type):
        grads = LinearCrossEntropyFunction._backward(ctx, grad_loss)[:3]
    return filled(grads, x)  # type: ignore[return-value]


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_forward_fake(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    none = reduction == "none"
    loss = x.new_empty(x.shape[:1] if none else (), dtype=compute_dtype(x.dtype))
    needs = (False,) * 3 if none else (need_x, need_weight, need_bias)
    return (loss, *fake_grads(x, weight, None, needs))  # type: ignore[return-value]


@linear_cross_entropy_backward.register_fake
def _linear_cross_entropy_backward_fake(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return fake_grads(x, weight, None, (need_x, need_weight, need_bias))  # type: ignore[return-value]


def _ce_op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, target, reduction, ignore_index, chunk_size, *needs, backend = inputs
    save_op_head(ctx, (x, weight, bias, target), reduction, output[1:], tuple(needs))
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend


def _ce_op_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    def late_op(grad_loss: Tensor, late: tuple) -> tuple:
        x, weight, bias, target = ctx.saved_tensors[3:]
        row_grad = grad_loss.to(compute_dtype(x.dtype))  # ∂C/∂ℓ_i per row
        if ctx.reduction == "mean":
            row_grad = row_grad / (target != ctx.ignore_index).sum()
        return linear_cross_entropy_backward(
            row_grad.expand(target.shape), x, weight, bias, target, ctx.ignore_index,
            ctx.chunk_size, *late, ctx.backend,
        )  # fmt: skip

    return (*op_grads(ctx, grad_loss, late_op), *(None,) * 8)


linear_cross_entropy_forward.register_autograd(
    lambda ctx, grad_loss, *_: head_backward(_ce_op_backward, no_graph_backward, ctx, grad_loss),
    setup_context=_ce_op_setup_context,
)


# ------------------------------------------------------------------------------ entry point


def _check_class_target(target: Any, x: Tensor, ignore_index: int) -> Tensor:
    """The checks of `manualbp.functional.cross_entropy`, for targets of shape x.shape[:-1].

    All but the class range, which reads values: the caller (eager) or the op (compiled) runs it.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target: expected integer class indices (e.g. torch.long), got dtype {target.dtype}; "
            "class-probability targets are not supported"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    expected = tuple(x.shape[:-1])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target: shape {tuple(target.shape)} does not fit input of shape {tuple(x.shape)}; "
            f"expected {expected} (one class index per row of input)"
        )
    if target.device != x.device:
        raise RuntimeError(
            f"target: on device {target.device} but input is on {x.device}; "
            "expected all tensors on the same device"
        )
    return target


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """`F.cross_entropy(F.linear(x, weight, bias), target, ...)` without the (M × C) logits.

    `x` is (..., in_features), `weight` (classes, in_features), `target` holds one class index
    per row of `x` (shape x.shape[:-1]). Rows whose target is `ignore_index` contribute neither
    loss nor gradient; "mean" divides by the number of the other rows. `chunk_size` rows are
    processed at a time (default: `default_chunk_size`), so peak extra memory is
    O(chunk_size × classes). Gradients are computed in forward; backward scales them.

    Under `torch.autocast` the GEMMs run in the autocast dtype and the loss is float32, as
    `F.cross_entropy(F.linear(...))` gives there.
    """
    check_tensor("input", x)
    autocast = autocast_on(x.device.type)
    x, weight, bias = autocast_to(x.device.type, None, x, weight, bias)
    check_head(x, weight, bias, reduction)
    _check_class_target(target, x, ignore_index)
    rows = x.reshape(-1, x.shape[-1])
    chunk = check_chunk(chunk_size, rows.shape[0], weight.shape[1], weight.shape[0])
    args = (rows, weight, bias, target.reshape(-1), reduction, int(ignore_index), chunk)
    if torch._C._are_functorch_transforms_active():
        # vmap / jvp / grad transforms: the layer and the loss as two Functions (they support
        # them); the logits are materialised, and the class range is not read on the host.
        loss = cross_entropy(linear(rows, weight, bias), target.reshape(-1), reduction, ignore_index)
        return loss.view(target.shape) if reduction == "none" else loss
    needs = requested(x, weight, bias)
    with no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            loss, *_ = linear_cross_entropy_forward(*args, *needs, traced_backend(x.device))
        else:
            check_class_range(target, weight.shape[0], ignore_index)
            loss, *_ = LinearCrossEntropyFunction.apply(*args, needs, backends.resolve(x.device))
        # Computed in float32 for 16-bit inputs: float32 under autocast, as native; else x's dtype.
        loss = loss if autocast else loss.to(x.dtype)
    return loss.view(target.shape) if reduction == "none" else loss
