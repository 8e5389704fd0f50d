"""Fused heads (manualbp.ops.heads) and the cross-entropy kernel against native autograd."""

import pytest
import torch
import torch.nn.functional as F
from manualbp.triton_kernels.cross_entropy import cross_entropy_rows

import manualbp as mbp
from manualbp.ops import heads as fused_loss
from manualbp.ops.ce_rows import CEOptions
from manualbp.ops.heads import default_chunk_size, linear_cross_entropy, linear_mse_loss
from manualbp.ops.network import saved_tensor_bytes

from .helpers import TOL, rel_err

REDUCTIONS = ["mean", "sum", "none"]
LEAD, K, C = (2, 13), 9, 70  # M = 26 rows; 70 classes span two of the interpreter's 64-wide tiles


def _data(dtype, *, bias=True, ignore=(3, 17), lead=LEAD, k=K, c=C):
    x = torch.randn(*lead, k)
    w = torch.randn(c, k) / k**0.5
    b = torch.randn(c) if bias else None
    t = torch.randint(0, c, lead)
    t.view(-1)[list(ignore)] = -100
    # Values representable in `dtype`, so only the arithmetic differs from the float64 oracle.
    return [v.to(dtype) if v is not None else None for v in (x, w, b)] + [t]


def _leaves(tensors, dtype, grads=(True, True, True)):
    return [
        None if t is None else t.detach().to(dtype).clone().requires_grad_(g)
        for t, g in zip(tensors, grads, strict=True)
    ]


def _native_ce(x, w, b, t, reduction, ignore_index=-100):
    logits = F.linear(x, w, b)
    loss = F.cross_entropy(
        logits.reshape(-1, w.shape[0]), t.reshape(-1), reduction=reduction, ignore_index=ignore_index
    )
    return loss.view(t.shape) if reduction == "none" else loss


def _check_ce(dtype, reduction, chunk_size, *, bias=True, grads=(True, True, True), backend="torch",
              ignore_index=-100, data=None):  # fmt: skip
    x, w, b, t = data if data is not None else _data(dtype, bias=bias)
    ours_in = _leaves((x, w, b), dtype, grads)
    ref_in = _leaves((x, w, b), torch.float64, grads)
    with mbp.use_backend(backend):
        loss = linear_cross_entropy(*ours_in, t, reduction, ignore_index, chunk_size)
    ref = _native_ce(*ref_in, t, reduction, ignore_index)
    assert loss.dtype == dtype and loss.shape == ref.shape
    tol = TOL[dtype]
    assert rel_err(loss, ref) <= tol
    g = torch.randn(ref.shape, dtype=torch.float64)
    with mbp.use_backend(backend):
        loss.backward(g.to(dtype))
    ref.backward(g)
    for name, ours, theirs in zip("xwb", ours_in, ref_in, strict=True):
        if ours is None:
            continue
        if not ours.requires_grad:
            assert ours.grad is None
            continue
        assert ours.grad is not None and ours.grad.dtype == dtype, name
        assert rel_err(ours.grad, theirs.grad) <= tol, name


# ------------------------------------------------------------------------------ reference backend


@pytest.mark.parametrize("chunk_size", [1, 7, 1000, None])  # 7 does not divide M = 26
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce_parity(dtype, reduction, chunk_size):
    _check_ce(dtype, reduction, chunk_size)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "grads", [(False, True, True), (True, False, True), (True, True, False), (False, False, True)]
)
def test_ce_only_requested_gradients(grads, reduction):
    _check_ce(torch.float64, reduction, 4, grads=grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_no_bias_and_custom_ignore_index(reduction):
    x, w, _, t = _data(torch.float64, bias=False, ignore=())
    t.view(-1)[[0, 5, 6]] = 4  # ignore_index = 4 is a real class: those rows drop out
    _check_ce(torch.float64, reduction, 6, ignore_index=4, data=(x, w, None, t))


def test_ce_all_rows_ignored():
    x, w, b, t = _data(torch.float64)
    t.fill_(-100)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, b, t)
    ref = _native_ce(x.detach().clone().requires_grad_(), w, b, t, "mean")
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # native's gradient is also exactly 0


