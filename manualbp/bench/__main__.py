"""Command line: ``python -m manualbp.bench`` (console script ``manualbp-bench``).

Examples::

    # CPU, small shapes, no Triton:
    python -m manualbp.bench --device cpu --shapes 128x128x128 512x512x512 \\
        --contenders manualbp-torch native compile --name bench_cpu    # into ./bench-results

    # CUDA, square shapes from the M/N/K lists' product, two dtypes:
    python -m manualbp.bench -M 1024 4096 -N 4096 -K 4096 --dtypes bfloat16 float32

    # CPU goal grid of the mlp suite: batch × width (BxW) × depth × activation × dtype × threads
    python -m manualbp.bench --device cpu --suites mlp --contenders manualbp-torch native \\
        --mlp-shapes 32x64 256x512 --depths 2 4 8 --activations all \\
        --dtypes float32 bfloat16 --threads 1 2 --mlp-cells 4096x2048:2:relu:float32:1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from manualbp.bench.cases import MlpCell
from manualbp.bench.contenders import CONTENDER_NAMES
from manualbp.bench.runner import SUITES as SUITE_NAMES


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected MxNxK with positive ints (e.g. 512x1024x256), got {text!r}"
        )
    return values


def _mlp_shape(text: str) -> tuple[int, int, int]:
    """BxW (batch × width, the input as wide as the layers) or MxNxK as --shapes."""
    parts = text.lower().split("x")
    if len(parts) == 2:
        try:
            batch, width = (int(p) for p in parts)
        except ValueError:
            batch = width = 0
        if min(batch, width) < 1:
            raise argparse.ArgumentTypeError(
                f"expected BxW (batch x width) or MxNxK with positive ints (e.g. 256x512), got {text!r}"
            )
        return batch, width, width
    return _shape(text)


def _mlp_cell(text: str) -> MlpCell:
    try:
        return MlpCell.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def activation_names(names: Sequence[str]) -> list[str]:
    """`names` with "all" expanded to every activation of manualbp's registry (order kept, no repeats)."""
    from manualbp.activations import ACTIVATIONS

    expanded: list[str] = []
    for name in names:
        for one in ACTIVATIONS if name == "all" else (name,):
            if one not in expanded:
                expanded.append(one)
    return expanded


def _expand_cell(cell: MlpCell) -> MlpCell:
    return dataclasses.replace(cell, activations=tuple(activation_names(cell.activations)))


