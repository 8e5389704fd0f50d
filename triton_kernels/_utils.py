"""Shared helpers of the kernels and launchers: interpreter mode, operand upcast, argument checks.

Nothing here knows about a particular kernel. The launchers use the checks so that a wrong
argument fails in Python with a message naming it, never inside a kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

# Read once, at import: Triton decides at `@triton.jit` time whether a function is compiled or
# interpreted, so the variable must be set before `triton` is first imported (tests/conftest.py).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: `alloc(shape, dtype, device) -> Tensor`, the launchers' optional output allocator.
Alloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Default allocator of every buffer a launcher creates (outputs, δ, split partials).

    Launchers look it up at call time (`_utils.empty`), so the tests replace it with one that
    fills buffers with NaN: an element a kernel forgets to write then fails the comparison.
    """
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def upcast(x, UPCAST: tl.constexpr):
    """Return `x` in float32 when UPCAST is set, unchanged otherwise.

    Triton's interpreter stores bfloat16 as raw uint16 bits and its `tl.dot` is a NumPy matmul on
    those bits, so the launchers set UPCAST (only when interpreting bfloat16) and every GEMM
    operand and elementwise input goes through this one helper. On a GPU UPCAST is False and
    the tensor cores see the 16-bit tiles directly.
    """
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


def autotune_enabled() -> bool:
    """False when MANUALBP_TRITON_AUTOTUNE=0: launches then use the first (largest) config of
    their list. Read at call time. Useful for tests on a GPU (one compile per variant instead of
    one per config) and for bitwise reproducibility across processes (the autotuner may pick a
    different tile, hence a different summation order, in another run)."""
    return os.environ.get("MANUALBP_TRITON_AUTOTUNE", "1") != "0"


def launch_kwargs(config: triton.Config) -> dict:
    """Keyword arguments that launch a plain `@triton.jit` kernel with `config`."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


_RECORDING = threading.local()


@contextlib.contextmanager
def recorded_launches() -> Iterator[None]:
    """Launches inside go through `torch.library.wrap_triton` (see `traceable`).

    The bodies of the ``manualbp::triton_linear_*`` `triton_op`s run in it: traced by
    `torch.compile`, their launches become graph nodes; run eagerly, `triton_op` itself turns the
    wrapping off. Everywhere else (the autograd Functions, the opaque ops) launches are plain:
    `wrap_triton` outside a `triton_op` would send every launch through higher-order-op dispatch,
    which costs far more than a small kernel.
    """
    previous = getattr(_RECORDING, "on", False)
    _RECORDING.on = True
    try:
        yield
    finally:
        _RECORDING.on = previous


@dataclasses.dataclass
class Launch:
    """One launch recorded by `captured_launches`: the kernel, its grid and arguments exactly as
    the launcher passes them, and (for the GEMMs) the configuration list it would pick from."""

    kernel: object
    grid: object
    args: tuple
    kwargs: dict
    configs: list | None = None  # a GEMM's config list for the captured capability


_CAPTURE = threading.local()


@contextlib.contextmanager
def captured_launches(capability: tuple[int, int]) -> Iterator[list[Launch]]:
    """Inside, launches are recorded (appended to the yielded list) instead of run, as on a
    device of `capability`, and CPU tensors are accepted as stand-ins for CUDA ones.

    The ahead-of-time build (`aot.py`) calls the real launchers in it, so what it compiles is
    specialised on the launchers' own arguments (Triton's binder then decides divisibility and
    1-strides exactly as at a launch); the tests use it to see which kernels a call launches.
    Nothing is run and no tensor data is read.
    """
    previous = getattr(_CAPTURE, "state", None)
    launches: list[Launch] = []
    _CAPTURE.state = (tuple(capability), launches)
    try:
        yield launches
    finally:
        _CAPTURE.state = previous


def _capturing() -> tuple[tuple[int, int], list[Launch]] | None:
    return getattr(_CAPTURE, "state", None)


class _Recorder:
    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, grid, args, kwargs))

        return record


def traceable(kernel):
    """`kernel`, or inside `recorded_launches` what `torch.library.wrap_triton` hands back for it.

    Every launch goes through this. While a `triton_op` is traced (`torch.compile` decomposes
    ``manualbp::triton_linear_*`` into the kernels they launch) a wrapped launch is recorded as a
    graph node instead of run, so Inductor can schedule it. The launchers therefore never read
    tensor data on the host: what they decide (configs, splits, placeholders) depends on shapes,
    strides, dtypes and the device only.
    """
    capture = _capturing()
    if capture is not None:
        return _Recorder(kernel, capture[1])
    if getattr(_RECORDING, "on", False):
        return torch.library.wrap_triton(kernel)
    return kernel


def launch_first_fitting(kernel, grid, configs: list[triton.Config], *args, **kwargs) -> None:
    """Launch `kernel` with the first of `configs` that the device can run (the path taken when
    autotuning is off). A configuration whose shared memory exceeds the device — fp32 with
    deep pipelines on sm_80 — raises OutOfResources at launch; the next one is tried. (A traced
    launch raises nothing, so a compiled graph records the first configuration; with autotuning
    on, the default, Inductor gets the whole list and its autotuner skips what does not fit.)"""
    from triton.runtime.errors import OutOfResources

    for config in configs:
        try:
            traceable(kernel)[grid](*args, **kwargs, **launch_kwargs(config))
            return
        except OutOfResources:
            continue
    name = getattr(kernel, "__name__", "kernel")
    raise RuntimeError(f"{name}: no configuration fits the device's shared memory")


def launch_gemm(
    kernel,
    grid,
    args: tuple,
    flags: dict,
    *,
    autotuned: dict,
    configs: dict[str, list[triton.Config]],
    flavour: Callable[[tuple[int, int]], str],
    interpreter_config: triton.Config,
) -> None:
    """Launch one of the GEMM kernels: `interpreter_config` under the interpreter; on a GPU the
    config list `flavour(capability)` names, autotuned (`autotuned[name]`) or, with autotuning
    off, its first configuration that fits."""
    capture = _capturing()
    if capture is not None:
        capture[1].append(Launch(kernel, grid, args, dict(flags), configs[flavour(capture[0])]))
        return
    if flags.get("USE_TMA"):
        ensure_allocator()
    if INTERPRET:
        traceable(kernel)[grid](*args, **flags, **interpreter_config.kwargs)
        return
    name = flavour(device_capability(args[0].device))
    if autotune_enabled():
        traceable(autotuned[name])[grid](*args, **flags)
    else:
        launch_first_fitting(kernel, grid, configs[name], *args, **flags)


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device: selects the config lists."""
    return torch.cuda.get_device_capability(device)


