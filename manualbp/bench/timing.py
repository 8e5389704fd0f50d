"""Timing and the two roofline ceilings (peak matmul rate, copy bandwidth), measured in the run.

CUDA: `triton.testing.do_bench` (warm-up, then the median and 20/80 % quantiles of many runs; it
also clears L2 before each run). CPU: `manualbp.bench.interleave` — blocks of calls timed with
the process's CPU time (one thread) or wall time (more), median over rounds; the suites time all
contenders of a case interleaved, `measure` times one fn the same way.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from manualbp.bench.interleave import interleaved

__all__ = ["Ceilings", "Timing", "measure", "measure_ceilings", "rotations", "synchronize"]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float


@dataclass(frozen=True)
class Ceilings:
    """Measured peaks: matmul FLOP/s per dtype, copy bandwidth in bytes/s."""

    peak_flops: dict[torch.dtype, float]
    matmul_size: dict[torch.dtype, int]
    bandwidth: float
    copy_bytes: int

    def floor_seconds(self, flops: float, min_bytes: float, dtype: torch.dtype) -> tuple[float, str]:
        """The roofline floor of a case: max(FLOPs / peak, bytes / bandwidth), and which bound."""
        compute = flops / self.peak_flops[dtype]
        memory = min_bytes / self.bandwidth
        return (compute, "compute") if compute >= memory else (memory, "memory")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float, rounds: int = 9
) -> Timing:
    """Median and 20/80 % quantiles of `fn`'s run time, in milliseconds."""
    if device.type == "cuda":
        import triton.testing  # only here: see --interpreter

        median, q20, q80 = triton.testing.do_bench(
            fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)), quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(float(median), float(q20), float(q80))
    (result,) = interleaved([fn], warmup_ms=warmup_ms, rep_ms=rep_ms, rounds=rounds)
    if result.error is not None:
        raise result.error
    return Timing(result.median_ms, result.quantile_ms(0.2), result.quantile_ms(0.8))


def _matmul_size(device: torch.device, dtype: torch.dtype, target_ms: float) -> int:
    """Grow a square matmul until one call takes `target_ms` (or the size cap): near peak, cheap."""
    cap = 8192 if device.type == "cuda" else 2048
    n = 256
    while n < cap:
        a = torch.randn(n, n, device=device, dtype=dtype)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        synchronize(device)
        if (time.perf_counter() - start) / 3 * 1e3 >= target_ms:
            break
        n *= 2
    return n


def measure_ceilings(
    device: torch.device, dtypes: list[torch.dtype], warmup_ms: float, rep_ms: float
) -> Ceilings:
    """Peak matmul rate per dtype (a square matmul) and copy bandwidth (a large `copy_`)."""
    peak: dict[torch.dtype, float] = {}
    sizes: dict[torch.dtype, int] = {}
    for dtype in dtypes:
        n = _matmul_size(device, dtype, target_ms=2.0 if device.type == "cuda" else 20.0)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timing = measure(functools.partial(torch.matmul, a, b), device, warmup_ms, rep_ms)
        # A ceiling is the best rate seen, so the fast (20 %) quantile rather than the median.
        peak[dtype] = 2 * n**3 / (timing.q20_ms / 1e3)
        sizes[dtype] = n
    # Far larger than the last-level cache, so the copy streams from memory.
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    moved = 2 * src.numel() * src.element_size()  # read + write
    return Ceilings(peak, sizes, moved / (timing.q20_ms / 1e3), moved)


def rotations(bytes_per_set: int, device: torch.device, max_sets: int = 16) -> int:
    """How many copies of a case's inputs to cycle through so that together they exceed twice
    the last-level cache: a small case then cannot run from a cache its previous run warmed."""
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    else:
        cache = 32 << 20  # a typical server last-level cache share; CPUs do not report theirs
    if bytes_per_set <= 0:
        return 1
    return int(min(max_sets, max(1, math.ceil(2 * cache / bytes_per_set))))
