"""The network-mode sweep on the fast path (:mod:`manualbp.backends.fast`): first order, CPU.

The same loop as :func:`manualbp.ops.network._backward_loop` with the reference step inlined:

    δᴸ    = ∂C/∂aᴸ ⊙ f′ᴸ                  one ATen activation-backward kernel
    ∇Wˡ   = δˡᵀ aˡ⁻¹,  ∇bˡ = Σ δˡ         fresh tensors (handed to autograd)
    δˡ⁻¹  = f′ˡ⁻¹ ⊙ (δˡ Wˡ)               the GEMM writes into a workspace buffer, f′ in place

The δ temporaries live in one buffer borrowed from the owner's workspace (fresh without one)
and in the kept tensors the sweep has finished with; the gradient of the input, and every
parameter gradient, is always a fresh tensor. With `release`
(the graph is not retained) each layer's kept tensor is dropped as soon as the sweep has used it
— for δ of its layer and as the input of the layer above's weight gradient — so the peak of
backward does not hold every activation next to every parameter gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from manualbp.backends import fast

__all__ = ["fast_sweep"]


def fast_sweep(
    needs_input_grad: tuple[bool, ...],
    plan: Any,
    x: Tensor,
    kept: list[Tensor | None],
    layers: list[tuple[Tensor, Tensor | None]],
    grad_out: Tensor,
    release: bool,
) -> tuple:
    """(grad_x, None, *parameter grads) of the stack, as autograd wants them from MLPFunction."""
    acts, depth = plan.acts, plan.depth
    flags = needs_input_grad[2:]
    offsets, j = [], 0
    for has_bias in plan.has_bias:
        offsets.append((j, has_bias))
        j += 2 if has_bias else 1
    wants = [(bool(flags[j]), bool(flags[j + 1]) if b else False) for j, b in offsets]
    if needs_input_grad[0]:
        lowest = -1
    else:
        lowest = next((i for i, (w, b) in enumerate(wants) if w or b), depth)
    top, stop = depth - 1, max(lowest, 0)
    grads: list[Tensor | None] = [None] * len(flags)
    if top < stop:
        return (None, None, *grads)

    rows = grad_out.shape[0]
    ws = plan.workspace
    # Flat buffers this sweep may overwrite: the one borrowed from the workspace, and — when the
    # graph is not retained — each kept tensor once the sweep is done with it (they are
    # reachable from this sweep alone then; the network output, kept by an output-derivable last
    # layer, is the caller's and never reused). So δ temporaries cost no allocation after the
    # first step, and no memory beyond the one borrowed buffer.
    free: list[Tensor] = []
    widths = [layers[i][0].shape[1] for i in range(stop + 1, top + 1)]
    borrowed = ws.take(rows * max(widths), grad_out) if ws is not None and widths and rows else None
    if borrowed is not None:
        free.append(borrowed)

    def buffer(width: int) -> Tensor:
        n = rows * width
        for i, b in enumerate(free):
            if b.numel() >= n:
                return free.pop(i)
        return grad_out.new_empty(n)

    def recycle(t: Tensor | None) -> None:
        # At most two spare buffers are held (δ needs one per step); the rest are freed now.
        if t is not None and release and len(free) < 2 and t._base is None and t.is_contiguous():
            free.append(t.view(-1))

    try:
        top_kept = kept[top]
        d_buf: Tensor | None = None  # the flat buffer d lives in, when it is one of ours
        if acts[top].name == "identity":
            d = grad_out
        elif release and top_kept is not None and top_kept is not outputs_top(plan, top_kept):
            d = fast.delta(acts[top], grad_out, top_kept, top_kept)  # δ over the kept z
            d_buf = top_kept.view(-1)
        else:
            d = fast.delta(acts[top], grad_out, top_kept)
        if release:
            kept[top] = None
        grad_x = None
        for layer in range(top, stop - 1, -1):
            weight = layers[layer][0]
            need_weight, need_bias = wants[layer]
            j, _ = offsets[layer]
            if need_weight:
                a_in = _layer_input(x, acts, kept, layer)
                grads[j] = torch.mm(d.t(), a_in)
                if layer > 0 and a_in is not kept[layer - 1]:
                    recycle(a_in)  # a recomputed f(z): a temporary of ours
                del a_in
            if need_bias:
                grads[j + 1] = d.sum(0)
            if layer - 1 < lowest:
                continue
            if layer == 0:
                grad_x = torch.mm(d, weight)  # handed to autograd: a fresh tensor
                continue
            width = weight.shape[1]
            g_buf = buffer(width)
            g = torch.mm(d, weight, out=g_buf[: rows * width].view(rows, width))
            if d_buf is not None:
                free.append(d_buf)
            d, d_buf = g, g_buf
            prev = acts[layer - 1]
            if prev.name != "identity":
                d = fast.delta(prev, g, kept[layer - 1], g)  # type: ignore[arg-type]
            if release:
                recycle(kept[layer - 1])
                kept[layer - 1] = None
        return (grad_x, None, *grads)
    finally:
        if ws is not None and borrowed is not None:
            ws.give(borrowed)


def outputs_top(plan: Any, top_kept: Tensor) -> Tensor | None:
    """The kept tensor of the last layer when it is the network output (the caller's), else None."""
    return top_kept if plan.acts[-1].uses_output else None


def _layer_input(x: Tensor, acts: Any, kept: list[Tensor | None], layer: int) -> Tensor:
    """aˡ⁻¹: x, the kept a, or f(z) recomputed from the kept z (float32/float64: no casts)."""
    if layer == 0:
        return x
    prev = kept[layer - 1]
    assert prev is not None
    return prev if acts[layer - 1].uses_output else acts[layer - 1](prev)
