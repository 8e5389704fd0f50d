"""One benchmark run: measure the ceilings, run every case of every suite, write the outputs."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import importlib.util
import itertools
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from manualbp.activations import get_activation
from manualbp.bench.cases import Case, MlpCell, dtype_name
from manualbp.bench.common import Env, status_rows
from manualbp.bench.contenders import Contender, make_contenders
from manualbp.bench.memory import memory_case
from manualbp.bench.report import COLUMNS, add_speedups, write_csv, write_markdown, write_plot
from manualbp.bench.suites import LAYER_OPS, run_case
from manualbp.bench.timing import Ceilings, measure_ceilings

__all__ = ["COLUMNS", "SUITES", "BenchConfig", "BenchResult", "run_benchmark"]

SUITES: tuple[str, ...] = ("layer", "mlp", "loss", "memory")


@dataclass
class BenchConfig:
    """What to run. Shapes are (M, N, K): rows, output features (classes for `loss`), inputs."""

    suites: Sequence[str] = ("layer", "mlp", "loss", "memory")
    shapes: Sequence[tuple[int, int, int]] = ((256, 256, 256),)
    loss_shapes: Sequence[tuple[int, int, int]] = ()  # (rows, classes, hidden); () = `shapes`
    mlp_shapes: Sequence[tuple[int, int, int]] = ()  # (batch, width, input width); () = `shapes`
    # sampled cells of the mlp grid, beside the product of `mlp_shapes` (which, when only cells
    # are given, is left out rather than taken from `shapes`)
    mlp_cells: Sequence[MlpCell] = ()
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    activations: Sequence[str] = ("gelu",)
    contenders: Sequence[str] = ("manualbp-triton", "manualbp-torch", "native", "compile")
    memory_contenders: Sequence[str] | None = None  # None: the same as `contenders`
    depth: int = 4  # the mlp suite's depth when `depths` is empty
    depths: Sequence[int] = ()  # the mlp suite's depths (one case each); () = (depth,)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: Path = Path("bench-results")
    name: str = "bench"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0
    # torch.set_num_threads during the run (CPU); several: the timing cases once per count, each
    # count's rows marked with it; None: leave torch's own
    threads: int | Sequence[int] | None = None
    rounds: int = 9  # CPU: interleaved rounds per timing (manualbp.bench.interleave)
    ceilings: bool = True
    plot: bool = True
    progress: bool = True
    time_budget_s: float = math.inf
    ref64_max_flops: float = 2e10
    command: str = ""
    note: str = ""  # one line for the Markdown header (e.g. what else loaded the machine)
    extra_contenders: Sequence[Contender] = field(default_factory=tuple)


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    paths: list[Path]
    ceilings: Ceilings | None


def _check_config(config: BenchConfig) -> None:
    unknown = [s for s in config.suites if s not in SUITES]
    if unknown or not config.suites:
        raise ValueError(f"suites: expected some of {', '.join(SUITES)}, got {list(config.suites)}")
    for shape in [*config.shapes, *config.loss_shapes, *config.mlp_shapes]:
        if len(shape) != 3 or any(int(v) < 1 for v in shape):
            raise ValueError(f"shapes: expected (M, N, K) of positive ints, got {shape}")
    for activation in [*config.activations, *(a for cell in config.mlp_cells for a in cell.activations)]:
        get_activation(activation)  # raises ValueError naming the known activations
    for depth in [*depths_of(config), *(d for cell in config.mlp_cells for d in cell.depths)]:
        if depth < 1:
            raise ValueError(f"depths: expected positive ints, got {list(depths_of(config))}")
    for threads in all_thread_counts(config):
        if threads is not None and threads < 1:
            raise ValueError(f"threads: expected positive ints, got {config.threads}")
    if config.rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {config.rounds}")


def depths_of(config: BenchConfig) -> list[int]:
    return list(config.depths) if config.depths else [config.depth]


def thread_counts(config: BenchConfig) -> list[int | None]:
    """The thread counts the timing cases run under, in order ([None]: torch's own)."""
    if config.threads is None:
        return [None]
    if isinstance(config.threads, int):
        return [config.threads]
    return list(config.threads) or [None]


def all_thread_counts(config: BenchConfig) -> list[int | None]:
    """`thread_counts`, then those only some mlp cells ask for."""
    counts = thread_counts(config)
    for cell in config.mlp_cells:
        counts += [t for t in cell.threads if t not in counts]
    return counts


def runs_under(case: Case, threads: int | None, config: BenchConfig) -> bool:
    """Whether `case` is timed in the group of thread count `threads` (as requested)."""
    if case.threads is None:
        return threads in thread_counts(config)
    return case.threads == threads


def all_dtypes(config: BenchConfig) -> list[torch.dtype]:
    dtypes = list(config.dtypes)
    for cell in config.mlp_cells:
        dtypes += [d for d in cell.dtypes if d not in dtypes]
    return dtypes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cases(config: BenchConfig) -> tuple[list[Case], list[Case]]:
    """Timing cases suite by suite (layer, mlp, loss), then the memory cases: with a time
    budget, what runs out is the end of this list."""
    shapes = list(config.shapes)
    loss_shapes = list(config.loss_shapes) if config.loss_shapes else shapes
    mlp_shapes = list(config.mlp_shapes) if config.mlp_shapes else [] if config.mlp_cells else shapes
    per_suite: dict[str, list[Case]] = {"layer": [], "mlp": [], "loss": []}
    for dtype in config.dtypes:
        for (M, N, K), activation in itertools.product(shapes, config.activations):
            per_suite["layer"].append(Case("layer", M, N, K, dtype, activation))
        grid = itertools.product(mlp_shapes, config.activations, depths_of(config))
        per_suite["mlp"] += [Case("mlp", M, N, K, dtype, act, depth) for (M, N, K), act, depth in grid]
        # the loss head has no activation: one case per shape and dtype
        per_suite["loss"] += [Case("loss", M, N, K, dtype, "") for M, N, K in loss_shapes]
    for cell in config.mlp_cells:
        M, N, K = cell.shape
        cell_grid = itertools.product(
            cell.dtypes or config.dtypes,
            cell.activations or config.activations,
            cell.depths or depths_of(config),
            cell.threads or [None],
        )
        per_suite["mlp"] += [Case("mlp", M, N, K, dtype, act, depth, t) for dtype, act, depth, t in cell_grid]
    timing = [
        case for suite in ("layer", "mlp", "loss") if suite in config.suites for case in per_suite[suite]
    ]
    memory = per_suite["layer"] + per_suite["mlp"] + per_suite["loss"] if "memory" in config.suites else []
    return timing, memory


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """Yields advance(description); rich if installed, tqdm else, silence when disabled."""
    if enabled:
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns) as progress:
                task = progress.add_task("benchmark", total=total)
                yield lambda text: progress.update(task, advance=1, description=text)
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            with tqdm(total=total) as bar:

                def advance(text: str) -> None:
                    bar.set_description(text)
                    bar.update(1)

                yield advance
            return
        except ImportError:
            pass
    yield lambda text: None


