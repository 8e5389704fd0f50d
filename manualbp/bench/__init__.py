"""Benchmark harness: manualbp's layers timed side by side with native PyTorch and torch.compile.

Run it as ``python -m manualbp.bench`` (or ``manualbp-bench``); ``--help`` lists the options.
Suites:

* ``layer``  — one `LinearAct` (x Wᵀ + b, then f): forward, backward, forward+backward;
* ``mlp``    — one training step (forward, loss, backward, SGD step) of a depth-L MLP;
* ``loss``   — linear layer + cross-entropy: manualbp's fused `linear_cross_entropy` and the
  unfused linear-then-cross-entropy, against native and torch's own `F.linear_cross_entropy`;
* ``memory`` — bytes the backward keeps (counted with `torch.autograd.graph.saved_tensors_hooks`),
  bytes still allocated after the forward, and peak memory of a forward+backward (CUDA: the
  caching allocator; CPU: the profiler's allocation events).

On CPU the contenders of a case are timed together, interleaved (`manualbp.bench.interleave`);
one command covers a grid (`--mlp-shapes`, `--mlp-cells`, `--depths`, `--threads 1 2`, ...) and
the Markdown starts with a summary of the `× native` ratios (`manualbp.bench.summary`).

Every contender's output and gradients are checked against native autograd (float64 where cheap)
before it is timed; a wrong result is an ``error`` row, never a time. Each case also gets its
roofline floor, from a peak matmul rate and a copy bandwidth measured at the start of the run.

This package must not import triton at import time: ``--interpreter`` sets ``TRITON_INTERPRET``
first, and Triton reads it when a kernel is decorated.
"""

from __future__ import annotations

__all__ = ["COLUMNS", "BenchConfig", "run_benchmark"]


def __getattr__(name: str) -> object:
    # Lazy: `import manualbp.bench` stays cheap and triton-free until the harness is used.
    if name in __all__:
        from manualbp.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'manualbp.bench' has no attribute {name!r}")
