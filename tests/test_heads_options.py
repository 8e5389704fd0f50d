"""The fused cross-entropy head's options — class weights, label smoothing, z-loss, logit softcap,
probability targets, reductions, ignore_index — against native autograd in float64 (softcap and
z-loss against a hand-composed native expression), and against torch's `F.linear_cross_entropy`."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import manualbp as mbp
from manualbp.ops import heads
from manualbp.ops.heads import linear_cross_entropy
from manualbp.ops.network import saved_tensor_bytes

from .helpers import TOL, rel_err

F64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]
LEAD, K, C = (2, 13), 9, 70  # 26 rows; 70 classes span two of the interpreter's 64-wide tiles
IGNORED = (0, 3, 17)  # row 0 has target ignore_index: class 0's weight must not count there

# Option sets: keyword arguments of linear_cross_entropy (class_weight=True: a random one).
OPTIONS = {
    "smoothing": dict(label_smoothing=0.1),
    "weight": dict(class_weight=True),
    "weight+smoothing": dict(class_weight=True, label_smoothing=0.25),
    "z_loss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=2.5),
    "all": dict(class_weight=True, label_smoothing=0.1, lse_square_scale=3e-2, softcap=4.0),
    "smoothing=1": dict(label_smoothing=1.0),
}


def _data(*, prob=False, ignore=IGNORED, ignore_index=-100, bias=True):
    x = torch.randn(*LEAD, K, dtype=F64)
    w = torch.randn(C, K, dtype=F64) * (2 / K**0.5)  # logits of order 2: the softcap bends them
    b = torch.randn(C, dtype=F64) if bias else None
    if prob:
        t = torch.softmax(3 * torch.randn(*LEAD, C, dtype=F64), -1)
    else:
        t = torch.randint(1, C, LEAD)
        t.view(-1)[list(ignore)] = ignore_index
    return x, w, b, t


def _class_weight(opts):
    opts = dict(opts)
    if opts.pop("class_weight", None):
        cw = torch.rand(C, dtype=F64) + 0.2
        cw[0] = 50.0  # a weight that would show if an ignored row (safe index 0) counted it
        opts["class_weight"] = cw
    return opts


def native_head(x, w, b, t, reduction="mean", ignore_index=-100, *, class_weight=None,
                label_smoothing=0.0, lse_square_scale=0.0, softcap=None, parts=False):  # fmt: skip
    """The hand-composed native expression: F.cross_entropy(cap(F.linear(x)), ...) + z-loss."""
    z = F.linear(x, w, b).reshape(-1, C)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = t.is_floating_point()
    rows_t = t.reshape(-1, C) if prob else t.reshape(-1)
    ce = F.cross_entropy(z, rows_t, weight=class_weight, reduction=reduction,
                         ignore_index=ignore_index, label_smoothing=label_smoothing)  # fmt: skip
    lse = torch.logsumexp(z, 1)
    valid = torch.ones_like(lse, dtype=torch.bool) if prob else rows_t != ignore_index
    zl = torch.where(valid, lse_square_scale * lse**2, torch.zeros_like(lse))
    zl = zl if reduction == "none" else (zl.sum() / valid.sum() if reduction == "mean" else zl.sum())
    shape = x.shape[:-1]
    loss = ce + zl if lse_square_scale else ce
    loss = loss.view(shape) if reduction == "none" else loss
    if not parts:
        return loss
    return loss, (zl.view(shape) if reduction == "none" else zl), lse.view(shape)


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).clone().requires_grad_() for t in tensors]


def check_head(dtype, reduction, opts, *, prob=False, backend="torch", chunk_size=7, data=None,
               ignore_index=-100, tol=None):  # fmt: skip
    """Loss and every gradient of x, W, b against the float64 native expression."""
    x, w, b, t = data if data is not None else _data(prob=prob, ignore_index=ignore_index)
    opts = _class_weight(opts)
    ours_in, ref_in = _leaves((x, w, b), dtype), _leaves((x, w, b), F64)
    ours_opts = dict(opts)
    if "class_weight" in opts:
        ours_opts["class_weight"] = opts["class_weight"].to(dtype)
    t_ours = t.to(dtype) if prob else t
    with mbp.use_backend(backend):
        loss = linear_cross_entropy(*ours_in, t_ours, reduction, ignore_index, chunk_size, **ours_opts)
    ref = native_head(*ref_in, t, reduction, ignore_index, **opts)
    tol = TOL[dtype] if tol is None else tol
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert rel_err(loss, ref) <= tol
    seed = torch.randn(ref.shape, dtype=F64)
    with mbp.use_backend(backend):
        loss.backward(seed.to(dtype))
    ref.backward(seed)
    for name, ours, theirs in zip("xwb", ours_in, ref_in, strict=True):
        if ours is not None:
            assert ours.grad is not None and ours.grad.dtype == dtype, name
            assert rel_err(ours.grad, theirs.grad) <= tol, name


# ------------------------------------------------------------------------------ reference backend


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_class_target_options(dtype, option, reduction):
    check_head(dtype, reduction, OPTIONS[option])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight", "all"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_probability_target_options(dtype, option, reduction):
    check_head(dtype, reduction, OPTIONS.get(option, {}), prob=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options_with_a_real_class_as_ignore_index(reduction):
    """ignore_index = 4 is a class: those rows drop out of the loss, the weights and the mean."""
    x, w, b, t = _data(ignore=())
    t.view(-1)[[0, 5, 6]] = 4
    check_head(F64, reduction, OPTIONS["all"], data=(x, w, b, t), ignore_index=4)


@pytest.mark.parametrize("chunk_size", [1, 26, None])
def test_options_any_chunking(chunk_size):
    check_head(F64, "mean", OPTIONS["all"], chunk_size=chunk_size)
    check_head(F64, "none", OPTIONS["all"], chunk_size=chunk_size, prob=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(reduction):
    """"mean" is 0/0 = NaN as native (with weights too), "sum" 0; every gradient exactly 0."""
    x, w, b, t = _data()
    t.fill_(-100)
    opts = _class_weight(OPTIONS["all"])
    ours_in = _leaves((x, w, b), F64)
    loss = linear_cross_entropy(*ours_in, t, reduction, chunk_size=7, **opts)
    ref = native_head(x, w, b, t, reduction, **opts)
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
    else:
        assert torch.equal(loss, ref) and not loss.any()
    loss.sum().backward()
    for leaf in ours_in:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_mean_with_weights_divides_by_the_weights_of_counted_rows():
    """mean = Σ w_t ℓ / Σ w_t, the weights of ignored rows (safe index 0, weight 50) excluded."""
    x, w, b, t = _data()
    cw = torch.rand(C, dtype=F64) + 0.2
    cw[0] = 50.0
    per_row = linear_cross_entropy(x, w, b, t, "none", class_weight=cw)
    valid = t != -100
    expected = per_row.sum() / cw[t[valid]].sum()
    mean = linear_cross_entropy(x, w, b, t, class_weight=cw)
    assert rel_err(mean, expected) <= TOL[F64]


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_returned_z_loss_and_lse(reduction, prob):
    x, w, b, t = _data(prob=prob)
    opts = dict(lse_square_scale=0.05, softcap=3.0, label_smoothing=0.1)
    loss, z_loss, lse = linear_cross_entropy(x, w, b, t, reduction, chunk_size=5, return_z_loss=True,
                                             return_lse=True, **opts)  # fmt: skip
    ref_loss, ref_z, ref_lse = native_head(x, w, b, t, reduction, parts=True, **opts)
    for ours, ref in ((loss, ref_loss), (z_loss, ref_z), (lse, ref_lse)):
        assert ours.shape == ref.shape and rel_err(ours, ref) <= TOL[F64]
    only_lse = linear_cross_entropy(x, w, b, t, reduction, chunk_size=5, return_lse=True, **opts)
    assert isinstance(only_lse, tuple) and torch.equal(only_lse[1], lse)
    only_z = linear_cross_entropy(x.float(), w.float(), b.float(), t.float() if prob else t,
                                  reduction, return_z_loss=True, **opts)  # fmt: skip
    assert only_z[1].dtype == torch.float32 and rel_err(only_z[1], ref_z) <= TOL[torch.float32]
    assert not z_loss.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_second_order(reduction, prob):
    """create_graph: the gradient is itself differentiable and matches native's second order."""
    x, w, b, t = _data(prob=prob)
    opts = _class_weight(OPTIONS["all"])
    ours_in, ref_in = _leaves((x, w, b), F64), _leaves((x, w, b), F64)
    seed = torch.randn(LEAD, dtype=F64) if reduction == "none" else torch.tensor(1.0, dtype=F64)
    results = []
    for fn, leaves in ((linear_cross_entropy, ours_in), (native_head, ref_in)):
        kwargs = {} if fn is native_head else {"chunk_size": 7}
        loss = fn(*leaves, t, reduction, **opts, **kwargs)
        grads = torch.autograd.grad(loss, leaves, seed, create_graph=True)
        gg = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
        results.append((grads, gg))
    for ours, ref in zip(*results, strict=True):
        for a, r in zip(ours, ref, strict=True):
            assert rel_err(a, r) <= 1e-9


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options_forward_mode(reduction, prob):
    import torch.autograd.forward_ad as fwAD

    x, w, b, t = _data(prob=prob)
    opts = _class_weight(OPTIONS["all"])
    tangents = [torch.randn_like(v) for v in (x, w, b)]
    outs = []
    for fn in (linear_cross_entropy, native_head):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(v, tv) for v, tv in zip((x, w, b), tangents, strict=True)]
            outs.append(fwAD.unpack_dual(fn(*duals, t, reduction, **opts)).tangent)
    assert rel_err(outs[0], outs[1]) <= TOL[F64]


