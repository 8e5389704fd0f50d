"""The whole MLP stack in one forward kernel and one δ-sweep kernel (small widths, ≤ 128).

For layers l = 0 … L−1 with weights W_l (d_{l+1}, d_l), biases b_l, activations f_l, input
h_0 = x (M, d_0):

    mlp_forward_kernel      z_l = h_l W_lᵀ + b_l,  h_{l+1} = f_l(z_l)  for every layer, one row
                            tile per program: h stays in registers from layer to layer (rounded
                            to the storage dtype between layers, as a per-layer network rounds
                            the tensor it writes); each layer's kept tensor (a = h_{l+1} when f′
                            reads the output, z_l when it needs the pre-activation) is written
                            once, and only the last layer's output otherwise.
    mlp_backward_kernel     δ_{L−1} = ∂C/∂a ⊙ f′_{L−1};  δ_{l−1} = (δ_l W_l) ⊙ f′_{l−1}(kept_{l−1})
                            for every layer, right to left, on chip; each δ_l is written once
                            (for the weight gradient), its column sums Σ_rows δ_l per program
                            (the bias gradient's partials), and ∇x = δ_0 W_0 when asked for.
    mlp_grad_weight_kernel  ∇W_l = δ_lᵀ h_l for every layer: program p reduces its own range of
                            rows into an fp32 partial (fused_mlp_grad_weight.py: one K-loop
                            over rows per layer, operands straight from memory, no atomics;
                            h_lᵀ δ_l where the output is under a wgmma's 64 rows).
    mlp_reduce_kernel       Σ_p partial[p] in a fixed order, cast to the parameter dtype
                            (fused_mlp_reduce.py): the deterministic cross-program reduction
                            of the weight and the bias partials, both in one launch (the same
                            inputs give bitwise-identical gradients). A training step is 4
                            launches in all.

Widths: every d_l is padded inside the kernels to a power of two ≥ 16 (the dot's minimum) with
masked loads — the caller's tensors are never copied or padded. Padded columns of z are 0, so
f(0) (finite for every activation) multiplies zero weight rows; padded δ columns are 0.
Layers are a `tl.static_range` loop over constexpr tuples (activation ids, padded widths, bias
flags), so a network compiles to one kernel per (depth, widths, activations) — its shape is a
model constant. The weights are re-read per row tile (from L2: at most 8·128·128 elements),
except in the resident forward (`forward_resident`: 16-bit, widths ≤ 64): persistent programs
load every Wᵀ once, before their loop over the row tiles, and Triton keeps them in shared
memory (the loads and their shared-memory copies sit before the loop in the TTGIR, 3.6 and 3.9).

No autograd here (DESIGN.md); :mod:`manualbp.ops.fused_mlp` wires these into the library.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import INTERPRET, check_device, downcast, input_precision, needs_upcast, upcast
from .activations import act_fn, act_grad, check_act_id, uses_output
from .fused_mlp_grad_weight import (  # noqa: F401  (fused_mlp.X)
    GRAD_WEIGHT_LAUNCH,
    grad_weight_launch,
    grad_weight_programs,
    grad_weight_transposed,
    mlp_grad_weight_kernel,
)
from .fused_mlp_reduce import mlp_reduce_kernel, reduce_partials  # noqa: F401  (fused_mlp.X)

MAX_WIDTH = 128  # registers: a (BLOCK_M, 128) fp32 tile per live operand
MAX_DEPTH = 8
RESIDENT_BYTES = 64 * 1024  # the forward's weights held in shared memory (forward_resident)
PROGRAMS_PER_SM = 2  # the resident forward's persistent programs


@triton.jit
def _rows(pid, BLOCK_M: tl.constexpr):
    return (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)


@triton.jit
def _load_tile(ptr, rows, stride_m, stride_n, M, n_real, NP: tl.constexpr, UPCAST: tl.constexpr):
    """A (BLOCK_M, NP) fp32 tile of rows × the first n_real columns, 0 elsewhere."""
    n = tl.arange(0, NP)
    mask = (rows[:, None] < M) & (n[None, :] < n_real)
    t = tl.load(ptr + rows[:, None] * stride_m + n[None, :] * stride_n, mask=mask, other=0.0)
    return upcast(t, UPCAST).to(tl.float32)


@triton.jit
def _store_tile(ptr, t, rows, stride_m, M, n_real, NP: tl.constexpr, UPCAST: tl.constexpr):
    """Store the fp32 tile t rounded to the buffer's dtype (rows of `stride_m`, unit columns)."""
    n = tl.arange(0, NP)
    mask = (rows[:, None] < M) & (n[None, :] < n_real)
    t = downcast(t, ptr.dtype.element_ty, UPCAST)
    tl.store(ptr + rows[:, None] * stride_m + n[None, :], t, mask=mask)


