"""`manualbp-train`: train an MLP with Lightning from a YAML config (the experiments' command line).

    manualbp-train fit --config digits                   # a config shipped with the package
    manualbp-train fit --config digits --model.init_args.backend native --run_name digits_native
    manualbp-train fit --config digits --ckpt_path runs/digits/version_0/checkpoints/last.ckpt \\
        --trainer.max_epochs 20                          # resume
    manualbp-train fit --config my_config.yaml           # any YAML file of yours
    manualbp-train validate --config digits --ckpt_path ...

Built on `LightningCLI` (jsonargparse): `--help`, `--print_config`, any `--model.init_args.*`,
`--data.init_args.*` or `--trainer.*` override. `--config NAME` that is not a file names one of
the packaged configs (`configs/NAME.yaml` beside this module: digits, regression,
linear_neuron). Logs go to ``<runs_dir>/<run_name>/version_N/`` (``./runs`` by default; CSV
always, TensorBoard too when it is installed), with a checkpoint every epoch
(``checkpoints/last.ckpt`` is the newest) for `--ckpt_path` to resume from. `seed_everything`
(default 0) makes a run repeatable.

A `fit` ends with one summary line (final metrics, wall time, where the outputs are) and writes
``curves.png`` beside the run's ``metrics.csv``: loss and accuracy (or MSE) per epoch, with the
newest run in `runs_dir` that has the same hyperparameters but the other backend drawn dashed,
when there is one. Lightning's advertising tips and known third-party warnings are silenced
here, in this entry point only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import jsonargparse  # noqa: F401  (lightning.pytorch.cli imports without it, then fails late)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
except ImportError as err:
    raise ImportError(
        f"manualbp-train needs the 'lightning' extra ({err.name} is not installed): "
        "pip install manualbp[lightning]"
    ) from err
import torch

from manualbp.lightning.plots import find_comparison, plot_curves, read_metrics, summary_line

__all__ = ["CONFIGS_DIR", "ManualBPCLI", "default_loggers", "main", "quiet_third_party", "resolve_config"]

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
RUNS_DIR = Path("runs")  # relative to the working directory, where users look for outputs

# Messages dropped from Lightning's loggers inside `quiet_third_party` (substring match).
_NOISE = (
    "💡 Tip:",  # litlogger / litmodels advertising
    "Starting from v1.9.0, `tensorboardX` has been removed",
)
# (message regex, category) of third-party warnings silenced inside `quiet_third_party`.
_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r".*LeafSpec.* is deprecated", FutureWarning),
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", Warning),  # a warning, when logger=True
)
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence Lightning's tips and the known third-party warnings, for the enclosed block only."""
    noise = _DropNoise()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message, category in _WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (`--config NAME`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config(value: str) -> str:
    """`value` itself when it is a file; else the packaged config it names (digits, digits.yaml)."""
    if Path(value).is_file():
        return value
    name = Path(value).name.removesuffix(".yaml").removesuffix(".yml")
    packaged = CONFIGS_DIR / f"{name}.yaml"
    if Path(value).parent == Path(".") and packaged.is_file():
        return str(packaged)
    raise FileNotFoundError(
        f"--config: {value!r} is neither a file nor a packaged config; "
        f"expected a YAML path or one of {', '.join(packaged_configs())}"
    )


def _resolve_config_args(args: Sequence[str]) -> list[str]:
    out, after_config = [], False
    for arg in args:
        if after_config:
            arg, after_config = resolve_config(arg), False
        elif arg == "--config":
            after_config = True
        elif arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.removeprefix("--config="))
        out.append(arg)
    return out


def default_loggers(runs_dir: str | Path, run_name: str) -> list[Logger]:
    """CSV always; TensorBoard as well when `tensorboard` is installed (it is not a dependency)."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(runs_dir), name=run_name)]
    if importlib.util.find_spec("tensorboard") is not None:
        version = loggers[0].version  # one version folder for both loggers
        loggers.append(TensorBoardLogger(save_dir=str(runs_dir), name=run_name, version=version))
    return loggers


class ManualBPCLI(LightningCLI):
    """LightningCLI plus `--runs_dir`/`--run_name` (where the default loggers write),
    `--torch_threads` (intra-op threads; these matrices are tiny, and on a busy machine extra
    threads cost far more in synchronisation than they compute — measured 30× on digits) and
    `--plot` (the curves PNG); a `fit` ends with a summary line."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--runs_dir", type=str, default=str(RUNS_DIR), help="where runs are written")
        parser.add_argument("--run_name", type=str, default="default", help="subfolder of runs_dir")
        parser.add_argument(
            "--torch_threads", type=int | None, default=None, help="torch.set_num_threads (null: default)"
        )
        parser.add_argument("--plot", type=bool, default=True, help="write curves.png after fit")

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

    def before_fit(self) -> None:
        self.fit_started = time.perf_counter()

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self.fit_started
        trainer = self.trainer
        self.summary: str | None = None
        self.curves_path: Path | None = None
        if not trainer.is_global_zero:
            return
        csv = _csv_logger(trainer)
        run_dir = Path(csv.log_dir) if csv is not None else None
        if run_dir is not None and (run_dir / "metrics.csv").is_file() and self._get(self.config, "plot"):
            ours = read_metrics(run_dir / "metrics.csv")
            backend = str(self.model.hparams.get("backend", "")) or "this run"
            other = find_comparison(run_dir, dict(self.model.hparams))
            theirs = read_metrics(other[1] / "metrics.csv") if other is not None else None
            self.curves_path = plot_curves(
                ours, run_dir / "curves.png", label=backend,
                other=theirs, other_label=other[0] if other is not None else None,
                title=self._get(self.config, "run_name"),
            )  # fmt: skip
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.summary = summary_line(
            name=self._get(self.config, "run_name"),
            backend=str(self.model.hparams.get("backend", "?")),
            epochs=trainer.current_epoch,
            steps=trainer.global_step,
            seconds=seconds,
            metrics=final,
            run_dir=run_dir,
            curves=self.curves_path,
        )
        print(self.summary, flush=True)


def _csv_logger(trainer: pl.Trainer) -> CSVLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return logger
    return None


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """The CLI; `args` (a list or dict) replaces sys.argv, e.g. in tests."""
    if args is None:  # the command line: rewritten in place (DDP's launcher re-runs sys.argv)
        sys.argv[1:] = _resolve_config_args(sys.argv[1:])
    elif isinstance(args, (list, tuple)):
        args = _resolve_config_args([str(a) for a in args])
    with quiet_third_party():
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


def console_main() -> None:
    """The `manualbp-train` console script."""
    main()