def program_name(argv0: str | None = None) -> str:
    """How the user started us: ``manualbp-bench`` (console script) or ``python -m manualbp.bench``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    module_run = Path(argv0).name in ("__main__.py", "-m", "-c", "")
    return "python -m manualbp.bench" if module_run else "manualbp-bench"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where the help already says them or there is none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(d) for d in default)
        return f"{text} (default: {default})"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or program_name(),
        description="Time manualbp's layers against native PyTorch and torch.compile, "
        "after checking every contender's output and gradients. Writes NAME.csv, NAME.md and "
        "NAME.png into --out.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--suites", nargs="+", choices=SUITE_NAMES, default=list(SUITE_NAMES),
                        help="what to time")  # fmt: skip
    parser.add_argument("--shapes", nargs="+", type=_shape, metavar="MxNxK",
                        help="explicit (M, N, K) shapes; overrides -M/-N/-K")  # fmt: skip
    parser.add_argument("--loss-shapes", nargs="+", type=_shape, metavar="MxNxK",
                        help="loss suite shapes: rows x classes x hidden (default: --shapes)")  # fmt: skip
    parser.add_argument("--mlp-shapes", nargs="+", type=_mlp_shape, metavar="BxW",
                        help="mlp suite shapes: batch x width (or MxNxK; default: --shapes)")  # fmt: skip
    parser.add_argument("--mlp-cells", nargs="+", type=_mlp_cell, metavar="BxW:L:ACT:DTYPE:THREADS",
                        help="sampled mlp cells beside the --mlp-shapes product, each field a comma "
                        "list or * for the run's own (e.g. 4096x2048:2:relu:float32:1)")  # fmt: skip
    parser.add_argument("-M", nargs="+", type=int, default=None, help="rows (batch); product with -N/-K")
    parser.add_argument("-N", nargs="+", type=int, default=None, help="output features (classes for loss)")
    parser.add_argument("-K", nargs="+", type=int, default=None, help="input features")
    parser.add_argument("--depths", "--depth", dest="depths", nargs="+", type=int, default=[4],
                        help="layers of the mlp suite's MLP, one case per depth")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="float32 float16 bfloat16 float64 "
                        "(default: bfloat16 float32 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--activations", nargs="+", default=["gelu"],
                        help="activations of the layers; 'all': every one of manualbp's")  # fmt: skip
    parser.add_argument("--contenders", nargs="+", choices=CONTENDER_NAMES,
                        default=["manualbp-triton", "manualbp-torch", "native", "compile"],
                        help="what is timed")  # fmt: skip
    parser.add_argument("--memory-contenders", nargs="+", choices=CONTENDER_NAMES, default=None,
                        help="contenders of the memory suite (default: --contenders)")  # fmt: skip
    parser.add_argument("--max-autotune", action="store_true",
                        help="also time torch.compile(mode='max-autotune') (long compiles)")  # fmt: skip
    parser.add_argument("--interpreter", action="store_true",
                        help="run the Triton contender on CPU under TRITON_INTERPRET=1 (slow)")  # fmt: skip
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="output folder, created if missing")  # fmt: skip
    parser.add_argument("--name", default="bench", help="file stem: NAME.csv, NAME.md, NAME.png")
    parser.add_argument("--rep-ms", type=float, default=None,
                        help="measuring time per timing, ms: do_bench's rep on CUDA (default 100); on "
                        "CPU each contender's share of an interleaved timing (default 200)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=9,
                        help="CPU: interleaved rounds per timing (one block per contender each); "
                        "times are medians over them")  # fmt: skip
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per timing, ms")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="torch.set_num_threads for the CPU runs; several: the timing cases once "
                        "per count (default: torch's own)")  # fmt: skip
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this long; the rest become 'skipped' rows")  # fmt: skip
    parser.add_argument("--note", default="", help="a line for the Markdown header")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the peak/bandwidth measurement")
    parser.add_argument("--no-plot", action="store_true", help="skip NAME.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    if args.interpreter and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when a kernel is decorated, and importing manualbp may
        # already have imported triton: start again in a fresh interpreter with it set.
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "manualbp.bench", *arguments])
    import torch

    from manualbp.bench.cases import parse_dtype
    from manualbp.bench.runner import BenchConfig, run_benchmark

    if args.threads is not None and min(args.threads) < 1:
        raise SystemExit(f"--threads: expected positive ints, got {args.threads}")
    if min(args.depths) < 1:
        raise SystemExit(f"--depths: expected positive ints, got {args.depths}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected a positive int, got {args.rounds}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shapes:
        shapes = list(args.shapes)
    else:
        default = [1024, 4096] if device == "cuda" else [256]
        shapes = [(m, n, k) for m in args.M or default for n in args.N or default for k in args.K or default]
    dtype_names = args.dtypes or (["bfloat16", "float32"] if device == "cuda" else ["float32"])
    contenders = list(args.contenders)
    if args.max_autotune and "compile-max-autotune" not in contenders:
        contenders.append("compile-max-autotune")
    config = BenchConfig(
        suites=args.suites,
        shapes=shapes,
        loss_shapes=args.loss_shapes or (),
        dtypes=[parse_dtype(d) for d in dtype_names],
        mlp_shapes=args.mlp_shapes or (),
        mlp_cells=[_expand_cell(cell) for cell in args.mlp_cells or ()],
        activations=activation_names(args.activations),
        contenders=contenders,
        memory_contenders=args.memory_contenders,
        depths=args.depths,
        device=device,
        out=args.out,
        name=args.name,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms if args.rep_ms is not None else (100.0 if device == "cuda" else 200.0),
        seed=args.seed,
        note=args.note,
        threads=args.threads,
        rounds=args.rounds,
        ceilings=not args.no_ceilings,
        plot=not args.no_plot,
        progress=not args.no_progress,
        time_budget_s=args.time_budget if args.time_budget is not None else float("inf"),
        command=f"{program_name()} {shlex.join(arguments)}",
    )
    result = run_benchmark(config)
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"{len(result.rows)} rows ({summary}); wrote {', '.join(str(p) for p in result.paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
