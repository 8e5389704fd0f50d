"""Callbacks that watch the hand-written backward while a model trains.

* `GradientParityCallback` — every n steps, recomputes the step's gradients with native autograd
  on a float64 copy of the model and logs the relative difference of each parameter's gradient
  (``parity/layers.{i}.weight``, ``parity/layers.{i}.bias``, ``parity/max``); fails the run with a
  RuntimeError when one passes the threshold for the model's dtype.
* `SavedActivationMemoryCallback` — logs how many bytes autograd keeps for backward per step
  (``memory/saved_bytes``), counted with `torch.autograd.graph.saved_tensors_hooks`.

They work with any LightningModule that offers what `MLPClassifier`/`MLPRegressor` do: a network
`net`, `loss(output, target)` and `native_twin()` (a native copy of `net`, same parameter names),
`native_loss(output, target)`, and batches `(x, target)`.

Relative difference is ‖ours − ref‖ / ‖ref‖ (absolute when ‖ref‖ = 0), in float64, where ref is
the gradient native autograd computes in float64 — DESIGN.md's definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, cast

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_PARITY_THRESHOLDS",
    "GradientParityCallback",
    "ParityModule",
    "SavedActivationMemoryCallback",
    "gradient_parity",
    "native_gradients",
    "relative_differences",
]

#: Largest relative gradient difference tolerated per parameter dtype.
DEFAULT_PARITY_THRESHOLDS: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


class ParityModule(Protocol):
    """What the parity helpers need of a LightningModule (MLPClassifier and MLPRegressor have it)."""

    net: torch.nn.Module

    def loss(self, output: Tensor, target: Tensor) -> Tensor: ...
    def native_loss(self, output: Tensor, target: Tensor) -> Tensor: ...
    def native_twin(self) -> torch.nn.Module: ...


def parity_name(param_name: str) -> str:
    """The log and report name of a parameter: its name in `net`, which is its state_dict key
    there (``layers.0.weight``), so a report names exactly what a checkpoint holds."""
    return param_name


def relative_differences(ours: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, float]:
    """‖ours − ref‖ / ‖ref‖ per name (absolute difference when ‖ref‖ = 0), computed in float64."""
    if ours.keys() != reference.keys():
        raise ValueError(
            f"ours: gradient names {sorted(ours)} do not match the reference's {sorted(reference)}"
        )
    result = {}
    for name, ref in reference.items():
        ref64, ours64 = ref.detach().double(), ours[name].detach().double()
        diff = torch.linalg.vector_norm(ours64 - ref64).item()
        scale = torch.linalg.vector_norm(ref64).item()
        result[name] = diff / scale if scale > 0 else diff
    return result


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def native_gradients(
    pl_module: ParityModule, batch: Any, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """∂C/∂θ on `batch` by native autograd on a copy of `pl_module.net`, cast to `dtype` (None:
    the module's own dtype). The module itself is untouched."""
    x, target = batch
    twin = pl_module.native_twin()
    if dtype is not None:
        twin = twin.to(dtype)
    params = dict(twin.named_parameters())
    # Optimisers run their step (and so Lightning's hooks around it) under no_grad.
    with torch.enable_grad():
        loss = pl_module.native_loss(twin(_cast(x, dtype)), _cast(target, dtype))
        grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _module_gradients(pl_module: ParityModule, batch: Any) -> dict[str, Tensor]:
    """∂C/∂θ on `batch` with the module's own backend, without touching `.grad`."""
    x, target = batch
    params = dict(pl_module.net.named_parameters())
    with torch.enable_grad():
        loss = pl_module.loss(pl_module.net(x), target)
        grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _log_names(values: Mapping[str, float]) -> dict[str, float]:
    return {parity_name(name): value for name, value in values.items()}


def gradient_parity(pl_module: ParityModule, batch: Any) -> dict[str, float]:
    """Relative difference, per parameter (log names), between the module's gradient on `batch`
    and the float64 native-autograd gradient at the same weights. Nothing in the module changes."""
    ours = _module_gradients(pl_module, batch)
    return _log_names(relative_differences(ours, native_gradients(pl_module, batch, torch.float64)))


class GradientParityCallback(pl.Callback):
    """Checks the training gradients against native autograd every `every_n_steps` steps.

    On a checked step it keeps the batch and, once backward has filled `.grad` (just before the
    optimiser step), recomputes the gradients with native autograd on a float64 copy of the
    network — the reference of DESIGN.md — and logs ``parity/<param>`` (e.g.
    ``parity/layers.0.weight``) for each parameter and ``parity/max``. `history` keeps
    (step, {name: value}).

    It raises RuntimeError, naming the parameter, step, value and limit, when a difference passes
    `threshold` (default: `DEFAULT_PARITY_THRESHOLDS` for the parameters' dtype). Below float64
    the limit is widened to `slack` × the error of native autograd *in the model's dtype* on the
    same batch (logged as ``parity/native_max``): near convergence the cross-entropy gradient
    softmax − onehot cancels (p ≈ 1), and then even native float32 autograd misses the float64
    gradient by more than 1e-5 relative; a wrong backward (say, scaled by 1.01) is still off by
    orders of magnitude more.
    """

    def __init__(self, every_n_steps: int = 50, threshold: float | None = None, slack: float = 10.0) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive int, got {every_n_steps!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(
                f"threshold: expected a number > 0 or None (per-dtype default), got {threshold!r}"
            )
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack >= 1:
            raise ValueError(f"slack: expected a number >= 1, got {slack!r}")
        self.every_n_steps = every_n_steps
        self.threshold = threshold
        self.slack = float(slack)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._batch: Any = None

    def threshold_for(self, dtype: torch.dtype) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        if dtype not in DEFAULT_PARITY_THRESHOLDS:
            raise ValueError(
                f"dtype: no default parity threshold for {dtype}; expected one of "
                f"{list(DEFAULT_PARITY_THRESHOLDS)} or an explicit threshold="
            )
        return DEFAULT_PARITY_THRESHOLDS[dtype]

    @property
    def max_difference(self) -> float:
        """The largest difference seen in any check so far (NaN before the first)."""
        return max((max(values.values()) for _, values in self.history), default=float("nan"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"accumulate_grad_batches: GradientParityCallback compares one batch's gradient, "
                f"got accumulate_grad_batches={trainer.accumulate_grad_batches}; expected 1"
            )
        for name in ("net", "loss", "native_loss", "native_twin"):
            if not hasattr(pl_module, name):
                raise TypeError(
                    f"pl_module: {type(pl_module).__name__} has no `{name}`; GradientParityCallback "
                    "expects a module like manualbp.lightning.MLPClassifier"
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due = trainer.global_step % self.every_n_steps == 0
        self._batch = batch if due else None

    def _training_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        ours = {}
        for name, param in cast(ParityModule, pl_module).net.named_parameters():
            if param.grad is None:
                raise RuntimeError(
                    f"{name}: no gradient after backward at step {trainer.global_step}; "
                    "GradientParityCallback expects every parameter of `net` to be trained"
                )
            ours[name] = param.grad
        return ours

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        step = trainer.global_step
        module = cast(ParityModule, pl_module)
        dtype = next(module.net.parameters()).dtype
        reference = native_gradients(module, batch, torch.float64)
        values = _log_names(relative_differences(self._training_gradients(trainer, pl_module), reference))
        self.history.append((step, values))
        metrics = {f"parity/{name}": value for name, value in values.items()}
        metrics["parity/max"] = max(values.values())

        limit = self.threshold_for(dtype)
        if dtype != torch.float64:
            native = relative_differences(native_gradients(module, batch), reference)
            metrics["parity/native_max"] = max(native.values())
            limit = max(limit, self.slack * metrics["parity/native_max"])
        # Straight to the loggers: `self.log` would repeat a step metric's last value on the
        # steps in between, which were not checked.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for name, value in values.items():
            if not value <= limit:  # also catches NaN
                raise RuntimeError(
                    f"gradient parity: {name} differs from native autograd (float64) by {value:.3e} "
                    f"relative at step {step}; expected <= {limit:.1e} for {dtype} — the "
                    "hand-written backward disagrees with autograd"
                )


class SavedActivationMemoryCallback(pl.Callback):
    """Logs ``memory/saved_bytes``: what autograd keeps for backward during one training step.

    Every tensor packed by `saved_tensors_hooks` between the start of the batch and the backward
    is counted once per storage (tensors saved by reference share their storage). Parameters are
    left out (they exist anyway), so the figure is the activations: the input x, `a` or `z` per
    layer, and whatever the loss keeps.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, int]] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._storages: dict[int, int] = {}
        self._skip: set[int] = set()

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._skip:
            self._storages[key] = storage.nbytes()
        return tensor

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._storages = {}
        self._skip = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def _close(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._close()  # the forward is over: everything backward needs has been saved
        saved = sum(self._storages.values())
        self.history.append((trainer.global_step, saved))
        pl_module.log("memory/saved_bytes", float(saved), on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close()  # in case the step returned no loss and backward never ran

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()
