"""Ahead-of-time compilation of every kernel variant, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot --arch 90 80 --json      # all variants, JSON records
    python -m manualbp.triton_kernels.aot --arch 90                # a Markdown table
    python -m manualbp.triton_kernels.aot --family fused --json    # the fused MLP's only

The default family "all" compiles the linear kernels' variants (`aot_variants`) and the fused
MLP's (`aot_fused`: mlp_forward, mlp_backward, mlp_grad_weight, mlp_reduce records).

Each variant (kernel × dtype × activation × flags × launch configuration) is compiled as a launch
would compile it ("AOT = launch"): the real launcher is called on stand-in CPU tensors of a
16-divisible contiguous problem inside `_utils.captured_launches` (as on a device of that
capability; nothing runs), and the kernel is then "launched" through Triton's own
`JITFunction.run` against a stand-in driver for `GPUTarget("cuda", arch, 32)`, whose
`jit_cache_hook` hands back the signature, constexprs and specialisation attributes Triton's
binder derived from those arguments (divisibility 16 of pointers, sizes and strides — 0
included —, 1-valued ints as constexprs), which `triton.compile(ASTSource(...))` then compiles.

For each cubin, the `cuobjdump` shipped in the Triton wheel reports registers, stack and spills
(`-res-usage`, LDL/STL in `-sass`) and whether the tensor-core GEMM is a Hopper wgmma (HGMMA).
Static checks on the compiled code (GPU_AUDIT.md): `rings` (TTGIR: every shared-memory operand
ring has a slot for each load in flight plus each step an async wgmma may still read),
`loop_insts` / `loop_hgmma` / `loop_bars` (SASS of the main loop, one K-step),
`wgmma_serialized` (a wait to 0 on the wgmma groups inside the main loop: ptxas serialisation,
C7515, or an explicit one), `tma` (UTMALDG in the SASS), `launch_specialized`.

Must run WITHOUT TRITON_INTERPRET: under the interpreter `@triton.jit` gives interpreted
functions that cannot be compiled (tests/test_triton_aot.py runs this in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import aot_fused
from .aot_inspect import (  # noqa: F401  (re-exported: aot.ring_report, aot.cost_model, …)
    _SASS_LINE,
    cost_model,
    cubin_record,
    cuobjdump_path,
    model_table,
    ring_problems,
    ring_report,
    sass_main_loop,
    sixteen_bit_sm90_gemm,
)

# The variants and their launch specialisation live in their own modules; `aot.X` offers them.
from .aot_launch import (  # noqa: F401
    SPEC_KEYS,
    _call_launcher,
    _device_answers,
    _StandInDriver,
    captured_launch,
    launch_agreement,
    launch_specialization,
    launched_on,
    spec_summary,
    specialization,
)
from .aot_variants import (  # noqa: F401
    ARCHS,
    DTYPES,
    GEMMS,
    Variant,
    _config_name,
    _fixed_config,
    _gemm_combos,
    _kernel_fn,
    _modules,
    _prev,
    configs_for,
    routed,
    variants,
)


def _cuobjdump() -> str:
    return cuobjdump_path()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def compile_one(job: tuple[Variant, int]) -> dict:
    """Compile one variant; returns its record (errors are recorded, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, config_index = job
    record = dataclasses.asdict(variant)
    t0 = time.perf_counter()
    try:
        name, mod = _kernel_fn(variant.kernel)
        fn = getattr(mod, name)
        spec = specialization(variant, config_index)
        record["launch_specialized"] = True  # derived by JITFunction.run from the launcher's args
        # USE_TMA launches are persistent (`_utils.persistent_programs`): the cost model's case.
        record["persistent"] = "USE_TMA" in fn.arg_names and any(
            path == (fn.arg_names.index("USE_TMA"),) and value for path, value in spec["constants"].items()
        )
        record["spec"] = spec_summary(fn, spec)
        src = ASTSource(fn, spec["signature"], spec["constants"], spec["configs"][0])
        options = {k: spec[k] for k in SPEC_KEYS[3:] if k in spec}
        kernel = triton.compile(src, target=GPUTarget("cuda", variant.arch, 32), options=options)
        record.update(cubin_record(kernel)[0])
        record["model"] = cost_model(record)
        record["error"] = None
    except Exception as err:  # recorded so that one failure does not hide the others
        record["error"] = f"{type(err).__name__}: {err}"
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    return record


def check(record: dict) -> list[str]:
    """Problems with one record: compile error, spills, a launch specialisation not derived from
    the launcher, a shared-memory ring too small (race), and for a 16-bit GEMM on sm_90 no HGMMA
    or serialised wgmma in the main loop."""
    if record["error"]:
        return [record["error"]]
    problems = []
    if record["stack"] or record["local"] or record["spill_insts"]:
        problems.append(
            f"spills: stack {record['stack']}, local {record['local']}, LDL/STL {record['spill_insts']}"
        )
    if not record.get("launch_specialized"):
        problems.append("not compiled with the specialisation of a launch")
    problems += aot_fused.check(record)
    problems += ring_problems(record.get("rings", []))
    if sixteen_bit_sm90_gemm(record):
        if not record["hgmma"]:
            problems.append("no HGMMA in the SASS of a 16-bit GEMM on sm_90")
        if record["wgmma_serialized"]:
            problems.append("wgmma serialised in the main loop (a wait to 0 on the groups every K-step)")
        if not record["loop_hgmma"]:
            problems.append("no HGMMA in the main loop found in the SASS")
    return problems


FAMILIES = ("all", "linear", "fused")


def _compile_any(job: tuple[Variant, int]) -> dict:
    """`compile_one`, or `aot_fused.compile_one` for the fused MLP's kernels (mlp_*)."""
    if job[0].kernel in aot_fused.KERNELS:
        return aot_fused.compile_one(job)
    return compile_one(job)


def run(
    archs, jobs: int, selection: str = "full", progress: bool = False, dtypes=None, family: str = "all"
) -> list[dict]:
    """Compile every variant of `family`: the linear kernels' (`aot_variants.variants`), the
    fused MLP's (`aot_fused.variants`), or both ("all")."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    if family not in FAMILIES:
        raise ValueError(f"family: got {family!r}, expected one of {', '.join(FAMILIES)}")
    work = variants(archs, selection) if family != "fused" else []
    if family != "linear":
        work += aot_fused.variants(archs, selection)
    work = [w for w in work if dtypes is None or w[0].dtype in dtypes]
    import multiprocessing

    records = []
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            results = map(_compile_any, work)
        else:
            context = multiprocessing.get_context("fork")
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=context))
            results = pool.map(_compile_any, work, chunksize=1)
        for i, record in enumerate(results):
            records.append(record)
            if progress:  # one JSON line per variant on stderr: what a watchdog reads
                print(f"[{i + 1}/{len(work)}] " + json.dumps(record), file=sys.stderr, flush=True)
    return records


def table(records: list[dict]) -> str:
    lines = [
        "| kernel | arch | dtype | act | flags | config | regs | shared B | stack | spills | HGMMA | ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        ok = "; ".join(check(r)) or "ok"
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['act']} | {r['flags']} | "
                         f"{r['config']} | - | - | - | - | - | {ok} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['act']} | {r['flags']} | {r['config']} | "
            f"{r['regs']} | {r['shared']} | {r['stack']} | {r['spill_insts']} | "
            f"{'yes' if r['hgmma'] else 'no'} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (90 80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument(
        "--set",
        dest="selection",
        choices=("full", "ci"),
        default="full",
        help="full: every variant and every config of each list; ci: first configs off sm_90",
    )
    parser.add_argument(
        "--family", choices=FAMILIES, default="all",
        help="linear: the layer kernels; fused: the fused MLP's (aot_fused.py); all: both",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the JSON records to this file")
    parser.add_argument("--progress", action="store_true", help="one line per variant on stderr")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="only these dtypes")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--model", action="store_true", help="print the cost-model table (16-bit sm_90)")
    parser.add_argument(
        "--agree", action="store_true", help="only compare AOT and launch specialisations (JSON)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.agree:
        result = launch_agreement(args.arch)
        json.dump(result, sys.stdout, indent=1)
        print()
        return 1 if result["mismatches"] else 0
    t0 = time.perf_counter()
    records = run(args.arch, args.jobs, args.selection, progress=args.progress, dtypes=args.dtype,
                  family=args.family)  # fmt: skip
    bad = [r for r in records if check(r)]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    elif args.model:
        print(model_table(records))
    else:
        print(table(records))
        print(f"\n{len(records)} variants, {len(bad)} with problems, {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