def gemm_capability(device: torch.device) -> tuple[int, int] | None:
    """The capability the GEMMs are compiled for: the captured one inside `captured_launches`,
    the device's for a CUDA tensor, None under the interpreter (CPU tensors)."""
    capture = _capturing()
    if capture is not None:
        return capture[0]
    if device.type != "cuda":
        return None
    return device_capability(device)


def prologue_serializes(device: torch.device, dtype: torch.dtype) -> bool:
    """True where δ formed in registers before the dot would serialise the tensor cores.

    On sm_90 a 16-bit dot whose A operand comes from registers (δ = grad_out ⊙ f′(saved) formed
    in the prologue) compiles to register-sourced wgmma that ptxas serialises (warning C7515:
    a wait to 0 after every HGMMA), which the AOT checks see as `wgmma_serialized`. The
    launchers then form δ in the δ pass and run the plain GEMM on it (GPU_AUDIT.md finding C).
    sm_80 (mma.sync takes registers anyway), float32 and the interpreter keep the prologue.
    """
    capability = gemm_capability(device)
    return capability is not None and capability >= (9, 0) and dtype in (torch.float16, torch.bfloat16)


def tma_path(device: torch.device, dtype: torch.dtype, *operands: torch.Tensor | None) -> bool:
    """USE_TMA of a GEMM launch: Hopper (sm_90+) and 16-bit, with every operand a valid TMA
    descriptor base (`descriptor_ok`); anything else (sm_80, float32, a strided view, an odd
    offset) keeps the cp.async pointer path of the same kernel. The interpreter takes the TMA
    path only when a test answers `gemm_capability` as (9, 0)."""
    capability = gemm_capability(device)
    if capability is None or capability < (9, 0) or dtype not in (torch.float16, torch.bfloat16):
        return False
    return all(descriptor_ok(t) for t in operands if t is not None)


