"""Ahead-of-time compilation of the cross-entropy kernel's option flags for sm_90 and sm_80,
without a GPU.

As tests/test_triton_aot_gated.py: `python -m manualbp.triton_kernels.aot_ce` runs in a
subprocess without TRITON_INTERPRET and compiles cross_entropy_kernel for every arch × dtype ×
flag set (forward only, gradient, class weights + smoothing, z-loss + softcap, all, probability
targets + all) × row width; each cubin is inspected with the Triton wheel's cuobjdump: it
compiles (every constexpr branch types in compiled Triton) and nothing spills.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.aot

from .test_triton_aot import run_aot  # noqa: E402


def test_aot_compile_cross_entropy_flags_sm90_sm80() -> None:
    code, out, err = run_aot(["--arch", "90", "80", "--json", "--jobs", "2"], module="aot_ce")
    assert out.strip(), f"aot_ce printed nothing; stderr:\n{err[-4000:]}"
    records = json.loads(out)

    from manualbp.triton_kernels import aot
    from manualbp.triton_kernels.aot_ce import CLASSES, FLAG_SETS

    problems = {
        f"sm_{r['arch']} {r['dtype']} {r['flags']} {r['config']}": aot.check(r) for r in records
    }
    assert {k: v for k, v in problems.items() if v} == {}
    seen = {(r["arch"], r["dtype"], r["flags"], r["config"]) for r in records}
    expected = {(a, d, f, c) for a in (90, 80) for d in ("fp32", "fp16", "bf16") for f in FLAG_SETS
                for c in CLASSES}  # fmt: skip
    assert expected <= seen
    assert code == 0, err[-4000:]
