"""The fused cross-entropy head's options under torch.compile(fullgraph=True) and torch.export:
the `manualbp::linear_cross_entropy_*` ops carry them (class_weight, label_smoothing,
lse_square_scale, softcap, probability targets), and every result matches the float64 native
expression and eager."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp.ops import heads
from manualbp.ops.heads import linear_cross_entropy

from .helpers import TOL, rel_err
from .test_heads_options import LEAD, OPTIONS, REDUCTIONS, C, K, _class_weight, _data, native_head

F64 = torch.float64
CHUNK = 7


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).clone().requires_grad_() for t in tensors]


def _check_compiled(reduction, option, *, prob=False, dtype=F64, backend="aot_eager", returns=False):
    """Compiled (fullgraph) == eager == native: loss, returned z-loss / lse, every gradient."""
    torch._dynamo.reset()
    x, w, b, t = _data(prob=prob)
    opts = _class_weight(OPTIONS.get(option, {}))
    ours_opts = {k: (v.to(dtype) if isinstance(v, Tensor) else v) for k, v in opts.items()}
    t_ours = t.to(dtype) if prob else t
    extra = dict(return_z_loss=True, return_lse=True) if returns else {}
    head = torch.compile(functools.partial(linear_cross_entropy, **ours_opts, **extra),
                         fullgraph=True, backend=backend)  # fmt: skip
    ours, eager, ref = _leaves((x, w, b), dtype), _leaves((x, w, b), dtype), _leaves((x, w, b), F64)
    out = head(*ours, t_ours, reduction, -100, CHUNK)
    eager_out = linear_cross_entropy(*eager, t_ours, reduction, -100, CHUNK, **ours_opts, **extra)
    ref_out = native_head(*ref, t, reduction, **opts, parts=returns)
    outs, eager_outs, ref_outs = ((o,) if not returns else o for o in (out, eager_out, ref_out))
    tol = TOL[dtype]
    for o, e, r in zip(outs, eager_outs, ref_outs, strict=True):
        assert o.shape == r.shape and rel_err(o, r) <= tol and rel_err(o, e) <= tol
    seed = torch.randn(ref_outs[0].shape, dtype=F64)
    got = torch.autograd.grad(outs[0], ours, seed.to(dtype))
    for g, e, r in zip(got, torch.autograd.grad(eager_outs[0], eager, seed.to(dtype)),
                       torch.autograd.grad(ref_outs[0], ref, seed), strict=True):  # fmt: skip
        assert g.dtype == dtype and rel_err(g, r) <= tol and rel_err(g, e) <= tol


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["weight+smoothing", "z_loss", "softcap", "all"])
def test_compile_class_target_options(option, reduction):
    _check_compiled(reduction, option)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_probability_targets(reduction):
    _check_compiled(reduction, "all", prob=True)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_returns_z_loss_and_lse(reduction, prob):
    _check_compiled(reduction, "all", prob=prob, returns=True)


def test_compile_inductor_with_options():
    _check_compiled("mean", "all", backend="inductor")


def test_compile_triton_backend_with_options():
    with mbp.use_backend("triton"):
        _check_compiled("mean", "all", dtype=torch.float32)
        _check_compiled("none", "all", prob=True, dtype=torch.float32)


def test_op_late_backward_scales_ce_and_z_loss_apart():
    """Forward precomputed nothing (need flags off): the backward op gets r = g/D for the
    cross-entropy part and r_z = g/N for the z-loss — they differ with class weights."""
    x, w, b, t = _data()
    x, w, b = (v.reshape(-1, K) if v is x else v for v in (x, w, b))
    x, w, b = _leaves((x, w, b), F64)
    cw = torch.rand(C, dtype=F64) + 0.2
    loss, lse, *_ = heads.linear_cross_entropy_forward(
        x, w, b, t.reshape(-1), cw, "mean", -100, 0.1, 0.05, 3.0, CHUNK, False, False, False, "torch"
    )
    ref_in = _leaves((x, w, b), F64)
    ref = native_head(*ref_in, t.reshape(-1), "mean", class_weight=cw, label_smoothing=0.1,
                      lse_square_scale=0.05, softcap=3.0)  # fmt: skip
    assert rel_err(loss, ref) <= TOL[F64] and lse.shape == (x.shape[0],)
    for ours, theirs in zip(torch.autograd.grad(loss, (x, w, b)), torch.autograd.grad(ref, ref_in),
                            strict=True):  # fmt: skip
        assert rel_err(ours, theirs) <= TOL[F64]


class _Head(nn.Module):
    def __init__(self, reduction: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, K, dtype=F64))
        self.bias = nn.Parameter(torch.randn(C, dtype=F64))
        self.register_buffer("class_weight", torch.rand(C, dtype=F64) + 0.2)
        self.reduction = reduction

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(x, self.weight, self.bias, target, self.reduction, -100, CHUNK,
                                    class_weight=self.class_weight, label_smoothing=0.1,
                                    lse_square_scale=0.02, softcap=3.0)  # fmt: skip


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_export_records_the_options(reduction, prob):
    head = _Head(reduction)
    x, _, _, t = _data(prob=prob)
    program = torch.export.export(head, (x, t))
    node = next(n for n in program.graph.nodes if "linear_cross_entropy_forward" in str(n.target))
    assert node.args[7:10] == (0.1, 0.02, 3.0)  # label_smoothing, lse_square_scale, softcap
    exported = program.module()
    x.requires_grad_()  # not at export: the backward op computes grad_x
    out = exported(x, t)
    ref = native_head(x, head.weight, head.bias, t, reduction, class_weight=head.class_weight,
                      label_smoothing=0.1, lse_square_scale=0.02, softcap=3.0)  # fmt: skip
    assert out.shape == ref.shape == (LEAD if reduction == "none" else ())
    assert rel_err(out, ref) <= TOL[F64]
    seed = torch.randn(ref.shape, dtype=F64)
    ours = torch.autograd.grad(out, [x, *exported.parameters()], seed)
    theirs = torch.autograd.grad(ref, [x, head.weight, head.bias], seed)
    for a, r in zip(ours, theirs, strict=True):
        assert rel_err(a, r) <= TOL[F64]
