"""LightningModules training an MLP either with manualbp's hand-written backward or natively.

`backend="manual"` runs :class:`manualbp.MLP` and manualbp's losses (`cross_entropy`, `mse_loss`,
`half_mse_loss`): every gradient is the seed's δ = ∂C/∂a ⊙ f′, ∇W = δᵀa, ∇b = Σδ, δ·W.
`backend="native"` runs the same network as `nn.Linear` + torch activation modules + torch
losses, differentiated by PyTorch's autograd. Both start from the very same weights for the
same seed: the manualbp MLP is always built first (drawing the initialisation from the RNG) and
the native stack copies it, so a run of each is a like-for-like comparison.

Both keep their layers under ``net.layers.{i}.weight`` / ``net.layers.{i}.bias``, so checkpoints
from one backend load into the other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

import manualbp.functional as MF
from manualbp.nn import MLP

__all__ = ["BACKENDS", "OPTIMIZERS", "MLPClassifier", "MLPRegressor", "NativeMLP"]

BACKENDS = ("manual", "native")
OPTIMIZERS = ("sgd", "momentum", "adam")
REGRESSION_LOSSES = ("mse", "half_mse")


class NativeMLP(nn.Module):
    """The network of a :class:`manualbp.MLP` rebuilt from `nn.Linear` and torch activations.

    Parameters keep the MLP's names (``layers.{i}.weight``), so state dicts are interchangeable.
    """

    def __init__(self, linears: Sequence[nn.Linear], activations: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(linears)
        self.activations = nn.ModuleList(activations)

    @classmethod
    def from_manual(cls, mlp: MLP) -> NativeMLP:
        """A native copy of `mlp` holding copies of its current weights (the RNG is not touched)."""
        linears = []
        for layer in mlp.layers:
            # skip_init: no random initialisation (it would be overwritten, and would advance the
            # global RNG, making a native run draw different numbers than a manual one).
            linear = nn.utils.skip_init(
                nn.Linear,
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            linears.append(linear)
        native = cls(linears, [layer.act.native() for layer in mlp.layers])  # type: ignore[union-attr,operator]
        native.load_state_dict(mlp.state_dict())
        return native

    def forward(self, input: Tensor) -> Tensor:
        for linear, activation in zip(self.layers, self.activations):
            input = activation(linear(input))
        return input


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return float(value)


class _MLPModule(pl.LightningModule):
    """What the classifier and the regressor share: the network, the backend, the optimiser.

    Subclasses call `save_hyperparameters()` in their own `__init__` (so checkpoints record
    their full signature), then `_build()`, and define `loss`, `native_loss` and the steps.
    """

    net: nn.Module

    def _build(self) -> None:
        hp = self.hp
        _check_choice("backend", hp.backend, BACKENDS)
        _check_choice("optimizer", hp.optimizer, OPTIMIZERS)
        _check_positive("lr", hp.lr)
        if isinstance(hp.sizes, (str, bytes)) or not isinstance(hp.sizes, Sequence):
            raise TypeError(f"sizes: expected a list of ints [in, h1, ..., out], got {hp.sizes!r}")
        self.net = self._initial_network()

    def _initial_network(self) -> nn.Module:
        hp = self.hp

        def build() -> MLP:
            return MLP(list(hp.sizes), hp.activation, hp.output_activation, bias=hp.bias)

        if hp.init_seed is None:
            mlp = build()
        else:  # the initialisation depends on init_seed only, not on the global RNG's state
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hp.init_seed)
                mlp = build()
        return mlp if hp.backend == "manual" else NativeMLP.from_manual(mlp)

    @property
    def hp(self) -> Any:
        """`self.hparams` (an AttributeDict: attribute access, untyped)."""
        return self.hparams

    @property
    def backend(self) -> str:
        return self.hp.backend

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """The training loss, computed by the module's backend."""
        if self.hp.backend == "manual":
            return self.manual_loss(output, target)
        return self.native_loss(output, target)

    def manual_loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def native_loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def native_twin(self) -> NativeMLP:
        """A native-autograd copy of the network with the current weights, detached from them."""
        if isinstance(self.net, MLP):
            return NativeMLP.from_manual(self.net)
        return cast(NativeMLP, copy.deepcopy(self.net))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hp
        params = self.parameters()
        if hp.optimizer == "sgd":  # the seed's rule: Δw = −η ∂E/∂w
            return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "momentum":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)


class MLPClassifier(_MLPModule):
    """Softmax classification with cross-entropy; logs `{train,val,test}/loss` and `/acc`.

    Args:
        sizes: layer widths [in_features, hidden..., num_classes].
        activation: hidden activation, a name from `manualbp.ACTIVATIONS`.
        output_activation: activation of the last layer (identity: the logits).
        bias: whether the layers have biases.
        backend: "manual" (manualbp's backward) or "native" (torch autograd), same init either way.
        optimizer: "sgd" (plain, the seed's η), "momentum" (SGD with `momentum`) or "adam".
        lr: the learning rate η.
        momentum: momentum factor, used by optimizer="momentum" only.
        weight_decay: L2 penalty passed to the optimiser.
        init_seed: seed for the initial weights alone; None draws them from the global RNG.
    """

    def __init__(
        self,
        sizes: list[int],
        activation: str = "relu",
        output_activation: str = "identity",
        bias: bool = True,
        backend: Literal["manual", "native"] = "manual",
        optimizer: Literal["sgd", "momentum", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._build()
        num_classes = int(sizes[-1])
        if num_classes < 2:
            raise ValueError(f"sizes: the last width is the number of classes, expected >= 2, got {sizes}")
        metric = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()

    def manual_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return MF.cross_entropy(output, target)

    def native_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: torchmetrics.Metric) -> Tensor:
        x, target = batch
        logits = self(x)
        loss = self.loss(logits, target)
        accuracy(logits.detach(), target)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", accuracy, on_step=on_step, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_acc)


class MLPRegressor(_MLPModule):
    """Regression with squared error; logs `{train,val,test}/loss` and `/mse`.

    Args are those of :class:`MLPClassifier` (the last width is the number of outputs), plus
    `loss`: "mse" (mean of (y − t)², the seed's E = (t − y)² for one output) or "half_mse"
    (E = 1/(2n) Σₓ‖y − t‖², whose gradient is (y − t)/n). The default `activation` is tanh: a
    smooth target is better fitted by a smooth network.
    """

    def __init__(
        self,
        sizes: list[int],
        activation: str = "tanh",
        output_activation: str = "identity",
        bias: bool = True,
        backend: Literal["manual", "native"] = "manual",
        optimizer: Literal["sgd", "momentum", "adam"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        init_seed: int | None = None,
        loss: Literal["mse", "half_mse"] = "mse",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_choice("loss", loss, REGRESSION_LOSSES)
        self._build()
        metric = torchmetrics.MeanSquaredError
        self.train_mse, self.val_mse, self.test_mse = metric(), metric(), metric()

    def manual_loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.hp.loss == "mse":
            return MF.mse_loss(output, target)
        return MF.half_mse_loss(output, target)

    def native_loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.hp.loss == "mse":
            return F.mse_loss(output, target)
        return 0.5 * (output - target).pow(2).flatten(1).sum(1).mean()

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, mse: torchmetrics.Metric) -> Tensor:
        x, target = batch
        output = self(x)
        loss = self.loss(output, target)
        mse(output.detach(), target)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/mse", mse, on_step=on_step, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_mse)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_mse)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_mse)