def test_ce_1d_input_and_no_grad():
    x, w, b, t = _data(torch.float64, lead=(1,), ignore=())
    with torch.no_grad():
        loss = linear_cross_entropy(x[0], w, b, t[0])
    assert rel_err(loss, _native_ce(x, w, b, t, "mean")) <= TOL[torch.float64]


def test_default_chunk_size():
    assert default_chunk_size(1024, 64, 64) == 1024  # C ≤ K: one chunk
    assert default_chunk_size(1024, 64, 2048) == 32  # logits chunk ≈ the size of x
    assert default_chunk_size(1000, 100, 350) == 256  # next power of two ≥ 1000 / 4
    assert default_chunk_size(3, 1, 10**6) == 1
    # CPU: CPU_CHUNK_ROWS rows per thread, never more than the next power of two ≥ the rows.
    assert default_chunk_size(1024, 256, 4000, cpu=True) == 256
    assert default_chunk_size(8192, 1024, 32768, cpu=True) == 256
    assert default_chunk_size(8192, 1024, 32768, cpu=True, threads=2) == 512
    assert default_chunk_size(8192, 64, 2048, cpu=True) == 256
    assert default_chunk_size(100, 64, 2048, cpu=True) == 128
    assert default_chunk_size(3, 1, 10**6, cpu=True) == 4


# ------------------------------------------------------------------------------ memory


