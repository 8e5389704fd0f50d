"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80, without a GPU.

The test suite runs with TRITON_INTERPRET=1 (tests/conftest.py), under which `@triton.jit` gives
interpreted functions, so the compilation runs in a subprocess with the variable removed:
`python -m manualbp.triton_kernels.aot --arch A --set ci --family linear` compiles every kernel × dtype ×
activation × flag variant a launch can specialise (bias/no bias, epilogue, split, bias-only; the
δ pass and the split reduction) with the configuration lists the launchers select on a device of
that capability: on sm_90 every configuration of every list, on sm_80 the first of each list
(`--set full`, run by hand, also compiles the other sm_80 configurations). Each variant is
specialised as a launch specialises it (the launcher's own arguments through Triton's binder;
`test_aot_equals_launch` checks the two agree) and its cubin, SASS and TTGIR are inspected: no
spills anywhere, no shared-memory ring too small for its pipeline, and on sm_90 HGMMA in the main
loop of every 16-bit GEMM, never serialised. Two negative controls show the checks can fail:
a kernel built with the race of GPU_AUDIT.md finding A, and the relu register prologue compiled
for sm_90 (finding C).

Robust on a slow, shared machine: Triton's cache directory is fixed (MANUALBP_AOT_CACHE, default
~/.cache/manualbp/triton-aot-<triton version>), so a rerun and the xdist workers (one test per
arch) share compiled kernels; the subprocess prints one line per compiled variant and is killed,
with its whole process group, only when no variant has finished for STALL_S seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.processes import run_bounded

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.aot

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
GEMMS = ("forward", "grad_input", "grad_weight")
ARCHS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
STALL_S = 600  # no variant finished for this long: the compiler hangs (one takes ~1-20 s)
REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> str:
    default = Path.home() / ".cache" / "manualbp" / f"triton-aot-{triton.__version__}"
    return os.environ.get("MANUALBP_AOT_CACHE", str(default))


