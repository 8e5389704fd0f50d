"""Weight and bias gradients of a fully connected layer, deterministic, optionally split over M.

    grad_out (M, N), saved (M, N)   δ = grad_out ⊙ f′(saved), formed in the prologue
                                     (ACT = identity: grad_out is δ and saved is not read)
    x        (M, K)                  the layer input (any strides)
    grad_weight (N, K) = δᵀ x        reduction over the M rows
    grad_bias   (N,)   = Σ_m δ       fused into the same launch by ⌈N/BLOCK_N⌉ extra programs
                                     (the first ones of the grid, so they run in the first wave,
                                     beside the GEMM tiles): each adds its δ column tiles
                                     elementwise into a (BLOCK_M, BLOCK_N) fp32 register
                                     accumulator and reduces its rows once, after the loop

The bias sum is not computed in the GEMM's loop. There it was a second use of the δ load, and
Triton gives a load that feeds an async wgmma its extra shared-memory slot (the wgmma of step i
is still in flight when the copy of step i + stages - 1 is issued) only when the dot is its
single use: the δ ring had `stages - 1` slots and the copy overwrote the tile the in-flight
wgmma read (a data race, GPU_AUDIT.md finding A), and the sum reduced across warps every step
(finding B). Kept out of the loop, the GEMM tiles run the plain pipelined loop; a bias program
reads M·BLOCK_N elements of δ, memory-bound, once (not once per K-tile column). The ring sizes
are checked on the compiled TTGIR of every variant (`aot.ring_report`).

Split-K (the GEMM's reduction dimension is M here). When M ≫ N·K / tile², the (N, K) output has
too few tiles to occupy every SM, while each tile loops over all M rows. The launcher then
splits M into `split` contiguous ranges, one per grid row; each program writes its fp32 partial
tile to a (split, N, K) buffer, and `split_reduce_kernel` sums the partials in a fixed order and
casts to the output dtype. No atomics anywhere: the same inputs give bitwise-identical results.
Without a split the same kernel stores straight into the output; the store casts to whatever
the output pointer holds, so split and direct launches differ only in the pointers passed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils
from ._utils import (
    INTERPRET,
    Alloc,
    check_matrix,
    check_slope,
    check_tensor,
    downcast,
    gemm_config,
    input_precision,
    needs_upcast,
    tile_count,
    upcast,
)
from .activations import IDENTITY, check_act_id, delta_tile
from .delta import linear_delta
from .linear_forward import grouped_tile


@triton.jit
def grad_weight_kernel(
    grad_ptr, saved_ptr, x_ptr, gw_ptr, gb_ptr,
    M, N, K, rows_per_split,
    stride_gm, stride_gn,
    stride_sm, stride_sn,
    stride_xm, stride_xk,
    stride_ws, stride_wn, stride_wk,
    stride_bs, stride_bn,
    negative_slope,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):  # fmt: skip
    # Tiles along grid axis 0: first ⌈N/BLOCK_N⌉ bias tiles (HAS_BIAS), then the
    # ⌈N/BLOCK_N⌉·⌈K/BLOCK_K⌉ output tiles of the (N, K) weight gradient (HAS_WEIGHT); axis 1 is
    # the split of M. Persistent with TMA (the programs of a split row stride over its tiles),
    # otherwise one tile per program (no tile loop, as in linear_forward_kernel).
    if USE_TMA:
        # Hopper: δ and x tiles by TMA; a tile never crosses a split boundary (rows_per_split is
        # a multiple of BLOCK_M) and rows past M read as zeros.
        g_desc = tl.make_tensor_descriptor(grad_ptr, [M, N], [stride_gm, 1], [BLOCK_M, BLOCK_N])
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        num_n = tl.cdiv(N, BLOCK_N)
        num_tiles = (num_n if HAS_BIAS else 0) + (tile_count(N, K, BLOCK_N, BLOCK_K) if HAS_WEIGHT else 0)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _grad_weight_tile(
                tile, g_desc, x_desc, grad_ptr, saved_ptr, gw_ptr, gb_ptr, M, N, K, rows_per_split,
                stride_gm, stride_gn, stride_sm, stride_sn, stride_xm, stride_xk,
                stride_ws, stride_wn, stride_wk, stride_bs, stride_bn, negative_slope,
                ACT, HAS_BIAS, HAS_WEIGHT, UPCAST, INPUT_PRECISION, USE_TMA,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_N,
            )  # fmt: skip
    else:
        _grad_weight_tile(
            tl.program_id(0), grad_ptr, x_ptr, grad_ptr, saved_ptr, gw_ptr, gb_ptr, M, N, K, rows_per_split,
            stride_gm, stride_gn, stride_sm, stride_sn, stride_xm, stride_xk,
            stride_ws, stride_wn, stride_wk, stride_bs, stride_bn, negative_slope,
            ACT, HAS_BIAS, HAS_WEIGHT, UPCAST, INPUT_PRECISION, USE_TMA,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_N,
        )  # fmt: skip


@triton.jit
def _grad_weight_tile(
    tile, g_src, x_src, grad_ptr, saved_ptr, gw_ptr, gb_ptr, M, N, K, rows_per_split,
    stride_gm, stride_gn, stride_sm, stride_sn, stride_xm, stride_xk,
    stride_ws, stride_wn, stride_wk, stride_bs, stride_bn, negative_slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    """Tile `tile` of grid axis 0 in split row program_id(1): a bias tile or a weight tile.
    g_src and x_src are tensor descriptors (USE_TMA) or pointers; the bias tiles read δ
    through `grad_ptr` either way."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_bias = num_n if HAS_BIAS else 0
    pid_s = tl.program_id(1)
    # This program's rows: [m_start, m_end); rows_per_split is a multiple of BLOCK_M.
    m_start = pid_s.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    if tile < num_bias:
        # grad_bias[n-tile] = Σ_m δ: δ tiles added elementwise into a 2-D fp32 accumulator
        # (no cross-thread work in the loop), its rows reduced once after it.
        offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        bias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            m = m0 + offs_m
            delta = _delta_tile(
                grad_ptr, saved_ptr, m, offs_n, m < m_end, mask_n,
                stride_gm, stride_gn, stride_sm, stride_sn, negative_slope, ACT, UPCAST,
            )  # fmt: skip
            bias_acc += upcast(delta, UPCAST).to(tl.float32)
        gb_ptrs = gb_ptr + pid_s.to(tl.int64) * stride_bs + offs_n * stride_bn
        gb = downcast(tl.sum(bias_acc, axis=0), gb_ptr.dtype.element_ty, UPCAST)
        tl.store(gb_ptrs, gb, mask=mask_n)
    elif HAS_WEIGHT:
        # Output tile (pid_n, pid_k) of the (N, K) weight gradient: δᵀ x over this range.
        pid_n, pid_k = grouped_tile(tile - num_bias, num_n, tl.cdiv(K, BLOCK_K), GROUP_N)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_n = offs_n < N
        mask_k = offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # Rows in 32 bits for descriptor coordinates: narrowing the i64 range is exact, since
        # the launcher checked M < 2³¹; the loop variable is not m0, which the bias branch holds
        # in 64 bits.
        if USE_TMA:
            rows_lo, rows_hi = m_start.to(tl.int32), m_end.to(tl.int32)
        else:
            rows_lo, rows_hi = m_start, m_end
        for r0 in range(rows_lo, rows_hi, BLOCK_M):
            if USE_TMA:
                delta = g_src.load([r0, pid_n * BLOCK_N])  # (BLOCK_M, BLOCK_N)
                x = x_src.load([r0, pid_k * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            else:
                m = r0 + offs_m
                mask_m = m < m_end
                delta = _delta_tile(
                    grad_ptr, saved_ptr, m, offs_n, mask_m, mask_n,
                    stride_gm, stride_gn, stride_sm, stride_sn, negative_slope, ACT, UPCAST,
                )  # fmt: skip
                x = tl.load(
                    x_src + m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_K)
            acc = tl.dot(
                tl.trans(upcast(delta, UPCAST)),
                upcast(x, UPCAST),
                acc,
                input_precision=INPUT_PRECISION,
            )
        gw_ptrs = gw_ptr + pid_s.to(tl.int64) * stride_ws
        gw_ptrs += offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        mask = mask_n[:, None] & mask_k[None, :]
        tl.store(gw_ptrs, downcast(acc, gw_ptr.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _delta_tile(
    grad_ptr, saved_ptr, m, offs_n, mask_m, mask_n,
    stride_gm, stride_gn, stride_sm, stride_sn, negative_slope,
    ACT: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The (rows m, columns offs_n) tile of δ = grad_out ⊙ f′(saved), in the storage dtype
    (ACT = identity: grad_out itself, `saved` not read); zero outside the masks."""
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.load(grad_ptr + m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    if ACT != IDENTITY:
        s = tl.load(saved_ptr + m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        return downcast(delta_tile(g, s, ACT, negative_slope, UPCAST), g.dtype, UPCAST)
    else:
        return g


@triton.jit
def split_reduce_kernel(
    part_ptr, out_ptr,
    SPLIT, R, C, stride_ps,
    stride_or, stride_oc,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[r, c] = Σ_s part[s, r, c], summed in order s = 0, 1, … (deterministic).

    `part` is an fp32 (SPLIT, R, C) buffer, contiguous within a plane, planes `stride_ps`
    apart; `out` may have any strides and dtype. The pointer is advanced plane by plane so no
    s · stride product can overflow int32.
    """
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    part_ptrs = part_ptr + offs_r[:, None] * C + offs_c[None, :]
    total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for _ in range(0, SPLIT):
        total += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += stride_ps
    out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
    tl.store(out_ptrs, downcast(total, out_ptr.dtype.element_ty, UPCAST), mask=mask)


# GPU configurations per flavour (see linear_grad_input.py), each checked ahead of time not to
# spill. With δ formed in the prologue the δ tile has to be transposed through registers into
# the MMA while the accumulator is live, so that flavour uses 32-row δ tiles (16 δ values per
# thread). On sm_80 mma.sync also holds operand fragments in registers and the 128 × 128
# accumulator with the fused bias sum spilled, so Ampere gets 128 × 64 output tiles, and a
# 16-bit prologue (gelu_tanh with the bias sum spilled at 32 × 128) 32 × 64 output tiles with
# 128-wide K steps (32 × 64 × 64 spilled: relu, tanh, silu at 8 warps; relu, leaky_relu at 4). A
# float32 prologue (IEEE dot on FMA units, operands in registers) gets 64 × 64 output tiles;
# on sm_80 every float32 launch does (the plain 64 × 128 tiles spilled there).
CONFIGS = {
    "plain": [
        gemm_config(64, 128, 128, 8, 3, "GROUP_N"),
        gemm_config(32, 128, 128, 8, 4, "GROUP_N"),
        gemm_config(64, 128, 64, 4, 4, "GROUP_N"),
        gemm_config(64, 64, 64, 4, 4, "GROUP_N"),
    ],
    "plain_sm80": [
        gemm_config(64, 128, 64, 8, 3, "GROUP_N"),
        gemm_config(64, 64, 64, 4, 4, "GROUP_N"),
    ],
    "prologue_sm80": [
        gemm_config(32, 64, 128, 8, 4, "GROUP_N"),
    ],
    "fp32_fused": [
        gemm_config(32, 64, 64, 8, 3, "GROUP_N"),
        gemm_config(32, 64, 64, 4, 3, "GROUP_N"),
    ],
}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_N": 4})
REDUCE_BLOCK = {"BLOCK_R": 32, "BLOCK_C": 128}
REDUCE_BLOCK_INTERPRETER = {"BLOCK_R": 32, "BLOCK_C": 32}


def config_flavour(act_id: int, capability: tuple[int, int], dtype: torch.dtype) -> str:
    """Which GPU config list a launch autotunes over (`capability` of the device, e.g. (8, 0))."""
    hopper = capability >= (9, 0)
    if dtype == torch.float32 and (act_id != 0 or not hopper):
        return "fp32_fused"
    if act_id != 0:
        if hopper:
            raise ValueError("a 16-bit sm_90 prologue is routed through the δ pass (prologue_serializes)")
        return "prologue_sm80"
    return "plain" if hopper else "plain_sm80"


grad_weight_autotuned = {
    flavour: triton.autotune(configs=configs, key=["M", "N", "K", "rows_per_split"])(grad_weight_kernel)
    for flavour, configs in CONFIGS.items()
}

# Split heuristic constants (see `choose_split`).
NOMINAL_TILE = 128  # output tile edge used to count tiles before the autotuner picks one
MIN_ROWS_PER_SPLIT = 2048  # below this the fp32 partial traffic outweighs the extra parallelism
MAX_SPLIT = 32


def choose_split(M: int, N: int, K: int, device: torch.device) -> int:
    """How many ranges of M rows to reduce in parallel (wave-aware).

    The (N, K) output has ⌈N/128⌉·⌈K/128⌉ tiles. When that is below one wave of programs
    (one per SM), M is split into the number of ranges whose programs fill the waves best:
    the highest tiles·split / (SMs·⌈tiles·split / SMs⌉), the fewest ranges among equals, every
    range ≥ 2048 rows (a split costs 2 × split × N·K × 4 bytes of partials, write + reduce read,
    against (M·N + M·K) × elem bytes of operands, so short ranges are not worth it). Example:
    M = 65536, N = K = 1024 on a 132-SM H200 → 64 tiles → split 2 (128 programs, 97 % of one
    wave; ⌈132/64⌉ = 3 would give 192 programs: 73 % of two waves).
    """
    tiles = triton.cdiv(N, NOMINAL_TILE) * triton.cdiv(K, NOMINAL_TILE)
    sms = _utils.num_sms(device)
    most = min(M // MIN_ROWS_PER_SPLIT, MAX_SPLIT)
    if tiles >= sms or most <= 1:
        return 1

    def wave_efficiency(split: int) -> float:
        programs = tiles * split
        return programs / (sms * triton.cdiv(programs, sms))

    return max(range(1, most + 1), key=lambda split: (round(wave_efficiency(split), 2), -split))


def linear_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    saved: torch.Tensor | None = None,
    act_id: int = 0,
    negative_slope: float = 0.01,
    *,
    need_weight: bool = True,
    need_bias: bool = True,
    split_k: int | None = None,
    alloc: Alloc | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_weight, grad_bias) = (δᵀ x, Σ_m δ) with δ = grad_out ⊙ f′(saved).

    act_id = 0 takes `grad_out` as δ. split_k: number of M ranges reduced in parallel
    (None: `choose_split`; 1: no split). `alloc(shape, dtype, device)` allocates the results.
    Either gradient may be skipped; asking for neither returns (None, None).
    """
    check_matrix("grad_out", grad_out)
    check_matrix("x", x)
    act_id = check_act_id("act_id", act_id)
    negative_slope = check_slope("negative_slope", negative_slope)
    M, N = grad_out.shape
    K = x.shape[1]
    dtype, device = grad_out.dtype, grad_out.device
    check_tensor("x", x, (M, K), dtype, device)
    if act_id != 0:
        if saved is None:
            raise ValueError(f"saved: got None, expected an (M, N) = {(M, N)} tensor for act_id={act_id}")
        check_tensor("saved", saved, (M, N), dtype, device)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k: got {split_k!r}, expected None or an int >= 1")
    if act_id != 0 and _utils.prologue_serializes(device, dtype):
        # sm_90, 16-bit: a prologue would serialise the wgmma; δ pass, then the plain GEMM.
        grad_out = linear_delta(grad_out, saved, act_id, negative_slope)
        act_id, saved = 0, None
    alloc = alloc or _utils.empty
    gw = alloc((N, K), dtype, device) if need_weight else None
    gb = alloc((N,), dtype, device) if need_bias else None
    if gw is not None:
        check_tensor("alloc(...) result for grad_weight", gw, (N, K), dtype, device)
    if gb is not None:
        check_tensor("alloc(...) result for grad_bias", gb, (N,), dtype, device)
    if N == 0:
        return gw, gb
    if M == 0:  # an empty reduction
        for t in (gw, gb):
            if t is not None:
                t.zero_()
        return gw, gb
    if K == 0 and gw is not None:  # an empty (N, 0) matrix: nothing to compute
        need_weight = False
    if not (need_weight or need_bias):
        return gw, gb

    # Bias only: the kernel skips x and the dot; one K-tile column is enough.
    K_eff = K if need_weight else 1
    interp_block_m = INTERPRETER_CONFIG.kwargs["BLOCK_M"]
    split = split_k if split_k is not None else choose_split(M, N, K_eff, device)
    # rows_per_split is a multiple of every BLOCK_M in the configs (the largest is 64; the
    # interpreter's is 32), so every range starts on a tile boundary.
    row_quantum = max(64, interp_block_m)
    rows_per_split = triton.cdiv(triton.cdiv(M, split), row_quantum) * row_quantum
    split = triton.cdiv(M, rows_per_split)  # drop empty ranges

    if split == 1:
        w_out, b_out = gw, gb
        w_strides = (0, *gw.stride()) if gw is not None else (0, 0, 0)
        b_strides = (0, gb.stride(0)) if gb is not None else (0, 0)
    else:
        w_out = _utils.empty((split, N, K), torch.float32, device) if need_weight else None
        b_out = _utils.empty((split, N), torch.float32, device) if need_bias else None
        w_strides = w_out.stride() if w_out is not None else (0, 0, 0)
        b_strides = b_out.stride() if b_out is not None else (0, 0)
    placeholder = w_out if w_out is not None else b_out
    s = saved if act_id != 0 else grad_out
    args = (
        grad_out, s, x, w_out if w_out is not None else placeholder,
        b_out if b_out is not None else placeholder,
        M, N, K_eff, rows_per_split,
        grad_out.stride(0), grad_out.stride(1),
        s.stride(0), s.stride(1),
        x.stride(0), x.stride(1),
        *w_strides,
        *b_strides,
        negative_slope,
    )  # fmt: skip
    flags = dict(
        ACT=act_id,
        HAS_BIAS=need_bias,
        HAS_WEIGHT=need_weight,
        UPCAST=needs_upcast(dtype),
        INPUT_PRECISION=input_precision(dtype),
        # δ by TMA only as grad_out itself (ACT = identity: always so on sm_90 16-bit).
        USE_TMA=need_weight and act_id == 0 and _utils.tma_path(device, dtype, grad_out, x),
    )

    def grid(meta):
        tiles_n = triton.cdiv(N, meta["BLOCK_N"])
        weight_tiles = tiles_n * triton.cdiv(K, meta["BLOCK_K"]) if need_weight else 0
        tiles = (tiles_n if need_bias else 0) + weight_tiles
        return (_utils.persistent_programs(device, tiles, split) if flags["USE_TMA"] else tiles, split)

    _utils.launch_gemm(
        grad_weight_kernel, grid, args, flags,
        autotuned=grad_weight_autotuned,
        configs=CONFIGS,
        flavour=lambda capability: config_flavour(act_id, capability, dtype),
        interpreter_config=INTERPRETER_CONFIG,
    )  # fmt: skip

    if split > 1:
        blocks = REDUCE_BLOCK_INTERPRETER if INTERPRET else REDUCE_BLOCK
        if need_weight:
            _reduce(w_out, gw, blocks)
        if need_bias:
            _reduce(b_out.unsqueeze(1), gb.unsqueeze(0), blocks)
    return gw, gb


def _reduce(part: torch.Tensor, out: torch.Tensor, blocks: dict[str, int]) -> None:
    split, R, C = part.shape
    grid = (triton.cdiv(R, blocks["BLOCK_R"]), triton.cdiv(C, blocks["BLOCK_C"]))
    _utils.traceable(split_reduce_kernel)[grid](
        part, out, split, R, C, part.stride(0), out.stride(0), out.stride(1),
        UPCAST=needs_upcast(out.dtype), **blocks,
    )  # fmt: skip
