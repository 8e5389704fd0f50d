"""The summary a run ends with: per suite, operation and contender, how its `× native` ratios
spread over the rows (geometric mean, min, max, rows below 1.0 and below 0.98), so that a goal
such as "≥ 1.0× native in every row" can be read off one line."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Spread", "geometric_mean", "spreads", "summary_lines"]

Row = dict[str, Any]

#: (column of the ratio, what it is compared with) summarised, in this order
RATIOS: tuple[tuple[str, str], ...] = (
    ("speedup_vs_native", "native"),
    ("speedup_vs_torch_lce", "torch's F.linear_cross_entropy (faster variant)"),
)


def geometric_mean(values: Sequence[float]) -> float:
    if not values or min(values) <= 0:
        raise ValueError(f"geometric_mean: expected positive values, got {list(values)}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def contender_label(row: Row) -> str:
    return str(row.get("contender", "")) + (f" ({row['variant']})" if row.get("variant") else "")


def _is_baseline(row: Row) -> bool:
    # native's plain rows are the baseline itself (1.0 by definition): not summarised
    return row.get("contender") == "native" and row.get("variant", "") in ("", "unfused")


@dataclass(frozen=True)
class Spread:
    suite: str
    op: str
    contender: str
    versus: str
    count: int
    geomean: float
    low: float
    low_case: str
    high: float
    below_1: int
    below_098: int


def _case_label(row: Row) -> str:
    parts = [str(row.get("case", "")), str(row.get("dtype", "")), str(row.get("activation", ""))]
    if row.get("threads") not in (None, ""):
        parts.append(f"{row['threads']}t")
    return " ".join(p for p in parts if p)


def spreads(rows: Sequence[Row]) -> list[Spread]:
    """One Spread per (ratio, suite, op, contender) that has at least one ok row with the ratio."""
    out = []
    for column, versus in RATIOS:
        groups: dict[tuple[str, str, str], list[Row]] = {}
        for r in rows:
            value = r.get(column)
            if r.get("status") != "ok" or not isinstance(value, float) or value <= 0:
                continue
            if column == "speedup_vs_native" and _is_baseline(r):
                continue
            groups.setdefault((r["suite"], r["op"], contender_label(r)), []).append(r)
        for (suite, op, contender), group in groups.items():
            values = [float(r[column]) for r in group]
            worst = min(range(len(values)), key=values.__getitem__)
            out.append(
                Spread(
                    suite,
                    op,
                    contender,
                    versus,
                    len(values),
                    geometric_mean(values),
                    values[worst],
                    _case_label(group[worst]),
                    max(values),
                    sum(v < 1.0 for v in values),
                    sum(v < 0.98 for v in values),
                )  # fmt: skip
            )
    return out


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """The Markdown summary section (empty when nothing was timed against a baseline)."""
    found = spreads(rows)
    if not found:
        return []
    headers = ["suite", "op", "contender", "vs", "rows", "geomean ×", "min × (row)", "max ×",
               "rows < 1.0", "rows < 0.98"]  # fmt: skip
    lines = [
        "## summary",
        "",
        "Per suite, operation and contender, over its `ok` rows: the geometric mean, minimum (and "
        "its row) and maximum of the speed ratio (baseline's median ÷ this median; > 1 is faster), "
        "and how many rows fall below 1.0 and below 0.98.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    for s in found:
        ratios = [f"{s.geomean:.3f}", f"{s.low:.3f} ({s.low_case})", f"{s.high:.3f}"]
        cells = [
            s.suite,
            s.op,
            s.contender,
            s.versus,
            str(s.count),
            *ratios,
            str(s.below_1),
            str(s.below_098),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return [*lines, ""]
