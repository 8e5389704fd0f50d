"""CPU timing: the contenders of one case timed together, as interleaved blocks.

On a shared CPU the machine's speed drifts with the neighbours' load, by far more than the
differences being measured; timed one after the other, two contenders see different machines.
So every contender of a case is timed in the same stretch of time: `rounds` rounds, each running
one block of the same number of calls per contender, in an order that rotates and reverses from
round to round (A B, B A, B A, A B, ...), so that no contender always runs first or after the
same neighbour. A contender's time is the median over the rounds of its block's time per call.

The clock is the process's CPU time (`time.process_time`) with one intra-op thread: work done
by other processes does not count. With more threads it is wall time (`time.perf_counter`):
CPU time would count the thread pool's spin-waiting as work, and the threads run in parallel.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

__all__ = ["Interleaved", "block_order", "calls_per_block", "cpu_clock", "interleaved", "quantile"]

Clock = Callable[[], float]
ContextFactory = Callable[[], AbstractContextManager[None]]


@dataclass(frozen=True)
class Interleaved:
    """One contender's result: per-call seconds of each round's block (empty if it failed), and
    the calls in the first round's blocks (later rounds are resized to the load they see)."""

    block_seconds: list[float]
    calls_per_block: int
    error: BaseException | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.block_seconds) * 1e3

    def quantile_ms(self, q: float) -> float:
        return quantile(self.block_seconds, q) * 1e3


def cpu_clock() -> Clock:
    """process_time with one intra-op thread, perf_counter with more (see the module docstring)."""
    import time

    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (as torch.quantile)."""
    if not values or not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: expected values and 0 <= q <= 1, got {len(values)} values, q={q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def block_order(count: int, round_index: int) -> list[int]:
    """Order of the `count` contenders in round `round_index`: rotated by one every second round,
    reversed every odd round. Over 2·count rounds each contender takes every position equally
    often, and for two contenders the rounds read A B, B A, B A, A B."""
    if count < 1:
        raise ValueError(f"count: expected at least one contender, got {count}")
    shift = (round_index // 2) % count
    order = list(range(shift, count)) + list(range(shift))
    return order[::-1] if round_index % 2 else order


def calls_per_block(per_call_seconds: Sequence[float], block_seconds: float) -> int:
    """Calls in each block: the same for every contender, so that the slowest one's block lasts
    about `block_seconds` (at least one call)."""
    slowest = max(per_call_seconds, default=0.0)
    if slowest <= 0.0:
        return 1
    # rounded, not floored: a per-call time a hair above block/n must not drop a call
    return max(1, round(block_seconds / slowest))


def _block(fn: Callable[[], object], calls: int, context: ContextFactory, clock: Clock) -> float:
    # The context (e.g. the manualbp backend in force) is entered outside the timed stretch.
    with context():
        start = clock()
        for _ in range(calls):
            fn()
        return (clock() - start) / calls


def interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    warmup_ms: float,
    rep_ms: float,
    rounds: int = 9,
    contexts: Sequence[ContextFactory] | None = None,
    clock: Clock | None = None,
) -> list[Interleaved]:
    """Time `fns` together (see the module docstring); one result per fn, in order.

    Warm-up: one untimed call each, then timed single calls round-robin until each had about
    `warmup_ms` (at least one); their medians size the blocks so that the slowest fn's block
    lasts `rep_ms / rounds`, and each round's times size the next round's blocks. A fn that
    raises gets a result carrying the exception and is left out of the later rounds; the
    others go on.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected a positive int, got {rounds}")
    clock = clock or cpu_clock()
    contexts = list(contexts) if contexts is not None else [contextlib.nullcontext] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def run(i: int, calls: int) -> float | None:
        if errors[i] is not None:
            return None
        try:
            return _block(fns[i], calls, contexts[i], clock)
        except Exception as e:  # one broken contender must not take the others down
            errors[i] = e
            return None

    for i in range(len(fns)):
        run(i, 1)  # cold: first-call costs (allocations, lazy initialisation) are not timed
    samples: list[list[float]] = [[] for _ in fns]
    spent, cycles = 0.0, 0
    while cycles < 100_000:  # bounded even where a call takes no measurable time
        cycles += 1
        for i in range(len(fns)):
            seconds = run(i, 1)
            if seconds is not None:
                samples[i].append(seconds)
                spent += seconds
        if spent * 1e3 >= warmup_ms * len(fns) or all(e is not None for e in errors):
            break
    block_seconds = rep_ms / 1e3 / rounds
    calls = calls_per_block([statistics.median(s) for s, e in zip(samples, errors) if e is None and s],
                            block_seconds)  # fmt: skip
    blocks: list[list[float]] = [[] for _ in fns]
    first_calls = calls
    for r in range(rounds):
        this_round = []
        for i in block_order(len(fns), r):
            seconds = run(i, calls)
            if seconds is not None:
                blocks[i].append(seconds)
                this_round.append(seconds)
        # Resized from the round just timed (still the same for every contender within a round):
        # when a neighbour's load slows every call tenfold, the blocks stay about as long as
        # planned instead of ten times longer.
        calls = calls_per_block(this_round, block_seconds)
    return [
        Interleaved([] if error is not None else block, first_calls, error)
        for block, error in zip(blocks, errors)
    ]