def run_aot(args: list[str], python: str = sys.executable, module: str = "aot") -> tuple[int, str, str]:
    """Run `python -m manualbp.triton_kernels.MODULE ARGS` (`aot`, or a kernel family's own
    `aot_gated`/`aot_ce`; no interpreter, fixed cache) under a progress watchdog; returns
    (returncode, stdout, stderr)."""
    if not CUOBJDUMP.exists():
        pytest.fail(f"no cuobjdump in the triton wheel at {CUOBJDUMP}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = cache_dir()
    return run_watched([python, "-m", f"manualbp.triton_kernels.{module}", *args], env)


def run_watched(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run `cmd` from the repository root in its own process group (tests/processes.py): killed,
    and the test failed, after STALL_S without output; swept after it exits."""
    done = run_bounded(cmd, idle_timeout=STALL_S, env=env, cwd=REPO)
    return done.returncode, done.stdout, done.stderr


def _compile_ci_set(arch: int) -> list[dict]:
    args = ["--arch", str(arch), "--set", "ci", "--family", "linear", "--json", "--jobs", "2", "--progress"]
    _, out, err = run_aot(args)
    assert out.strip(), f"aot printed nothing; stderr:\n{err[-4000:]}"
    return json.loads(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_aot_compile(arch):
    """Every variant compiles without spills or short rings, the set is the full product, every
    selectable config was compiled, 16-bit GEMMs use the tensor cores (unserialised on sm_90)."""
    records = _compile_ci_set(arch)
    _check_no_problems(records)
    _check_full_product(records, arch)
    _check_every_config_compiled(records, arch)
    _check_tensor_cores(records, arch)
    _check_launch_specialisation(records)


def _check_no_problems(records):
    from manualbp.triton_kernels.aot import check

    problems = {
        f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['act']} {r['flags']} {r['config']}": check(r)
        for r in records
    }
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, json.dumps(problems, indent=1)


def _expected_product(arch: int) -> set[tuple[str, int, str, str, str]]:
    """(kernel, arch, dtype, act, flags) of every variant a launch can specialise, written out
    here independently of aot.variants. On sm_90 a 16-bit δ prologue is never launched: the
    launchers form δ in the δ pass and launch the identity GEMM (test_triton_kernels.py checks)."""
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

    def routed(kernel, dtype, act):
        return arch == 90 and dtype != "fp32" and kernel in GEMMS[1:] and act != "identity"

    return {
        (kernel, arch, dtype, act, flags)
        for dtype in DTYPES
        for kernel, pairs in combos.items()
        for act, flags in pairs
        if not routed(kernel, dtype, act)
    }


def _check_full_product(records, arch):
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["act"], r["flags"]) for r in records}
    assert compiled == _expected_product(arch), (
        sorted(_expected_product(arch) - compiled),
        sorted(compiled - _expected_product(arch)),
    )


def _check_every_config_compiled(records, arch):
    """Every configuration a launcher can pick on sm_90 (each list its `config_flavour` selects
    for that capability), and the first of each list on sm_80, was compiled at least once for
    that kernel, arch and dtype."""
    from manualbp.triton_kernels.aot import _config_name, configs_for

    compiled = {(r["kernel"], r["arch"], r["dtype"], r["config"]) for r in records}
    selectable = {
        (kernel, arch, dtype, _config_name(cfg))
        for kernel, arch, dtype, act, flags in _expected_product(arch)
        if kernel in GEMMS
        for cfg in configs_for(kernel, act, flags, arch, dtype)[: None if arch == 90 else 1]
    }
    missing = selectable - compiled
    assert not missing, sorted(missing)


def _check_tensor_cores(records, arch):
    rows = [
        r for r in records
        if r["kernel"] in GEMMS and r["dtype"] != "fp32" and r["flags"] != "bias-only"
    ]  # fmt: skip
    assert rows
    if arch == 80:  # no wgmma: 16-bit GEMMs use HMMA (mma.sync), operands by cp.async
        assert all(r["mma"] and not r["hgmma"] and not r["tma"] for r in rows)
        return
    # The Hopper path: operand tiles by TMA descriptors (UTMALDG) in every 16-bit GEMM on sm_90,
    # the cp.async pointer path in every float32 one.
    assert all(r["tma"] for r in rows), [r["config"] for r in rows if not r["tma"]]
    fp32 = [r for r in records if r["kernel"] in GEMMS and r["dtype"] == "fp32"]
    assert fp32 and not any(r["tma"] for r in fp32)
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['act']} {r['flags']} {r['config']}"
        assert r["hgmma"] and r["loop_hgmma"] >= 1, name
        assert r["wgmma_serialized"] is False, name
        # The pipelined operands are rings of shared memory the TTGIR check did see.
        # Every ring feeds an async wgmma straight from shared memory (its views were traced).
        assert len(r["rings"]) >= 2, name
        for g in r["rings"]:
            assert g["slots"] >= g["needed"] > g["ahead"] >= 2 and g["async_readers"] >= 1, (name, g)
        # No per-step cross-warp reduction (the Σδ one had 9 BARs): the TMA pipeline's own
        # CTA barriers (every warp done with a slot before one thread refills it) are 4.
        assert r["loop_insts"] and r["loop_bars"] <= 4, name


def _check_launch_specialisation(records):
    """Facts of a real launch the old hand-written AOT signature got wrong (GPU_AUDIT.md D)."""
    assert all(r["launch_specialized"] for r in records)
    direct = [r for r in records if r["kernel"] == "grad_weight" and not r["flags"].startswith("split")]
    assert direct and all(r["spec"]["stride_ws"] == "D" and r["spec"]["stride_bs"] == "D" for r in direct)
    assert all(r["spec"]["stride_gn"] == "=1" for r in direct)
    bias_only = [r for r in direct if r["flags"] == "bias-only"]
    assert bias_only and all(r["spec"]["K"] == "=1" for r in bias_only)  # K_eff = 1 in the launch


def test_aot_equals_launch():
    """What the AOT build compiles is what a launch compiles: for every variant's first config,
    the signature, constexprs and attributes through the capture agree with those that the
    launcher's plain launch path hands to `JITFunction.run` (autotuning off)."""
    from manualbp.triton_kernels.aot import variants

    rc, out, err = run_aot(["--arch", *map(str, ARCHS), "--agree"])
    assert out.strip(), err[-4000:]
    result = json.loads(out)
    assert result["mismatches"] == [] and rc == 0
    assert result["compared"] == sum(1 for _, index in variants(ARCHS, "ci") if index == 0)


@triton.jit
def racy_kernel(g_ptr, x_ptr, out_ptr, sum_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The race of GPU_AUDIT.md finding A, on purpose (only compiled, never launched):
    acc = Σ gᵀ x by wgmma and s = Σ g on the same load, whose second use keeps Triton from
    giving the g ring its extra slot for the in-flight wgmma (2 slots at num_stages = 3)."""
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + offs_m
        g = tl.load(g_ptr + rows[:, None] * BLOCK_N + offs_n[None, :])
        x = tl.load(x_ptr + rows[:, None] * BLOCK_N + offs_n[None, :])
        total += tl.sum(g.to(tl.float32), axis=0)
        acc = tl.dot(tl.trans(g), x, acc)
    tl.store(out_ptr + offs_n[:, None] * BLOCK_N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))
    tl.store(sum_ptr + offs_n, total)


RACY = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from manualbp.triton_kernels import aot
from tests.test_triton_aot import racy_kernel
sig = {"g_ptr": "*bf16", "x_ptr": "*bf16", "out_ptr": "*bf16", "sum_ptr": "*fp32", "M": "i32",
       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
src = ASTSource(racy_kernel, sig, {(5,): 64, (6,): 128}, {(i,): [["tt.divisibility", 16]] for i in range(5)})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
rings = aot.ring_report(k.asm["ttgir"])
print(json.dumps({"rings": rings, "problems": aot.ring_problems(rings)}), file=sys.stderr)
"""


def test_ring_check_catches_the_race():
    """The TTGIR ring check flags the race of finding A on a kernel built to have it (a load
    with a dot and a second use): the g ring has 2 slots where 3 are needed; x is fine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = cache_dir()
    rc, _, err = run_watched([sys.executable, "-c", RACY], env)
    assert rc == 0, err[-4000:]
    result = json.loads(err.strip().splitlines()[-1])
    rings = {r["ring"].lstrip("%").split("_")[0]: r for r in result["rings"]}
    assert rings["g"]["slots"] == 2 and rings["g"]["needed"] == 3
    assert rings["x"]["slots"] == 3 and rings["x"]["needed"] == 3
    assert len(result["problems"]) == 1 and "2 slots, 3 needed" in result["problems"][0]


SERIALISED = """
import json, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from manualbp.triton_kernels import _utils, aot
v = aot.Variant("grad_input", 80, "bf16", "relu", "-", "", True)
launch = aot.captured_launch(v)  # on sm_80 the relu prologue is launched (not routed)
kwargs = {**launch.kwargs, **_utils.launch_kwargs(launch.configs[0])}
with aot.launched_on(90) as seen:
    launch.kernel[launch.grid](*launch.args, **kwargs)
((_, spec),) = seen
src = ASTSource(launch.kernel, spec["signature"], spec["constants"], spec["configs"][0])
k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"])
    f.flush()
    sass = aot._run([aot._cuobjdump(), "-sass", f.name]).stdout
print(json.dumps(aot.sass_main_loop(sass)), file=sys.stderr)
"""


def test_serialisation_check_catches_a_register_prologue():
    """The `wgmma_serialized` check flags what GPU_AUDIT.md finding C found: the relu prologue of
    grad_input (δ formed in registers, a register-A wgmma) compiled for sm_90 has a wait to 0
    after its HGMMAs in the main loop. The launchers never compile it for sm_90 (δ pass)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = cache_dir()
    rc, _, err = run_watched([sys.executable, "-c", SERIALISED], env)
    assert rc == 0, err[-4000:]
    loop = json.loads(err.strip().splitlines()[-1])
    assert loop["loop_hgmma"] >= 1 and loop["wgmma_serialized"] is True
