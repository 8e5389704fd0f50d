"""What the ahead-of-time build compiles (`manualbp.triton_kernels.aot`): every kernel variant —
kernel × dtype × activation × flags × launch configuration, per GPU architecture — and the
configuration lists the launchers pick from."""

from __future__ import annotations

import dataclasses

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
    "ci": the same on sm_90 (199); on the other archs only the first configuration of each
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
