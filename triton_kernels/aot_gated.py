"""Ahead-of-time compilation of the gated MLP kernels (`gated_mlp.py`), as `aot.py` does for the
linear ones, for GPUs this machine does not have.

    python -m manualbp.triton_kernels.aot_gated --arch 90 80 --json

Every variant: gated_up × dtype × activation × bias flags × each configuration of the list its
launcher selects (`gated_mlp.configs_for`), and gated_delta × dtype × activation, specialised as a
launch on a contiguous 16-divisible problem. Each cubin goes through `aot.py`'s cuobjdump
inspection and `aot.check` (no spills, HGMMA in every 16-bit GEMM on sm_90). Kept beside aot.py
rather than in it while aot.py is being reworked; its variants belong in `aot.variants`.
Must run WITHOUT TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

from . import aot

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


def _signature(variant: aot.Variant, index: int):
    from . import gated_mlp
    from .activations import ACTIVATION_IDS

    ptr = "*" + aot.DTYPES[variant.dtype]
    act_id = ACTIVATION_IDS[variant.act]
    if variant.kernel == "gated_up":
        fn = gated_mlp.gated_up_kernel
        capability = (variant.arch // 10, variant.arch % 10)
        cfg = gated_mlp.configs_for(capability, _torch_dtype(variant.dtype))[index]
        names = ("x_ptr", "wg_ptr", "wu_ptr", "bg_ptr", "bu_ptr", "zg_ptr", "zu_ptr", "h_ptr")
        types = {n: ptr for n in names}
        ones = {"stride_xk", "stride_gk", "stride_uk", "stride_zgn", "stride_zun", "stride_hn"}
        bias = variant.flags == "bias"
        const: dict[str, object] = dict(cfg.kwargs)
        const.update(
            ACT=act_id, HAS_GATE_BIAS=bias, HAS_UP_BIAS=bias, STORE_Z=True, UPCAST=False,
            INPUT_PRECISION="ieee",
        )  # fmt: skip
    else:
        fn = gated_mlp.gated_delta_kernel
        cfg = gated_mlp.delta_gpu_config()
        types = {n: ptr for n in ("dh_ptr", "zg_ptr", "zu_ptr", "dg_ptr", "du_ptr", "h_ptr")}
        ones = {"stride_dhn", "stride_zgn", "stride_zun", "stride_dgn", "stride_dun", "stride_hn"}
        const = dict(cfg.kwargs)
        const.update(ACT=act_id, STORE_H=True, UPCAST=False)
    types["negative_slope"] = "fp32"
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
            if signature[name] != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, const, attrs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def compile_one(job: tuple[aot.Variant, int]) -> dict:
    """As `aot.compile_one`, for the gated kernels."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, index = job
    record = dataclasses.asdict(variant)
    t0 = time.perf_counter()
    try:
        fn, signature, const, attrs, options = _signature(variant, index)
        target = GPUTarget("cuda", variant.arch, 32)
        kernel = triton.compile(ASTSource(fn, signature, const, attrs), target=target, options=options)
        record["shared"] = int(kernel.metadata.shared)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            sass = aot._run([aot._cuobjdump(), "-res-usage", "-sass", f.name])
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


def run(archs, jobs: int) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot_gated: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    work = variants(archs)
    if jobs <= 1:
        return [compile_one(j) for j in work]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_one, work, chunksize=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records = run(args.arch, args.jobs)
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    else:
        print(aot.table(records))
    return 1 if any(aot.check(r) for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
