"""The network-mode sweep on the fast path (:mod:`manualbp.backends.fast`): first order, CPU.

The same loop as :func:`manualbp.ops.network._backward_loop` with the reference step inlined:

    δᴸ    = ∂C/∂aᴸ ⊙ f′ᴸ                  one ATen activation-backward kernel
    ∇Wˡ   = δˡᵀ aˡ⁻¹,  ∇bˡ = Σ δˡ         fresh tensors (handed to autograd)
    δˡ⁻¹  = f′ˡ⁻¹ ⊙ (δˡ Wˡ)               the GEMM writes into a flat buffer, f′ in place

Everything about the stack that does not change from step to step — where each parameter sits
in the flat list, each layer's bound δ kernel, which layers the loop visits for a given set of
wanted gradients — is worked out once, in a :class:`Sweep` (one per stack structure), so the
loop itself is GEMMs and kernels.

The δ temporaries live in one buffer borrowed from the owner's workspace (fresh without one)
and in the kept tensors the sweep has finished with; the gradient of the input, and every
parameter gradient, is always a fresh tensor. With `release` (the graph is not retained) each
layer's kept tensor is dropped as soon as the sweep has used it — for δ of its layer and as the
input of the layer above's weight gradient — so the peak of backward does not hold every
activation next to every parameter gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from manualbp.activations import Activation
from manualbp.backends import fast

__all__ = ["Sweep", "fast_sweep", "sweep_for"]

# One visited layer: (layer, index of W, index of b or -1, want ∇W, want ∇b, form δ below,
# its input is x or the layer below's kept tensor).
_Visit = tuple[int, int, int, bool, bool, bool, bool]


class Sweep:
    """The static part of the sweep of one stack structure (activations, which layers have a bias)."""

    def __init__(self, acts: Sequence[Activation], has_bias: Sequence[bool]) -> None:
        self.acts, self.depth = tuple(acts), len(acts)
        index, j = [], 0
        for b in has_bias:
            index.append((j, j + 1 if b else -1))
            j += 2 if b else 1
        self.index, self.n_params = tuple(index), j
        self.deltas = tuple(fast.delta_into(a) for a in acts)
        # The network output is the caller's: δ is never written over it.
        self.top_is_output = self.acts[-1].uses_output
        self._visits: dict[tuple[bool, ...], tuple[tuple[_Visit, ...], tuple[int, ...]]] = {}

    def visits(self, needs: tuple[bool, ...]) -> tuple[tuple[_Visit, ...], tuple[int, ...]]:
        """The layers the loop visits for autograd's `needs_input_grad` (x, plan, *params), top
        down to the lowest one a gradient is wanted for, and the weights whose GEMMs write δ into
        a buffer (their in_features size it). Cached: a model sees one or two such tuples."""
        found = self._visits.get(needs)
        if found is not None:
            return found
        flags = needs[2:]
        wants = [(bool(flags[w]), b >= 0 and bool(flags[b])) for w, b in self.index]
        if needs[0]:
            lowest = -1
        else:
            lowest = next((i for i, (w, b) in enumerate(wants) if w or b), self.depth)
        visits = tuple(
            (layer, *self.index[layer], *wants[layer], layer - 1 >= lowest,
             layer == 0 or self.acts[layer - 1].uses_output)
            for layer in range(self.depth - 1, max(lowest, 0) - 1, -1)
        )  # fmt: skip
        buffered = tuple(v[1] for v in visits if v[5] and v[0] > 0)
        self._visits[needs] = found = (visits, buffered)
        return found


@functools.lru_cache(maxsize=64)
def sweep_for(acts: tuple[Activation, ...], has_bias: tuple[bool, ...]) -> Sweep:
    """The (shared) :class:`Sweep` of a stack structure."""
    return Sweep(acts, has_bias)


# Below this many bytes per δ temporary the sweep allocates them fresh, as native autograd does:
# the allocator serves such sizes from its free lists at once, cheaper than the bookkeeping of
# reuse. Above it (the allocator's mmap range: fresh pages, faults) it reuses buffers.
REUSE_BYTES = 256 * 1024


def fast_sweep(
    spec: Sweep,
    needs: tuple[bool, ...],
    x: Tensor,
    kept: list[Tensor | None],
    params: Sequence[Tensor],
    grad_out: Tensor,
    release: bool,
    workspace: Any,
    inputs: list[Tensor | None] | None = None,
    lent: Tensor | None = None,
) -> tuple:
    """(grad_x, None, *parameter grads) of the stack, as autograd wants them from the node.

    `kept` is the per-layer list of kept tensors, the sweep's own when `release` (it drops its
    entries as it goes and may overwrite their storage: they are reachable from it alone then).
    Kept tensors are the forward's fresh, contiguous GEMM/activation results (or a view of `lent`),
    so their flat views are whole storages.

    `inputs`, when given, holds per layer the a = f(z) the forward kept next to z (GELU-class
    hidden layers; None elsewhere): the layer above's weight gradient reads it instead of
    recomputing f(z), and with `release` it is dropped (and its storage reused) once read.
    `lent` is the workspace buffer the forward wrote a kept tensor into: with `release` the sweep
    gives it back to `workspace` when it returns (it then takes none of its own); without, the
    graph still holds it, and it is left to the graph.
    """
    visits, buffered = spec.visits(needs)
    grads: list[Tensor | None] = [None] * spec.n_params
    if not visits:
        if lent is not None and release:
            kept.clear()
            workspace.give(lent)
        return (None, None, *grads)
    rows = grad_out.shape[0]
    free: list[Tensor] | None = None  # flat buffers this sweep may overwrite (at most two held)
    borrowed = None
    if lent is not None and release:
        borrowed = lent  # given back below; its kept tensor is reachable from the sweep alone
        if buffered and rows:
            numel = rows * _widest(params, buffered)
            free = [] if numel * grad_out.element_size() >= REUSE_BYTES else None
    elif buffered and rows:
        numel = rows * _widest(params, buffered)
        if numel * grad_out.element_size() >= REUSE_BYTES:
            free = []
            if workspace is not None:
                borrowed = workspace.take(numel, grad_out)
                free.append(borrowed)
    try:
        top = spec.depth - 1
        top_delta, top_kept = spec.deltas[top], kept[top]
        d_buf: Tensor | None = None  # the flat buffer d lives in, when it is one of ours
        if top_delta is None:
            d = grad_out
        elif release and not spec.top_is_output:
            d = top_delta(grad_out, top_kept, top_kept)  # type: ignore[arg-type]  # over the kept z
            d_buf = top_kept.view(-1) if free is not None else None  # type: ignore[union-attr]
        else:
            d = fast.delta(spec.acts[top], grad_out, top_kept)  # type: ignore[arg-type]
        del top_kept
        if release:
            kept[top] = None
        grad_x = None
        for layer, wi, bi, need_weight, need_bias, need_prev, input_kept in visits:
            if need_weight:
                if input_kept:  # x, or the a that layer below keeps for its own f′
                    grads[wi] = torch.mm(d.t(), x if layer == 0 else kept[layer - 1])  # type: ignore[arg-type]
                else:
                    a_in = _layer_input(x, spec.acts, kept, inputs, layer)
                    grads[wi] = torch.mm(d.t(), a_in)
                    if release:
                        # A kept or recomputed f(z): ours alone, so its storage may take a δ.
                        if free is not None:
                            _hold(free, a_in)
                        if inputs is not None:
                            inputs[layer - 1] = None
                    del a_in
            if need_bias:
                grads[bi] = d.sum(0)
            if not need_prev:
                continue
            weight = params[wi]
            if layer == 0:
                grad_x = torch.mm(d, weight)  # handed to autograd: a fresh tensor
                continue
            if free is None:
                g = torch.mm(d, weight)
            else:
                width = weight.shape[1]
                n = rows * width
                g_buf = _take(free, n, grad_out)
                g = torch.mm(d, weight, out=g_buf[:n].view(rows, width))
                if d_buf is not None:
                    free.append(d_buf)
                d_buf = g_buf
            prev_delta = spec.deltas[layer - 1]
            d = g if prev_delta is None else prev_delta(g, kept[layer - 1], g)  # type: ignore[arg-type]
            if release:
                if free is not None:
                    _hold(free, kept[layer - 1])
                kept[layer - 1] = None
        return (grad_x, None, *grads)
    finally:
        if borrowed is not None:
            if borrowed is lent:
                kept.clear()  # the views of it the sweep did not reach
            workspace.give(borrowed)


def _widest(params: Sequence[Tensor], weights: Sequence[int]) -> int:
    width = 0
    for i in weights:
        n = params[i].shape[1]
        if n > width:
            width = n
    return width


def _take(free: list[Tensor], numel: int, like: Tensor) -> Tensor:
    for i, b in enumerate(free):
        if b.numel() >= numel:
            return free.pop(i)
    return like.new_empty(numel)


def _hold(free: list[Tensor], t: Tensor | None) -> None:
    # At most two spare buffers are held (δ needs one per step); the rest are freed now.
    if t is not None and len(free) < 2:
        free.append(t.view(-1))


def _layer_input(
    x: Tensor, acts: Sequence[Activation], kept: list[Tensor | None],
    inputs: list[Tensor | None] | None, layer: int,
) -> Tensor:  # fmt: skip
    """aˡ⁻¹: x, the kept a (in `kept`, or next to z in `inputs`), or f(z) recomputed from the kept
    z (the same kernel on the same z as forward, so the same values, bfloat16 included)."""
    if layer == 0:
        return x
    if inputs is not None:
        kept_a = inputs[layer - 1]
        if kept_a is not None:
            return kept_a
    prev = kept[layer - 1]
    assert prev is not None
    return prev if acts[layer - 1].uses_output else acts[layer - 1](prev)
