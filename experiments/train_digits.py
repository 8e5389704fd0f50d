"""The demo: train the digits MLP with the hand-written backward, then check it against autograd.

    python -m experiments.train_digits                  # = make demo
    python -m experiments.train_digits --trainer.max_epochs 20 --model.init_args.backend native

A thin wrapper over `manualbp-train fit --config digits` (any extra argument is a LightningCLI
override). After the run's summary line it prints, on one validation batch, the largest relative
difference between manualbp's gradients and native autograd's in float64, next to what native
autograd itself reaches in the model's dtype; parameters are named by their state_dict keys in
the network (``layers.1.weight``).
"""

from __future__ import annotations

import sys

import torch

from manualbp.lightning.callbacks import native_gradients, relative_differences
from manualbp.lightning.cli import CONFIGS_DIR
from manualbp.lightning.cli import main as cli_main
from manualbp.lightning.modules import MLPClassifier

CONFIG = CONFIGS_DIR / "digits.yaml"


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
    return (
        f"gradients on one validation batch ({len(x)} examples), relative difference to native "
        f"autograd in float64:\n"
        f"  {model.backend} backward ({dtype}): {ours_diff:.2e} (largest, {ours_name})\n"
        f"  native autograd ({dtype}):  {native_diff:.2e} (for scale: {dtype} rounding alone)"
    )


def main(argv: list[str] | None = None) -> None:
    extra = sys.argv[1:] if argv is None else argv
    cli = cli_main(["fit", "--config", str(CONFIG), *extra])  # prints the run's summary line
    batch = next(iter(cli.datamodule.val_dataloader()))
    print(gradient_report(cli.model, batch))


if __name__ == "__main__":
    main()