def descriptor_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit last stride, row stride and base address
    multiples of 16 bytes, sizes in 1 … 2³¹ - 1."""
    if t.dim() != 2 or not 0 < t.shape[0] < 2**31 or not 0 < t.shape[1] < 2**31 or t.stride(1) != 1:
        return False  # (coordinates and sizes of a descriptor are 32-bit)
    size = t.element_size()
    if (t.stride(0) * size) % 16 or t.stride(0) < t.shape[1]:
        return False
    try:
        return t.data_ptr() % 16 == 0
    except RuntimeError:  # a traced (fake) tensor: its allocation is 16-byte aligned
        return (t.storage_offset() * size) % 16 == 0


def persistent_programs(device: torch.device, tiles: int, split: int = 1) -> int:
    """Programs per grid row of a persistent launch: two per SM over the `split` rows (a second
    resident program's main loop hides one's epilogue, as two CTAs per SM do without
    persistence; 3 in all under the interpreter, so that the tile loop strides), never more
    than the tiles."""
    programs = 2 * num_sms(device) if device.type == "cuda" else 3
    return max(1, min(tiles, programs // split))


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def ensure_allocator() -> None:
    """In-kernel TMA descriptors live in a global scratch buffer Triton asks an allocator for
    at launch; install one unless the caller (e.g. Inductor) has."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def gemm_config(
    block_m: int, block_n: int, block_k: int, warps: int, stages: int, group: str = "GROUP_M"
) -> triton.Config:
    """A GEMM launch configuration: tile sizes, `group` = 8 tiles per L2 group, warps, stages."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, group: 8},
        num_warps=warps,
        num_stages=stages,
    )


@triton.jit
def tile_count(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """⌈rows/BLOCK_R⌉ · ⌈cols/BLOCK_C⌉, the tiles a persistent loop strides over, as an i32.

    A product of two run-time sizes is formed in i64 (DESIGN.md, "Conventions"). Narrowing it
    back is exact: the tiles cover an output of rows × cols elements that fits in device memory,
    so there are far fewer than 2³¹ of them (2³⁷ bytes of HBM / the smallest 32×64 tile), and
    the loop counter must be i32 because TMA coordinates derived from it are.
    """
    tiles = tl.cdiv(rows, BLOCK_R).to(tl.int64) * tl.cdiv(cols, BLOCK_C)
    return tiles.to(tl.int32)


@triton.jit
def downcast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Round the float32 `x` to `dtype` (the storage dtype of an output or of δ).

    The companion of `upcast`, under the same constexpr: the interpreter converts float32 to
    bfloat16 by truncation (round toward zero), a GPU rounds to nearest even (cvt.rn.bf16.f32).
    Truncation is biased, and summed over a GEMM it doubles or triples the error of a bfloat16
    result, so when UPCAST is set the rounding to nearest even is done here on the bits (NaN
    passes through) and the final conversion is exact. On a GPU this is a plain `.to(dtype)`.
    """
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return x.to(dtype)  # includes fp32 split partials, which must not be rounded


def needs_upcast(dtype: torch.dtype) -> bool:
    """UPCAST constexpr for a launch: only bfloat16 under the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact IEEE fp32 unless PyTorch allows TF32 for matmuls.

    16-bit operands ignore it (their products are exact in fp32); it is kept constant for them so
    the float32 setting does not create extra specialisations.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def check_device(name: str, t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors when the interpreter is active."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and (INTERPRET or _capturing() is not None):
        return
    expected = "a CUDA tensor" + (" or a CPU tensor" if INTERPRET else "")
    hint = "" if INTERPRET else " (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)"
    raise ValueError(f"{name}: got a tensor on {t.device}, expected {expected}{hint}")


def check_tensor(
    name: str,
    t: object,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Type, shape, dtype and device of one tensor argument; raises naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: got dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name}: got device {t.device}, expected {device} (same as the input)")


def check_matrix(name: str, t: object) -> torch.Tensor:
    """A 2-D floating tensor of a supported dtype on a usable device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: got a {t.dim()}-D tensor of shape {tuple(t.shape)}, expected 2-D")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: got dtype {t.dtype}, expected one of float32, float16, bfloat16")
    check_device(name, t)
    return t


def check_slope(name: str, slope: object) -> float:
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(slope).__name__}")
    if not slope >= 0.0:
        raise ValueError(f"{name}: got {slope}, expected a float >= 0")
    return float(slope)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (1 under the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
