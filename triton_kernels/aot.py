"""Ahead-of-time compilation of every kernel variant, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot --arch 90 80 --json      # all variants, JSON records
    python -m manualbp.triton_kernels.aot --arch 90                # a Markdown table

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
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .aot_inspect import (  # noqa: F401  (re-exported: aot.ring_report, aot.cost_model, …)
    _SASS_LINE,
    cost_model,
    model_table,
    ring_problems,
    ring_report,
    sass_main_loop,
    sixteen_bit_sm90_gemm,
)

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

    # The names of what the launchers pass: no num_stages (Triton's default, 3), 4 warps.
    if kernel == "delta":
        return triton.Config(dict(delta.GPU_BLOCK), num_warps=delta.GPU_NUM_WARPS, num_stages=3)
    return triton.Config(dict(linear_grad_weight.REDUCE_BLOCK), num_warps=4, num_stages=3)


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


def routed(kernel: str, arch: int, dtype: str, act: str) -> bool:
    """A 16-bit sm_90 δ prologue, which no launch compiles: the launcher forms δ in the δ pass
    and runs the plain GEMM (`_utils.prologue_serializes`), variants already in the set."""
    return kernel in ("grad_input", "grad_weight") and arch >= 90 and dtype != "fp32" and act != "identity"


def variants(archs=ARCHS, selection: str = "full") -> list[tuple[Variant, int]]:
    """The variants to compile, each with the index of its config in `configs_for(...)`.

    Both sets hold the full product: for every arch, dtype, GEMM kernel and (activation, flags)
    combination (bias/no bias, epilogue, split, bias-only) the list its launcher selects on a
    device of that capability; the δ pass for every activation and the split reduction for
    every dtype.
    "full": the first (largest) configuration of each list, and every configuration of the
        list for mish (the activation with the most elementwise work) and identity, so every
        list a launch can pick is compiled whole on every arch (448 compiles for 90 and 80).
    "ci": the same on sm_90 (197); on the other archs only the first configuration of each
        list (225 on sm_80; tests/test_triton_aot.py, one test per arch).
    Variants no launch compiles are left out: the 16-bit sm_90 δ prologues (`routed`).
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
                    if routed(kernel, arch, dtype, act):
                        continue
                    n = len(configs_for(kernel, act, flags, arch, dtype))
                    every = act in ("identity", "mish") and flags in ("bias", "-", "prev=mish")
                    for i in range(n if every and whole_lists else 1):
                        add(kernel, arch, dtype, act, flags, i)
            for act in NAMES[1:]:
                add("delta", arch, dtype, act, "-")
            add("split_reduce", arch, dtype, "-", "-")
    return out


# The stand-in problem the launchers are called on: sizes divisible by 16 (as the config lists
# assume), N ≠ K so that a swapped operand cannot pass, small enough to allocate on the CPU.
STANDIN_M, STANDIN_N, STANDIN_K = 512, 384, 256


def _call_launcher(variant: Variant) -> None:
    """Call the real launcher of `variant` on contiguous stand-in CPU tensors."""
    import torch

    from . import delta, linear_forward, linear_grad_input, linear_grad_weight
    from .activations import ACTIVATION_IDS

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[variant.dtype]
    M, N, K = STANDIN_M, STANDIN_N, STANDIN_K

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dt)

    act_id = ACTIVATION_IDS.get(variant.act, 0)
    saved = t(M, N) if act_id else None
    if variant.kernel == "forward":
        linear_forward.linear_forward(t(M, K), t(N, K), t(N) if variant.flags == "bias" else None, act_id)
    elif variant.kernel == "grad_input":
        prev_id = ACTIVATION_IDS[_prev(variant.flags)]
        linear_grad_input.linear_grad_input(
            t(M, N), t(N, K), saved, act_id, prev_act_id=prev_id, prev_saved=t(M, K) if prev_id else None
        )
    elif variant.kernel == "grad_weight":
        flags = variant.flags
        linear_grad_weight.linear_grad_weight(
            t(M, N), t(M, K), saved, act_id,
            need_weight=flags != "bias-only",
            need_bias=flags == "bias-only" or (flags.endswith("bias") and not flags.endswith("nobias")),
            split_k=2 if flags.startswith("split") else 1,
        )  # fmt: skip
    elif variant.kernel == "delta":
        delta.linear_delta(t(M, N), t(M, N), act_id)
    else:  # split_reduce: the reduction of a split weight gradient into the output dtype
        linear_grad_weight.linear_grad_weight(t(M, N), t(M, K), need_bias=False, split_k=2)


