"""The fused cross-entropy head's options on the Triton backend (interpreter on CPU) against the
float64 native expression, and the kernel's option flags on their own."""

import pytest
import torch
import torch.nn.functional as F
from manualbp.triton_kernels.cross_entropy import cross_entropy_rows

from manualbp.ops.ce_rows import CEOptions, rows_reference

from .helpers import TOL, rel_err
from .test_heads_options import OPTIONS, REDUCTIONS, C, check_head

F32 = torch.float32


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_triton_class_target_options(option, reduction):
    check_head(F32, reduction, OPTIONS[option], backend="triton", chunk_size=10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight", "all"])
def test_triton_probability_target_options(option, reduction):
    check_head(F32, reduction, OPTIONS.get(option, {}), prob=True, backend="triton", chunk_size=10)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_options_16_bit(dtype, prob):
    """16-bit storage (bfloat16 through the interpreter's upcast flag), every option on."""
    check_head(dtype, "mean", OPTIONS["all"], prob=prob, backend="triton", chunk_size=10)


def test_triton_options_with_a_real_class_as_ignore_index():
    from .test_heads_options import _data

    x, w, b, t = _data(ignore=())
    t.view(-1)[[0, 5, 6]] = 4
    check_head(F32, "sum", OPTIONS["all"], data=(x, w, b, t), ignore_index=4, backend="triton",
               chunk_size=10)  # fmt: skip


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize(
    "opts",
    [CEOptions(), CEOptions(label_smoothing=0.3), CEOptions(lse_square_scale=0.1),
     CEOptions(softcap=1.5), CEOptions(0.2, 0.05, 2.0)],
)  # fmt: skip
def test_kernel_flags_match_the_reference_rows(opts, prob):
    """Each flag alone and together, class weights on and off: ce, lse and every gradient
    element (the gradient buffer is poisoned first) equal the torch rows in float64."""
    rows = 5
    z = torch.randn(rows, C) * 3
    opts = CEOptions(opts.label_smoothing, opts.lse_square_scale, opts.softcap, prob)
    target = torch.softmax(torch.randn(rows, C), 1) if prob else torch.tensor([1, 69, -100, 0, 64])
    scale, z_scale = torch.rand(rows) + 0.5, torch.rand(rows) + 0.5
    for cw in (None, torch.rand(C) + 0.1):
        grad = torch.full_like(z, float("nan"))
        ce, lse = cross_entropy_rows(
            z, target, scale, -100, grad=grad, weight=cw, label_smoothing=opts.label_smoothing,
            lse_square_scale=opts.lse_square_scale, z_scale=z_scale, softcap=opts.softcap,
        )  # fmt: skip
        with torch.no_grad():
            ref = rows_reference(z.double(), target.double() if prob else target,
                                 None if cw is None else cw.double(), -100, opts,
                                 scale.double(), z_scale.double())  # fmt: skip
        for ours, theirs in zip((ce, lse, grad), ref, strict=True):
            assert theirs is not None and rel_err(ours, theirs) <= TOL[F32]
        ce_only, lse_only = cross_entropy_rows(
            z, target, None, weight=cw, label_smoothing=opts.label_smoothing, softcap=opts.softcap
        )
        assert torch.equal(ce_only, ce) and torch.equal(lse_only, lse)


def test_kernel_rows_match_native_cross_entropy_with_options():
    """The kernel against F.cross_entropy directly: weights, smoothing, probability targets."""
    z = torch.randn(6, C)
    cw = torch.rand(C) + 0.1
    t = torch.tensor([3, 0, 69, 5, -100, 12])
    ce, _ = cross_entropy_rows(z, t, None, weight=cw, label_smoothing=0.2)
    ref = F.cross_entropy(z.double(), t, weight=cw.double(), label_smoothing=0.2, reduction="none")
    assert rel_err(ce, ref) <= TOL[F32]
    q = torch.softmax(torch.randn(6, C), 1)
    ce, _ = cross_entropy_rows(z, q, None, weight=cw, label_smoothing=0.2)
    ref = F.cross_entropy(z.double(), q.double(), weight=cw.double(), label_smoothing=0.2,
                          reduction="none")  # fmt: skip
    assert rel_err(ce, ref) <= TOL[F32]


def test_kernel_option_arguments():
    z = torch.randn(4, C)
    t = torch.zeros(4, dtype=torch.long)
    scale = torch.ones(4)
    with pytest.raises(ValueError, match="weight"):
        cross_entropy_rows(z, t, None, weight=torch.ones(C - 1))
    with pytest.raises(ValueError, match="weight"):
        cross_entropy_rows(z, t, None, weight=torch.ones(C, dtype=torch.float64))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_rows(z, t, None, label_smoothing=2.0)
    with pytest.raises(ValueError, match="z_scale"):
        cross_entropy_rows(z, t, scale, lse_square_scale=0.1)
    with pytest.raises(ValueError, match="z_scale"):
        cross_entropy_rows(z, t, scale, lse_square_scale=0.1, z_scale=torch.ones(3))


def test_triton_reads_the_probability_target_in_place(monkeypatch):
    """The kernel gets views of the caller's (M, C) target, chunk by chunk: no copy of it."""
    import manualbp.triton_kernels.cross_entropy as kernel_module

    from .test_heads_options import _data

    x, w, b, q = _data(prob=True)
    x, w, b, q = x.float(), w.float(), b.float(), q.float()
    seen = []
    real = kernel_module.cross_entropy_rows

    def spy(logits, target, *args, **kwargs):
        seen.append((target.untyped_storage().data_ptr(), tuple(target.shape)))
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "cross_entropy_rows", spy)
    import manualbp as mbp
    from manualbp.ops.heads import linear_cross_entropy

    with mbp.use_backend("triton"):
        linear_cross_entropy(x, w, b, q, "sum", -100, 10, label_smoothing=0.1)
    assert seen == [(q.untyped_storage().data_ptr(), (r, C)) for r in (10, 10, 6)]
