"""Ahead-of-time compilation of every kernel variant, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot --arch 90 80 --json      # all variants, JSON records
    python -m manualbp.triton_kernels.aot --arch 90                # a Markdown table

Each variant (kernel × dtype × activation × flags × launch configuration) is compiled with
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`
exactly as a launch on a contiguous problem with 16-divisible sizes would specialise it (inner
strides equal to 1 become constexprs; pointers, sizes and outer strides carry divisibility 16).
For each cubin, the `cuobjdump` shipped in the Triton wheel reports registers, stack and spills
(`-res-usage`, LDL/STL in `-sass`) and whether the tensor-core GEMM is a Hopper wgmma (HGMMA).

Must run WITHOUT TRITON_INTERPRET: under the interpreter `@triton.jit` gives interpreted
functions that cannot be compiled (tests/test_triton_aot.py runs this in a subprocess).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCHS = (90, 80)
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: which kernel, with which constexprs, for which arch."""

    kernel: str  # forward | grad_input | grad_weight | delta | split_reduce
    arch: int
    dtype: str  # storage dtype of the operands
    act: str  # activation name ("-" when the kernel has none)
    flags: str  # human-readable flags, e.g. "bias", "split", "prev=gelu"
    config: str  # BLOCK sizes / warps / stages, e.g. "128x128x64 w8 s3"
    gemm: bool  # a tensor-core GEMM (HGMMA expected on sm_90 for 16-bit)


def _modules():
    from . import delta, linear_forward, linear_grad_input, linear_grad_weight

    return {
        "forward": linear_forward,
        "grad_input": linear_grad_input,
        "grad_weight": linear_grad_weight,
        "delta": delta,
        "split_reduce": linear_grad_weight,
    }


def _kernel_fn(kernel: str):
    mod = _modules()[kernel]
    return {
        "forward": "linear_forward_kernel",
        "grad_input": "grad_input_kernel",
        "grad_weight": "grad_weight_kernel",
        "delta": "delta_kernel",
        "split_reduce": "split_reduce_kernel",
    }[kernel], mod


def _prev(flags: str) -> str:
    return flags.split("prev=")[1] if "prev=" in flags else "identity"


