"""The heads' chunk loop on the reference backend with grad mode off: every GEMM writes where
its result is needed (:mod:`manualbp.ops.chunked` states the loop; this is its fast form).

Per chunk of rows x_c:

    y   = x_c Wᵀ + b          into one (chunk × C) buffer, allocated once for the whole loop
    G   = head(y)             the head overwrites y with ∂C/∂y (no class-sized temporaries)
    grad_x[c] = G W           written straight into those rows of the full grad_x
    grad_W += Gᵀ x_c          the GEMM adding into the accumulator itself (beta = 1)
    grad_b += Σ_rows G

float32/float64 run every GEMM in their own dtype. bfloat16 runs them in bfloat16 as native
F.linear does on CPU (float32 accumulation inside the GEMM, one rounding of its output): the
logits are rounded to bfloat16 (as native's are), the head works on a float32 copy, and G is
rounded once to bfloat16 for the two backward GEMMs. Each chunk's Gᵀ x_c is summed over chunks in
float32 (so the weight gradient is not rounded once per chunk) and rounded once at the end.
float16, whose CPU GEMMs are not native on most machines, computes in float32 (its weight
upcast once for the loop, not once per chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from manualbp.backends.reference import cast, compute_dtype

__all__ = ["gemm_dtype", "run_chunks_inplace"]

# Storage dtypes whose GEMMs run as they are (float32 accumulation inside, for bfloat16).
_NATIVE_GEMM = (torch.float32, torch.float64, torch.bfloat16)


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loop's GEMMs run in for inputs stored in `dtype`."""
    return dtype if dtype in _NATIVE_GEMM else compute_dtype(dtype)


def run_chunks_inplace(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    chunk_size: int,
    head: Callable[[Tensor, slice], Tensor | None],
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`manualbp.ops.chunked.run_chunks` for the reference GEMMs with grad mode off."""
    need_x, need_weight, need_bias = needs
    M, K = x.shape
    N = weight.shape[0]
    cdt, gdt = compute_dtype(x.dtype), gemm_dtype(x.dtype)
    w = cast(weight, gdt)  # hoisted: one cast for the loop (a no-op unless float16)
    b = None if bias is None else cast(bias, gdt)
    rows_max = max(1, min(chunk_size, M))
    y_buf = x.new_empty((rows_max, N), dtype=gdt)
    # The head works in the compute dtype: a float32 buffer beside bfloat16 logits.
    h_buf = y_buf if gdt == cdt else x.new_empty((rows_max, N), dtype=cdt)
    grad_x = x.new_empty((M, K)) if need_x else None
    acc_w = weight.new_zeros((N, K), dtype=cdt) if need_weight else None
    part_w = weight.new_empty((N, K), dtype=gdt) if need_weight and gdt != cdt else None
    acc_b = weight.new_zeros((N,), dtype=cdt) if need_bias else None
    ones = x.new_ones((rows_max,), dtype=cdt) if need_bias else None  # Σ_rows G as a GEMV
    for start in range(0, M, chunk_size):
        rows = slice(start, min(start + chunk_size, M))
        x_c = cast(x[rows], gdt)
        y = y_buf[: rows.stop - start]
        if b is None:
            torch.mm(x_c, w.t(), out=y)
        else:
            torch.addmm(b, x_c, w.t(), out=y)  # the bias add fused into the GEMM
        grad = head(y if h_buf is y_buf else h_buf[: y.shape[0]].copy_(y), rows)
        if grad is None:
            continue
        grad_g = grad if grad.dtype == gdt else y.copy_(grad)  # rounded once, into y's buffer
        if grad_x is not None:
            if grad_x.dtype == gdt:
                torch.mm(grad_g, w, out=grad_x[rows])
            else:
                grad_x[rows] = grad_g @ w
        if acc_w is not None:
            if part_w is None:
                acc_w.addmm_(grad_g.t(), x_c)
            else:
                acc_w += torch.mm(grad_g.t(), x_c, out=part_w)
        if acc_b is not None and ones is not None:
            if grad.dtype == cdt:
                acc_b.addmv_(grad.t(), ones[: grad.shape[0]])  # faster than grad.sum(0) on CPU
            else:
                acc_b += grad.sum(0)
        del grad, grad_g
    return grad_x, _rounded(acc_w, weight.dtype, part_w), _rounded(acc_b, weight.dtype, None)


def _rounded(acc: Tensor | None, dtype: torch.dtype, into: Tensor | None) -> Tensor | None:
    """The accumulator in the parameter's dtype, written into `into` when there is one."""
    if acc is None or acc.dtype == dtype:
        return acc
    return into.copy_(acc) if into is not None and into.dtype == dtype else acc.to(dtype)

