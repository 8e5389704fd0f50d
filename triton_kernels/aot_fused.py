"""Ahead-of-time compilation of the fused MLP kernels (`fused_mlp.py`) for sm_90 and sm_80.

    python -m manualbp.triton_kernels.aot --family fused --arch 90 80 --json

(also part of the default `python -m manualbp.triton_kernels.aot --json`). Each variant is one
network shape — the fused kernels are specialised on the depth, the padded widths and the
activations, which are constexprs — compiled as a launch of the real launchers in `fused_mlp.py`
on stand-in tensors would compile it (`aot_launch.launched_on`), and inspected as the linear
kernels are (`aot.compile_one`'s fields, `aot.check`): no spills, and for 16-bit on sm_90
HGMMA. `mlp_grad_weight` is the one with reduction loops (over rows, one a layer): it is a `gemm`
record where every layer can be a wgmma (`_wgmma_wide`), so `aot.check` also requires HGMMA,
not serialised, in each of those loops (`mma_loops`; the main loop is only the smallest), and
shared-memory rings with enough slots. The two sweeps have no K-loop (a layer is one dot of
K = width ≤ 128); their wgmma of layer l + 1 waits for layer l by data dependence
(`layer_waits` counts those waits).

The accumulating δ sweep (`mlp_backward_acc`, `fused_mlp_acc.py`, in layer groups) is recorded
where a launch on that arch takes it (`fused_mlp_acc.fits`), with `ptxas_serialized`: whether
the wheel's ptxas, run once more on its PTX, warns that it serialised the wgmma (C7514/C7515),
which its data-dependent waits cannot show. Known, and why the recorded networks avoid it: at
width 128
the elementwise code of the gelu-class activations (gelu, gelu_tanh, silu, mish, softplus)
over a 64 × 128 tile spills in the split δ sweep on sm_90 — ptxas schedules each operation
over all 32 elements a thread holds; relu, leaky_relu, sigmoid, tanh at 128 and every
activation at ≤ 64 do not. A spill costs speed, not correctness.
"""

from __future__ import annotations

import dataclasses
import os

from . import aot_inspect, aot_variants

# (dtype, input width, hidden width, depth, output width, activation, bias): small input and
# output widths (a coordinate net, 2 → 3) exercise the in-kernel padding.
# The accumulating sweep's groups (fused_mlp_acc.ACT_GROUPS): on sm_90 tanh at width 64 takes
# pairs of layers up to 4 layers and single ones beyond, silu single ones; on sm_80 single
# 64-wide layers, up to 4.
NETS_CI = {
    90: [("bf16", 2, 64, 4, 3, "tanh", True), ("fp16", 128, 128, 4, 128, "relu", False),
         ("bf16", 2, 64, 8, 3, "tanh", True)],
    80: [("bf16", 2, 64, 4, 3, "tanh", True), ("fp32", 32, 32, 2, 32, "tanh", True)],
}
_EXTRA = [("bf16", 64, 64, 8, 64, "gelu", True), ("fp16", 32, 32, 4, 1, "mish", True),
          ("bf16", 3, 128, 8, 1, "tanh", True), ("fp16", 64, 64, 2, 64, "gelu", False),
          ("fp16", 32, 32, 2, 32, "mish", False), ("bf16", 2, 64, 4, 3, "silu", True),
          ("fp16", 32, 32, 8, 32, "sigmoid", False), ("bf16", 2, 64, 4, 3, "relu", True),
          ("bf16", 2, 64, 4, 3, "softplus", True)]
NETS_FULL = {arch: [*dict.fromkeys([*NETS_CI[90], *NETS_CI[80], *_EXTRA])] for arch in NETS_CI}
SWEEPS = ("mlp_forward", "mlp_backward", "mlp_backward_acc")
KERNELS = (*SWEEPS, "mlp_grad_weight", "mlp_reduce")


