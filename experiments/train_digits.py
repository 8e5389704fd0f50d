"""The demo: train the digits MLP with the hand-written backward, then check it against autograd.

    python -m experiments.train_digits                  # = make demo
    python -m experiments.train_digits --trainer.max_epochs 20 --model.init_args.backend native

A thin wrapper over `experiments.train` with experiments/configs/digits.yaml (any extra argument
is a LightningCLI override). After `fit` it prints the validation accuracy and, on one
validation batch, the largest relative difference between manualbp's gradients and native
autograd's in float64, next to what native autograd itself reaches in the model's dtype.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from experiments.train import main as cli_main
from manualbp.lightning.callbacks import native_gradients, parity_name, relative_differences
from manualbp.lightning.modules import MLPClassifier

CONFIG = Path(__file__).resolve().parent / "configs" / "digits.yaml"


def _largest(values: dict[str, float]) -> tuple[str, float]:
    name = max(values, key=lambda k: values[k])
    return name, values[name]


def gradient_report(model: MLPClassifier, batch: tuple[torch.Tensor, torch.Tensor]) -> str:
    """One batch: ours vs float64 native autograd, and native in the model's dtype vs the same."""
    x, target = batch
    params = dict(model.net.named_parameters())
    with torch.enable_grad():
        ours = torch.autograd.grad(model.loss(model(x), target), list(params.values()))
    reference = native_gradients(model, batch, torch.float64)
    ours_name, ours_diff = _largest(relative_differences(dict(zip(params, ours)), reference))
    _, native_diff = _largest(relative_differences(native_gradients(model, batch), reference))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    ours_name = parity_name(ours_name)
    return (
        f"gradients on one validation batch ({len(x)} examples), relative difference to native "
        f"autograd in float64:\n"
        f"  {model.backend} backward ({dtype}): {ours_diff:.2e} (largest, {ours_name})\n"
        f"  native autograd ({dtype}):  {native_diff:.2e} (for scale: {dtype} rounding alone)"
    )


def main(argv: list[str] | None = None) -> None:
    extra = sys.argv[1:] if argv is None else argv
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(CONFIG), *extra])
    seconds = time.perf_counter() - start
    trainer, model = cli.trainer, cli.model
    accuracy = trainer.callback_metrics["val/acc"].item()
    print(
        f"\ndigits, {model.backend} backward: validation accuracy {accuracy:.2%} after "
        f"{trainer.current_epoch} epochs ({trainer.global_step} steps, {seconds:.1f} s)"
    )
    batch = next(iter(cli.datamodule.val_dataloader()))
    print(gradient_report(model, batch))


if __name__ == "__main__":
    main()
