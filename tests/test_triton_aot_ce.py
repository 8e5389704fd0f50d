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
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.aot

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def test_aot_compile_cross_entropy_flags_sm90_sm80() -> None:
    # The triton wheel ships cuobjdump: without it the compiled code cannot be checked at all.
    assert CUOBJDUMP.exists(), f"no cuobjdump in the triton wheel at {CUOBJDUMP}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "manualbp.triton_kernels.aot_ce", "--arch", "90", "80", "--json",
           "--jobs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.stdout.strip(), f"aot_ce printed nothing; stderr:\n{proc.stderr[-4000:]}"
    records = json.loads(proc.stdout)

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
    assert proc.returncode == 0, proc.stderr[-4000:]
