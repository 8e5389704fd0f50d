"""Outputs of a run: `<name>.csv` (one row per case, operation and contender), `<name>.md` and
one figure `<name>.png` (TFLOP/s against problem size per contender, and memory bars)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from manualbp.bench.summary import summary_lines

__all__ = ["COLUMNS", "add_speedups", "write_csv", "write_markdown", "write_plot"]

COLUMNS: tuple[str, ...] = (
    "date",
    "device",
    "torch",
    "triton",
    "suite",
    "case",
    "M",
    "N",
    "K",
    "depth",
    "dtype",
    "threads",
    "activation",
    "op",
    "variant",
    "contender",
    "status",
    "note",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "tflops",
    "gbps",
    "speedup_vs_native",
    "speedup_vs_torch_lce",
    "floor_ms",
    "floor_bound",
    "floor_frac",
    "max_rel_err",
    "reference",
    "flops",
    "min_bytes",
    "saved_bytes",
    "saved_activation_bytes",
    "peak_bytes",
    "retained_bytes",
    "calls_per_block",
    "case_seconds",
)

Row = dict[str, Any]
_KEY = ("suite", "case", "dtype", "activation", "op", "threads")
TORCH_LCE = ("torch-fused", "torch-chunked")  # native's variants that are torch's F.linear_cross_entropy


def add_speedups(rows: list[Row]) -> None:
    """speedup_vs_native = native eager's median / this row's median, for the same case, op and
    thread count; for the loss suite also speedup_vs_torch_lce = the faster of torch's own
    F.linear_cross_entropy variants' median / this median."""
    baseline: dict[tuple, float] = {}
    torch_lce: dict[tuple, float] = {}
    for r in rows:  # the first native row of a case: its plain variant (the loss suite's "unfused")
        if r.get("contender") == "native" and r.get("status") == "ok" and "median_ms" in r:
            key = tuple(r.get(k) for k in _KEY)
            baseline.setdefault(key, r["median_ms"])
            if r.get("variant") in TORCH_LCE:
                torch_lce[key] = min(torch_lce.get(key, math.inf), r["median_ms"])
    for r in rows:
        if r.get("status") != "ok" or not r.get("median_ms"):
            continue
        key = tuple(r.get(k) for k in _KEY)
        if key in baseline:
            r["speedup_vs_native"] = baseline[key] / r["median_ms"]
        if key in torch_lce and r.get("variant") not in TORCH_LCE:
            r["speedup_vs_torch_lce"] = torch_lce[key] / r["median_ms"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: _fmt(row.get(k), 6) if isinstance(row.get(k), float) else row.get(k, "") for k in COLUMNS}
            )


def _table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def _mib(value: Any) -> str:
    return "" if value in (None, "") else f"{value / 2**20:.3g}"


def _spread(row: Row) -> str:
    if row.get("q20_ms") is None:
        return ""
    return f"{_fmt(row.get('q20_ms'))}–{_fmt(row.get('q80_ms'))}"


def write_markdown(rows: Sequence[Row], path: Path, header: Sequence[str]) -> None:
    parts = list(header) + summary_lines(rows)
    timing_headers = [
        "case", "dtype", "threads", "act", "op", "contender", "status", "median ms", "q20–q80 ms",
        "TFLOP/s", "GB/s",
        "× native", "floor ms (bound)", "% of floor", "max rel err", "note",
    ]  # fmt: skip
    for suite in ("layer", "mlp", "loss"):
        suite_rows = [r for r in rows if r.get("suite") == suite]
        if not suite_rows:
            continue
        lines = []
        for r in suite_rows:
            contender = r["contender"] + (f" ({r['variant']})" if r.get("variant") else "")
            floor = f"{_fmt(r.get('floor_ms'))} ({r.get('floor_bound', '')})" if r.get("floor_ms") else ""
            frac = f"{100 * r['floor_frac']:.1f}" if r.get("floor_frac") else ""
            lines.append([
                r["case"], r["dtype"], _fmt(r.get("threads")), r.get("activation", ""), r["op"],
                contender, r["status"], _fmt(r.get("median_ms")), _spread(r), _fmt(r.get("tflops")),
                _fmt(r.get("gbps")),
                _fmt(r.get("speedup_vs_native")), floor, frac, _fmt(r.get("max_rel_err"), 2),
                r.get("note", ""),
            ])  # fmt: skip
        parts += [f"## {suite}", "", _table(timing_headers, lines), ""]
    memory = [r for r in rows if r.get("suite") == "memory"]
    if memory:
        lines = [
            [
                r["op"],
                r["case"],
                r["dtype"],
                r.get("activation", ""),
                r["contender"] + (f" ({r['variant']})" if r.get("variant") else ""),
                r["status"],
                _mib(r.get("saved_bytes")),
                _mib(r.get("saved_activation_bytes")),
                _mib(r.get("retained_bytes")),
                _mib(r.get("peak_bytes")),
                r.get("note", ""),
            ]  # fmt: skip
            for r in memory
        ]
        headers = [
            "what", "case", "dtype", "act", "contender", "status", "saved MiB",
            "saved beyond inputs+params MiB", "kept after forward MiB", "peak MiB", "note",
        ]  # fmt: skip
        parts += ["## memory (one forward + backward)", "", _table(headers, lines), ""]
    path.write_text("\n".join(parts) + "\n")


