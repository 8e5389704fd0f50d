"""Train an MLP with Lightning from a YAML config: the experiments' command line.

    python -m experiments.train fit --config experiments/configs/digits.yaml
    python -m experiments.train fit --config experiments/configs/digits.yaml --model.init_args.backend native
    python -m experiments.train fit --config experiments/configs/digits.yaml \\
        --ckpt_path experiments/runs/digits/version_0/checkpoints/last.ckpt --trainer.max_epochs 40
    python -m experiments.train validate --config experiments/configs/digits.yaml --ckpt_path ...

Built on `LightningCLI` (jsonargparse): `--help`, `--print_config`, any `--model.init_args.*`,
`--data.init_args.*` or `--trainer.*` override. Logs go to ``<runs_dir>/<run_name>/version_N/``
(CSV always, TensorBoard too when it is installed), with a checkpoint written every epoch
(``checkpoints/last.ckpt`` is the newest) for `--ckpt_path` to resume from. `seed_everything`
(default 0) makes a run repeatable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

RUNS_DIR = Path(__file__).resolve().parent / "runs"  # git-ignored


def default_loggers(runs_dir: str | Path, run_name: str) -> list[Logger]:
    """CSV always; TensorBoard as well when `tensorboard` is installed (it is not a dependency)."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(runs_dir), name=run_name)]
    if importlib.util.find_spec("tensorboard") is not None:
        version = loggers[0].version  # one version folder for both loggers
        loggers.append(TensorBoardLogger(save_dir=str(runs_dir), name=run_name, version=version))
    return loggers


class ManualBPCLI(LightningCLI):
    """LightningCLI plus `--runs_dir`/`--run_name` (where the default loggers write) and
    `--torch_threads` (intra-op threads; these matrices are tiny, and on a busy machine extra
    threads cost far more in synchronisation than they compute — measured 30× on digits)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_dir", type=str, default=str(RUNS_DIR), help="where runs are written")
        parser.add_argument("--run_name", type=str, default="default", help="subfolder of runs_dir")
        parser.add_argument(
            "--torch_threads", type=int | None, default=None, help="torch.set_num_threads (null: default)"
        )

    def before_instantiate_classes(self) -> None:
        threads = self._get(self.config, "torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads: expected a positive int or null, got {threads}")
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        # `logger: true` (Lightning's default) means "ours"; an explicit logger or false is kept.
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            runs_dir = self._get(self.config_init, "runs_dir")
            kwargs["logger"] = default_loggers(runs_dir, self._get(self.config_init, "run_name"))
        # A checkpoint every epoch (last.ckpt is the newest) for --ckpt_path to resume from,
        # unless checkpointing is off or the config brings its own ModelCheckpoint.
        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(every_n_epochs=1, save_last=True))
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """The CLI; `args` (a list or dict) replaces sys.argv, e.g. in tests."""
    return ManualBPCLI(
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        trainer_defaults={"devices": 1},  # accelerator "auto": CUDA (and Triton kernels) when present
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
