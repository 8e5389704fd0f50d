"""Fused output heads: the last linear layer and its loss, chunk by chunk over the rows.

`F.cross_entropy(F.linear(x, W, b), t)` materialises the (M × C) logits, keeps them for backward
and then allocates their (M × C) gradient — for a language-model head (C = 50k-250k classes) that
dwarfs every other activation. Here the rows are processed `chunk_size` at a time, and for each
chunk forward already computes everything backward needs (as Liger-Kernel's fused linear
cross-entropy does):

    z   = x_c Wᵀ + b                         (chunk × C), the chunk's class-sized buffer
    ℓ_i = logsumexp(z_i) − z_i[t_i]          the seed's cost for one example
    G   = (softmax(z) − onehot(t)) · s_i     ∂C/∂z, written over z (s_i = 1/count for "mean")
    grad_x[c] = G W,   grad_W += Gᵀ x_c,   grad_b += Σ_rows G

so backward only multiplies the precomputed gradients by the incoming scalar ∂C/∂loss. Peak
extra memory is O(chunk × C) plus the gradients themselves (the sizes of x, W and b); no
(M × C) tensor is ever allocated or saved. With reduction="none" the row weights ∂C/∂ℓ_i are
unknown until backward, so forward keeps only its inputs and backward runs the same chunk loop
with them (one more pass of the forward GEMM).

With the options (class weights, label smoothing, z-loss, logit softcap, probability targets)
ℓ_i and G are those stated in :mod:`manualbp.ops.ce_rows`, which holds the per-chunk math of
both backends; this module holds the chunk loop's Function, its custom ops and the entry point.
A probability target is the caller's own (M × C) tensor, read a chunk at a time (the kernel
reads it in place; the reference forms one chunk-sized buffer from it).

`linear_mse_loss` is the same head for a regression output: G = 2 (y − t) · s.

Backends: the reference computes in torch ops — with grad mode off (every first-order call) in
the in-place loop of `manualbp.ops.chunked_inplace` (one chunk buffer, GEMMs writing where their
results go; bfloat16 GEMMs in bfloat16 as native's, the loss math and the weight-gradient sum in
float32), under a differentiable backward in float32 for 16-bit inputs, rounded once at the end;
the Triton backend runs the layer GEMM kernels and, for cross-entropy, the softmax/loss/gradient
kernel of `manualbp.triton_kernels.cross_entropy`. On the Triton backend the logits and their
gradient are stored in the input dtype (as native F.linear would), and for 16-bit inputs each
chunk's weight gradient is rounded to the storage dtype before the float32 sum over chunks.

torch.compile / torch.export: eager calls run the autograd Functions below. While a graph is
captured (`torch.compiler.is_compiling()`) the heads call `torch.library` custom ops instead,
opaque to the tracer as the layer's ops of `manualbp.ops` are (no graph break, and an exported
program records them by name):

    manualbp::linear_cross_entropy_forward(x, weight, bias?, target, class_weight?, reduction,
        ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size, need_x,
        need_weight, need_bias, backend) -> (loss, lse, grad_x, grad_weight, grad_bias)
    manualbp::linear_cross_entropy_backward(grad_rows, z_grad_rows, x, weight, bias?, target,
        class_weight?, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_size,
        need_x, need_weight, need_bias, backend) -> (grad_x, grad_weight, grad_bias)
    manualbp::linear_mse_forward(x, weight, bias?, target, reduction, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (loss, 4 gradients)
    manualbp::linear_mse_backward(grad_loss, x, weight, bias?, target, chunk_size,
        need_x, need_weight, need_bias, need_target, backend) -> (4 gradients)

They run the Functions' own forward/backward bodies. The forward op precomputes the gradients
named by its need flags (read from `requires_grad` at trace time); for "mean"/"sum" the compiled
backward only scales them (plain torch ops). The backward op runs the chunk loop again with
per-row weights (∂C/∂ce_i and ∂C/∂zl_i, which "mean" scales apart): for reduction "none", and for
any gradient autograd wants that forward did not precompute (an exported program run with other
`requires_grad` than it was traced with — only then are the inputs saved too). Unneeded gradients
are (0,)-shaped placeholders (ops return neither None nor aliases). The class-range check of the
targets reads their values, so it runs inside the forward op at run time. `backend` ("torch" or
"triton") is the one in force at trace time, baked into the graph as for `manualbp.ops`; the
Triton backend runs inside the opaque op (the heads have no `triton_op` form that Inductor could
see into).
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
from manualbp.ops.ce_rows import (
    CEOptions,
    check_ce_options,
    denominators,
    row_scales,
    rows_reference,
    rows_triton,
    valid_rows,
    z_loss_of,
)
from manualbp.ops.chunked import (
    Head,
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
    scaled_or_same,
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


Scales = tuple[Tensor, Tensor] | None  # (r, r_z) per row: ∂C/∂ce_i and ∂C/∂zl_i


def _ce_head(backend: ModuleType, target: Tensor, class_weight: Tensor | None, ignore_index: int,
             opts: CEOptions, ces: Tensor, lses: Tensor, scales: Scales) -> Head:  # fmt: skip
    """Head closure: writes each chunk's ce and lse rows into `ces`/`lses`, returns its ∂C/∂z."""
    rows_fn = rows_reference if backend is reference else rows_triton

    def head(z: Tensor, rows: slice) -> Tensor | None:
        scale, z_scale = (None, None) if scales is None else (scales[0][rows], scales[1][rows])
        ce, lse, grad = rows_fn(z, target[rows], class_weight, ignore_index, opts, scale, z_scale)
        ces[rows], lses[rows] = ce, lse
        return grad

    return head