def captured_launch(variant: Variant):
    """The launch of `variant`'s kernel that its launcher makes on a device of `variant.arch`
    (`_utils.Launch`: kernel, grid, arguments, constexpr flags, config list)."""
    from . import _utils

    name, mod = _kernel_fn(variant.kernel)
    fn = getattr(mod, name)
    with _utils.captured_launches((variant.arch // 10, variant.arch % 10)) as launches:
        _call_launcher(variant)
    mine = [launch for launch in launches if launch.kernel is fn]
    if not mine:
        raise RuntimeError(f"{variant}: the launcher made no launch of {name}: {launches}")
    return mine[0] if variant.kernel == "split_reduce" else mine[-1]


class _StandInDriver:
    """Answers what `JITFunction.run` asks the driver before compiling, for a GPU of `arch`."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # one binder cache per arch

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def launched_on(arch: int):
    """Inside, `kernel[grid](...)` runs Triton's own launch path for a GPU of `arch` up to the
    compile, which a `jit_cache_hook` skips: the yielded list receives, per launch, the kernel
    name and what `JITFunction.run` would compile (signature, constants, attributes, options)."""
    from triton import knobs
    from triton.runtime.driver import driver

    seen: list[tuple[str, dict]] = []

    def hook(*, fn, compile, **_):
        seen.append((fn.name, compile))
        return True  # skip the compilation: run() returns before launching

    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_StandInDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


SPEC_KEYS = ("signature", "constants", "configs", "num_warps", "num_ctas", "num_stages", "enable_fp_fusion")


def specialization(variant: Variant, config_index: int) -> dict:
    """What a launch of `variant` with config `config_index` of its list compiles."""
    launch = captured_launch(variant)
    kwargs = dict(launch.kwargs)
    if launch.configs is not None:
        from ._utils import launch_kwargs

        kwargs.update(launch_kwargs(launch.configs[config_index]))
    with launched_on(variant.arch) as seen:
        launch.kernel[launch.grid](*launch.args, **kwargs)
    ((_, spec),) = seen
    return {k: spec[k] for k in SPEC_KEYS if k in spec}


@contextlib.contextmanager
def _device_answers(arch: int):
    """The launchers' device queries answered as on a GPU of `arch`, CPU stand-ins accepted,
    autotuning off (a launch takes the first configuration of its list): nothing else changes."""
    from . import _utils

    capability = (arch // 10, arch % 10)
    saved = {k: getattr(_utils, k) for k in ("device_capability", "gemm_capability", "check_device")}
    previous_env = os.environ.get("MANUALBP_TRITON_AUTOTUNE")
    _utils.device_capability = lambda device: capability
    _utils.gemm_capability = lambda device: capability
    _utils.check_device = lambda name, t: None
    os.environ["MANUALBP_TRITON_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(_utils, k, v)
        if previous_env is None:
            os.environ.pop("MANUALBP_TRITON_AUTOTUNE", None)
        else:
            os.environ["MANUALBP_TRITON_AUTOTUNE"] = previous_env


def launch_specialization(variant: Variant) -> dict:
    """What a real launch of `variant` compiles (first configuration), taken from the
    launcher's own launch path (`_utils.launch_gemm` → `kernel[grid](...)` → `JITFunction.run`),
    without the capture `specialization` uses: the reference of the AOT = launch test."""
    name, _ = _kernel_fn(variant.kernel)
    with _device_answers(variant.arch), launched_on(variant.arch) as seen:
        _call_launcher(variant)
    mine = [spec for kernel, spec in seen if kernel == name]
    if not mine:
        raise RuntimeError(f"{variant}: no launch of {name} reached JITFunction.run")
    spec = mine[0] if variant.kernel == "split_reduce" else mine[-1]
    return {k: spec[k] for k in SPEC_KEYS if k in spec}


def launch_agreement(archs=ARCHS) -> dict:
    """Compare, for every variant's first configuration, what the AOT build compiles with
    what a launch compiles; returns {"compared": n, "mismatches": [...]}."""
    mismatches, compared = [], 0
    for variant, index in variants(archs, "ci"):
        if index:
            continue
        aot, launch = specialization(variant, 0), launch_specialization(variant)
        compared += 1
        if repr(aot) != repr(launch):
            mismatches.append(
                {"variant": dataclasses.asdict(variant), "aot": repr(aot), "launch": repr(launch)}
            )
    return {"compared": compared, "mismatches": mismatches}


def spec_summary(fn, spec: dict) -> dict[str, str]:
    """Per runtime argument: "=1" (specialised to the constexpr 1), "D" (divisible by 16), ""."""
    constants = {path[0]: value for path, value in spec["constants"].items()}
    attrs = {path[0]: value for path, value in spec["configs"][0].items()}
    out = {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            continue
        if i in constants:
            out[name] = f"={constants[i]}"
        else:
            out[name] = "D" if any(a[0] == "tt.divisibility" for a in attrs.get(i, [])) else ""
    return out


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
        name, mod = _kernel_fn(variant.kernel)
        fn = getattr(mod, name)
        spec = specialization(variant, config_index)
        record["launch_specialized"] = True  # derived by JITFunction.run from the launcher's args
        record["spec"] = spec_summary(fn, spec)
        src = ASTSource(fn, spec["signature"], spec["constants"], spec["configs"][0])
        options = {k: spec[k] for k in SPEC_KEYS[3:] if k in spec}
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
        record["tma"] = "UTMALDG" in sass.stdout
        record.update(sass_main_loop(sass.stdout))
        record["sass_insts"] = len(_SASS_LINE.findall(sass.stdout))
        record["rings"] = ring_report(kernel.asm["ttgir"])
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
    problems += ring_problems(record.get("rings", []))
    if sixteen_bit_sm90_gemm(record):
        if not record["hgmma"]:
            problems.append("no HGMMA in the SASS of a 16-bit GEMM on sm_90")
        if record["wgmma_serialized"]:
            problems.append("wgmma serialised in the main loop (a wait to 0 on the groups every K-step)")
        if not record["loop_hgmma"]:
            problems.append("no HGMMA in the main loop found in the SASS")
    return problems


def run(archs, jobs: int, selection: str = "full", progress: bool = False, dtypes=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    work = [w for w in variants(archs, selection) if dtypes is None or w[0].dtype in dtypes]
    import multiprocessing

    records = []
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            results = map(compile_one, work)
        else:
            context = multiprocessing.get_context("fork")
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=context))
            results = pool.map(compile_one, work, chunksize=1)
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
    records = run(args.arch, args.jobs, args.selection, progress=args.progress, dtypes=args.dtype)
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
