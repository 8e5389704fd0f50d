"""What a `manualbp-train fit` leaves behind besides its logs: a curves PNG and a summary line.

* `read_metrics` — the per-epoch series of a Lightning `CSVLogger` ``metrics.csv``;
* `find_comparison` — the newest run beside this one with the same hyperparameters but the
  other backend (manual vs native), if any;
* `plot_curves` — loss and accuracy (or MSE) per epoch, train and validation, the comparison
  run dashed;
* `summary_line` — one line: final metrics, steps, wall time, where the outputs are.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["find_comparison", "plot_curves", "read_metrics", "summary_line"]

Series = dict[str, list[tuple[int, float]]]

# Panels of the figure: a metric family and the logged names that belong to it.
_PANELS = (("loss", "loss"), ("acc", "accuracy"), ("mse", "MSE"))


def read_metrics(path: str | Path) -> Series:
    """``{"train/loss": [(epoch, value), ...], "val/acc": [...], ...}`` from a metrics.csv.

    Per-step columns (``*_step``) and the parity columns are left out; ``train/loss_epoch`` is
    read as ``train/loss``. An epoch logged twice keeps its last value.
    """
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch") or ""
            if not epoch:
                continue
            for name, value in row.items():
                if name in ("epoch", "step") or not value or name.endswith("_step"):
                    continue
                if name.startswith("parity/"):
                    continue
                series.setdefault(name.removesuffix("_epoch"), {})[int(float(epoch))] = float(value)
    return {name: sorted(values.items()) for name, values in sorted(series.items())}


def _comparable(hparams: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if k != "backend" and not k.startswith("_")}


def find_comparison(run_dir: Path, hparams: Mapping[str, Any]) -> tuple[str, Path] | None:
    """(backend, folder) of the newest other run under ``run_dir/../..`` that has the same
    hyperparameters as `hparams` except the backend, and a metrics.csv; None if there is none."""
    import yaml

    backend = hparams.get("backend")
    if backend is None:
        return None
    best: tuple[float, str, Path] | None = None
    for hparams_file in run_dir.parent.parent.glob("*/version_*/hparams.yaml"):
        folder = hparams_file.parent
        metrics = folder / "metrics.csv"
        if folder.resolve() == run_dir.resolve() or not metrics.is_file():
            continue
        try:
            theirs = yaml.safe_load(hparams_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(theirs, dict) or theirs.get("backend") in (None, backend):
            continue
        if _comparable(theirs) != _comparable(hparams):
            continue
        mtime = metrics.stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, str(theirs["backend"]), folder)
    return None if best is None else (best[1], best[2])


def plot_curves(
    series: Series,
    path: Path,
    *,
    label: str,
    other: Series | None = None,
    other_label: str | None = None,
    title: str = "",
) -> Path | None:
    """Write the curves PNG to `path` and return it; None when there is nothing per-epoch to draw.

    Raises ImportError naming the extra when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "plot_curves: needs matplotlib (pip install manualbp[lightning]), or pass --plot false"
        ) from err
    panels = [
        (family, heading)
        for family, heading in _PANELS
        if any(name.split("/")[-1] == family for name in series)
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.6), squeeze=False)
    for ax, (family, heading) in zip(axes.flat, panels):
        mine = {"train": "tab:blue", "val": "tab:orange"}
        theirs = {"train": "tab:green", "val": "tab:red"}
        for runs, run_label, style, colours in (
            (series, label, "-", mine),
            (other or {}, other_label, "--", theirs),
        ):
            for stage, colour in colours.items():
                points = runs.get(f"{stage}/{family}")
                if not points:
                    continue
                epochs, values = zip(*points)
                ax.plot(epochs, values, style, color=colour, marker=".", label=f"{stage} ({run_label})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(heading)
        if family == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title or other:
        fig.suptitle(f"{title}: {label} vs {other_label}" if other else title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _format(name: str, value: float) -> str:
    if not math.isfinite(value):
        return f"{name} {value}"
    if name.endswith("/acc"):
        return f"{name} {value:.2%}"
    return f"{name} {value:.4g}"


def summary_line(
    *,
    name: str,
    backend: str,
    epochs: int,
    steps: int,
    seconds: float,
    metrics: Mapping[str, float],
    run_dir: Path | None,
    curves: Path | None,
) -> str:
    """One line: what ran, its final validation and training metrics, wall time, outputs."""
    shown = [k for k in sorted(metrics) if k.startswith("val/")]
    shown += [k for k in ("train/loss_epoch", "train/acc_epoch", "train/mse_epoch") if k in metrics]
    figures = ", ".join(_format(k.removesuffix("_epoch"), metrics[k]) for k in shown)
    where = f"outputs in {run_dir}" if run_dir is not None else "no logger: nothing written"
    if run_dir is not None:
        where += " (metrics.csv, checkpoints/"
        where += f", {curves.name})" if curves is not None else ")"
    return (
        f"{name}: {backend} backward, {epochs} epoch{'' if epochs == 1 else 's'} ({steps} steps) "
        f"in {seconds:.1f} s; "
        f"{figures or 'no metrics logged'}; {where}"
    )
