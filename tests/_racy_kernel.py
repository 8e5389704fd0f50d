"""A kernel with the shared-memory race of GPU_AUDIT.md finding A, for tests/test_triton_aot.py.

    acc = Σ_m gᵀ x  (a wgmma on the loaded tiles)    s = Σ_m g  (a second use of the same load)

The second use keeps Triton from giving the g ring its extra slot for the in-flight wgmma: the
compiled TTGIR has a 2-slot g ring at num_stages=3 with the wgmma one group ahead, which
`aot.ring_report` must flag. Only compiled ahead of time, never launched.
"""

import triton
import triton.language as tl


@triton.jit
def racy_kernel(g_ptr, x_ptr, out_ptr, sum_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + offs_m
        g = tl.load(g_ptr + rows[:, None] * BLOCK_N + offs_n[None, :])
        x = tl.load(x_ptr + rows[:, None] * BLOCK_N + offs_n[None, :])
        total += tl.sum(g.to(tl.float32), axis=0)
        acc = tl.dot(tl.trans(g), x, acc)
    tl.store(out_ptr + offs_n[:, None] * BLOCK_N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty))
    tl.store(sum_ptr + offs_n, total)