def kernels_of(net: tuple, arch: int) -> tuple[str, ...]:
    """What a training step of `net` launches on `arch` besides the reduction: the forward,
    and the accumulating δ sweep where it takes the stack (`fused_mlp_acc.fits`), else the
    split δ sweep and the weight-gradient loop."""
    from . import fused_mlp, fused_mlp_acc
    from .activations import ACTIVATION_IDS

    acts = [ACTIVATION_IDS[net[5]]] * (net[3] - 1) + [0]  # as _call_launchers builds it
    plan = fused_mlp.Plan(_dims(net), acts, [0.0] * net[3], [net[6]] * net[3])
    if fused_mlp_acc.fits(plan, (arch // 10, arch % 10), _torch_dtype(net[0])):
        return ("mlp_forward", "mlp_backward_acc")
    return ("mlp_forward", "mlp_backward", "mlp_grad_weight")


def _flags(net: tuple) -> str:
    dims = "-".join(str(d) for d in _dims(net))
    return f"dims={dims}{' bias' if net[6] else ''}"


def _dims(net: tuple) -> list[int]:
    _, n_in, width, depth, n_out, _, _ = net
    return [n_in, *([width] * (depth - 1)), n_out]


def variants(archs=aot_variants.ARCHS, selection: str = "ci") -> list[tuple[aot_variants.Variant, int]]:
    """Per arch and network: the three kernels of the step (forward, δ sweep, weight gradient);
    in "full" also the reduction once per arch (elementwise, its dtype only): 12 for "ci"."""
    out = []
    for arch in archs:
        nets = (NETS_FULL if selection == "full" else NETS_CI).get(arch, NETS_CI[90])
        for net in nets:
            for kernel in kernels_of(net, arch):
                config = _config_name(kernel, net, arch)
                gemm = kernel == "mlp_grad_weight" and _wgmma_wide(net)
                out.append((aot_variants.Variant(kernel, arch, net[0], net[5], _flags(net), config, gemm), 0))
        if selection == "full":
            out.append((aot_variants.Variant("mlp_reduce", arch, nets[0][0], "-", "-", "256 w4", False), 0))
    return out


def _wgmma_wide(net: tuple) -> bool:
    """Whether every weight-gradient dot can be wgmma: a warpgroup's wgmma needs M ≥ 64, and
    the loop puts the wider of a layer's padded widths on M (`grad_weight_transposed`), so a
    layer of two widths under 64 compiles to mma.sync."""
    from . import fused_mlp

    pad = [fused_mlp.padded(d) for d in _dims(net)]
    return all(max(pad[i], pad[i + 1]) >= 64 for i in range(len(pad) - 1))


def _config_name(kernel: str, net: tuple, arch: int) -> str:
    from . import fused_mlp

    width = max(fused_mlp.padded(d) for d in _dims(net))
    if kernel == "mlp_grad_weight":
        c = fused_mlp.grad_weight_launch(width, _torch_dtype(net[0]), (arch // 10, arch % 10))
        return f"{c['BLOCK_M']} w{c['num_warps']} s{c['num_stages']}"
    if kernel == "mlp_backward_acc":
        from . import fused_mlp_acc

        c = fused_mlp_acc.GPU_LAUNCH
        return f"{c['BLOCK_M']} w{c['num_warps']} s{c['num_stages']}"
    c = fused_mlp.gpu_launch(width, kernel.removeprefix("mlp_"))
    return f"{c['BLOCK_M']} w{c['num_warps']}"


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _net(variant: aot_variants.Variant) -> tuple:
    nets = NETS_FULL.get(variant.arch, NETS_FULL[90])
    for net in nets:
        if net[0] == variant.dtype and net[5] == variant.act and _flags(net) == variant.flags:
            return net
    return nets[0]  # mlp_reduce: any network of its dtype


def _call_launchers(variant: aot_variants.Variant) -> None:
    """A training step's launches on contiguous stand-in CPU tensors (inside a capture)."""
    import torch

    from . import fused_mlp, fused_mlp_acc
    from .activations import ACTIVATION_IDS

    net = _net(variant)
    dt = _torch_dtype(variant.dtype)
    dims, depth, bias = _dims(net), net[3], net[6]
    act = ACTIVATION_IDS[net[5]]
    acts = [act] * (depth - 1) + [0]  # identity output layer, as a regression or a field
    M = aot_variants.STANDIN_M
    ws = [torch.empty((dims[i + 1], dims[i]), dtype=dt) for i in range(depth)]
    bs = [torch.empty((dims[i + 1],), dtype=dt) if bias else None for i in range(depth)]
    plan = fused_mlp.Plan(dims, acts, [0.01] * depth, [bias] * depth)
    x = torch.empty((M, dims[0]), dtype=dt)
    out, kept = fused_mlp.mlp_forward(x, ws, bs, plan)
    accumulate = fused_mlp_acc.fits(plan, (variant.arch // 10, variant.arch % 10), dt)
    backward = fused_mlp_acc.mlp_backward_accumulated if accumulate else fused_mlp.mlp_backward
    backward(out, x, ws, kept, plan, need_x=False, need_weight=[True] * depth, need_bias=[True] * depth)


def specialization(variant: aot_variants.Variant) -> tuple[object, dict]:
    from . import _utils, aot_launch, fused_mlp, fused_mlp_acc

    module = fused_mlp_acc if variant.kernel == "mlp_backward_acc" else fused_mlp
    fn = getattr(module, variant.kernel + "_kernel")
    with _utils.captured_launches((variant.arch // 10, variant.arch % 10)) as launches:
        _call_launchers(variant)
    launch = [launch for launch in launches if launch.kernel is fn][-1]
    with aot_launch.launched_on(variant.arch) as seen:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)  # type: ignore[index]
    ((_, spec),) = seen
    return fn, {k: spec[k] for k in aot_launch.SPEC_KEYS if k in spec}


def compile_one(job: tuple[aot_variants.Variant, int]) -> dict:
    """`aot.compile_one` for a fused variant: the same fields, plus `layer_waits`."""
    import re
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import aot_launch

    variant, _ = job
    record = dataclasses.asdict(variant)
    t0 = time.perf_counter()
    try:
        fn, spec = specialization(variant)
        record["launch_specialized"] = True
        record["spec"] = aot_launch.spec_summary(fn, spec)
        src = ASTSource(fn, spec["signature"], spec["constants"], spec["configs"][0])
        options = {k: spec[k] for k in aot_launch.SPEC_KEYS[3:] if k in spec}
        kernel = triton.compile(src, target=GPUTarget("cuda", variant.arch, 32), options=options)
        fields, sass = aot_inspect.cubin_record(kernel)
        record.update(fields)
        record["layer_waits"] = len(re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", sass))
        if variant.kernel == "mlp_grad_weight":  # one K-loop a layer; the main loop is one of them
            record["mma_loops"] = aot_inspect.sass_mma_loops(sass)
        if variant.kernel == "mlp_backward_acc" and variant.arch >= 90:
            record["ptxas_serialized"] = ptxas_serializes(kernel.asm["ptx"], variant.arch)
        record["model"] = None
        record["error"] = None
    except Exception as err:  # recorded so that one failure does not hide the others
        record["error"] = f"{type(err).__name__}: {err}"
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    return record


def _unaligned_input(record: dict) -> bool:
    """Known, and the caller's to change: an input x whose rows are not whole 16-byte vectors
    (a coordinate net's 2 or 3 columns) is the first layer's narrow operand, loaded through
    registers, not by cp.async into the ring, so that loop's wgmma waits every step (x is the
    caller's tensor: never copied or padded). The later layers' narrow δ is padded."""
    return int(record["flags"].split()[0].removeprefix("dims=").split("-")[0]) % 8 != 0


def ptxas_serializes(ptx: str, arch: int) -> bool:
    """Whether ptxas warns that it serialised the wgmma (C7514/C7515: a non-wgmma instruction
    reads or defines an accumulator inside a wgmma pipeline stage — every HGMMA then waits for
    the one before). The sweeps' waits are data dependences and cannot tell this apart, so
    the PTX goes through the wheel's ptxas once more with its messages kept."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return "serialized" in done.stdout + done.stderr


def check(record: dict) -> list[str]:
    """The fused kernels' own checks beyond `aot.check`: a 16-bit sweep on sm_90 uses wgmma,
    the accumulating sweep's is not serialised by ptxas, and in a wgmma-wide weight gradient
    every layer's K-loop has HGMMA, not serialised (`aot.check` sees the smallest loop only)."""
    if record["error"]:
        return []
    if record["kernel"] == "mlp_grad_weight" and aot_inspect.sixteen_bit_sm90_gemm(record):
        loops = record.get("mma_loops", [])
        problems = []
        for i, lp in enumerate(loops):
            if not lp["hgmma"]:
                problems.append(f"no HGMMA in K-loop {i} of the weight gradient (mma.sync or FMA)")
            if lp["serialized"] and not (i == 0 and _unaligned_input(record)):
                problems.append(f"wgmma serialised in K-loop {i} of the weight gradient")
        return problems
    if record["kernel"] not in SWEEPS:
        return []
    if record["arch"] >= 90 and record["dtype"] != "fp32" and not record["hgmma"]:
        return ["no HGMMA in the SASS of a 16-bit fused sweep on sm_90"]
    if record.get("ptxas_serialized"):
        return ["ptxas serialised the wgmma of the accumulating sweep (C7514/C7515)"]
    return []