def test_ce_never_keeps_a_logits_sized_tensor():
    """Saved for backward: only x/W/b-sized gradients — native keeps the (M × C) logits."""
    M, k, c = 64, 8, 512
    x = torch.randn(M, k, requires_grad=True)
    w = torch.randn(c, k, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    t = torch.randint(0, c, (M,))
    exclude = [x, w, b, t]
    ours = saved_tensor_bytes(lambda: linear_cross_entropy(x, w, b, t, chunk_size=8), exclude)
    native = saved_tensor_bytes(lambda: F.cross_entropy(F.linear(x, w, b), t), exclude)
    logits_bytes = M * c * 4
    assert max(native.storages.values()) >= logits_bytes
    assert sorted(ours.storages.values()) == sorted([M * k * 4, c * k * 4, c * 4])
    assert max(ours.storages.values()) < logits_bytes / 4


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ce_class_buffers_are_chunk_sized(monkeypatch, reduction):
    """Every (rows × classes) buffer the head sees has at most chunk_size rows."""
    seen: list[tuple[int, ...]] = []
    real = fused_loss.rows_reference

    def spy(z, *args):
        seen.append(tuple(z.shape))
        return real(z, *args)

    monkeypatch.setattr(fused_loss, "rows_reference", spy)
    _check_ce(torch.float64, reduction, 7)
    passes = 2 if reduction == "none" else 1  # "none" reruns the chunk loop in backward
    assert seen == [(7, C), (7, C), (7, C), (5, C)] * passes


# ------------------------------------------------------------------------------ Triton backend


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ce_triton_interpreter(dtype, reduction):
    _check_ce(dtype, reduction, 10, backend="triton")  # chunks of 10, 10 and 6 rows


def test_ce_triton_frozen_weight_no_bias():
    _check_ce(torch.float32, "mean", 10, bias=False, grads=(True, False, False), backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, under the interpreter: −inf − −inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_entropy_kernel(dtype):
    """The kernel alone: strided logits, −inf entries, a separate poisoned output, every element."""
    M, c = 9, 150
    base = torch.randn(M, 2 * c).to(dtype)
    logits = base[:, ::2]  # column stride 2
    logits[1, :] = -float("inf")
    logits[1, 5] = 2.0  # a row that is −inf but for its target
    logits[2, :40] = -float("inf")  # a whole first tile of −inf
    t = torch.randint(0, c, (M,))
    t[1], t[4] = 5, -100
    scale = torch.rand(M)
    grad = torch.full((M, c), float("nan"), dtype=dtype)
    loss, lse = cross_entropy_rows(logits, t, scale, grad=grad)
    z = logits.double().requires_grad_()
    ref = F.cross_entropy(z, t, reduction="none")
    (ref * scale.double()).sum().backward()
    assert rel_err(loss, ref) <= 1e-6  # computed in float32 from the same 16-bit values
    keep = t != -100
    assert rel_err(lse[keep], torch.logsumexp(z, 1)[keep]) <= 1e-6
    assert torch.equal(grad[4], torch.zeros(c, dtype=dtype))
    # The gradient is rounded to `dtype` once: within half an ulp of the float64 one.
    assert rel_err(grad, z.grad) <= TOL[dtype] / 2
    loss2, lse2 = cross_entropy_rows(logits, t, None)  # forward only: logits untouched
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse)
    assert torch.equal(logits, base[:, ::2])


def test_cross_entropy_kernel_bad_arguments():
    z = torch.randn(4, 5)
    with pytest.raises(TypeError, match="target"):
        cross_entropy_rows(z, torch.zeros(4, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="class probabilities"):
        cross_entropy_rows(z, torch.zeros(4), None)  # a floating target is (M, C) probabilities
    with pytest.raises(ValueError, match="target"):
        cross_entropy_rows(z, torch.zeros(3, dtype=torch.long), None)
    with pytest.raises(ValueError, match="scale"):
        cross_entropy_rows(z, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------ MSE head


def _check_mse(dtype, reduction, chunk_size, *, backend="torch", grads=(True, True, True),
               target_grad=False):  # fmt: skip
    x, w, b, _ = _data(dtype)
    y = torch.randn(*LEAD, C).to(dtype)
    ours_in = _leaves((x, w, b), dtype, grads)
    ref_in = _leaves((x, w, b), torch.float64, grads)
    yt = y.clone().requires_grad_(target_grad)
    y64 = y.double().requires_grad_(target_grad)
    with mbp.use_backend(backend):
        loss = linear_mse_loss(*ours_in, yt, reduction, chunk_size)
    ref = F.mse_loss(F.linear(*ref_in), y64, reduction=reduction)
    tol = TOL[dtype]
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert rel_err(loss, ref) <= tol
    g = torch.randn(ref.shape, dtype=torch.float64)
    loss.backward(g.to(dtype))
    ref.backward(g)
    pairs = list(zip(ours_in, ref_in, strict=True)) + [(yt, y64)]
    for ours, theirs in pairs:
        if not ours.requires_grad:
            assert ours.grad is None
            continue
        assert ours.grad is not None and ours.grad.dtype == dtype
        assert rel_err(ours.grad, theirs.grad) <= tol


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mse_parity(dtype, reduction, chunk_size):
    _check_mse(dtype, reduction, chunk_size, target_grad=chunk_size == 7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_triton_interpreter(reduction):
    _check_mse(torch.float32, reduction, 7, backend="triton", target_grad=True)


def test_mse_only_requested_gradients():
    _check_mse(torch.float64, "mean", 5, grads=(False, True, False))


def test_mse_keeps_no_output_sized_tensor():
    x, w, b, _ = _data(torch.float32)
    y = torch.randn(*LEAD, C)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    saved = saved_tensor_bytes(lambda: linear_mse_loss(x, w, b, y), [x, w, b, y])
    assert sorted(saved.storages.values()) == sorted([x.numel() * 4, w.numel() * 4, C * 4])


# ------------------------------------------------------------------------------ bad inputs


def test_bad_inputs():
    x, w, b, t = _data(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, b, t, reduction="avg")
    with pytest.raises(ValueError, match="target: floating"):
        linear_cross_entropy(x, w, b, t.float())  # probabilities must be (*lead, classes)
    with pytest.raises(TypeError, match="target"):
        linear_cross_entropy(x, w, b, t > 0)
    with pytest.raises(ValueError, match="target: shape"):
        linear_cross_entropy(x, w, b, t[0])
    bad = t.clone()
    bad[0, 0] = C
    with pytest.raises(ValueError, match=f"class index {C} is out of range"):
        linear_cross_entropy(x, w, b, bad)
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="class index -1"):
        linear_cross_entropy(x, w, b, bad)
    with pytest.raises(ValueError, match="input"):
        linear_cross_entropy(x[..., :-1], w, b, t)
    with pytest.raises(TypeError, match="weight"):
        linear_cross_entropy(x, w.double(), b, t)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(x, w, b[:-1], t)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, b, t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        linear_cross_entropy(x, w, b, t, chunk_size=True)
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(x, w, b, t, ignore_index=1.5)
    y = torch.randn(*LEAD, C)
    with pytest.raises(ValueError, match="target: shape"):
        linear_mse_loss(x, w, b, y[..., :-1])
    with pytest.raises(TypeError, match="target"):
        linear_mse_loss(x, w, b, y.double())
    with pytest.raises(ValueError, match="reduction"):
        linear_mse_loss(x, w, b, y, reduction="avg")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy, under the interpreter: −inf − −inf
@pytest.mark.parametrize("head", ["rows_reference", "rows_triton"])
def test_ce_ignored_row_of_inf_logits_gets_zero_gradient(head):
    """A row of only −inf logits (NaN softmax) whose target is ignored: gradient exactly 0.

    (Native log_softmax backward gives NaN in that row; the other rows are compared with it.)
    """
    z = torch.randn(4, 70)
    z[2] = -float("inf")
    t = torch.tensor([1, 69, -100, 0])
    scale = torch.full((4,), 0.25)
    loss, _, grad = getattr(fused_loss, head)(z.clone(), t, None, -100, CEOptions(), scale, scale)
    zz = z.double().requires_grad_()
    ref = F.cross_entropy(zz, t, reduction="sum") * 0.25
    ref.backward()
    assert torch.equal(grad[2], torch.zeros(70))
    keep = [0, 1, 3]
    assert rel_err(grad[keep], zz.grad[keep]) <= TOL[torch.float32]
    assert rel_err(loss.sum(), ref / 0.25) <= TOL[torch.float32]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    """No rows: losses as native (NaN for "mean"), zero parameter gradients."""
    x = torch.randn(0, K, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, K, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    y = torch.randn(0, C, dtype=torch.float64)
    logits = F.linear(x, w)
    cases = [
        (linear_cross_entropy(x, w, None, t, reduction), F.cross_entropy(logits, t, reduction=reduction)),
        (linear_mse_loss(x, w, None, y, reduction), F.mse_loss(logits, y, reduction=reduction)),
    ]
    for loss, native in cases:
        assert loss.shape == native.shape
        assert torch.equal(loss.isnan(), native.isnan())
        assert torch.equal(loss.nan_to_num(), native.nan_to_num())
        w.grad = x.grad = None
        loss.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


def test_ce_autocast():
    """Under torch.autocast: GEMMs in the autocast dtype, a float32 loss, as native there."""
    x, w, b, t = _data(torch.bfloat16)  # values representable in bfloat16
    ours_in = _leaves((x, w, b), torch.float32)
    ref_in = _leaves((x, w, b), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(*ours_in, t)
        native = _native_ce(*_leaves((x, w, b), torch.float32), t, "mean")
    assert loss.dtype == native.dtype == torch.float32
    ref = _native_ce(*ref_in, t, "mean")
    assert rel_err(loss, ref) <= TOL[torch.bfloat16]
    loss.backward()
    ref.backward()
    for ours, theirs in zip(ours_in, ref_in, strict=True):
        assert ours.grad.dtype == torch.float32
        assert rel_err(ours.grad, theirs.grad) <= TOL[torch.bfloat16]
