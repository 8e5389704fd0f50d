"""The network-mode sweep on the fast path (:mod:`manualbp.backends.fast`): first order, CPU.

The same loop as :func:`manualbp.ops.network._backward_loop` with the reference step inlined:

    δᴸ    = ∂C/∂aᴸ ⊙ f′ᴸ                  one ATen activation-backward kernel
    ∇Wˡ   = δˡᵀ aˡ⁻¹,  ∇bˡ = Σ δˡ         fresh tensors (handed to autograd)
    δˡ⁻¹  = f′ˡ⁻¹ ⊙ (δˡ Wˡ)               the GEMM writes into a workspace buffer, f′ in place

The δ temporaries ping-pong between two buffers borrowed from the owner's workspace (or fresh
ones without a workspace); the gradient of the input is always a fresh tensor. With `release`
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
    top_identity = acts[top].name == "identity"
    widths = [layers[i][0].shape[1] for i in range(stop + 1, top + 1)]
    if not top_identity:
        widths.append(grad_out.shape[1])
    numel = rows * max(widths, default=0)
    ws = plan.workspace
    bufs = [ws.take(numel, grad_out), ws.take(numel, grad_out)] if ws is not None and numel else None

    try:
        if top_identity:
            d = grad_out
        else:
            out = None if bufs is None else bufs[0][: grad_out.numel()].view(grad_out.shape)
            d = fast.delta(acts[top], grad_out, kept[top], out)  # type: ignore[arg-type]
        if release:
            kept[top] = None
        which, grad_x = 0, None
        for layer in range(top, stop - 1, -1):
            weight = layers[layer][0]
            need_weight, need_bias = wants[layer]
            j, has_bias = offsets[layer]
            if need_weight:
                grads[j] = torch.mm(d.t(), _layer_input(x, acts, kept, layer))
            if need_bias:
                grads[j + 1] = d.sum(0)
            if layer - 1 < lowest:
                continue
            if layer == 0:
                grad_x = torch.mm(d, weight)  # handed to autograd: a fresh tensor
                continue
            if bufs is None:
                g = torch.mm(d, weight)
            else:
                which ^= 1
                width = weight.shape[1]
                g = torch.mm(d, weight, out=bufs[which][: rows * width].view(rows, width))
            prev = acts[layer - 1]
            d = g if prev.name == "identity" else fast.delta(prev, g, kept[layer - 1], g)  # type: ignore[arg-type]
            if release:
                kept[layer - 1] = None
        return (grad_x, None, *grads)
    finally:
        if bufs is not None:
            for buf in bufs:
                ws.give(buf)


def _layer_input(x: Tensor, acts: Any, kept: list[Tensor | None], layer: int) -> Tensor:
    """aˡ⁻¹: x, the kept a, or f(z) recomputed from the kept z (float32/float64: no casts)."""
    if layer == 0:
        return x
    prev = kept[layer - 1]
    assert prev is not None
    return prev if acts[layer - 1].uses_output else acts[layer - 1](prev)
