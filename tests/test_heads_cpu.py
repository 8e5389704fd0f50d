"""The heads' CPU path: the in-place chunk loop (manualbp.ops.chunked_inplace), the default CPU
chunk size, the gradients handed out without a copy, and the step's peak memory."""

import pytest
import torch
import torch.nn.functional as F

import manualbp.ops.chunked as chunked
from experiments.bench_memory import peak_bytes
from manualbp.ops.ce_rows import CEOptions, rows_reference
from manualbp.ops.chunked import CPU_CHUNK_ROWS, ReferenceGemms, default_chunk_size, run_chunks
from manualbp.ops.chunked_inplace import gemm_dtype, run_chunks_inplace
from manualbp.ops.heads import linear_cross_entropy, linear_mse_loss

from .helpers import TOL, rel_err

M, K, C = 37, 11, 90


def _data(dtype=torch.float64, *, m=M, k=K, c=C, ignore=(2, 30)):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(c, k, generator=gen) / k**0.5
    b = torch.randn(c, generator=gen)
    t = torch.randint(0, c, (m,), generator=gen)
    t[list(ignore)] = -100
    return x.to(dtype), w.to(dtype), b.to(dtype), t


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _native(x, w, b, t, **kw):
    return F.cross_entropy(F.linear(x, w, b), t, **kw)


# ------------------------------------------------------------------------------ chunk size


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_cpu_chunk_size_is_bounded_and_deterministic(threads):
    for rows in (1, 3, 200, 256, 257, 4096, 8192):
        for k in (1, 64, 256, 300, 1024, 4096):
            for c in (10, 4000, 32000, 256000):
                chunk = default_chunk_size(rows, k, c, cpu=True, threads=threads)
                assert chunk == default_chunk_size(rows, k, c, cpu=True, threads=threads)
                assert chunk & (chunk - 1) == 0, chunk  # a power of two
                # Never below the bound unless the whole batch is one smaller chunk.
                assert chunk >= CPU_CHUNK_ROWS or chunk >= rows, (rows, k, c, chunk)
                # At most the bound per thread, and (beyond the bound) at most K rows: a chunk's
                # logits no larger than the weight gradient.
                assert chunk <= CPU_CHUNK_ROWS * threads and chunk <= max(k, CPU_CHUNK_ROWS)