def configs_for(kernel: str, act: str, flags: str, arch: int = 90, dtype: str = "bf16") -> list:
    """The GPU configurations a launch of this variant autotunes over (the launchers' lists)."""
    import torch

    from .activations import ACTIVATION_IDS

    mod = _modules()[kernel]
    act_id = ACTIVATION_IDS.get(act, 0)
    capability = (arch // 10, arch % 10)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if kernel == "forward":
        return mod.CONFIGS[mod.config_flavour(act_id, capability, torch_dtype)]
    if kernel == "grad_input":
        prev_id = ACTIVATION_IDS[_prev(flags)]
        return mod.CONFIGS[mod.config_flavour(act_id, prev_id, capability, torch_dtype)]
    if kernel == "grad_weight":
        return mod.CONFIGS[mod.config_flavour(act_id, capability, torch_dtype)]
    return [_fixed_config(kernel)]


def _config_name(cfg) -> str:
    kw = cfg.kwargs
    keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C") if k in kw]
    return "x".join(str(kw[k]) for k in keys) + f" w{cfg.num_warps} s{cfg.num_stages}"


def _fixed_config(kernel: str):
    import triton

    from . import delta, linear_grad_weight

    if kernel == "delta":
        return triton.Config(dict(delta.GPU_BLOCK), num_warps=delta.GPU_NUM_WARPS, num_stages=1)
    return triton.Config(dict(linear_grad_weight.REDUCE_BLOCK), num_warps=4, num_stages=1)


GEMMS = ("forward", "grad_input", "grad_weight")


def _gemm_combos(kernel: str, names) -> list[tuple[str, str]]:
    """Every (activation, flags) of one GEMM kernel."""
    if kernel == "forward":
        return [(a, f) for a in names for f in ("bias", "nobias")]
    if kernel == "grad_input":
        return (
            [(a, "-") for a in names]
            + [("identity", f"prev={p}") for p in names[1:]]
            + [("mish", "prev=mish")]
        )
    return (
        [(a, f) for a in names for f in ("bias", "nobias")]
        + [(a, f"split+{b}") for a in ("identity", "gelu") for b in ("bias", "nobias")]
        + [("identity", "bias-only")]
    )


def variants(archs=ARCHS, selection: str = "full") -> list[tuple[Variant, int]]:
    """The variants to compile, each with the index of its config in `configs_for(...)`.

    Both sets hold the full product: for every arch, dtype, GEMM kernel and (activation, flags)
    combination (bias/no bias, epilogue, split, bias-only) the list its launcher selects on a
    device of that capability; the δ pass for every activation and the split reduction for
    every dtype.
    "full": the first (largest) configuration of each list, and every configuration of the
        list for mish (the activation with the most elementwise work) and identity, so every
        list a launch can pick is compiled whole on every arch (517 compiles for 90 and 80,
        ~5.5-6.5 min on 2 cores with a cold cache).
    "ci": the same on sm_90; on the other archs only the first configuration of each list
        (491 compiles, ~6 min on 2 cores with a cold cache; tests/test_triton_aot.py).
    """
    from .activations import NAMES

    if selection not in ("full", "ci"):
        raise ValueError(f"selection: got {selection!r}, expected 'full' or 'ci'")
    out: list[tuple[Variant, int]] = []

    def add(kernel: str, arch: int, dtype: str, act: str, flags: str, index: int = 0) -> None:
        cfg = configs_for(kernel, act, flags, arch, dtype)[index]
        out.append((Variant(kernel, arch, dtype, act, flags, _config_name(cfg), kernel in GEMMS), index))

    for arch in archs:
        whole_lists = selection == "full" or arch == 90
        for dtype in DTYPES:
            for kernel in GEMMS:
                for act, flags in _gemm_combos(kernel, NAMES):
                    n = len(configs_for(kernel, act, flags, arch, dtype))
                    every = act in ("identity", "mish") and flags in ("bias", "-", "prev=mish")
                    for i in range(n if every and whole_lists else 1):
                        add(kernel, arch, dtype, act, flags, i)
            for act in NAMES[1:]:
                add("delta", arch, dtype, act, "-")
            add("split_reduce", arch, dtype, "-", "-")
    return out


def _signature(variant: Variant, config_index: int):
    """(fn, signature, constexprs, attrs, options) for triton.compile."""
    from .activations import ACTIVATION_IDS, uses_output

    name, mod = _kernel_fn(variant.kernel)
    fn = getattr(mod, name)
    cfg = configs_for(variant.kernel, variant.act, variant.flags, variant.arch, variant.dtype)[config_index]
    ptr = "*" + DTYPES[variant.dtype]
    act_id = ACTIVATION_IDS.get(variant.act, 0)
    const: dict[str, object] = dict(cfg.kwargs)
    types: dict[str, str] = {}  # non-constexpr args; default i32 (sizes and strides)
    ones: set[str] = set()  # strides equal to 1 in a contiguous launch
    zeros: set[str] = set()  # strides equal to 0 (the direct-store "split" stride)

    if variant.kernel == "forward":
        types.update(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, a_ptr=ptr, z_ptr=ptr, negative_slope="fp32")
        ones |= {"stride_xk", "stride_wk", "stride_an", "stride_zn"}
        const.update(
            ACT=act_id, HAS_BIAS=variant.flags == "bias", STORE_Z=not uses_output(act_id),
            UPCAST=False, INPUT_PRECISION="ieee",
        )  # fmt: skip
    elif variant.kernel == "grad_input":
        types.update(grad_ptr=ptr, saved_ptr=ptr, w_ptr=ptr, prev_ptr=ptr, gi_ptr=ptr)
        types.update(negative_slope="fp32", prev_negative_slope="fp32")
        ones |= {"stride_gn", "stride_sn", "stride_wk", "stride_pk", "stride_ik"}
        prev = ACTIVATION_IDS[_prev(variant.flags)]
        const.update(ACT=act_id, PREV_ACT=prev, UPCAST=False, INPUT_PRECISION="ieee")
    elif variant.kernel == "grad_weight":
        split = variant.flags.startswith("split")
        out_ptr = "*fp32" if split else ptr
        types.update(grad_ptr=ptr, saved_ptr=ptr, x_ptr=ptr, gw_ptr=out_ptr, gb_ptr=out_ptr)
        types.update(negative_slope="fp32")
        ones |= {"stride_gn", "stride_sn", "stride_xk", "stride_wk", "stride_bn"}
        if not split:
            zeros |= {"stride_ws", "stride_bs"}
        const.update(
            ACT=act_id,
            HAS_BIAS=variant.flags == "bias-only"
            or (variant.flags.endswith("bias") and not variant.flags.endswith("nobias")),
            HAS_WEIGHT=variant.flags != "bias-only",
            UPCAST=False,
            INPUT_PRECISION="ieee",
        )
    elif variant.kernel == "delta":
        types.update(grad_ptr=ptr, saved_ptr=ptr, delta_ptr=ptr, negative_slope="fp32")
        ones |= {"stride_gn", "stride_sn", "stride_dn"}
        const.update(ACT=act_id, UPCAST=False)
    else:  # split_reduce: fp32 partials into the output dtype
        types.update(part_ptr="*fp32", out_ptr=ptr)
        ones |= {"stride_oc"}
        const.update(UPCAST=False)

    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in ones:
            signature[name] = "constexpr"
            const[name] = 1
        else:
            signature[name] = types.get(name, "i32")
            # Pointers from the caching allocator, sizes and strides of a 16-divisible problem.
            if signature[name] != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
            if name in zeros:
                attrs.pop((i,), None)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return fn, signature, const, attrs, options


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


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
        fn, signature, const, attrs, options = _signature(variant, config_index)
        src = ASTSource(fn, signature, const, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", variant.arch, 32), options=options)
        record["shared"] = int(kernel.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            # One call for both (a process per variant less): the resource line, then the SASS.
            sass = _run([_cuobjdump(), "-res-usage", "-sass", f.name])
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", sass.stdout)
        if m is None:
            raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {sass.stdout[:2000]!r}")
        record.update(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))
        record["spill_insts"] = len(re.findall(r"\b(?:LDL|STL)\b", sass.stdout))
        record["hgmma"] = "HGMMA" in sass.stdout
        record["mma"] = bool(re.search(r"\b(?:HGMMA|HMMA)\b", sass.stdout))
        record["error"] = None
    except Exception as err:  # recorded so that one failure does not hide the others
        record["error"] = f"{type(err).__name__}: {err}"
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    return record


def check(record: dict) -> list[str]:
    """Problems with one record: compile error, spills, no HGMMA for a 16-bit GEMM on sm_90."""
    if record["error"]:
        return [record["error"]]
    problems = []
    if record["stack"] or record["local"] or record["spill_insts"]:
        problems.append(
            f"spills: stack {record['stack']}, local {record['local']}, LDL/STL {record['spill_insts']}"
        )
    uses_dot = record["gemm"] and record["flags"] != "bias-only"
    if uses_dot and record["arch"] == 90 and record["dtype"] != "fp32" and not record["hgmma"]:
        problems.append("no HGMMA in the SASS of a 16-bit GEMM on sm_90")
    return problems


def run(archs, jobs: int, selection: str = "full", progress: bool = False, dtypes=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    work = [w for w in variants(archs, selection) if dtypes is None or w[0].dtype in dtypes]
    if jobs <= 1:
        return [compile_one(j) for j in work]
    import multiprocessing

    records = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for i, record in enumerate(pool.map(compile_one, work, chunksize=2)):
            records.append(record)
            if progress:  # one JSON line per variant on stderr, for long runs
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
    parser.add_argument("--out", type=Path, help="also write the JSON records to this file")
    parser.add_argument("--progress", action="store_true", help="one line per variant on stderr")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="only these dtypes")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    records = run(args.arch, args.jobs, args.selection, progress=args.progress, dtypes=args.dtype)
    bad = [r for r in records if check(r)]
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    else:
        print(table(records))
        print(f"\n{len(records)} variants, {len(bad)} with problems, {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
