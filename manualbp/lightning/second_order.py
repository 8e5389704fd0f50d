"""A LightningModule that trains a manualbp MLP by Levenberg–Marquardt (or SGD/Adam to compare).

Levenberg–Marquardt is not a `torch.optim.Optimizer`: one iteration builds the residual Jacobian
by hand-written backpropagation, solves the damped normal equations and may retry with more
damping, so the module uses Lightning's manual optimisation (``automatic_optimization = False``).
Every training batch is one LM iteration on that batch: give it the whole (small) data set as a
single batch, e.g. with :func:`full_batch_loader`. With ``optimizer="sgd"`` or ``"adam"`` the same
module takes one first-order step per batch, through ``manual_backward``, for a like-for-like
comparison.

Batches are cast to the parameters' dtype (float64 by default), so float32 data modules such as
:class:`manualbp.lightning.data.RegressionDataModule` plug in unchanged.

Logged: ``train_mse`` (after the step), ``damping`` and ``rejected`` (LM only), ``val_mse``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from manualbp.functional import mse_loss
from manualbp.jacobian import DEFAULT_MAX_JACOBIAN_ELEMENTS
from manualbp.nn import MLP
from manualbp.optim import LevenbergMarquardt

__all__ = ["OPTIMIZERS", "SecondOrderRegressor", "full_batch_loader", "noisy_sine"]

#: "lm" — Levenberg–Marquardt, "gauss_newton" — LM with λ = 0, "sgd", "adam".
OPTIMIZERS = ("lm", "gauss_newton", "sgd", "adam")


def noisy_sine(
    n: int = 64, noise: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """x evenly spaced on [−π, π] (shape (n, 1)), y = sin x + N(0, noise²), from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(x) + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def full_batch_loader(x: Tensor, y: Tensor) -> DataLoader:
    """The whole data set as one batch, in order: what a full-batch LM iteration expects."""
    return DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False)


class SecondOrderRegressor(L.LightningModule):
    """Fit ``MLP(sizes, activation)`` to regression targets under MSE with manual optimisation.

    Args:
        sizes, activation, output_activation, bias: the MLP (see :class:`manualbp.MLP`).
        optimizer: one of :data:`OPTIMIZERS`.
        lr: learning rate for "sgd" / "adam".
        damping, damping_up, damping_down, scaling, max_retries, max_jacobian_elements: passed to
            :class:`manualbp.optim.LevenbergMarquardt` for "lm" / "gauss_newton".
        dtype: parameter dtype (float64 by default: these models are tiny and LM likes precision).
    """

    def __init__(
        self,
        sizes: Sequence[int] = (1, 10, 1),
        activation: str = "tanh",
        output_activation: str = "identity",
        bias: bool = True,
        optimizer: str = "lm",
        lr: float = 0.1,
        damping: float = 1e-3,
        damping_up: float = 10.0,
        damping_down: float = 10.0,
        scaling: str = "marquardt",
        max_retries: int = 10,
        max_jacobian_elements: int | None = DEFAULT_MAX_JACOBIAN_ELEMENTS,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = MLP(list(sizes), activation, output_activation, bias=bias, dtype=dtype)
        self.lm: LevenbergMarquardt | None = None
        if optimizer in ("lm", "gauss_newton"):
            self.lm = LevenbergMarquardt(
                self.model,
                damping,
                damping_up=damping_up,
                damping_down=damping_down,
                scaling=scaling,
                max_retries=max_retries,
                gauss_newton=optimizer == "gauss_newton",
                max_jacobian_elements=max_jacobian_elements,
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        name, lr = self.hparams["optimizer"], self.hparams["lr"]
        if name == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=lr)
        if name == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=lr)
        return None  # LM updates the parameters itself in training_step

    def _cast(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        # Data modules hand out float32; LM checks dtypes strictly, so match the parameters.
        dtype = next(self.model.parameters()).dtype
        x, y = batch
        return x.to(dtype), y.to(dtype)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = self._cast(batch)
        if self.lm is not None:
            loss = self.lm.step(x, y)
            self.log("damping", self.lm.last.damping, on_step=False, on_epoch=True)
            self.log("rejected", float(self.lm.last.rejected), on_step=False, on_epoch=True)
        else:
            opt = cast(LightningOptimizer, self.optimizers())  # exactly one was configured
            opt.zero_grad()
            batch_loss = mse_loss(self.model(x), y)
            self.manual_backward(batch_loss)
            opt.step()
            with torch.no_grad():  # the loss *after* the step, as LM reports it
                loss = float(mse_loss(self.model(x), y))
        # As a tensor of the model's dtype: a Python float would be logged in float32.
        loss_t = torch.tensor(loss, dtype=next(self.model.parameters()).dtype)
        self.log("train_mse", loss_t, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = self._cast(batch)
        self.log("val_mse", mse_loss(self.model(x), y), prog_bar=True)
