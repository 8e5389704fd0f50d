"""The fused MLP: the whole stack's forward in one kernel, its backward in one δ sweep.

The same network as :mod:`manualbp.ops.network` (aᴸ = fᴸ(Wᴸ ⋯ f¹(W¹x + b¹) ⋯ + bᴸ)), the same
seed equations in backward,

    δᴸ = ∂C/∂aᴸ ⊙ f′ᴸ,   δˡ⁻¹ = (δˡ Wˡ) ⊙ f′ˡ⁻¹,   ∇Wˡ = δˡᵀ aˡ⁻¹,   ∇bˡ = Σ_rows δˡ,

but on :mod:`manualbp.triton_kernels.fused_mlp`: every layer of a row tile is computed on chip
in one launch (the activations between layers never go to memory, only what backward keeps),
and the backward sweeps δ from the last layer to the first in one launch, then reduces the
weight and bias gradients deterministically (per-program partials, a fixed-order sum).

For small widths only (every layer ≤ 128 wide, 1 to 8 layers: the kernels hold a row tile of
each layer in registers), on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), in float32,
float16 or bfloat16. Elsewhere :func:`fused_mlp` raises, naming the limit and `mode='network'`.

What forward keeps is what network mode keeps (one a or z per layer, nothing for an identity
last layer); `recompute=True` keeps only the input and reruns the fused forward in backward.

The autograd contract: a backward run with grad mode on (create_graph) runs network mode's
differentiable reference loop from the saved inputs, so higher-order gradients are exact; under
torch.func transforms (vmap, jvp, grad) the call runs network mode on the reference backend (as
every op does there); hooks and parametrizations make `MLP` call its layers (`MLP.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from manualbp._autograd import PositionalFunction
from manualbp.activations import Activation
from manualbp.backends import reference
from manualbp.ops._common import (
    no_autocast,
)
from manualbp.ops.network import NetworkPlan, _backward_loop, checked_stack, mlp_network

__all__ = ["FusedMLPFunction", "MAX_DEPTH", "MAX_WIDTH", "check_fused_sizes", "fused_mlp"]

MAX_WIDTH, MAX_DEPTH = 128, 8  # the kernels' limits (triton_kernels.fused_mlp)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_fused_sizes(sizes: Sequence[int]) -> None:
    """The sizes [in, h1, ..., out] the fused kernels take; raises ValueError otherwise."""
    depth = len(sizes) - 1
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(
            f"mode='fused': got {depth} layers (sizes {list(sizes)}), the fused kernels take 1 to "
            f"{MAX_DEPTH}; use mode='network'"
        )
    if max(sizes) > MAX_WIDTH:
        raise ValueError(
            f"mode='fused': sizes {list(sizes)} have a layer wider than {MAX_WIDTH}, the fused "
            "kernels' limit (a row tile of every layer lives in registers); use mode='network'"
        )


def _kernels() -> Any:
    from manualbp.triton_kernels import fused_mlp as kernels

    return kernels


def _backward_kernels(kplan: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The backward launcher for the stack: the accumulating sweep (∇W on chip, 2 launches)
    where it compiles clean for the device's capability, else the split one (δ sweep,
    weight-gradient loop, reduction)."""
    from manualbp.triton_kernels import _utils, fused_mlp_acc

    if fused_mlp_acc.fits(kplan, _utils.gemm_capability(device), dtype):
        return fused_mlp_acc.mlp_backward_accumulated
    return _kernels().mlp_backward


