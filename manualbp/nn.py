"""Drop-in modules: `Linear` (for `nn.Linear`), `LinearAct` (Linear + activation, fused), `MLP`.

They hold parameters exactly as `torch.nn.Linear` does — same names, shapes, initialisation and
state_dict keys — and call :func:`manualbp.functional.linear`, whose backward is hand-written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manualbp import functional as MF
from manualbp.activations import Activation, get_activation

__all__ = ["Linear", "LinearAct", "MLP"]


def _check_features(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _reset_linear(weight: Tensor, bias: Tensor | None) -> None:
    # nn.Linear's initialisation, so a seeded model starts from the very same weights.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class Linear(nn.Linear):
    """y = x Wᵀ + b with a hand-written backward: a true drop-in for `torch.nn.Linear`.

    It *is* an `nn.Linear` (same constructor, `device`/`dtype` factory kwargs, initialisation,
    `reset_parameters`, `extra_repr` and state_dict keys), so code that inspects modules by type
    keeps working; only `forward` differs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            _check_features("in_features", in_features),
            _check_features("out_features", out_features),
            bias=bias,
            device=device,
            dtype=dtype,
        )

    def forward(self, input: Tensor) -> Tensor:
        return MF.linear(input, self.weight, self.bias)


class LinearAct(nn.Module):
    """a = f(x Wᵀ + b): a linear layer and its activation as one fused op.

    Parameters and initialisation are those of `nn.Linear(in_features, out_features, bias)`;
    `activation` is a name from `manualbp.ACTIVATIONS` (`negative_slope` for leaky_relu).
    Backward keeps one activation-sized tensor: `a` or `z`, whichever f′ needs.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str | Activation = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        self.act = get_activation(activation, negative_slope=negative_slope)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def activation(self) -> str:
        return self.act.name

    def reset_parameters(self) -> None:
        _reset_linear(self.weight, self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return MF.linear(input, self.weight, self.bias, self.act)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.act.name}"
        )
        if self.act.name == "leaky_relu":
            text += f", negative_slope={self.act.negative_slope}"
        return text


class MLP(nn.Module):
    """A stack of `LinearAct` layers: sizes [in, h1, ..., out], `activation` on the hidden layers,
    `output_activation` on the last. State_dict keys are ``layers.{i}.weight`` / ``layers.{i}.bias``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Activation = "relu",
        output_activation: str | Activation = "identity",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise TypeError(f"sizes: expected a sequence of ints [in, h1, ..., out], got {sizes!r}")
        if len(sizes) < 2:
            raise ValueError(f"sizes: expected at least [in_features, out_features], got {list(sizes)}")
        for i, size in enumerate(sizes):
            _check_features(f"sizes[{i}]", size)
        self.sizes = [int(s) for s in sizes]
        hidden = get_activation(activation, negative_slope=negative_slope)
        last = get_activation(output_activation)
        self.layers = nn.ModuleList(
            LinearAct(
                n_in,
                n_out,
                hidden if i < len(sizes) - 2 else last,
                bias=bias,
                device=device,
                dtype=dtype,
            )
            for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]))
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        for layer in self.layers:
            input = layer(input)
        return input

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"