def _ce_chunks(backend: ModuleType, x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
               class_weight: Tensor | None, ignore_index: int, opts: CEOptions, chunk_size: int,
               needs: tuple[bool, bool, bool], scales: Scales) -> tuple:  # fmt: skip
    """The chunk loop: (ce rows, lse rows, grad_x, grad_weight, grad_bias) for row weights `scales`."""
    cdt = compute_dtype(x.dtype)
    ces = x.new_empty(x.shape[0], dtype=cdt)
    lses = x.new_empty(x.shape[0], dtype=cdt)
    head = _ce_head(backend, target, class_weight, ignore_index, opts, ces, lses, scales)
    grads = run_chunks(x, weight, bias, chunk_size, gemms_for(backend), head,
                       needs if scales is not None else (False,) * 3)  # fmt: skip
    return ces, lses, *grads


def _stats(target: Tensor, class_weight: Tensor | None, ignore_index: int, opts: CEOptions,
           dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    valid = valid_rows(target, ignore_index, opts)
    return (valid, *denominators(target, class_weight, valid, opts, dtype))


class LinearCrossEntropyFunction(PositionalFunction):
    """C = reduce_i ℓ_i(x_i Wᵀ + b), ℓ_i as `manualbp.ops.ce_rows` states; gradients per chunk.

    Inputs are flattened: x (M, K), target (M,) or (M, C). Outputs: the loss, the per-row lse
    and the three precomputed gradients (non-differentiable; empty when not wanted or for "none").
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                class_weight: Tensor | None, reduction: str, ignore_index: int, chunk_size: int,
                needs: tuple[bool, bool, bool], opts: CEOptions,
                backend: ModuleType) -> tuple[Tensor, ...]:  # fmt: skip
        cdt = compute_dtype(x.dtype)
        valid, d, n = _stats(target, class_weight, ignore_index, opts, cdt)
        precompute = reduction != "none" and any(needs)
        one = torch.ones((), dtype=cdt, device=x.device)
        scales = row_scales(reduction, one, d, n, x.shape[0]) if precompute else None
        ces, lses, *grads = _ce_chunks(backend, x, weight, bias, target, class_weight, ignore_index,
                                       opts, chunk_size, needs, scales)  # fmt: skip
        losses = ces
        if opts.lse_square_scale:
            losses = ces + z_loss_of(lses, valid, opts, "none", n)
        if reduction == "none":
            loss = losses
        elif reduction == "sum":
            loss = losses.sum()
        else:  # 0/0 = NaN when every row is ignored, as native
            loss = ces.sum() / d
            if opts.lse_square_scale:
                loss = loss + z_loss_of(lses, valid, opts, "mean", n)
        # In the compute dtype: the entry point rounds it to x's dtype unless autocast is on.
        return (loss, lses, *(or_placeholder(g, x) for g in grads))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, target, class_weight, reduction, ignore_index, chunk_size, needs, opts, \
            backend = inputs  # fmt: skip
        _, lse, *grads = output
        save_head(ctx, x, weight, bias, target, reduction, grads, also=(lse,))
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        ctx.needs, ctx.backend, ctx.class_weight, ctx.options = needs, backend, class_weight, opts

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None, *_: Any) -> tuple:
        """Forward mode: ℓ̇_i = Σ_c (∂ℓ_i/∂z_ic) ż_ic, reduced — ∂ℓ/∂z for all rows at once."""
        x, weight, bias, target = ctx.saved_tensors
        z, z_t = logits(x, weight, bias), tangent_z(x, weight, x_t, weight_t, bias_t)
        grad_z = _full_grad_z(ctx, z, target, torch.ones((), dtype=z.dtype, device=z.device))
        losses_t = (grad_z * z_t).sum(1)
        return (losses_t if ctx.reduction == "none" else losses_t.sum()), None, None, None, None

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Tensor) -> tuple:
        return head_backward(
            LinearCrossEntropyFunction._backward, _ce_differentiable_backward, ctx, grad_loss
        )

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple:
        grads, inputs = split_saved(ctx)
        if ctx.reduction != "none":
            grad_x, grad_weight, grad_bias = scaled_or_same(grads, ctx.needs, grad_loss)
        else:
            x, weight, bias, target = inputs
            g = grad_loss.to(compute_dtype(x.dtype))
            _, _, grad_x, grad_weight, grad_bias = _ce_chunks(
                ctx.backend, x, weight, bias, target, ctx.class_weight, ctx.ignore_index,
                ctx.options, ctx.chunk_size, ctx.needs, (g, g),
            )  # fmt: skip
        return grad_x, grad_weight, grad_bias, *(None,) * 8


def _full_grad_z(ctx: Any, z: Tensor, target: Tensor, grad_loss: Tensor) -> Tensor:
    """∂C/∂z for all rows at once (torch ops, differentiable with grad mode on)."""
    _, d, n = _stats(target, ctx.class_weight, ctx.ignore_index, ctx.options, z.dtype)
    scales = row_scales(ctx.reduction, grad_loss, d, n, z.shape[0])
    grad_z = rows_reference(z, target, ctx.class_weight, ctx.ignore_index, ctx.options, *scales)[2]
    assert grad_z is not None
    return grad_z


def _ce_differentiable_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    """G = ∂C/∂z from the saved inputs in differentiable torch ops, then its three GEMMs."""
    _, (x, weight, bias, target) = split_saved(ctx)
    grad_z = _full_grad_z(ctx, logits(x, weight, bias), target, up(grad_loss))
    return (*grads_from(grad_z, x, weight, ctx.needs_input_grad[:3]), *(None,) * 8)
# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op(f"{NS}::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, grad_x, grad_weight, grad_bias) of `LinearCrossEntropyFunction.forward`."""
    opts = CEOptions(label_smoothing, lse_square_scale, softcap, target.is_floating_point())
    if not opts.prob_target:
        # The range check reads target values, which a tracer cannot: it runs here, at run time.
        check_class_range(target, weight.shape[0], ignore_index)
    needs = (need_x, need_weight, need_bias)
    module = backend_module(backend)
    with no_autocast(x.device.type):
        return LinearCrossEntropyFunction.forward(  # type: ignore[return-value]
            x, weight, bias, target, class_weight, reduction, ignore_index, chunk_size, needs, opts,
            module,
        )  # fmt: skip


@torch.library.custom_op(f"{NS}::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_rows: Tensor,
    z_grad_rows: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float,
    chunk_size: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) for row weights ∂C/∂ce_i = grad_rows[i] and
    ∂C/∂zl_i = z_grad_rows[i] (shape (M,) each).

    The chunk loop of reduction "none"; also what the autograd formula calls (with the weights of
    "mean"/"sum") for a gradient that forward did not precompute.
    """
    opts = CEOptions(label_smoothing, lse_square_scale, softcap, target.is_floating_point())
    needs = (need_x, need_weight, need_bias)
    with no_autocast(x.device.type):
        grads = _ce_chunks(backend_module(backend), x, weight, bias, target, class_weight,
                           ignore_index, opts, chunk_size, needs, (grad_rows, z_grad_rows))[2:]  # fmt: skip
    return filled(grads, x)  # type: ignore[return-value]


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_forward_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, class_weight: Tensor | None,
    reduction: str, ignore_index: int, label_smoothing: float, lse_square_scale: float,
    softcap: float, chunk_size: int, need_x: bool, need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    none = reduction == "none"
    cdt = compute_dtype(x.dtype)
    loss = x.new_empty(x.shape[:1] if none else (), dtype=cdt)
    needs = (False,) * 3 if none else (need_x, need_weight, need_bias)
    return (loss, x.new_empty(x.shape[:1], dtype=cdt), *fake_grads(x, weight, None, needs))  # type: ignore[return-value]


@linear_cross_entropy_backward.register_fake
def _linear_cross_entropy_backward_fake(
    grad_rows: Tensor, z_grad_rows: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
    target: Tensor, class_weight: Tensor | None, ignore_index: int, label_smoothing: float,
    lse_square_scale: float, softcap: float, chunk_size: int, need_x: bool, need_weight: bool,
    need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return fake_grads(x, weight, None, (need_x, need_weight, need_bias))  # type: ignore[return-value]


def _ce_op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, target, class_weight, reduction, ignore_index, smoothing, z_scale, cap, \
        chunk_size, *needs, backend = inputs  # fmt: skip
    save_op_head(ctx, (x, weight, bias, target, class_weight), reduction, output[2:], tuple(needs),
                 also=(output[1],))  # fmt: skip
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend
    ctx.option_args = (smoothing, z_scale, cap)


def _ce_op_backward(ctx: Any, grad_loss: Tensor) -> tuple:
    def late_op(grad_loss: Tensor, late: tuple) -> tuple:
        x, weight, bias, target, class_weight = ctx.saved_tensors[3:]
        smoothing, z_scale, cap = ctx.option_args
        opts = CEOptions(smoothing, z_scale, cap, target.is_floating_point())
        _, d, n = _stats(target, class_weight, ctx.ignore_index, opts, compute_dtype(x.dtype))
        scales = row_scales(ctx.reduction, grad_loss.to(d.dtype), d, n, x.shape[0])
        return linear_cross_entropy_backward(
            *(s.contiguous() for s in scales), x, weight, bias, target, class_weight,
            ctx.ignore_index, *ctx.option_args, ctx.chunk_size, *late, ctx.backend,
        )  # fmt: skip

    return (*op_grads(ctx, grad_loss, late_op), *(None,) * 12)


linear_cross_entropy_forward.register_autograd(
    lambda ctx, grad_loss, *_: head_backward(_ce_op_backward, no_graph_backward, ctx, grad_loss),
    setup_context=_ce_op_setup_context,
)


# ------------------------------------------------------------------------------ entry point


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    *,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_lse: bool = False,
) -> Any:
    """`F.cross_entropy(F.linear(x, weight, bias), target, ...)` without the (M × C) logits.

    `x` is (..., in_features), `weight` (classes, in_features); `target` holds one class index
    per row of `x` (shape x.shape[:-1]), or class probabilities (a floating tensor of shape
    (*x.shape[:-1], classes)). Rows whose class target is `ignore_index` contribute neither loss
    nor gradient. `chunk_size` rows are processed at a time (default: `default_chunk_size`), so
    peak extra memory is O(chunk_size × classes). Gradients are computed in forward; backward
    scales them. Options, with native's semantics (`manualbp.ops.ce_rows` states the math):

    * `class_weight` (C,): `F.cross_entropy`'s `weight` ("mean" divides by Σ w_t over the rows
      that count; torch's `F.linear_cross_entropy` calls it `weight` too). No gradient.
    * `label_smoothing` ε ∈ [0, 1]: the target mixed with the uniform distribution.
    * `lse_square_scale` λ ≥ 0: the z-loss λ·lse_i² added to each counted row's loss ("mean"
      averages it over those rows). `return_z_loss=True` also returns that term, reduced as the
      loss, and `return_lse=True` the per-row log-sum-exp (shape x.shape[:-1]; float32 for
      16-bit inputs): `(loss, z_loss, lse)`, those asked for, in that order. Both are
      non-differentiable diagnostics (the z-loss's gradient reaches x, W, b through `loss`).
    * `softcap` s > 0: the logits become s·tanh(z/s) before the softmax (Gemma-style).

    Under `torch.autocast` the GEMMs run in the autocast dtype and the loss is float32, as
    `F.cross_entropy(F.linear(...))` gives there.
    """
    check_tensor("input", x)
    autocast = autocast_on(x.device.type)
    x, weight, bias = autocast_to(x.device.type, None, x, weight, bias)
    check_head(x, weight, bias, reduction)
    opts = check_ce_options(x, weight, target, ignore_index, class_weight, label_smoothing,
                            lse_square_scale, softcap)  # fmt: skip
    classes = weight.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    target_rows = target.reshape(-1, classes) if opts.prob_target else target.reshape(-1)
    chunk = check_chunk(chunk_size, rows.shape[0], weight.shape[1], classes,
                        cpu=rows.device.type == "cpu")  # fmt: skip
    shape = x.shape[:-1]
    if torch._C._are_functorch_transforms_active():
        # vmap / jvp / grad transforms: the layer and the loss as two Functions (they support
        # them); the logits are materialised, and the class range is not read on the host.
        if opts != CEOptions() or class_weight is not None or return_z_loss or return_lse:
            raise NotImplementedError(
                "linear_cross_entropy: under torch.func transforms only the plain loss is "
                "supported (no class_weight, label_smoothing, z-loss, softcap, probability "
                "targets or returned lse/z_loss); compose F.linear and F.cross_entropy instead"
            )
        loss = cross_entropy(linear(rows, weight, bias), target_rows, reduction, ignore_index)
        return loss.view(shape) if reduction == "none" else loss
    needs = requested(x, weight, bias)
    with no_autocast(x.device.type):
        if torch.compiler.is_compiling():
            loss, lse, *_ = linear_cross_entropy_forward(
                rows, weight, bias, target_rows, class_weight, reduction, int(ignore_index),
                opts.label_smoothing, opts.lse_square_scale, opts.softcap, chunk, *needs,
                traced_backend(x.device),
            )  # fmt: skip
        else:
            if not opts.prob_target:
                check_class_range(target, classes, ignore_index)
            loss, lse, *_ = LinearCrossEntropyFunction.apply(
                rows, weight, bias, target_rows, class_weight, reduction, int(ignore_index), chunk,
                needs, opts, backends.resolve(x.device),
            )  # fmt: skip
        # Computed in float32 for 16-bit inputs: float32 under autocast, as native; else x's dtype.
        out_dtype = loss.dtype if autocast else x.dtype
        out = [loss.to(out_dtype)]
        if return_z_loss:
            valid, _, n = _stats(target_rows, class_weight, ignore_index, opts, lse.dtype)
            out.append(z_loss_of(lse, valid, opts, reduction, n).to(out_dtype))
        if return_lse:
            out.append(lse)
    out = [t.view(shape) if t.dim() == 1 else t for t in out]
    return out[0] if len(out) == 1 else tuple(out)