def _skipped(case: Case, contenders: Sequence[Contender], note: str, memory: bool) -> list[dict[str, Any]]:
    ops = {"layer": LAYER_OPS, "mlp": ("train_step",), "loss": ("fwd+bwd",)}[case.suite]
    suite = {"suite": "memory"} if memory else {}
    return [
        {**status_rows(case, (op,), "", contender.name, "skipped", note)[0], **suite}
        for contender in contenders
        for op in (ops if not memory else (case.suite,))
    ]


def _method(config: BenchConfig, device: torch.device) -> str:
    """How the times were taken, for the Markdown header."""
    if device.type == "cuda":
        timing = (
            "Times are medians of triton.testing.do_bench (warm-up, then many runs of each contender "
            "in turn; L2 cleared before each run)."
        )
    else:
        timing = (
            "Times are interleaved medians: all contenders of one case and operation are timed in the "
            f"same stretch of time, as {config.rounds} rounds of one block per contender (the same "
            "number of calls each, sized from a warm-up and then from the previous round so that "
            "the slowest block lasts about "
            f"{config.rep_ms:g} ms ÷ {config.rounds}), in an order that rotates and reverses from round "
            "to round; a block is timed with the process's CPU time (time.process_time) with one "
            "thread, with wall time (time.perf_counter) with more; a contender's time is the median "
            "of its blocks' per-call times, q20/q80 their 20/80 % quantiles."
        )
    return (
        f"{timing} `× native` = native eager's median ÷ this median (> 1 is faster), from the same "
        "interleaved run. The floor is the roofline bound max(FLOPs ÷ peak matmul rate, minimal "
        "bytes ÷ copy bandwidth) from the ceilings above; `% of floor` = floor ÷ median. Every "
        "contender's output and gradients were checked against native autograd before timing "
        "(`max rel err`); a wrong result is an `error` row."
    )


