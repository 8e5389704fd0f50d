"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80, without a GPU.

The test suite runs with TRITON_INTERPRET=1 (tests/conftest.py), under which `@triton.jit` gives
interpreted functions, so the compilation runs in a subprocess with the variable removed:
`python -m manualbp.triton_kernels.aot --arch 90 80 --set ci` compiles every kernel × dtype ×
activation × flag variant (bias/no bias, epilogue, split, bias-only; the δ pass and the split
reduction) for both architectures, with the configuration lists the launchers select on a device
of that capability: on sm_90 every configuration of every list, on sm_80 the first of each list
(`--set full`, run by hand, also compiles the other sm_80 configurations: ~30 compiles more
than fit the CI budget of 6 minutes on 2 cores). Each cubin is inspected with the `cuobjdump` of
the Triton wheel: no spills anywhere, HGMMA in every 16-bit GEMM on sm_90.
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
ARCHS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")


def _compile_ci_set() -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip(f"no cuobjdump in the triton wheel at {CUOBJDUMP}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "manualbp.triton_kernels.aot", "--arch", *map(str, ARCHS),
           "--set", "ci", "--json", "--jobs", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.stdout.strip(), f"aot printed nothing; stderr:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_aot_compile_sm90_sm80():
    """One test (the compilation runs once, not once per xdist worker): every variant compiles
    without spills on both archs, the set is the full product, 16-bit GEMMs use tensor cores."""
    records = _compile_ci_set()
    _check_no_problems(records)
    _check_full_product(records)
    _check_every_config_compiled(records)
    _check_tensor_cores(records)


def _check_no_problems(records):
    from manualbp.triton_kernels.aot import check

    problems = {
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['act']} {r['flags']} {r['config']}": check(r)
        for r in records
    }
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, json.dumps(problems, indent=1)


def _expected_product() -> set[tuple[str, int, str, str, str]]:
    """(kernel, arch, dtype, act, flags) of every variant a launch can specialise, written out
    here independently of aot.variants."""
    from manualbp.triton_kernels.activations import NAMES

    combos = {
        "forward": [(a, f) for a in NAMES for f in ("bias", "nobias")],
        "grad_input": [(a, "-") for a in NAMES]
        + [("identity", f"prev={p}") for p in NAMES if p != "identity"]
        + [("mish", "prev=mish")],
        "grad_weight": [(a, f) for a in NAMES for f in ("bias", "nobias")]
        + [(a, f"split+{b}") for a in ("identity", "gelu") for b in ("bias", "nobias")]
        + [("identity", "bias-only")],
        "delta": [(a, "-") for a in NAMES if a != "identity"],
        "split_reduce": [("-", "-")],
    }
    return {
        (kernel, arch, dtype, act, flags)
        for arch in ARCHS
        for dtype in DTYPES
        for kernel, pairs in combos.items()
        for act, flags in pairs
    }


def _check_full_product(records):
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["act"], r["flags"]) for r in records}
    missing = _expected_product() - compiled
    assert not missing, sorted(missing)


def _check_every_config_compiled(records):
    """Every configuration a launcher can pick on sm_90 (each list its `config_flavour` selects
    for that capability), and the first of each list on sm_80, was compiled at least once for
    that kernel, arch and dtype."""
    from manualbp.triton_kernels.aot import _config_name, configs_for

    compiled = {(r["kernel"], r["arch"], r["dtype"], r["config"]) for r in records}
    selectable = {
        (kernel, arch, dtype, _config_name(cfg))
        for kernel, arch, dtype, act, flags in _expected_product()
        if kernel in GEMMS
        for cfg in configs_for(kernel, act, flags, arch, dtype)[: None if arch == 90 else 1]
    }
    missing = selectable - compiled
    assert not missing, sorted(missing)


def _check_tensor_cores(records):
    rows = [
        r for r in records
        if r["arch"] == 90 and r["kernel"] in GEMMS and r["dtype"] != "fp32" and r["flags"] != "bias-only"
    ]  # fmt: skip
    assert rows and all(r["hgmma"] for r in rows)
    # sm_80 has no wgmma: its 16-bit GEMMs use HMMA (mma.sync).
    sm80 = [
        r for r in records
        if r["arch"] == 80 and r["kernel"] in GEMMS and r["dtype"] != "fp32" and r["flags"] != "bias-only"
    ]  # fmt: skip
    assert sm80 and all(r["mma"] and not r["hgmma"] for r in sm80)