# ------------------------------------------------------------------------------ against torch


def _torch_lce(x, w, b, t, reduction, ignore_index, class_weight, label_smoothing, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the chunked path may fall back to the reference path
        return F.linear_cross_entropy(
            x.reshape(-1, K), w, t.reshape(-1, C) if t.is_floating_point() else t.reshape(-1),
            linear_bias=b, weight=class_weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )  # fmt: skip


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "smoothing", "weight", "weight+smoothing"])
def test_against_torch_linear_cross_entropy(option, reduction, prob, chunked):
    """torch 2.13's own F.linear_cross_entropy, for the options it has (no z-loss, softcap)."""
    x, w, b, t = _data(prob=prob)
    opts = _class_weight(OPTIONS.get(option, {}))
    ours_in, theirs_in = _leaves((x, w, b), F64), _leaves((x, w, b), F64)
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    ours = linear_cross_entropy(*ours_in, t, reduction, -100, 7, **opts)
    # torch's head refuses any explicit ignore_index with probability targets (its default, None,
    # means -100 for class indices); F.cross_entropy and ours accept a negative one.
    ignore_index = None if prob else -100
    theirs = _torch_lce(*theirs_in, t, reduction, ignore_index, opts.get("class_weight"),
                        opts.get("label_smoothing", 0.0), options)  # fmt: skip
    assert rel_err(ours.reshape(theirs.shape), theirs) <= TOL[F64]
    seed = torch.randn(theirs.shape, dtype=F64)
    ours.backward(seed.view(ours.shape))
    theirs.backward(seed)
    for a, r in zip(ours_in, theirs_in, strict=True):
        assert rel_err(a.grad, r.grad) <= TOL[F64]