def write_plot(rows: Sequence[Row], path: Path, title: str, peaks: dict[str, float]) -> bool:
    """One figure: a TFLOP/s-vs-FLOPs panel per (suite, op), then saved-memory bars.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    timed = [r for r in rows if r.get("status") == "ok" and r.get("tflops")]
    order = ["layer", "mlp", "loss", "forward", "backward", "fwd+bwd", "train_step"]
    rank = lambda key: order.index(key) if key in order else len(order)
    panels = sorted({(r["suite"], r["op"]) for r in timed}, key=lambda p: (rank(p[0]), rank(p[1])))
    memory = [r for r in rows if r.get("suite") == "memory" and r.get("status") == "ok"]
    n_panels = len(panels) + (1 if memory else 0)
    if n_panels == 0:
        return False
    cols = min(3, n_panels)
    nrows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    flat = list(axes.flat)
    many_dtypes = len({r["dtype"] for r in timed}) > 1
    many_acts = len({r.get("activation") for r in timed}) > 1
    for ax, (suite, op) in zip(flat, panels):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in (r for r in timed if (r["suite"], r["op"]) == (suite, op)):
            label = r["contender"] + (f" {r['variant']}" if r.get("variant") else "")
            label += f" {r['dtype']}" if many_dtypes else ""
            label += f" {r['activation']}" if many_acts and r.get("activation") else ""
            series.setdefault(label, []).append((r["flops"], r["tflops"]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for dtype, peak in peaks.items():
            ax.axhline(peak / 1e12, linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(f"peak matmul {dtype}", (0.01, peak / 1e12), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        # x labels on the decades only: the minor labels of a short log range overlap.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("FLOPs per call")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{suite}: {op}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    if memory:
        ax = flat[len(panels)]
        cases = sorted({(r["op"], r["case"], r["dtype"], r.get("activation", "")) for r in memory})
        labels = sorted({r["contender"] + (f" {r['variant']}" if r.get("variant") else "") for r in memory})
        width = 0.8 / max(1, len(labels))
        for j, label in enumerate(labels):
            values = []
            for case in cases:
                match = [
                    r for r in memory
                    if (r["op"], r["case"], r["dtype"], r.get("activation", "")) == case
                    and r["contender"] + (f" {r['variant']}" if r.get("variant") else "") == label
                ]  # fmt: skip
                values.append(match[0]["saved_activation_bytes"] / 2**20 if match else 0.0)
            ax.bar([i + j * width for i in range(len(cases))], values, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(
            [f"{c[0]} {c[1]}\n{c[2]} {c[3]}" for c in cases], fontsize=6, rotation=45, ha="right"
        )
        ax.set_ylabel("MiB saved for backward\n(beyond inputs and parameters)")
        ax.set_title("memory: tensors kept for backward")
        ax.legend(fontsize=7)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=9)
    # Fixed margins: tight_layout on log axes costs seconds.
    height = 4.0 * nrows  # inches: room for the rotated memory labels below, the title above
    fig.subplots_adjust(
        left=0.07, right=0.98, bottom=1.0 / height, top=1 - 0.5 / height, wspace=0.3, hspace=0.5
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
