"""Ahead-of-time compilation of the gated MLP kernels for sm_90 and sm_80, without a GPU.

As tests/test_triton_aot.py for the linear kernels: `python -m manualbp.triton_kernels.aot_gated`
runs in a subprocess without TRITON_INTERPRET and compiles gated_up (every dtype × activation,
bias on and off for silu and mish, every configuration of the list its launcher selects) and
gated_delta (every dtype × activation) for both architectures; each cubin is inspected with the
Triton wheel's cuobjdump: no spills, HGMMA in every 16-bit gated_up on sm_90.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.aot

from .test_triton_aot import run_aot  # noqa: E402


def test_aot_compile_gated_kernels_sm90_sm80() -> None:
    code, out, err = run_aot(["--arch", "90", "80", "--json", "--jobs", "2"], module="aot_gated")
    assert out.strip(), f"aot_gated printed nothing; stderr:\n{err[-4000:]}"
    records = json.loads(out)

    from manualbp.triton_kernels import aot
    from manualbp.triton_kernels.aot_gated import ACTS

    problems = {
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['act']} {r['flags']} {r['config']}": aot.check(r)
        for r in records
    }
    assert {k: v for k, v in problems.items() if v} == {}
    # The full product: both kernels, every arch, dtype and activation.
    seen = {(r["kernel"], r["arch"], r["dtype"], r["act"]) for r in records}
    for kernel in ("gated_up", "gated_delta"):
        for arch in (90, 80):
            for dtype in ("fp32", "fp16", "bf16"):
                assert {(kernel, arch, dtype, act) for act in ACTS} <= seen
    # Tensor cores: HGMMA for 16-bit on sm_90, an MMA on sm_80.
    for r in records:
        if r["kernel"] == "gated_up" and r["dtype"] != "fp32":
            assert r["hgmma"] if r["arch"] == 90 else r["mma"], r
    assert code == 0, err[-4000:]
