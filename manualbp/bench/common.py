"""What every suite shares: the run-wide settings, seeded inputs, the correctness reference,
and the timing of one operation for all contenders of a case together (`time_group`)."""

from __future__ import annotations

import contextlib
import itertools
import math
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from manualbp.bench.cases import TOLERANCES, Case, dtype_name
from manualbp.bench.interleave import interleaved
from manualbp.bench.timing import Ceilings, Timing, measure

__all__ = [
    "Env", "Pending", "Reference", "Row", "base_row", "case_generator", "linear_params",
    "max_rel_error", "randn", "short_error", "status_rows", "time_group",
]  # fmt: skip

Row = dict[str, Any]


@dataclass
class Env:
    """Run-wide settings every suite needs."""

    device: torch.device
    warmup_ms: float
    rep_ms: float
    ceilings: Ceilings | None
    seed: int = 0
    ref64_max_flops: float = 2e10  # float64 reference only below this many FLOPs (CPU)
    rounds: int = 9  # CPU: interleaved rounds per timing (see manualbp.bench.interleave)


# ------------------------------------------------------------------------------------ helpers


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:240]


def max_rel_error(
    got: Sequence[Tensor | None], ref: Sequence[Tensor], names: Sequence[str]
) -> tuple[float, str]:
    """The worst ‖got − ref‖ / ‖ref‖ over the tensors (computed in float64) and its tensor's name.

    A missing tensor, a shape mismatch or a non-finite value counts as an infinite error.
    """
    worst, worst_name = 0.0, names[0]
    for g, r, name in zip(got, ref, names):
        if g is None or g.shape != r.shape:
            return math.inf, name
        g64, r64 = g.detach().double(), r.detach().double()
        if not torch.isfinite(g64).all():
            return math.inf, name
        scale = float(r64.norm())
        err = float((g64 - r64).norm()) / (scale if scale > 0 else 1.0)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


def case_generator(env: Env, case: Case) -> torch.Generator:
    # One stream per case, so a case's inputs do not depend on which cases ran before it.
    key = f"{env.seed}:{case.suite}:{case.M}:{case.N}:{case.K}:{case.depth}"
    seed = zlib.crc32(key.encode())  # not hash(): str hashes change from process to process
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen: torch.Generator, shape: tuple[int, ...], case: Case, env: Env, scale: float = 1.0) -> Tensor:
    # Drawn on the CPU in float32 (reproducible across devices), then moved and cast.
    return (torch.randn(shape, generator=gen) * scale).to(device=env.device, dtype=case.dtype)


def linear_params(gen: torch.Generator, n_in: int, n_out: int, case: Case, env: Env) -> tuple[Tensor, Tensor]:
    bound = 1 / math.sqrt(n_in)  # nn.Linear's initialisation range
    weight = (torch.rand((n_out, n_in), generator=gen) * 2 - 1) * bound
    bias = (torch.rand((n_out,), generator=gen) * 2 - 1) * bound
    return (
        weight.to(device=env.device, dtype=case.dtype),
        bias.to(device=env.device, dtype=case.dtype),
    )


def reference_dtype(case: Case, env: Env) -> torch.dtype:
    """float64 wherever it is cheap (always on CUDA); else float32 for a 16-bit case, else the
    case's own dtype.

    A 16-bit case is never checked against native in its own 16-bit dtype: native's own
    rounding (a bfloat16 cross-entropy over thousands of classes is off by percents) would then
    count as the truth, and a contender that accumulates in float32 — torch's chunked
    F.linear_cross_entropy does — would fail for being more accurate."""
    cost = case.flops("fwd+bwd" if case.suite != "mlp" else "train_step")
    if env.device.type == "cuda" or cost <= env.ref64_max_flops:
        return torch.float64
    return torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype


def up(t: Tensor, dtype: torch.dtype, grad: bool = False) -> Tensor:
    t = t.detach().to(dtype)
    return t.requires_grad_() if grad else t


def base_row(case: Case, op: str, variant: str, contender: str) -> Row:
    return {
        "suite": case.suite,
        "case": case.label,
        "M": case.M,
        "N": case.N,
        "K": case.K,
        "depth": case.depth,
        "dtype": dtype_name(case.dtype),
        "activation": case.activation if case.suite != "loss" else "",
        "op": op,
        "variant": variant,
        "contender": contender,
    }


def status_rows(case: Case, ops: Sequence[str], variant: str, name: str, status: str, note: str) -> list[Row]:
    return [{**base_row(case, op, variant, name), "status": status, "note": note} for op in ops]