def _header(
    config: BenchConfig, tags: dict[str, str], ceilings: dict[int, Ceilings], device: torch.device
) -> list[str]:
    counts = ", ".join(str(t) for t in ceilings) or ", ".join(
        str(t if t is not None else torch.get_num_threads()) for t in thread_counts(config)
    )
    lines = [
        "# manualbp benchmark",
        "",
        f"- command: `{config.command or '(called from Python)'}`",
        f"- date: {tags['date']}",
        f"- device: {tags['device']}, threads {counts}; torch {tags['torch']}; triton {tags['triton']}",
        f"- TF32 matmuls allowed: {torch.backends.cuda.matmul.allow_tf32}",
    ]
    if config.note:
        lines.append(f"- note: {config.note}")
    for threads, ceiling in ceilings.items():
        where = f", threads={threads}" if device.type == "cpu" else ""
        for dtype, peak in ceiling.peak_flops.items():
            n = ceiling.matmul_size[dtype]
            lines.append(
                f"- measured peak matmul rate, {dtype_name(dtype)}{where}: {peak / 1e12:.3g} TFLOP/s "
                f"({n}×{n}×{n}, 20 % quantile of the times)"
            )
        lines.append(
            f"- measured copy bandwidth{where}: {ceiling.bandwidth / 1e9:.3g} GB/s "
            f"(copy_ of {ceiling.copy_bytes // 2 / 2**20:.0f} MiB, read + write counted, 20 % quantile)"
        )
    return [*lines, "", _method(config, device), ""]


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run `config`; write `<name>.csv`, `<name>.md`, `<name>.png` into `config.out`."""
    _check_config(config)
    threads = torch.get_num_threads()
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig) -> BenchResult:
    device = torch.device(config.device)
    contenders = make_contenders(config.contenders) + list(config.extra_contenders)
    memory_contenders = (
        contenders if config.memory_contenders is None else make_contenders(config.memory_contenders)
    )
    timing_cases, memory_cases = _cases(config)
    groups = all_thread_counts(config)
    tags = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
    }
    ceilings: dict[int, Ceilings] = {}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    per_group = [[c for c in timing_cases if runs_under(c, t, config)] for t in groups]
    total = len(contenders) * sum(map(len, per_group)) + len(memory_contenders) * len(memory_cases)
    with _progress(total, config.progress) as advance:
        try:
            for group, threads in enumerate(groups):
                if threads is not None:
                    torch.set_num_threads(threads)
                ceiling = None
                if config.ceilings:
                    ceiling = measure_ceilings(device, all_dtypes(config), config.warmup_ms, config.rep_ms)
                    ceilings[torch.get_num_threads()] = ceiling
                env = Env(device, config.warmup_ms, config.rep_ms, ceiling, config.seed,
                          config.ref64_max_flops, config.rounds)  # fmt: skip
                # Memory does not depend on the thread count: measured once, in the first group.
                cases = [(c, False) for c in per_group[group]]
                cases += [(c, True) for c in memory_cases if group == 0]
                _run_group(config, cases, contenders, memory_contenders, env, start, advance, rows)
        except KeyboardInterrupt:
            # Interrupted (e.g. `timeout -s INT`): still write what was measured.
            rows.append(
                {
                    "suite": "run",
                    "status": "interrupted",
                    "note": "stopped by SIGINT; rows after this are missing",
                }
            )
    add_speedups(rows)
    for row in rows:
        row.update({k: v for k, v in tags.items()})
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{config.name}.csv", out / f"{config.name}.md"]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], _header(config, tags, ceilings, device))
    if config.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"no {config.name}.png: matplotlib is not installed (pip install manualbp[bench])")
    elif config.plot:
        png = out / f"{config.name}.png"
        first = next(iter(ceilings.values()), None)
        peaks = {dtype_name(d): p for d, p in first.peak_flops.items()} if first else {}
        title = f"manualbp bench — {tags['device']} — torch {tags['torch']} — {tags['date']}"
        if write_plot(rows, png, title, peaks):
            paths.append(png)
    return BenchResult(rows, paths, next(iter(ceilings.values()), None))


def _run_group(
    config: BenchConfig,
    cases: list[tuple[Case, bool]],
    contenders: list[Contender],
    memory_contenders: list[Contender],
    env: Env,
    start: float,
    advance: Callable[[str], None],
    rows: list[dict[str, Any]],
) -> None:
    """Append the rows of `cases` ((case, is memory)) under the current thread count to `rows`
    (in place, so that an interrupted run keeps what was measured)."""
    threads = torch.get_num_threads()
    for case, memory in cases:
        label = f"{'memory ' if memory else ''}{case.suite} {case.label} {dtype_name(case.dtype)}"
        label += f" threads={threads}"
        who = memory_contenders if memory else contenders
        if time.perf_counter() - start > config.time_budget_s:
            case_rows = _skipped(case, who, "time budget spent", memory)
            for _ in who:
                advance(label)
        else:
            suite = memory_case if memory else run_case
            began = time.perf_counter()
            case_rows = suite(case, who, env, functools.partial(advance, label))
            # what the whole case cost (checks and every contender): for sizing a run's grid
            case_rows = [{**row, "case_seconds": time.perf_counter() - began} for row in case_rows]
        rows += [{**row, "threads": threads} for row in case_rows]
