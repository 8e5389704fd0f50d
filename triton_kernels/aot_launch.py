"""AOT = launch: the signature, constexprs and specialisation attributes of a variant, derived as
Triton's binder derives them for a real launch (`manualbp.triton_kernels.aot` states how)."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from .aot_variants import ARCHS, STANDIN_K, STANDIN_M, STANDIN_N, Variant, _kernel_fn, _prev, variants


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