# ------------------------------------------------------------------------------ memory


def test_probability_targets_keep_no_class_sized_tensor():
    """Saved for backward: only the x/W/b-sized gradients (the caller's target is not copied)."""
    M, k, c = 64, 8, 512
    x = torch.randn(M, k, requires_grad=True)
    w = torch.randn(c, k, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    t = torch.softmax(torch.randn(M, c), -1)
    cw = torch.rand(c)
    exclude = [x, w, b, t, cw]
    ours = saved_tensor_bytes(
        lambda: linear_cross_entropy(x, w, b, t, chunk_size=8, class_weight=cw, label_smoothing=0.1,
                                     lse_square_scale=1e-3, softcap=5.0), exclude)  # fmt: skip
    assert sorted(ours.storages.values()) == sorted([M * k * 4, c * k * 4, c * 4])


@pytest.mark.parametrize("prob", [False, True])
def test_option_buffers_are_chunk_sized(monkeypatch, prob):
    """Every (rows × classes) tensor the per-chunk math sees (logits, target) has ≤ chunk rows."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = heads.rows_reference

    def spy(z, target, *args):
        seen.append((tuple(z.shape), tuple(target.shape)))
        return real(z, target, *args)

    monkeypatch.setattr(heads, "rows_reference", spy)
    check_head(F64, "mean", OPTIONS["all"], prob=prob)
    rows = [7, 7, 7, 5]
    assert [s[0] for s in seen] == [(r, C) for r in rows]
    assert [s[1] for s in seen] == [(r, C) if prob else (r,) for r in rows]


# ------------------------------------------------------------------------------ bad arguments


def test_bad_options():
    x, w, b, t = _data()
    q = torch.softmax(torch.randn(*LEAD, C, dtype=F64), -1)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(x, w, b, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(x, w, b, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="lse_square_scale"):
        linear_cross_entropy(x, w, b, t, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(x, w, b, t, softcap=0.0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(x, w, b, t, softcap=float("inf"))
    with pytest.raises(ValueError, match="class_weight"):
        linear_cross_entropy(x, w, b, t, class_weight=torch.ones(C - 1, dtype=F64))
    with pytest.raises(TypeError, match="class_weight"):
        linear_cross_entropy(x, w, b, t, class_weight=torch.ones(C, dtype=torch.long))
    with pytest.raises(RuntimeError, match="class_weight"):
        linear_cross_entropy(x, w, b, t, class_weight=torch.ones(C, dtype=F64, requires_grad=True))
    # Native refuses a non-negative ignore_index with probability targets; so does the head.
    with pytest.raises(RuntimeError, match="ignore_index is not supported for probability"):
        linear_cross_entropy(x, w, b, q, ignore_index=3)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        F.cross_entropy(torch.randn(4, C), q.view(-1, C)[:4], ignore_index=3)
    with pytest.raises(ValueError, match="target: floating"):
        linear_cross_entropy(x, w, b, q[..., :-1])
    with pytest.raises(RuntimeError, match="probability target that requires grad"):
        linear_cross_entropy(x, w, b, q.clone().requires_grad_())
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: linear_cross_entropy(x, w, b, t, label_smoothing=0.1))(x)


@pytest.mark.parametrize("grads", [(True, False, True), (False, True, False), (False, False, True)])
def test_options_only_requested_gradients(grads):
    x, w, b, t = _data()
    opts = _class_weight(OPTIONS["all"])
    leaves = [v.clone().requires_grad_(g) for v, g in zip((x, w, b), grads, strict=True)]
    refs = [v.clone().requires_grad_(g) for v, g in zip((x, w, b), grads, strict=True)]
    linear_cross_entropy(*leaves, t, "mean", -100, 7, **opts).backward()
    native_head(*refs, t, "mean", **opts).backward()
    for ours, ref, wanted in zip(leaves, refs, grads, strict=True):
        assert (ours.grad is None) == (not wanted)
        if wanted:
            assert rel_err(ours.grad, ref.grad) <= TOL[F64]


@pytest.mark.parametrize("prob", [False, True])
def test_options_under_autocast(prob):
    """bfloat16 GEMMs, the loss in float32 as native gives there; float64 oracle, bf16 tolerance."""
    x, w, b, t = _data(prob=prob)
    opts = _class_weight(OPTIONS["all"])
    cw32 = {k: (v.float() if k == "class_weight" else v) for k, v in opts.items()}
    ours_in = _leaves((x, w, b), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(*ours_in, t.float() if prob else t, "mean", -100, 7, **cw32)
    assert loss.dtype == torch.float32
    ref_in = _leaves((x, w, b), F64)
    ref = native_head(*ref_in, t, "mean", **opts)
    assert rel_err(loss, ref) <= TOL[torch.bfloat16]
    loss.backward()
    ref.backward()
    for ours, theirs in zip(ours_in, ref_in, strict=True):
        assert ours.grad.dtype == torch.float32 and rel_err(ours.grad, theirs.grad) <= 2 * TOL[torch.bfloat16]
