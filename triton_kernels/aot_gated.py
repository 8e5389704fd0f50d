"""Ahead-of-time compilation of the gated MLP kernels (`gated_mlp.py`), as `aot.py` does for the
linear ones, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot_gated --arch 90 80 --json

Every variant: gated_up × dtype × activation × bias flags × each configuration of the list its
launcher selects (`gated_mlp.configs_for`), and gated_delta × dtype × activation,
specialised as Triton's binder specialises a real launch of the launchers in `gated_mlp.py` on
stand-in tensors (`aot_launch`). Each cubin goes through the same inspection and `aot.check` as
the linear kernels: no spills, no shared-memory ring race, and for 16-bit on sm_90 HGMMA in the
main loop, not serialised. Kept beside aot.py; its variants belong in `aot_variants.variants`.
Must run WITHOUT TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from . import aot, aot_inspect, aot_launch, aot_variants

ACTS = ("identity", "relu", "sigmoid", "gelu", "gelu_tanh", "silu", "mish", "softplus")


def variants(archs=aot.ARCHS) -> list[tuple[aot.Variant, int]]:
    from . import gated_mlp

    out = []
    for arch in archs:
        for dtype in aot.DTYPES:
            for act in ACTS:
                for flags in ("bias", "nobias") if act in ("silu", "mish") else ("nobias",):
                    configs = gated_mlp.configs_for((arch // 10, arch % 10), _torch_dtype(dtype))
                    for i, cfg in enumerate(configs):
                        name = aot._config_name(cfg)
                        out.append((aot.Variant("gated_up", arch, dtype, act, flags, name, True), i))
                name = aot._config_name(gated_mlp.delta_gpu_config())
                out.append((aot.Variant("gated_delta", arch, dtype, act, "-", name, False), 0))
    return out


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _call_launcher(variant: aot.Variant) -> None:
    """The real launcher of `variant` on contiguous stand-in CPU tensors (inside a capture)."""
    import torch

    from . import gated_mlp
    from .activations import ACTIVATION_IDS

    dt = _torch_dtype(variant.dtype)
    M, N, K = aot_variants.STANDIN_M, aot_variants.STANDIN_N, aot_variants.STANDIN_K
    act_id = ACTIVATION_IDS[variant.act]

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dt)

    if variant.kernel == "gated_up":
        bias = variant.flags == "bias"
        gated_mlp.gated_up(t(M, K), t(N, K), t(N, K), t(N) if bias else None, t(N) if bias else None, act_id)
    else:
        gated_mlp.gated_delta(t(M, N), t(M, N), t(M, N), act_id)


def specialization(variant: aot.Variant, index: int) -> tuple[object, dict]:
    """(kernel, what a launch of `variant` with config `index` compiles), derived by Triton's
    binder from the launcher's own arguments, as `aot_launch.specialization` does."""
    from . import _utils, gated_mlp

    fn = gated_mlp.gated_up_kernel if variant.kernel == "gated_up" else gated_mlp.gated_delta_kernel
    with _utils.captured_launches((variant.arch // 10, variant.arch % 10)) as launches:
        _call_launcher(variant)
    (launch,) = [launch for launch in launches if launch.kernel is fn]
    kwargs = dict(launch.kwargs)
    if launch.configs is not None:
        kwargs.update(_utils.launch_kwargs(launch.configs[index]))
    with aot_launch.launched_on(variant.arch) as seen:
        launch.kernel[launch.grid](*launch.args, **kwargs)  # type: ignore[index]
    ((_, spec),) = seen
    return fn, {k: spec[k] for k in aot_launch.SPEC_KEYS if k in spec}


def compile_one(job: tuple[aot.Variant, int]) -> dict:
    """As `aot.compile_one`, for the gated kernels: every field `aot.check` reads."""
    return compile_with(specialization, job)


def compile_with(specialize, job: tuple[aot.Variant, int]) -> dict:
    """Compile and inspect `job` as specialised by `specialize(variant, index) -> (kernel, spec)`
    (the kernels outside `aot.py`'s list share this: the gated MLP's, cross-entropy's)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, index = job
    record = dataclasses.asdict(variant)
    t0 = time.perf_counter()
    try:
        fn, spec = specialize(variant, index)
        record["launch_specialized"] = True
        record["spec"] = aot_launch.spec_summary(fn, spec)
        src = ASTSource(fn, spec["signature"], spec["constants"], spec["configs"][0])
        options = {k: spec[k] for k in aot_launch.SPEC_KEYS[3:] if k in spec}
        target = GPUTarget("cuda", variant.arch, 32)
        kernel = triton.compile(src, target=target, options=options)
        record.update(aot_inspect.cubin_record(kernel)[0])
        record["error"] = None
    except Exception as err:  # recorded so that one failure does not hide the others
        record["error"] = f"{type(err).__name__}: {err}"
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    return record


def run_family(name: str, work: list[tuple[aot.Variant, int]], compile_one, jobs: int) -> list[dict]:
    """Compile `work` with `compile_one` (a module-level function: it crosses a fork), `jobs` at a
    time; the run loop of the kernel families outside `aot.py` (gated MLP, cross-entropy)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit(f"{name}: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    if jobs <= 1:
        return [compile_one(j) for j in work]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_one, work, chunksize=2))


def family_main(doc: str, run_archs, argv: list[str] | None) -> int:
    """The command line of such a family: `--arch`, `--jobs`, `--json`; exit 1 on any problem.
    `run_archs(archs, jobs)` compiles and returns the records."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records = run_archs(args.arch, args.jobs)
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    else:
        print(aot.table(records))
    return 1 if any(aot.check(r) for r in records) else 0


def run(archs, jobs: int) -> list[dict]:
    return run_family("aot_gated", variants(archs), compile_one, jobs)


def main(argv: list[str] | None = None) -> int:
    return family_main(__doc__ or "", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
