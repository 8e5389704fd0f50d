"""The Triton backend: the seed equations on the fused kernels of `manualbp.triton_kernels`.

Same two functions as :mod:`manualbp.backends.reference`, plus :func:`is_available`:

    forward    one GEMM: z = x Wᵀ + b and a = f(z) in its epilogue; z is written only when f′
               needs it (gelu, gelu_tanh, silu, mish, softplus), otherwise `a` is what is saved.
    backward   δ = grad_out ⊙ f′(saved), grad_input = δ W, grad_weight = δᵀ x, grad_bias = Σ δ.

Where δ is formed — twice in the GEMM prologues, or once in a separate pass
---------------------------------------------------------------------------
δ is formed ONCE, in a memory-bound pass (`triton_kernels.delta`), whenever both GEMMs need it
or f′ needs the pre-activation z (gelu, gelu_tanh, silu, mish, softplus: erf/exp/tanh per
element); both GEMMs then read δ as a plain operand. Only for the cheap output-derived f′
(relu, leaky_relu, sigmoid, tanh: a select or one or two multiply-adds) with a single consumer
GEMM (e.g. the first layer, whose input needs no gradient) is δ formed in that GEMM's prologue,
which saves writing and re-reading an (M, N) buffer — except on sm_90 with 16-bit operands,
where the launchers themselves run the δ pass and the plain GEMM instead, because δ formed in
registers before the dot makes ptxas serialise every wgmma (`_utils.prologue_serializes`,
GPU_AUDIT.md finding C; the AOT checks report it as `wgmma_serialized`). Identity needs no δ at
all. The reasoning,
for a Hopper-class GPU (H100/H200, bf16, M = 8192, N = K = 4096):

1. Recomputation. A prologue recomputes δ for every output tile that reads the δ tile:
   ⌈K/BLOCK_K⌉ = 32 times in the input-gradient GEMM and ⌈K/BLOCK_K⌉ = 32 times in the
   weight-gradient GEMM, i.e. 64 evaluations of f′ per element instead of 1.
2. Which unit limits. Per (128 × 64) δ tile the MMA does 128·64·128 ≈ 1 M multiply-adds,
   ~512 cycles on one SM's tensor cores (~2048 bf16 FMA/clk). f′ of gelu / mish / silu costs
   ~20-40 fp32 instructions per element (erf or exp, reciprocal, converts): 8192 × 20-40 /
   128 lanes ≈ 1300-2600 cycles. Formed in the prologue, f′ makes the GEMM ALU-bound at 2-5×
   its tensor-core time; only relu/leaky/identity (a select and converts) would hide under it.
   The transformed tile also has to pass through registers rather than going from shared
   memory straight into wgmma: in the weight-gradient GEMM the δ tile must be transposed in
   registers while the 128 × 128 accumulator is live, and with mish the 64-row tile spilled
   (AOT, sm_90), so that flavour is limited to 32-row tiles.
3. Cost of the pass. It reads grad_out and saved and writes δ: 3·M·N·2 bytes = 201 MB, about
   42 µs at 4.8 TB/s, against 2·2·M·N·K = 550 GFLOP ≈ 0.6-0.7 ms for the two backward GEMMs:
   ~6 %, and the GEMMs then run at their plain-GEMM speed.
4. The prologue stays where it is cheap and where it is the point: the kernels keep it for every
   activation (the launchers accept any id, and a whole-network backward forms δ⁽ˡ⁻¹⁾ in the
   epilogue of the layer above's input-gradient GEMM, the same device function).

The bias gradient Σ δ is fused into the weight-gradient launch (its first ⌈N/BLOCK_N⌉ programs
sum δ columns; the GEMM tiles' loop stays the plain pipelined one).
This choice is argued, not measured: no GPU was available when it was written. The benchmark
`experiments/bench_triton_layer.py` times the backward and is where to check it.

Triton is imported lazily: importing this module never needs triton, and `is_available` says
why the backend cannot run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from manualbp.activations import Activation

__all__ = ["gated_mlp_backward", "gated_mlp_forward", "is_available", "linear_backward", "linear_forward"]

# Triton decides at import time whether kernels are interpreted; read the same variable here.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available(device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the kernels can run on tensors of `device`, else (False, reason)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "the 'triton' package is not installed (pip install manualbp[triton])"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available in this PyTorch build or on this machine"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return False, f"the kernels need compute capability >= 8.0, device has {major}.{minor}"
        return True, ""
    if device.type == "cpu":
        if _INTERPRET:
            return True, ""
        return False, (
            "CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    return False, (
        f"device type {device.type!r} is not supported (expected cuda, or cpu under the interpreter)"
    )


def _kernels():
    from manualbp.triton_kernels import delta, linear_forward, linear_grad_input, linear_grad_weight

    return linear_forward, linear_grad_input, linear_grad_weight, delta


def _check_act(act: Activation) -> None:
    from manualbp.triton_kernels.activations import NAMES

    kid = getattr(act, "kernel_id", None)
    if not isinstance(kid, int) or not 0 <= kid < len(NAMES) or NAMES[kid] != act.name:
        raise ValueError(
            f"act: registry entry {getattr(act, 'name', act)!r} has kernel_id {kid!r}, "
            f"expected the id of that name in the kernels' list {NAMES}"
        )


def _check_dtype(x: Tensor) -> None:
    # The kernels take 32- and 16-bit storage; say which backend does take the others.
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"input: dtype {x.dtype} is not supported by backend 'triton', which expects "
            "float32, float16 or bfloat16; use backend 'torch' (mbp.use_backend('torch')) for it"
        )


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: Activation) -> tuple[Tensor, Tensor]:
    """Returns (out, saved): saved is `out` itself when f′ is read from the output, else z."""
    _check_act(act)
    _check_dtype(x)
    fwd, _, _, _ = _kernels()
    out, z = fwd.linear_forward(
        x, weight, bias, act.kernel_id, act.negative_slope, store_z=not act.uses_output
    )
    return out, (out if act.uses_output else z)


def linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: Activation,
    *,
    need_input: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """δ = grad_out ⊙ f′(saved), then only the gradients asked for (see the module docstring)."""
    _check_act(act)
    _, gin, gw, dlt = _kernels()
    act_id, slope = act.kernel_id, act.negative_slope
    source, saved_arg = grad_out, saved  # type: Tensor, Tensor | None
    both = need_input and (need_weight or need_bias)
    if act_id != 0 and (both or not act.uses_output):
        source = dlt.linear_delta(grad_out, saved, act_id, slope)  # δ once (module docstring)
        act_id, saved_arg = 0, None
    grad_input = grad_weight = grad_bias = None
    if need_input:
        grad_input = gin.linear_grad_input(source, weight, saved_arg, act_id, slope)
    if need_weight or need_bias:
        grad_weight, grad_bias = gw.linear_grad_weight(
            source, x, saved_arg, act_id, slope, need_weight=need_weight, need_bias=need_bias
        )
    return grad_input, grad_weight, grad_bias


def network_step(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor | None,
    act: Activation,
    prev_saved: Tensor | None,
    prev_act: Activation | None,
    *,
    need_prev: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One step of the whole-network backward (`manualbp.ops.network`) on the kernels:
    δˡ⁻¹ = f′ˡ⁻¹ ⊙ (δˡ Wˡ) in the input-gradient GEMM's epilogue.

    Only the top layer receives ∂C/∂aᴸ (act ≠ identity); every lower layer receives δ itself
    from the epilogue of the layer above, so its GEMMs read it as a plain operand. At the top,
    δᴸ is formed once by the δ pass when both GEMMs need it, else in the one GEMM's prologue
    (the choice argued in manualbp/backends/triton.py).
    """
    _, linear_grad_input, linear_grad_weight, delta_pass = _kernels()
    act_id, slope = act.kernel_id, act.negative_slope
    need_weight_pass = need_weight or need_bias
    if act_id != 0 and need_prev and need_weight_pass:
        grad = delta_pass.linear_delta(grad, saved, act_id, slope)
        act_id, saved = 0, None
    grad_prev = grad_weight = grad_bias = None
    if need_prev:
        prev_id = 0 if prev_act is None else prev_act.kernel_id
        grad_prev = linear_grad_input.linear_grad_input(
            grad,
            weight,
            saved,
            act_id,
            slope,
            prev_act_id=prev_id,
            prev_saved=prev_saved if prev_id != 0 else None,
            prev_negative_slope=0.01 if prev_act is None else prev_act.negative_slope,
        )
    if need_weight_pass:
        grad_weight, grad_bias = linear_grad_weight.linear_grad_weight(
            grad, x, saved, act_id, slope, need_weight=need_weight, need_bias=need_bias
        )
    return grad_prev, grad_weight, grad_bias


def gated_mlp_forward(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    act: Activation,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, z_g, z_u) of the gated MLP (`manualbp.ops.gated`): gate and up in one GEMM, then down."""
    _check_act(act)
    _check_dtype(x)
    from manualbp.triton_kernels import gated_mlp

    return gated_mlp.gated_mlp_forward(
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
        act.kernel_id, act.negative_slope,
    )  # fmt: skip


def gated_mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    z_g: Tensor,
    z_u: Tensor,
    act: Activation,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The gated MLP's seven gradients; δ_g and δ_u in one pass (`triton_kernels.gated_mlp`)."""
    _check_act(act)
    from manualbp.triton_kernels import gated_mlp

    flags = tuple(bool(n) for n in needs)
    assert len(flags) == 7
    return gated_mlp.gated_mlp_backward(
        grad_out, x, gate_weight, up_weight, down_weight, z_g, z_u,
        act.kernel_id, act.negative_slope, flags,
    )  # fmt: skip
