"""Per-example Jacobians of an MLP's residuals, by hand-written backpropagation.

The backward pass of one layer turns one δ per example into ∇W = δ aᵀ (summed over examples).
Second-order methods need the same products *per example and per output unit*, unsummed: for
residuals r = y(x) − t of shape (N, O) and parameters θ (all of `model.parameters()`, flattened
in that order), the Jacobian J = ∂r/∂θ has one row per (example n, output o) and one column per
parameter, shape (N·O, P).

It is built with the backward's own structure, vectorised over examples and output units:

    δᴸ[n, o, :]    = f′ᴸ(zᴸ[n]) ⊙ e_o               a unit vector per output, through the last f′
    δˡ⁻¹[n, o, :]  = (δˡ[n, o, :] Wˡ) ⊙ f′ˡ⁻¹(zˡ⁻¹[n])  the backward's "Wᵀδ" then f′, per (n, o)
    J_Wˡ[n, o]     = δˡ[n, o, :] ⊗ aˡ⁻¹[n, :]        the backward's δ aᵀ, one outer product each
    J_bˡ[n, o]     = δˡ[n, o, :]                     bias: a weight on a constant input of 1

f′ comes from the activation registry's hand-written `derivative(saved)`; no autograd runs here.
The only loop is over layers. Memory: J holds N·O·P numbers, written in place block by block,
plus one layer's δ (N·O·width) at a time, so callers bound it with `max_elements`.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from manualbp.backends.reference import compute_dtype, linear_forward
from manualbp.nn import MLP, LinearAct

__all__ = ["DEFAULT_MAX_JACOBIAN_ELEMENTS", "check_mlp", "jacobian_elements", "residual_jacobian"]

#: Default bound on N·O·P, the number of Jacobian entries: 2.5·10⁷ (200 MB in float64).
DEFAULT_MAX_JACOBIAN_ELEMENTS = 25_000_000


def check_mlp(model: object, name: str = "model") -> MLP:
    """`model` as a manualbp MLP whose parameters are exactly its layers' weights and biases."""
    if not isinstance(model, MLP):
        raise TypeError(
            f"{name}: expected a manualbp.MLP (the Jacobian is built layer by layer from its "
            f"LinearAct layers), got {type(model).__name__}"
        )
    expected = [p for layer in model.layers for p in (layer.weight, layer.bias) if p is not None]
    actual = list(model.parameters())
    same = len(actual) == len(expected) and all(
        a is b for a, b in zip(actual, expected, strict=True)
    )
    if not same:
        raise ValueError(
            f"{name}: expected parameters() to be exactly the layers' weights and biases "
            f"({len(expected)} tensors, in layer order), got {len(actual)} tensors; "
            "extra or reordered parameters are not supported"
        )
    return model


def jacobian_elements(model: MLP, n_examples: int) -> int:
    """N·O·P: how many numbers the residual Jacobian of `n_examples` examples holds."""
    n_params = sum(p.numel() for p in model.parameters())
    return n_examples * model.sizes[-1] * n_params


def _check_batch(model: MLP, x: object, y: object) -> tuple[Tensor, Tensor]:
    n_in, n_out = model.sizes[0], model.sizes[-1]
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(
            f"x: expected shape (N, {n_in}) (examples × in_features), got {tuple(x.shape)}"
        )
    dtype = next(model.parameters()).dtype
    if x.dtype != dtype:
        raise TypeError(f"x: dtype {x.dtype} does not match the model's {dtype}; expected the same")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        given = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(
            f"y: expected a floating-point torch.Tensor of regression targets, got {given}; "
            "only mean-squared-error residuals are supported (no class indices)"
        )
    if tuple(y.shape) != (x.shape[0], n_out):
        raise ValueError(
            f"y: expected shape ({x.shape[0]}, {n_out}) (examples × out_features), "
            f"got {tuple(y.shape)}"
        )
    if x.device != y.device:
        raise RuntimeError(f"y: on device {y.device} but x is on {x.device}; expected the same")
    return x, y


def _check_size(model: MLP, n_examples: int, max_elements: int | None) -> None:
    if max_elements is None:
        return
    needed = jacobian_elements(model, n_examples)
    if needed > max_elements:
        n_params = needed // (n_examples * model.sizes[-1]) if n_examples else 0
        raise ValueError(
            f"max_jacobian_elements: the Jacobian needs N·O·P = {n_examples}·{model.sizes[-1]}·"
            f"{n_params} = {needed} elements, more than the bound {max_elements}; expected a "
            "smaller batch, a smaller model, or a larger max_jacobian_elements"
        )


@torch.no_grad()
def residual_jacobian(
    model: MLP, x: Tensor, y: Tensor, *, max_elements: int | None = DEFAULT_MAX_JACOBIAN_ELEMENTS
) -> tuple[Tensor, Tensor]:
    """Residuals r = model(x) − y flattened to (N·O,), and J = ∂r/∂θ of shape (N·O, P).

    Row n·O + o is example n, output o; columns follow `model.parameters()` flattened (each
    weight row-major, then its bias). Computed in the model's compute dtype (float32 for 16-bit
    storage). Raises ValueError when N·O·P exceeds `max_elements` (None: no bound).
    """
    model = check_mlp(model)
    x, y = _check_batch(model, x, y)
    _check_size(model, x.shape[0], max_elements)
    layers = cast(list[LinearAct], list(model.layers))
    cdt = compute_dtype(layers[0].weight.dtype)

    # Forward: keep every layer's input a⁽ˡ⁻¹⁾ and what f′ needs (a or z), as the backward does.
    inputs, saved = [], []
    a = x.to(cdt)
    for layer in layers:
        bias = None if layer.bias is None else layer.bias.to(cdt)
        inputs.append(a)
        a, s = linear_forward(a, layer.weight.to(cdt), bias, layer.act)
        saved.append(s)
    residual = a - y.to(cdt)  # (N, O)

    # Backward, right to left, one δ per (example, output unit), written straight into J's
    # column blocks (no per-layer copies: peak memory is J plus one layer's δ).
    n, n_out = residual.shape
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + layer.weight.numel())  # W block
        offsets.append(offsets[-1] + (0 if layer.bias is None else layer.bias.numel()))  # b block
    jacobian = torch.empty(n * n_out, offsets[-1], dtype=cdt, device=x.device)
    eye = torch.eye(n_out, dtype=cdt, device=x.device)
    delta = layers[-1].act.derivative(saved[-1]).unsqueeze(1) * eye  # (N, O, O): f′ᴸ ⊙ e_o
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        w_start, b_start, b_end = offsets[2 * index : 2 * index + 3]
        # J_W[n, o] = δ[n, o, :] ⊗ a⁽ˡ⁻¹⁾[n, :]  (the backward's δ aᵀ without the sum over n)
        grad_weight = jacobian[:, w_start:b_start].view(n, n_out, *layer.weight.shape)
        torch.mul(delta.unsqueeze(-1), inputs[index][:, None, None, :], out=grad_weight)
        if layer.bias is not None:
            jacobian[:, b_start:b_end] = delta.reshape(n * n_out, -1)  # J_b = δ
        if index > 0:
            below = layers[index - 1].act
            delta = (delta @ layer.weight.to(cdt)) * below.derivative(saved[index - 1]).unsqueeze(1)
    return residual.reshape(-1), jacobian