def test_cpu_chunk_size_follows_the_threads(monkeypatch):
    assert default_chunk_size(8192, 1024, 32000, cpu=True, threads=1) == 256
    assert default_chunk_size(8192, 1024, 32000, cpu=True, threads=2) == 512
    assert default_chunk_size(8192, 256, 32000, cpu=True, threads=2) == 256  # K caps it
    seen = []
    real = chunked.run_chunks_inplace

    def spy(x, weight, bias, chunk_size, head, needs):
        seen.append(chunk_size)
        return real(x, weight, bias, chunk_size, head, needs)

    monkeypatch.setattr(chunked, "run_chunks_inplace", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the entry point reads the intra-op threads at call time
        x = torch.randn(600, 512, dtype=torch.float64, requires_grad=True)
        w = torch.randn(50, 512, dtype=torch.float64)
        linear_cross_entropy(x, w, None, torch.zeros(600, dtype=torch.long))
    finally:
        torch.set_num_threads(threads)
    assert seen == [512]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_results_do_not_depend_on_the_chunk_size(reduction):
    """float64, every chunk size (incl. the CPU default): native's loss and gradients."""
    x, w, b, t = _data()
    ref_in = _leaves(x, w, b)
    ref = _native(*ref_in, t, reduction=reduction)
    g = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(g)
    for chunk in (1, 2, 5, 16, M - 1, M, 4 * M, None):
        ours_in = _leaves(x, w, b)
        loss = linear_cross_entropy(*ours_in, t, reduction, chunk_size=chunk)
        loss.backward(g)
        assert rel_err(loss, ref) <= TOL[torch.float64], chunk
        for ours, theirs in zip(ours_in, ref_in, strict=True):
            assert rel_err(ours.grad, theirs.grad) <= TOL[torch.float64], chunk


@pytest.mark.parametrize("prob", [False, True])
def test_inplace_loop_matches_the_generic_loop(prob):
    """The same chunk loop with grad mode on (the generic loop) and off (the in-place one)."""
    x, w, b, t = _data()
    if prob:
        t = torch.softmax(torch.randn(M, C, dtype=torch.float64), 1)
    opts = CEOptions(label_smoothing=0.1, lse_square_scale=1e-2, softcap=5.0, prob_target=prob)
    cw = torch.rand(C, dtype=torch.float64) + 0.5

    def head(z, rows):
        scale = torch.full((rows.stop - rows.start,), 0.3, dtype=torch.float64)
        return rows_reference(z, t[rows], cw, -100, opts, scale, scale)[2]

    with torch.no_grad():
        fast = run_chunks_inplace(x, w, b, 8, head, (True, True, True))
    with torch.enable_grad():
        slow = run_chunks(x, w, b, 8, ReferenceGemms, head, (True, True, True))
    for ours, theirs in zip(fast, slow, strict=True):
        assert ours is not None and theirs is not None
        assert rel_err(ours, theirs.detach()) <= TOL[torch.float64]


# ------------------------------------------------------------------------------ 16-bit storage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_16bit_against_float64_and_native(dtype, reduction):
    """bfloat16 runs its GEMMs in bfloat16 (as native), float16 in float32: both within the
    dtype's tolerance of the float64 oracle, and of native autograd in that dtype."""
    x, w, b, t = _data(dtype)
    ours_in, native_in = _leaves(x, w, b), _leaves(x, w, b)
    ref_in = _leaves(x.double(), w.double(), b.double())
    loss = linear_cross_entropy(*ours_in, t, reduction, chunk_size=8)
    ref = _native(*ref_in, t, reduction=reduction)
    native = _native(*native_in, t, reduction=reduction)
    assert loss.dtype == dtype
    assert rel_err(loss, ref) <= TOL[dtype] and rel_err(native, ref) <= TOL[dtype]
    g = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    loss.backward(g.to(dtype))
    ref.backward(g)
    native.backward(g.to(dtype))
    for ours, theirs, nat in zip(ours_in, ref_in, native_in, strict=True):
        assert ours.grad.dtype == dtype
        assert rel_err(ours.grad, theirs.grad) <= TOL[dtype]
        assert rel_err(ours.grad, nat.grad) <= 2 * TOL[dtype]
    assert gemm_dtype(torch.bfloat16) == torch.bfloat16 and gemm_dtype(torch.float16) == torch.float32


def test_mse_head_bfloat16():
    x, w, b, _ = _data(torch.bfloat16)
    y = torch.randn(M, C).to(torch.bfloat16)
    ours_in, ref_in = _leaves(x, w, b), _leaves(x.double(), w.double(), b.double())
    loss = linear_mse_loss(*ours_in, y, chunk_size=8)
    ref = F.mse_loss(F.linear(*ref_in), y.double())
    loss.backward()
    ref.backward()
    assert rel_err(loss, ref) <= TOL[torch.bfloat16]
    for ours, theirs in zip(ours_in, ref_in, strict=True):
        assert rel_err(ours.grad, theirs.grad) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------------------ no-copy backward


@pytest.mark.parametrize("head", ["ce", "mse"])
def test_gradients_handed_out_stay_correct_when_the_graph_is_retained(head):
    """loss.backward() (∂C/∂loss = 1) hands out the precomputed gradients without a copy; with
    retain_graph the second backward must still see them intact, and accumulate to twice."""
    x, w, b, t = _data()
    y = torch.randn(M, C, dtype=torch.float64)
    h = x.detach().clone().requires_grad_()
    ours_in, ref_in = [h * 1.0, *_leaves(w, b)], _leaves(x, w, b)  # x a non-leaf: flows on
    if head == "ce":
        loss, ref = linear_cross_entropy(*ours_in, t), _native(*ref_in, t)
    else:
        loss, ref = linear_mse_loss(*ours_in, y), F.mse_loss(F.linear(*ref_in), y)
    ref.backward()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(0.5, dtype=torch.float64))
    for ours, theirs in zip([h, *ours_in[1:]], ref_in, strict=True):
        assert rel_err(ours.grad, 2.5 * theirs.grad) <= TOL[torch.float64]


def test_plain_backward_gradient_is_the_precomputed_one():
    x, w, b, t = _data()
    ours_in, ref_in = _leaves(x, w, b), _leaves(x, w, b)
    linear_cross_entropy(*ours_in, t).backward()
    _native(*ref_in, t).backward()
    for ours, theirs in zip(ours_in, ref_in, strict=True):
        assert rel_err(ours.grad, theirs.grad) <= TOL[torch.float64]


# ------------------------------------------------------------------------------ peak memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_peak_is_the_gradients_and_one_chunk(dtype):
    """A training step's peak (profiler allocation events): the three gradients, one chunk's
    buffers and a weight-sized float32 accumulator for bfloat16 — no class-sized temporaries."""
    m, k, c = 1024, 32, 2048
    x, w, b, t = _data(dtype, m=m, k=k, c=c, ignore=())
    leaves = _leaves(x, w, b)
    chunk = default_chunk_size(m, k, c, cpu=True)

    def step():
        linear_cross_entropy(*leaves, t).backward()

    step()
    for p in leaves:
        p.grad = None
    peak, _ = peak_bytes(step, torch.device("cpu"))
    size = torch.finfo(dtype).bits // 8
    grads = (m * k + c * k + c) * size
    # float32: the chunk's logits; bfloat16: its bfloat16 logits, their float32 copy, and the
    # float32 weight-gradient accumulator (the bfloat16 gradient is counted in `grads`).
    buffers = chunk * c * 4 if dtype == torch.float32 else chunk * c * (2 + 4) + c * k * 4
    # Transient per chunk, beside them: oneDNN's bfloat16 GEMM workspaces and the float32 copy
    # of the chunk's weight gradient that the mixed-dtype `acc += part` makes.
    transient = 0 if dtype == torch.float32 else chunk * c * 2 + c * k * 4
    assert peak <= grads + buffers + transient + (1 << 16), (peak, grads, buffers)
    native = _leaves(x, w, b)
    for p in native:
        p.grad = None
    native_peak, _ = peak_bytes(lambda: _native(*native, t).backward(), torch.device("cpu"))
    assert peak < native_peak
