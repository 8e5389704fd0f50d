"""Levenberg–Marquardt on hand-built Jacobians vs SGD and Adam: iterations and time to a target MSE.

    python -m experiments.second_order                    # both problems, plain loops + Lightning
    python -m experiments.second_order --problems sine --no-lightning     # quick look

Problems (full batch, float64, weights seeded identically for every method):

* ``sine`` — ``MLP([1, 10, 1], "tanh")`` on 64 points of sin x + N(0, 0.1²) on [−π, π]
  (noise floor MSE 0.01);
* ``regression`` — ``MLP([3, 16, 1], "tanh")`` on the training split of
  :class:`manualbp.lightning.data.RegressionDataModule` (sin πx₀ + x₁x₂ + ½x₂² + N(0, 0.05²)).

Each first-order method gets its learning rate tuned over a grid (the rate that reaches the
target in the fewest iterations wins; a run is cut as soon as it can no longer win). An
"iteration" is one full-batch update: one LM solve (with its retries) or one SGD/Adam step.
Wall time is measured in this process with one intra-op thread; the loss after i iterations
counts as known when the forward pass that computes it has finished.

Then the same fits run under ``lightning.Trainer`` with
:class:`manualbp.lightning.second_order.SecondOrderRegressor` (manual optimisation), stopped by
``EarlyStopping(stopping_threshold=target)``.

Writes ``experiments/results/second_order.png`` (loss vs iteration and vs time) and
``second_order.md`` (tables, with the command and date).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import manualbp as mbp
from manualbp.optim import LevenbergMarquardt

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Problem:
    name: str
    sizes: list[int]
    x: Tensor
    y: Tensor
    target: float
    sgd_lrs: list[float]
    adam_lrs: list[float]


@dataclass
class Curve:
    """Loss after 0, 1, 2, ... iterations and the seconds until each was known."""

    method: str
    setting: str
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    target: float = 0.0

    @property
    def iterations_to_target(self) -> int | None:
        return next((i for i, loss in enumerate(self.losses) if loss <= self.target), None)

    @property
    def seconds_to_target(self) -> float | None:
        i = self.iterations_to_target
        return None if i is None else self.times[i]


# ----------------------------------------------------------------------------------- problems


def sine_problem(target: float) -> Problem:
    from manualbp.lightning.second_order import noisy_sine

    x, y = noisy_sine(n=64, noise=0.1, seed=0)
    sgd_lrs, adam_lrs = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5], [0.01, 0.03, 0.1, 0.3, 0.5, 1.0]
    return Problem("sine", [1, 10, 1], x, y, target, sgd_lrs, adam_lrs)


def regression_problem(target: float, num_samples: int) -> Problem:
    from manualbp.lightning.data import RegressionDataModule

    data = RegressionDataModule(num_samples=num_samples, batch_size=num_samples, seed=0)
    data.setup()
    assert data.train_set is not None  # setup() built it
    x, y = (t.double() for t in data.train_set.tensors)
    sgd_lrs, adam_lrs = [0.03, 0.1, 0.2, 0.3, 0.5], [0.01, 0.03, 0.1, 0.2, 0.3]
    return Problem("regression", [3, 16, 1], x, y, target, sgd_lrs, adam_lrs)


def make_model(problem: Problem, seed: int) -> mbp.MLP:
    torch.manual_seed(seed)
    return mbp.MLP(problem.sizes, "tanh", dtype=torch.float64)


def _mse(model: mbp.MLP, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(mbp.functional.mse_loss(model(x), y))


# ----------------------------------------------------------------------------------- loops


def run_lm(problem: Problem, seed: int, max_iters: int, gauss_newton: bool = False) -> Curve:
    model = make_model(problem, seed)
    opt = LevenbergMarquardt(model, damping=1e-3, gauss_newton=gauss_newton)
    name = "Gauss–Newton" if gauss_newton else "Levenberg–Marquardt"
    curve = Curve(name, "λ = 0" if gauss_newton else "λ₀ = 1e-3, ×10 / ÷10", target=problem.target)
    start = time.perf_counter()
    curve.losses.append(_mse(model, problem.x, problem.y))
    curve.times.append(time.perf_counter() - start)
    for _ in range(max_iters):
        loss = opt.step(problem.x, problem.y)
        curve.losses.append(loss)
        curve.times.append(time.perf_counter() - start)
        if not math.isfinite(loss):
            break
    return curve


def run_first_order(
    problem: Problem, seed: int, make_opt: Callable, name: str, lr: float, max_iters: int
) -> Curve:
    """Full-batch steps until the target or `max_iters`; stops at the target."""
    model = make_model(problem, seed)
    opt = make_opt(model.parameters(), lr=lr)
    curve = Curve(name, f"lr = {lr:g}", target=problem.target)
    start = time.perf_counter()
    for i in range(max_iters + 1):
        opt.zero_grad()
        loss = mbp.functional.mse_loss(model(problem.x), problem.y)  # the loss after i steps
        value = float(loss.detach())
        curve.losses.append(value)
        curve.times.append(time.perf_counter() - start)
        if value <= problem.target or i == max_iters or not math.isfinite(value):
            break
        loss.backward()
        opt.step()
    return curve


def tuned_first_order(
    problem: Problem, seed: int, make_opt: Callable, name: str, lrs: list[float], max_iters: int
) -> tuple[Curve, list[Curve]]:
    """The best learning rate of the grid: fewest iterations to target, else lowest final loss."""
    best: Curve | None = None
    tried: list[Curve] = []
    for lr in lrs:
        budget = max_iters
        if best is not None and best.iterations_to_target is not None:
            budget = best.iterations_to_target  # a run that needs more cannot win
        curve = run_first_order(problem, seed, make_opt, name, lr, budget)
        tried.append(curve)
        if _better(curve, best):
            best = curve
    assert best is not None
    return best, tried


def _better(curve: Curve, best: Curve | None) -> bool:
    if best is None:
        return True
    mine, theirs = curve.iterations_to_target, best.iterations_to_target
    if mine is not None or theirs is not None:
        return mine is not None and (theirs is None or mine < theirs)
    final = curve.losses[-1] if math.isfinite(curve.losses[-1]) else math.inf
    return final < best.losses[-1]


# ----------------------------------------------------------------------------------- Lightning


def run_lightning(problem: Problem, seed: int, optimizer: str, lr: float, max_epochs: int) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from manualbp.lightning.cli import quiet_third_party
    from manualbp.lightning.second_order import SecondOrderRegressor, full_batch_loader

    torch.manual_seed(seed)
    module = SecondOrderRegressor(sizes=problem.sizes, activation="tanh", optimizer=optimizer, lr=lr)
    stop = EarlyStopping(
        monitor="train_mse",
        mode="min",
        stopping_threshold=problem.target,
        patience=max_epochs,
        check_on_train_epoch_end=True,
    )
    with quiet_third_party():  # Lightning's tips and known third-party warnings
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[stop],
        )
        start = time.perf_counter()
        trainer.fit(module, full_batch_loader(problem.x, problem.y))
        seconds = time.perf_counter() - start
    final = float(trainer.callback_metrics["train_mse"])
    return {"epochs": trainer.current_epoch, "final": final, "seconds": seconds}


# ----------------------------------------------------------------------------------- report


def plot(results: dict[str, list[Curve]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (name, curves) in enumerate(results.items()):
        for curve in curves:
            label = f"{curve.method} ({curve.setting})"
            # Log axes: iteration i is drawn at i + 1; times start after the first forward (> 0).
            axes[row][0].plot(range(1, len(curve.losses) + 1), curve.losses, label=label)
            axes[row][1].plot(curve.times, curve.losses, label=label)
        # Gauss–Newton can overshoot by orders of magnitude: keep the axis on the useful range.
        low = min(min(c.losses) for c in curves)
        high = 3 * max(c.losses[0] for c in curves)
        xlabels = ("iteration + 1 (full batch)", "wall time [s]")
        for ax, xlabel in zip(axes[row], xlabels, strict=True):
            ax.axhline(curves[0].target, color="grey", linestyle=":", label="target")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(0.7 * low, high)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training MSE")
            ax.set_title(f"{name}: MSE vs {xlabel.split(' (')[0].replace(' + 1', '')}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][1].legend(fontsize=8, loc="lower left")  # the corner no curve reaches
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def _grid_entry(curve: Curve) -> str:
    """'lr = 0.1 → 258 iterations', or where a run stopped without reaching the target."""
    if curve.iterations_to_target is not None:
        return f"{curve.setting} → {curve.iterations_to_target} iterations"
    reason = "diverged" if not math.isfinite(curve.losses[-1]) else "stopped"
    return f"{curve.setting} → {reason} at {len(curve.losses) - 1} (MSE {curve.losses[-1]:.4g})"


def markdown(
    results: dict[str, list[Curve]],
    tuning: dict[str, dict[str, list[Curve]]],
    lightning_rows: list[tuple[str, str, str, dict]],
    problems: dict[str, Problem],
    args: argparse.Namespace,
) -> str:
    lines = [
        "# Second-order training: Levenberg–Marquardt on manual Jacobians",
        "",
        f"Command: `{' '.join(['python -m experiments.second_order', *sys.argv[1:]])}`",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"torch {torch.__version__}, Python {platform.python_version()}, CPU, "
        f"torch.set_num_threads(1), seed {args.seed}. Wall times are from a shared CPU machine "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end of the run) "
        "and only comparable within one run.",
        "",
        "Full-batch training in float64, every method from the same seeded initial weights. "
        "An iteration is one LM solve (including its rejected retries) or one SGD/Adam step. "
        "SGD and Adam stop at the target; LM and Gauss–Newton run a fixed number of iterations. "
        "In the learning-rate grids a run is stopped as soon as it can no longer beat the best "
        "so far (or at the iteration cap).",
        "",
    ]
    for name, curves in results.items():
        problem = problems[name]
        lines += [
            f"## {name}: MLP({problem.sizes}, tanh), {len(problem.x)} examples, "
            f"target MSE {problem.target:g}",
            "",
            "| method | setting | iterations to target | seconds to target | ms / iteration | "
            "final MSE (iterations) | highest MSE on the way |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in curves:
            iters = c.iterations_to_target
            per_iter = 1e3 * c.times[-1] / max(len(c.losses) - 1, 1)
            lines.append(
                f"| {c.method} | {c.setting} | {_fmt(iters, 'd')} | "
                f"{_fmt(c.seconds_to_target, '.3f')} | {per_iter:.2f} | "
                f"{c.losses[-1]:.4g} ({len(c.losses) - 1}) | {max(c.losses):.4g} |"
            )
        lines.append("")
        for method, tried in tuning[name].items():
            grid = "; ".join(_grid_entry(c) for c in tried)
            lines.append(f"{method} learning-rate grid: {grid}.")
        lines.append("")
    if lightning_rows:
        lines += [
            "## Under `lightning.Trainer` (SecondOrderRegressor, manual optimisation)",
            "",
            "One full batch per epoch; `EarlyStopping(stopping_threshold=target)` on `train_mse`; "
            "the learning rates are the tuned ones above. Fit seconds include the Trainer's own "
            "per-epoch overhead.",
            "",
            "| problem | optimizer | setting | epochs | final train MSE | fit seconds |",
            "|---|---|---|---|---|---|",
        ]
        for problem_name, optimizer, setting, row in lightning_rows:
            lines.append(
                f"| {problem_name} | {optimizer} | {setting} | {row['epochs']} | "
                f"{row['final']:.4g} | {row['seconds']:.2f} |"
            )
        lines.append("")
    lines.append("![loss vs iteration and time](second_order.png)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["sine", "regression"],
                        choices=["sine", "regression"])
    parser.add_argument("--sine-target", type=float, default=0.02)
    parser.add_argument("--regression-target", type=float, default=0.01)
    parser.add_argument("--regression-samples", type=int, default=512)
    parser.add_argument("--lm-iters", type=int, default=40, help="LM / Gauss–Newton iterations")
    parser.add_argument("--max-iters", type=int, default=3000, help="cap for SGD / Adam")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-lightning", action="store_true", help="skip the Trainer runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "second_order")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    problems = {}
    if "sine" in args.problems:
        problems["sine"] = sine_problem(args.sine_target)
    if "regression" in args.problems:
        problems["regression"] = regression_problem(args.regression_target, args.regression_samples)

    results: dict[str, list[Curve]] = {}
    tuning: dict[str, dict[str, list[Curve]]] = {}
    lightning_rows: list[tuple[str, str, str, dict]] = []
    for name, problem in problems.items():
        lm = run_lm(problem, args.seed, args.lm_iters)
        gn = run_lm(problem, args.seed, args.lm_iters, gauss_newton=True)
        sgd, sgd_grid = tuned_first_order(
            problem, args.seed, torch.optim.SGD, "SGD", problem.sgd_lrs, args.max_iters
        )
        adam, adam_grid = tuned_first_order(
            problem, args.seed, torch.optim.Adam, "Adam", problem.adam_lrs, args.max_iters
        )
        results[name] = [lm, gn, sgd, adam]
        tuning[name] = {"SGD": sgd_grid, "Adam": adam_grid}
        for c in results[name]:
            print(f"{name:10s} {c.method:20s} {c.setting:22s} iterations to target "
                  f"{_fmt(c.iterations_to_target, 'd'):>11s}  seconds "
                  f"{_fmt(c.seconds_to_target, '.3f'):>11s}  final {c.losses[-1]:.4g}")
        if not args.no_lightning:
            runs = [("lm", 1e-3, lm.setting, args.lm_iters)]
            runs += [("sgd", float(sgd.setting.split("= ")[1]), sgd.setting, args.max_iters)]
            runs += [("adam", float(adam.setting.split("= ")[1]), adam.setting, args.max_iters)]
            for optimizer, lr, setting, epochs in runs:
                row = run_lightning(problem, args.seed, optimizer, lr, epochs)
                lightning_rows.append((name, optimizer, setting, row))
                print(f"{name:10s} Lightning {optimizer:5s} {setting:22s} epochs {row['epochs']}"
                      f"  final {row['final']:.4g}  {row['seconds']:.2f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png, md = args.out.with_suffix(".png"), args.out.with_suffix(".md")
    plot(results, png)
    md.write_text(markdown(results, tuning, lightning_rows, problems, args))
    print(f"wrote {png} and {md}")


if __name__ == "__main__":
    main()