@triton.jit
def _weight_tile(w_ptr, stride_wn, stride_wk, n_out, n_in, RP: tl.constexpr, CP: tl.constexpr,
                 TRANSPOSED: tl.constexpr):  # fmt: skip
    """W (n_out, n_in) as an (RP, CP) tile: Wᵀ (in × out) when TRANSPOSED, else W (out × in)."""
    r = tl.arange(0, RP)
    c = tl.arange(0, CP)
    if TRANSPOSED:
        ptrs = w_ptr + r[:, None] * stride_wk + c[None, :] * stride_wn
        mask = (r[:, None] < n_in) & (c[None, :] < n_out)
    else:
        ptrs = w_ptr + r[:, None] * stride_wn + c[None, :] * stride_wk
        mask = (r[:, None] < n_out) & (c[None, :] < n_in)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def mlp_forward_kernel(
    x_ptr, w_ptrs, b_ptrs, kept_ptrs, out_ptr,
    M, dims, n_tiles,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_kept, stride_om,
    slopes,
    L: tl.constexpr,
    PAD: tl.constexpr,
    ACTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE: tl.constexpr,
    RESIDENT_W: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One row tile per program; or with RESIDENT_W persistent: every Wᵀ loaded once per
    program before its loop over the tiles pid, pid + P, … (P programs)."""
    pid = tl.program_id(0)
    if RESIDENT_W:
        ws = ()
        for i in tl.static_range(L):
            ws = ws + (_weight_tile(w_ptrs[i], stride_wn[i], stride_wk[i], dims[i + 1], dims[i],
                                    PAD[i], PAD[i + 1], True),)  # type: ignore[assignment]  # fmt: skip
        programs = tl.num_programs(0)
        for t in range(tl.cdiv(n_tiles - pid, programs)):
            _forward_tile(x_ptr, w_ptrs, ws, b_ptrs, kept_ptrs, out_ptr, _rows(pid + t * programs, BLOCK_M),
                          M, dims, stride_xm, stride_xk, stride_wn, stride_wk, stride_kept, stride_om, slopes,
                          L, PAD, ACTS, HAS_BIAS, STORE, RESIDENT_W, UPCAST, INPUT_PRECISION)  # fmt: skip
    else:
        _forward_tile(x_ptr, w_ptrs, (), b_ptrs, kept_ptrs, out_ptr, _rows(pid, BLOCK_M),
                      M, dims, stride_xm, stride_xk, stride_wn, stride_wk, stride_kept, stride_om, slopes,
                      L, PAD, ACTS, HAS_BIAS, STORE, RESIDENT_W, UPCAST, INPUT_PRECISION)  # fmt: skip


@triton.jit
def _forward_tile(
    x_ptr, w_ptrs, ws, b_ptrs, kept_ptrs, out_ptr, rows,
    M, dims, stride_xm, stride_xk, stride_wn, stride_wk, stride_kept, stride_om, slopes,
    L: tl.constexpr, PAD: tl.constexpr, ACTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE: tl.constexpr, RESIDENT_W: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    h = _load_tile(x_ptr, rows, stride_xm, stride_xk, M, dims[0], PAD[0], UPCAST)
    h = downcast(h, x_ptr.dtype.element_ty, UPCAST)
    for i in tl.static_range(L):
        if RESIDENT_W:
            w = ws[i]
        else:
            w = _weight_tile(w_ptrs[i], stride_wn[i], stride_wk[i], dims[i + 1], dims[i],
                             PAD[i], PAD[i + 1], True)  # fmt: skip
        z = tl.dot(upcast(h, UPCAST), upcast(w, UPCAST), input_precision=INPUT_PRECISION)
        if HAS_BIAS[i]:
            n = tl.arange(0, PAD[i + 1])
            b = tl.load(b_ptrs[i] + n, mask=n < dims[i + 1], other=0.0)
            z += upcast(b, UPCAST).to(tl.float32)[None, :]
        a = act_fn(z, ACTS[i], slopes[i])
        if STORE[i]:  # what f′ reads: a for ids 0-4, z for ids 5-9
            keep = a if ACTS[i] <= 4 else z
            _store_tile(kept_ptrs[i], keep, rows, stride_kept[i], M, dims[i + 1], PAD[i + 1], UPCAST)
        if i == L - 1:
            _store_tile(out_ptr, a, rows, stride_om, M, dims[i + 1], PAD[i + 1], UPCAST)
        else:
            h = downcast(a, x_ptr.dtype.element_ty, UPCAST)


@triton.jit
def mlp_backward_kernel(
    grad_ptr, w_ptrs, kept_ptrs, delta_ptrs, input_ptrs, gx_ptr, part_ptr,
    M, dims, delta_cols,
    stride_gm, stride_gn,
    stride_wn, stride_wk,
    stride_kept, stride_delta, stride_input,
    stride_gxm, part_offs, stride_part,
    slopes,
    L: tl.constexpr,
    PAD: tl.constexpr,
    ACTS: tl.constexpr,
    BIAS: tl.constexpr,
    WRITE_INPUT: tl.constexpr,
    NEED_X: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = _rows(pid, BLOCK_M)
    g = _load_tile(grad_ptr, rows, stride_gm, stride_gn, M, dims[L], PAD[L], UPCAST)
    if ACTS[L - 1] == 0:
        delta = g  # identity: ∂C/∂a is δ, nothing was kept
    else:
        s = _load_tile(kept_ptrs[L - 1], rows, stride_kept[L - 1], 1, M, dims[L], PAD[L], UPCAST)
        delta = act_grad(g, s, ACTS[L - 1], slopes[L - 1])
    for i in tl.static_range(L - 1, -1, -1):
        d = downcast(delta, grad_ptr.dtype.element_ty, UPCAST)  # δ_l as both GEMMs read it
        n = tl.arange(0, PAD[i + 1])
        mask = (rows[:, None] < M) & (n[None, :] < delta_cols[i])  # padded columns hold δ = 0
        tl.store(delta_ptrs[i] + rows[:, None] * stride_delta[i] + n[None, :], d, mask=mask)
        if BIAS[i]:  # this program's Σ_rows δ_l (masked rows hold δ = 0)
            col = tl.sum(upcast(d, UPCAST).to(tl.float32), axis=0)
            tl.store(part_ptr + pid * stride_part + part_offs[i] + n, col, mask=n < dims[i + 1])
        if i > 0 or NEED_X:
            w = _weight_tile(w_ptrs[i], stride_wn[i], stride_wk[i], dims[i + 1], dims[i],
                             PAD[i + 1], PAD[i], False)  # fmt: skip
            grad_prev = tl.dot(upcast(d, UPCAST), upcast(w, UPCAST), input_precision=INPUT_PRECISION)
            if i > 0:
                s = _load_tile(kept_ptrs[i - 1], rows, stride_kept[i - 1], 1, M, dims[i], PAD[i], UPCAST)
                delta = act_grad(grad_prev, s, ACTS[i - 1], slopes[i - 1])
                if WRITE_INPUT[i]:  # z was kept: the layer's input f(z), for ∇W_l's plain GEMM
                    a = act_fn(s, ACTS[i - 1], slopes[i - 1])
                    _store_tile(input_ptrs[i], a, rows, stride_input[i], M, dims[i], PAD[i], UPCAST)
            else:
                _store_tile(gx_ptr, grad_prev, rows, stride_gxm, M, dims[0], PAD[0], UPCAST)


# ------------------------------------------------------------------------------------ launchers

# Launch shapes. None has run on a GPU; each is compiled for sm_90 and sm_80 and checked not to
# spill (aot_fused.py). Wider layers hold more of the (BLOCK_M, width) fp32 tiles in registers.
INTERPRETER_BLOCK_M = 32


def gpu_launch(width: int, kernel: str = "forward") -> dict:
    """BLOCK_M and warps of a sweep for its widest (padded) layer `width`: 8 warps, and 64 rows
    where the tile is wide or the kernel holds more live tiles (the backward: δ, the kept
    tensor, f′ and for gelu-class layers f(z)). Chosen from the AOT register counts on sm_90
    and sm_80 (aot_fused.py); at width 128 the elementwise code of softplus-like activations
    still spills in the backward (README, fused mode)."""
    if kernel == "backward" or width > 64:
        return {"BLOCK_M": 64, "num_warps": 8}
    return {"BLOCK_M": 128, "num_warps": 8}


def padded(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


class Plan:
    """The static description of one launch: widths, activations, what is kept and needed."""

    def __init__(self, dims: list[int], act_ids: list[int], slopes: list[float], has_bias: list[bool]):
        self.dims = tuple(int(d) for d in dims)
        self.depth = len(act_ids)
        self.acts = tuple(check_act_id(f"act_ids[{i}]", a) for i, a in enumerate(act_ids))
        self.slopes = tuple(float(s) for s in slopes)
        self.has_bias = tuple(bool(b) for b in has_bias)
        self.pad = tuple(padded(d) for d in self.dims)
        if not len(self.dims) == self.depth + 1 == len(self.slopes) + 1 == len(self.has_bias) + 1:
            got = f"{len(self.dims)}/{self.depth}/{len(self.slopes)}/{len(self.has_bias)}"
            raise ValueError(
                f"dims/act_ids/slopes/has_bias: expected {self.depth + 1}/{self.depth}/{self.depth}/"
                f"{self.depth} entries, got {got}"
            )
        check_plan(self.dims, self.depth)

    def keeps(self, layer: int) -> bool:
        """Whether `layer` writes its own kept tensor (the last layer's a is the output)."""
        if layer < self.depth - 1:
            return True
        return not uses_output(self.acts[layer])  # z of a z-needing last layer

    def flags(self, x_dtype: torch.dtype) -> dict:
        return dict(L=self.depth, PAD=self.pad, ACTS=self.acts, UPCAST=needs_upcast(x_dtype),
                    INPUT_PRECISION=input_precision(x_dtype))  # fmt: skip

    def block(self, kernel: str = "forward") -> dict:
        if INTERPRET:
            return {"BLOCK_M": INTERPRETER_BLOCK_M}
        return gpu_launch(max(self.pad), kernel)


def check_plan(dims: tuple[int, ...], depth: int) -> None:
    """Where the fused kernels cannot run: a clear error naming the limit."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"mode='fused': got {depth} layers, supports 1 to {MAX_DEPTH}; use mode='network'")
    widest = max(dims)
    if widest > MAX_WIDTH:
        raise ValueError(
            f"mode='fused': layer widths {list(dims)} exceed the fused kernels' limit of {MAX_WIDTH} "
            "(the whole row tile of every layer lives in registers); use mode='network'"
        )


def forward_resident(plan: Plan, dtype: torch.dtype) -> bool:
    """Whether the forward runs persistent with every Wᵀ loaded once per program (kept in
    shared memory by Triton 3.6 and 3.9: the loads and their shared-memory copies sit before
    the tile loop in the TTGIR; AOT-checked clean at widths ≤ 64): 16-bit stacks of widths
    ≤ 64 whose weights fit RESIDENT_BYTES (float32's FMA dots would hold them in registers;
    width 128 was not compiled resident)."""
    size = sum(plan.pad[i] * plan.pad[i + 1] for i in range(plan.depth)) * 2
    return dtype != torch.float32 and max(plan.pad) <= 64 and size <= RESIDENT_BYTES


def mlp_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    plan: Plan,
    *,
    keep: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(output, kept): one launch for the whole stack. kept[l] is layer l's a or z (None where
    the output itself is kept, or when `keep` is False — recompute)."""
    check_device("x", x)
    M = x.shape[0]
    alloc, dt = _utils.empty, x.dtype
    out = alloc((M, plan.dims[-1]), dt, x.device)
    kept: list[torch.Tensor | None] = [
        alloc((M, plan.dims[i + 1]), dt, x.device) if keep and plan.keeps(i) else None
        for i in range(plan.depth)
    ]
    if M == 0:
        return out, kept
    block = plan.block()
    kept_t = tuple(k if k is not None else out for k in kept)  # stand-ins are never written
    tiles = triton.cdiv(M, block["BLOCK_M"])
    resident = forward_resident(plan, dt)
    grid = (min(tiles, PROGRAMS_PER_SM * _utils.num_sms(x.device)) if resident else tiles,)
    _utils.traceable(mlp_forward_kernel)[grid](
        x, tuple(weights), tuple(b if b is not None else w for b, w in zip(biases, weights)), kept_t, out,
        M, plan.dims, tiles,
        x.stride(0), x.stride(1),
        tuple(w.stride(0) for w in weights), tuple(w.stride(1) for w in weights),
        tuple(k.stride(0) for k in kept_t), out.stride(0),
        plan.slopes,
        HAS_BIAS=plan.has_bias,
        STORE=tuple(k is not None for k in kept),
        RESIDENT_W=resident,
        **plan.flags(dt),
        **block,
    )  # fmt: skip
    return out, kept


def mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    kept: list[torch.Tensor | None],
    plan: Plan,
    *,
    need_x: bool,
    need_weight: list[bool],
    need_bias: list[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """(∇x, [∇W_l], [∇b_l]) of the stack: the δ sweep, the weight-gradient partials, and one
    deterministic reduction for the weights and one for the biases. `kept` as `mlp_forward`
    returns it, with kept[L−1] the output where the last activation reads f′ from it.

    Where layer l − 1 kept z (gelu-class), the sweep also writes its f(z) — the input of layer l
    — so that ∇W_l is a plain GEMM of two loaded tiles (f(z) formed in registers before the dot
    serialised the wgmma of the weight-gradient loop on sm_90)."""
    M, dt, device = x.shape[0], x.dtype, x.device
    alloc, L, dims = _utils.empty, plan.depth, plan.dims
    # δ_l that the weight-gradient loop reads as its narrow operand (`grad_weight_transposed`)
    # is written with its zero padded columns: whole 32-byte rows, which go to the loop's
    # shared-memory ring by cp.async (a 1-column row is loaded through registers, and the
    # wgmma then waits every step for that buffer). An internal buffer, not the caller's.
    narrow = grad_weight_transposed(plan.pad)
    delta_cols = [plan.pad[i + 1] if narrow[i] and need_weight[i] else dims[i + 1] for i in range(L)]
    deltas = [alloc((M, delta_cols[i]), dt, device) for i in range(L)]
    grad_x = alloc((M, dims[0]), dt, device) if need_x else None
    bias = [need_bias[i] and plan.has_bias[i] for i in range(L)]
    block = plan.block("backward")
    write = [i > 0 and need_weight[i] and not uses_output(plan.acts[i - 1]) for i in range(L)]
    inputs = [x] + [
        alloc((M, dims[i]), dt, device) if write[i] else kept[i - 1] for i in range(1, L)
    ]
    tiles = triton.cdiv(M, block["BLOCK_M"]) if M else 0
    bias_offs = _offsets([dims[i + 1] if bias[i] else 0 for i in range(L)])
    bias_part = alloc((max(tiles, 1), max(bias_offs[-1], 1)), torch.float32, device)
    kept_t = tuple(k if k is not None else deltas[i] for i, k in enumerate(kept))
    inputs_t = tuple(t if t is not None else x for t in inputs)
    gx = grad_x if grad_x is not None else deltas[0]
    if tiles:
        _utils.traceable(mlp_backward_kernel)[(tiles,)](
            grad_out, tuple(weights), kept_t, tuple(deltas), inputs_t, gx, bias_part,
            M, dims, tuple(delta_cols),
            grad_out.stride(0), grad_out.stride(1),
            tuple(w.stride(0) for w in weights), tuple(w.stride(1) for w in weights),
            tuple(k.stride(0) for k in kept_t), tuple(d.stride(0) for d in deltas),
            tuple(t.stride(0) for t in inputs_t),
            gx.stride(0), bias_offs[:-1], bias_part.stride(0),
            plan.slopes,
            BIAS=tuple(bias), WRITE_INPUT=tuple(write), NEED_X=need_x, **plan.flags(dt), **block,
        )  # fmt: skip
    grad_w, weight_set = _grad_weights(inputs_t, deltas, weights, plan, need_weight)
    grad_b: list[torch.Tensor | None] = [
        alloc((dims[i + 1],), dt, device) if bias[i] else None for i in range(L)
    ]
    bias_set = (bias_part, tiles, grad_b, bias_offs, [dims[i + 1] for i in range(L)])
    reduce_partials(weight_set, bias_set, dt)
    return grad_x, grad_w, grad_b


def _offsets(sizes: list[int]) -> tuple[int, ...]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


def _grad_weights(inputs_t, deltas, weights, plan: Plan, need_weight: list[bool]) -> tuple[list, tuple]:
    """The weight gradients' buffers, and the partials the reduction sums into them."""
    x = inputs_t[0]
    M, dt, device, dims, L = x.shape[0], x.dtype, x.device, plan.dims, plan.depth
    alloc = _utils.empty
    grads = [alloc(tuple(w.shape), dt, device) if need_weight[i] else None for i, w in enumerate(weights)]
    if not any(need_weight):
        return grads, (None, 0, grads, (0,) * (L + 1), [0] * L)
    sizes = [dims[i + 1] * dims[i] if need_weight[i] else 0 for i in range(L)]
    offs = _offsets(sizes)
    launch = grad_weight_launch(max(plan.pad), dt, _utils.gemm_capability(device))
    block_m = INTERPRETER_BLOCK_M if INTERPRET else launch.pop("BLOCK_M")
    programs = grad_weight_programs(M, device) if M else 0
    rows = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m if programs else 0
    programs = triton.cdiv(M, rows) if rows else 0
    part = alloc((max(programs, 1), offs[-1]), torch.float32, device)
    if programs:
        _utils.traceable(mlp_grad_weight_kernel)[(programs,)](
            inputs_t, tuple(deltas), part,
            M, dims, tuple(d.shape[1] for d in deltas), rows,
            tuple(t.stride(0) for t in inputs_t), tuple(t.stride(1) for t in inputs_t),
            tuple(d.stride(0) for d in deltas),
            offs[:-1], part.stride(0),
            L=L, PAD=plan.pad, NEED_W=tuple(need_weight), TRANSPOSED=grad_weight_transposed(plan.pad),
            UPCAST=needs_upcast(dt),
            INPUT_PRECISION=input_precision(dt), BLOCK_M=block_m,
            **({} if INTERPRET else {k: v for k, v in launch.items() if k != "BLOCK_M"}),
        )  # fmt: skip
    return grads, (part, programs, grads, offs, sizes)
