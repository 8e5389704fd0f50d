"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80, without a GPU.

The test suite runs with TRITON_INTERPRET=1 (tests/conftest.py), under which `@triton.jit` gives
interpreted functions, so the compilation runs in a subprocess with the variable removed:
`python -m manualbp.triton_kernels.aot --set ci` compiles a covering subset of the variants
(every activation, dtype, bias flag, epilogue, split and bias-only variant of each GEMM appears
on sm_90; one of each GEMM flavour on sm_80; the δ pass and the reduction) with the
configurations the launchers really autotune over, and inspects each cubin with the
`cuobjdump` of the Triton wheel. `--set full` (run by hand: 536 compiles, ~15 CPU-minutes) compiles them all.
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
GEMMS = ("forward", "grad_input", "grad_weight")


def _compile_ci_set() -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip(f"no cuobjdump in the triton wheel at {CUOBJDUMP}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "manualbp.triton_kernels.aot", "--arch", "90", "80", "--set", "ci",
           "--json", "--jobs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.stdout.strip(), f"aot printed nothing; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_aot_compile_sm90_sm80():
    """One test (the compilation runs once, not once per xdist worker): every variant of the CI
    set compiles without spills, the set covers what it claims, 16-bit GEMMs use wgmma."""
    records = _compile_ci_set()
    _check_no_problems(records)
    _check_coverage(records)
    _check_tensor_cores(records)


def _check_no_problems(records):
    from manualbp.triton_kernels.aot import check

    problems = {
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['act']} {r['flags']} {r['config']}": check(r)
        for r in records
    }
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, json.dumps(problems, indent=1)


def _check_coverage(records):
    from manualbp.triton_kernels.activations import NAMES

    sm90 = [r for r in records if r["arch"] == 90]
    for kernel in GEMMS:
        rows = [r for r in sm90 if r["kernel"] == kernel]
        assert {r["act"] for r in rows} == set(NAMES), kernel
        assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}, kernel
    for kernel in ("forward", "grad_weight"):
        assert {"bias", "nobias"} <= {r["flags"] for r in sm90 if r["kernel"] == kernel}
    flags = {r["flags"] for r in sm90}
    assert {"prev=mish", "split+bias", "split+nobias", "bias-only"} <= flags
    assert {r["act"] for r in sm90 if r["kernel"] == "delta"} == set(NAMES[1:])
    assert {r["kernel"] for r in records if r["arch"] == 80} == set(GEMMS)


def _check_tensor_cores(records):
    rows = [
        r for r in records
        if r["arch"] == 90 and r["kernel"] in GEMMS and r["dtype"] != "fp32" and r["flags"] != "bias-only"
    ]  # fmt: skip
    assert rows and all(r["hgmma"] for r in rows)
    # sm_80 has no wgmma: its 16-bit GEMMs use HMMA (mma.sync).
    assert all(r["mma"] and not r["hgmma"] for r in records if r["arch"] == 80 and r["dtype"] != "fp32")
