"""Regenerate experiments/results/digits_cpu.md (and digits_cpu.png): digits, manual vs native.

    python -m experiments.digits_report                  # writes experiments/results/digits_cpu.*
    python -m experiments.digits_report --out /tmp/x     # anywhere else

Runs `manualbp-train fit --config digits` twice in this process, once per backend (same seed,
same initial weights, same batches), then writes a Markdown report with the per-epoch validation
accuracy and loss of both runs, their final metrics, the gradient-parity figures the callback
logged, and the curves PNG (manual solid, native dashed). Every number in it comes from the
runs' metrics.csv, so a fresh run reproduces the tables epoch by epoch; only the wall times
depend on the machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import platform
import tempfile
import time
from pathlib import Path

import torch

from manualbp.lightning.cli import main as cli_main
from manualbp.lightning.plots import plot_curves, read_metrics

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("manual", "native")


def _parity(metrics_csv: Path) -> tuple[int, float, float]:
    """(checks, max parity/max, max parity/native_max) logged by GradientParityCallback."""
    checks, ours, native = 0, 0.0, 0.0
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("parity/max"):
                checks += 1
                ours = max(ours, float(row["parity/max"]))
                native = max(native, float(row["parity/native_max"]))
    return checks, ours, native


def run(backend: str, runs_dir: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    cli = cli_main([
        "fit", "--config", "digits", "--runs_dir", str(runs_dir), "--run_name", f"digits_{backend}",
        "--model.init_args.backend", backend, "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *extra,
    ])  # fmt: skip
    seconds = time.perf_counter() - start
    run_dir = Path(cli.trainer.logger.log_dir)  # type: ignore[union-attr]
    return {
        "backend": backend,
        "seconds": seconds,
        "steps": cli.trainer.global_step,
        "epochs": cli.trainer.current_epoch,
        "series": read_metrics(run_dir / "metrics.csv"),
        "parity": _parity(run_dir / "metrics.csv"),
        "dir": run_dir,
        "val_size": len(cli.datamodule.val_set),
        "train_size": len(cli.datamodule.train_set),
    }


def _column(result: dict, name: str) -> dict[int, float]:
    return dict(result["series"].get(name, []))


def report(results: list[dict], command: str) -> str:
    manual, native = results
    val_size = manual["val_size"]
    lines = [
        "# Digits on the CPU: hand-written backward vs native autograd",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by",
        "",
        "```bash",
        command,
        "```",
        "",
        f"torch {torch.__version__}, lightning {importlib.metadata.version('lightning')}, "
        f"Python {platform.python_version()}, {platform.machine()}, no GPU. Config: "
        "`manualbp/lightning/configs/digits.yaml` — scikit-learn 8×8 digits "
        f"({manual['train_size']} train / {val_size} val, seed 0, inputs standardised with the "
        "training split's statistics), MLP [64, 64, 10] ReLU, cross-entropy, plain SGD η = 0.1, "
        f"batch 32, {manual['epochs']} epochs = {manual['steps']} steps, float32, "
        "`seed_everything: 0`, `torch_threads: 1`, `GradientParityCallback(every_n_steps=50)`.",
        "",
        "Per epoch (validation after each epoch; train loss is the epoch's mean):",
        "",
        "| epoch | val acc manual | val acc native | val loss manual | val loss native "
        "| train loss manual | train loss native |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    columns = [
        (_column(r, name), fmt)
        for name, fmt in (("val/acc", "{:.2%}"), ("val/loss", "{:.8f}"), ("train/loss", "{:.8f}"))
        for r in results
    ]
    for epoch in sorted(columns[0][0]):
        cells = [fmt.format(col[epoch]) if epoch in col else "—" for col, fmt in columns]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| backend | val accuracy (final) | val loss (final) | gradient checks | max `parity/max` "
        "| max `parity/native_max` | wall time of `fit` |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        acc = _column(r, "val/acc")
        loss = _column(r, "val/loss")
        last = max(acc)
        checks, ours, theirs = r["parity"]
        correct = round(acc[last] * val_size)
        lines.append(
            f"| {r['backend']} | {acc[last]:.2%} ({correct}/{val_size}) | {loss[last]:.8f} | {checks} "
            f"| {ours:.2e} | {theirs:.2e} | {r['seconds']:.1f} s |"
        )
    lines += [
        "",
        "`parity/max`: the largest relative difference of a gradient to native autograd in float64 "
        "on the checked step's batch; `parity/native_max`: native float32 autograd's own "
        "difference on the same batch (float32 rounding alone). Wall times depend on the machine "
        "and its load; every other number is reproduced by the command above.",
        "",
        "![loss and accuracy per epoch, manual solid, native dashed: the curves coincide](digits_cpu.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.digits_report",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for digits_cpu.md/.png")
    parser.add_argument("--max_epochs", type=int, default=None, help="override the config's epochs")
    args = parser.parse_args(argv)
    extra = [] if args.max_epochs is None else ["--trainer.max_epochs", str(args.max_epochs)]
    command = "python -m experiments.digits_report" + (
        f" --max_epochs {args.max_epochs}" if args.max_epochs is not None else ""
    )
    with tempfile.TemporaryDirectory(prefix="digits_report_") as tmp:
        results = [run(backend, Path(tmp), extra) for backend in BACKENDS]
        args.out.mkdir(parents=True, exist_ok=True)
        manual, native = results
        plot_curves(manual["series"], args.out / "digits_cpu.png", label="manual",
                    other=native["series"], other_label="native", title="digits")  # fmt: skip
        (args.out / "digits_cpu.md").write_text(report(results, command))
    print(f"wrote {args.out / 'digits_cpu.md'} and {args.out / 'digits_cpu.png'}")


if __name__ == "__main__":
    main()