@dataclass(frozen=True)
class FusedPlan:
    """The static description of the stack (activations, biases, recompute) for the Function."""

    acts: tuple[Activation, ...]
    has_bias: tuple[bool, ...]
    dims: tuple[int, ...]
    recompute: bool

    @property
    def depth(self) -> int:
        return len(self.acts)

    def kernel_plan(self) -> Any:
        return _kernels().Plan(
            list(self.dims), [a.kernel_id for a in self.acts], [a.negative_slope or 0.0 for a in self.acts],
            list(self.has_bias),
        )  # fmt: skip

    def split(self, params: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(weights, biases) from the flat list [W1, b1?, W2, b2?, ...]."""
        weights, biases, i = [], [], 0
        for has_bias in self.has_bias:
            weights.append(params[i])
            biases.append(params[i + 1] if has_bias else None)
            i += 2 if has_bias else 1
        return weights, biases

    def network(self) -> NetworkPlan:
        """Network mode's plan on the reference backend: the differentiable backward."""
        return NetworkPlan(acts=self.acts, has_bias=self.has_bias, backend=reference, recompute=True)


class FusedMLPFunction(PositionalFunction):
    """The stack as one autograd node whose forward and backward are the fused kernels.

    Inputs: `x` (M, in) rows, the plan, the flat parameter list. Outputs: the network output and
    the kept tensors (returned so that setup_context can save them; non-differentiable).
    """

    @staticmethod
    def forward(x: Tensor, plan: FusedPlan, *params: Tensor) -> tuple[Tensor, ...]:
        weights, biases = plan.split(params)
        out, kept = _kernels().mlp_forward(x, weights, biases, plan.kernel_plan(), keep=not plan.recompute)
        empty = out.new_empty(0)
        return (out, *(empty if k is None else k for k in kept))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        x, plan, *params = inputs
        out, kept = output[0], list(output[1:])
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # the kept outputs never receive a gradient
        ctx.plan = plan
        # The last layer's a is the output itself where its f′ reads a (and nothing is rerun);
        # an identity output layer needs nothing.
        reads_a = plan.acts[-1].uses_output and plan.acts[-1].name != "identity"
        last = out if reads_a and not plan.recompute else None
        ctx.save_for_backward(x, *params, *kept, last)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, *_grad_kept: Tensor) -> tuple:
        plan: FusedPlan = ctx.plan
        x, *rest = ctx.saved_tensors
        n_params = len(rest) - plan.depth - 1
        params, kept, last = rest[:n_params], list(rest[n_params:-1]), rest[-1]
        if grad_out is None:  # possible only without materialized grads: nothing flows back
            return (None,) * len(ctx.needs_input_grad)
        weights, _ = plan.split(params)
        if torch.is_grad_enabled():
            # create_graph: the backward must itself be differentiable; network mode's reference
            # loop reruns the forward from the saved inputs in torch ops.
            layers = list(zip(*plan.split(params), strict=True))
            with no_autocast(x.device.type):
                return _backward_loop(ctx.needs_input_grad, plan.network(), x, [], layers, grad_out)
        kernels, kplan = _kernels(), plan.kernel_plan()
        if plan.recompute:
            last, kept_new = kernels.mlp_forward(x, weights, plan.split(params)[1], kplan, keep=True)
            kept = list(kept_new)
        if plan.acts[-1].uses_output:
            kept[-1] = last
        wants = _wants(plan, ctx.needs_input_grad[2:])
        grad_x, grad_w, grad_b = _backward_kernels(kplan, x.device, x.dtype)(
            grad_out, x, weights, [k if k is None or k.dim() == 2 else None for k in kept], kplan,
            need_x=bool(ctx.needs_input_grad[0]),
            need_weight=[w for w, _ in wants], need_bias=[b for _, b in wants],
        )  # fmt: skip
        grads: list[Tensor | None] = []
        for layer, has_bias in enumerate(plan.has_bias):
            grads.append(grad_w[layer])
            if has_bias:
                grads.append(grad_b[layer])
        return (grad_x, None, *grads)


def _wants(plan: FusedPlan, flags: Sequence[bool]) -> list[tuple[bool, bool]]:
    """Per layer: whether autograd wants its weight's and its bias's gradient."""
    out, j = [], 0
    for has_bias in plan.has_bias:
        out.append((bool(flags[j]), bool(flags[j + 1]) if has_bias else False))
        j += 2 if has_bias else 1
    return out


def _check_runnable(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"mode='fused': input dtype {x.dtype} is not supported by the fused kernels (float32, "
            "float16 or bfloat16); use mode='network'"
        )
    from manualbp.backends import triton as triton_backend

    ok, why = triton_backend.is_available(x.device)
    if not ok:
        raise RuntimeError(
            f"mode='fused': the fused Triton kernels cannot run on {x.device}: {why}; use "
            "mode='network' (it runs everywhere)"
        )


def fused_mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    acts: Sequence[Activation],
    *,
    recompute: bool = False,
) -> Tensor:
    """aᴸ of the stack on the fused kernels; `input` is (..., in), leading dimensions kept.

    `weights[l]` is (out, in), `biases[l]` (out,) or None, as for network mode's `mlp`.
    Under `torch.autocast` every layer computes in the autocast dtype.
    """
    input, weights, biases, _ = checked_stack(input, weights, biases)
    device = input.device
    if torch._C._are_functorch_transforms_active():  # batched/dual tensors: torch ops only
        return mlp_network(input, weights, biases, acts, backend=reference, recompute=recompute)
    dims = (weights[0].shape[1], *(w.shape[0] for w in weights))
    check_fused_sizes(dims)
    _check_runnable(input)
    plan = FusedPlan(tuple(acts), tuple(b is not None for b in biases), tuple(int(d) for d in dims),
                     bool(recompute))  # fmt: skip
    params: list[Tensor] = []
    for weight, bias in zip(weights, biases, strict=True):
        params += [weight] if bias is None else [weight, bias]
    rows = input.reshape(-1, input.shape[-1]) if input.dim() != 2 else input
    with no_autocast(device.type):
        out = FusedMLPFunction.apply(rows, plan, *params)[0]
    return out if input.dim() == 2 else out.view(*input.shape[:-1], out.shape[-1])
