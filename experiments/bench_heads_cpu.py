"""The fused linear + cross-entropy head on CPU against torch's own, in time and in peak memory.

Per cell (rows M, hidden K, classes C, dtype, threads) one training step — loss = head(x, W, b, t);
loss.backward(), with x, W and b requiring grad and their .grad reset to None before each step —
of four contenders, in one process:

* manualbp: `manualbp.functional.linear_cross_entropy` (default chunk size);
* torch: `F.linear_cross_entropy` (torch ≥ 2.13) with `options=None`, its reference path;
* torch chunked: the same with `options=torch.nn.LinearCrossEntropyOptions()`;
* unfused: `F.cross_entropy(F.linear(x, W, b), t)`.

Time: interleaved blocks (every round runs each contender's block once, the order rotated
between rounds), the process's CPU time with one thread (`time.process_time`), wall time with
more (CPU time would count the pool's spin-waiting); the median over the rounds. Peak memory:
the highest bytes in use during one step above what was in use before it, from the profiler's
allocation events (`experiments.bench_memory.peak_bytes`, the repo's CPU peak). Ratios are
contender ÷ manualbp: time > 1 means manualbp is faster, memory > 1 that it needs less.

Not a test: run it by hand, e.g. (the sampled grid of results/heads_cpu.md)

    python experiments/bench_heads_cpu.py --out experiments/results/heads_cpu.md
    python experiments/bench_heads_cpu.py --cells 2048x512x8192:float32:1
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: the repo root on the path for `experiments`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import manualbp as mbp
from experiments.bench_memory import peak_bytes

CONTENDERS = ("manualbp", "torch", "torch_chunked", "unfused")

# The sampled grid: the corners of rows 512-8192 × hidden 256-1024 × classes 4k-32k that fit the
# time budget (a step of 8192 × 1024 × 32000 in float32 is ~25 s on one core here, and
# every cell runs 4 contenders × (7 rounds + 2 untimed steps)), plus bf16 and
# two-thread cells. M x K x C : dtype : threads.
DEFAULT_CELLS = (
    "512x256x4096:float32:1",
    "2048x512x8192:float32:1",
    "8192x256x4096:float32:1",
    "512x1024x32000:float32:1",
    "2048x256x32000:float32:1",
    "2048x512x8192:bfloat16:1",
    "2048x256x32000:bfloat16:1",
    "2048x512x8192:float32:2",
    "1024x1024x16384:float32:2",
)


def _steps(m: int, k: int, c: int, dtype: torch.dtype
           ) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:  # fmt: skip
    """(a training step of each contender, the reset of the gradients it starts with)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(c, k, generator=gen) / math.sqrt(k)).to(dtype).requires_grad_()
    bias = (torch.randn(c, generator=gen) * 0.1).to(dtype).requires_grad_()
    target = torch.randint(0, c, (m,), generator=gen)
    params = (x, weight, bias)
    chunked = torch.nn.LinearCrossEntropyOptions()
    losses: dict[str, Callable[[], torch.Tensor]] = {
        "manualbp": lambda: mbp.functional.linear_cross_entropy(x, weight, bias, target),
        "torch": lambda: F.linear_cross_entropy(x, weight, target, linear_bias=bias),
        "torch_chunked": lambda: F.linear_cross_entropy(
            x, weight, target, linear_bias=bias, options=chunked
        ),
        "unfused": lambda: F.cross_entropy(F.linear(x, weight, bias), target),
    }

    def clear() -> None:
        for p in params:
            p.grad = None

    def step(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            clear()
            loss().backward()

        return run

    return {name: step(fn) for name, fn in losses.items()}, clear


def _block(fn: Callable[[], None], n: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(n):
        fn()
    return (clock() - start) / n


def cell(spec: str, rounds: int, block_s: float) -> dict[str, tuple[float, int]]:
    """(median seconds per step, peak bytes of one step) of each contender."""
    shape, dtype_name, threads = spec.split(":")
    m, k, c = (int(v) for v in shape.split("x"))
    torch.set_num_threads(int(threads))
    clock = time.process_time if int(threads) == 1 else time.perf_counter
    steps, clear = _steps(m, k, c, getattr(torch, dtype_name))
    peaks = {}
    for name, fn in steps.items():  # warm-up, then one profiled step for the peak
        fn()
        clear()  # the previous step's gradients are freed before the profiled one, not in it
        peaks[name] = peak_bytes(fn, torch.device("cpu"))[0]
    one = max(_block(fn, 1, clock) for fn in steps.values())
    n = max(1, round(block_s / one))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_block(steps[name], n, clock))
    return {name: (statistics.median(times[name]), peaks[name]) for name in names}


def _row(spec: str, result: dict[str, tuple[float, int]]) -> str:
    shape, dtype_name, threads = spec.split(":")
    t0, p0 = result["manualbp"]
    cols = [shape.replace("x", " × "), dtype_name, threads, f"{t0 * 1e3:.0f}", f"{p0 / 2**20:.1f}"]
    for name in CONTENDERS[1:]:
        t, p = result[name]
        cols += [f"{t / t0:.2f}", f"{p / p0:.2f}"]
    return "| " + " | ".join(cols) + " |"


HEAD = (
    "| M × K × C | dtype | threads | manualbp ms | manualbp peak MiB "
    "| torch time ÷ ours | torch peak ÷ ours | chunked time ÷ ours | chunked peak ÷ ours "
    "| unfused time ÷ ours | unfused peak ÷ ours |"
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="MxKxC:dtype:threads")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-ms", type=float, default=300.0, help="time per block (≥ 1 step)")
    p.add_argument("--out", type=Path, help="markdown file the table is written to")
    args = p.parse_args(argv)
    lines = [HEAD, "|" + " --- |" * 11]
    print(HEAD, flush=True)
    absolute: list[str] = []
    command = "python experiments/bench_heads_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for spec in args.cells:
        result = cell(spec, args.rounds, args.block_ms / 1e3)
        lines.append(_row(spec, result))
        absolute.append(f"- {spec}: " + ", ".join(
            f"{name} {t * 1e3:.1f} ms / {p / 2**20:.1f} MiB" for name, (t, p) in result.items()
        ))  # fmt: skip
        print(lines[-1], flush=True)
        if args.out is not None:  # after every cell: a cut-short run keeps what it measured
            _write(args.out, command, args.rounds, lines, absolute)


def _write(out: Path, command: str, rounds: int, lines: list[str], absolute: list[str]) -> None:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = [
        "# Fused linear + cross-entropy head on CPU: manualbp against torch\n",
        f"- command: `{command}`",
        f"- date: {when}; torch {torch.__version__}; {rounds} interleaved rounds, medians",
        "- a step: loss = head(x, W, b, t) (mean); loss.backward(); x, W, b require grad",
        "- ratios: contender ÷ manualbp (time > 1: manualbp faster; peak > 1: manualbp "
        "needs less); peak = bytes in use during one step above the start (profiler events)",
        "- sampled grid (not the full rows 512-8192 × hidden 256-1024 × classes 4k-32k "
        "product: its largest float32 cells take ~25 s a step on one core here)",
        "", *lines, "", "Absolute values:", "", *absolute, "",
    ]  # fmt: skip
    out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