@dataclass
class Reference:
    """What every contender of a case is checked against.

    `tensors` come from native autograd in `dtype` (float64 where cheap); `native_error` is native
    eager's own error against them in the case's dtype. A contender passes when its error is within
    the dtype's tolerance or within twice native's own error: in bfloat16 a deep MLP's rounding
    can exceed a fixed tolerance for native itself, while a wrong kernel misses by far more.
    """

    tensors: list[Tensor]
    names: list[str]
    dtype: torch.dtype
    native_error: float = 0.0

    def gate(self, got: Sequence[Tensor | None], case: Case) -> tuple[float, str | None]:
        """(error, None) when `got` passes, else (error, the error row's note)."""
        err, where = max_rel_error(got, self.tensors, self.names)
        allowed = max(TOLERANCES[case.dtype], 2 * self.native_error)
        if err <= allowed:
            return err, None
        return err, (
            f"wrong result: rel. error {err:.3g} in {where} > allowed {allowed:.3g} "
            f"({dtype_name(case.dtype)} vs native in {dtype_name(self.dtype)}; "
            f"native's own error {self.native_error:.3g})"
        )


def reference_of(
    case: Case, env: Env, names: list[str], outputs: Callable[[torch.dtype], list[Tensor]]
) -> Reference:
    """Native's outputs in the reference dtype, and native's own error in the case's dtype."""
    ref_dtype = reference_dtype(case, env)
    reference = Reference([t.detach() for t in outputs(ref_dtype)], names, ref_dtype)
    if ref_dtype != case.dtype:
        reference.native_error, _ = max_rel_error(outputs(case.dtype), reference.tensors, names)
    return reference


def cycle(n: int) -> Callable[[], int]:
    counter = itertools.cycle(range(n))
    return lambda: next(counter)


# ---------------------------------------------------------------------------- grouped timing


def _no_op() -> None:
    return None


@dataclass
class Pending:
    """One contender's operation, checked and ready to be timed.

    `row` already carries the case, the contender and the correctness result; `prepare` runs
    before the timing (e.g. building the retained graphs that a backward-only timing replays)
    and `release` after it, both inside `context`.
    """

    row: Row
    fn: Callable[[], object]
    context: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
    prepare: Callable[[], None] = _no_op
    release: Callable[[], None] = _no_op


def timed_row(case: Case, op: str, row: Row, timing: Timing, env: Env) -> Row:
    """`row` with the timing and the rates and roofline floor derived from it."""
    seconds = timing.median_ms / 1e3
    flops, min_bytes = case.flops(op), case.min_bytes(op)
    row = dict(row)
    row.update(
        status="ok",
        note="",
        median_ms=timing.median_ms,
        q20_ms=timing.q20_ms,
        q80_ms=timing.q80_ms,
        tflops=flops / seconds / 1e12,
        gbps=min_bytes / seconds / 1e9,
        flops=flops,
        min_bytes=min_bytes,
    )
    if env.ceilings is not None:
        floor, bound = env.ceilings.floor_seconds(flops, min_bytes, case.dtype)
        row.update(floor_ms=floor * 1e3, floor_bound=bound, floor_frac=floor / seconds)
    return row


def _error_row(row: Row, err: BaseException) -> Row:
    return {**row, "status": "error", "note": short_error(err)}


def time_group(case: Case, op: str, pending: Sequence[Pending], env: Env) -> list[Row]:
    """Rows of `op` for every contender in `pending`, in order.

    CUDA: one contender after the other (do_bench; the GPU is not shared). CPU: all of them
    interleaved (`manualbp.bench.interleave`), so that their ratios see the same machine.
    """
    ready: list[Pending] = []
    rows: dict[int, Row] = {}
    for i, p in enumerate(pending):
        try:
            with p.context():
                p.prepare()
            ready.append(p)
        except Exception as e:  # a contender that cannot run this op is an error row, not a crash
            rows[i] = _error_row(p.row, e)
    try:
        if env.device.type == "cuda":
            for p in ready:
                try:
                    with p.context():
                        timing = measure(p.fn, env.device, env.warmup_ms, env.rep_ms)
                    rows[pending.index(p)] = timed_row(case, op, p.row, timing, env)
                except Exception as e:
                    rows[pending.index(p)] = _error_row(p.row, e)
        else:
            results = interleaved(
                [p.fn for p in ready],
                warmup_ms=env.warmup_ms,
                rep_ms=env.rep_ms,
                rounds=env.rounds,
                contexts=[p.context for p in ready],
            )
            for p, result in zip(ready, results):
                if result.error is not None:
                    rows[pending.index(p)] = _error_row(p.row, result.error)
                    continue
                timing = Timing(result.median_ms, result.quantile_ms(0.2), result.quantile_ms(0.8))
                row = timed_row(case, op, p.row, timing, env)
                row["calls_per_block"] = result.calls_per_block
                rows[pending.index(p)] = row
    finally:
        for p in ready:
            with p.context():
                p.release()
    return [rows[i] for i in range(len(pending))]
