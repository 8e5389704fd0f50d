"""torch.compile, torch.export and opcheck of the fused heads' `manualbp::linear_*` ops.

While a graph is captured, `linear_cross_entropy` / `linear_mse_loss` run as opaque custom ops
(manualbp.ops.heads). Graphs are tiny: most tests use backend="aot_eager" (AOTAutograd without
Inductor's C++ compile on the CPU); one runs Inductor. Every result is compared with native
autograd in float64 (float32 tolerance for the Triton backend under the interpreter).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import manualbp as mbp
from manualbp.ops import heads as fused_loss
from manualbp.ops.heads import linear_cross_entropy, linear_mse_loss
from manualbp.ops.network import saved_tensor_bytes

from .helpers import TOL, rel_err

F64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]
M, K, C = 7, 5, 6  # rows (2 × 7 with the leading dim below), in_features, classes
CHUNK = 4  # does not divide the 14 rows: the last chunk is short
NO_OPTIONS = (0.0, 0.0, 0.0)  # label_smoothing, lse_square_scale, softcap of the ops
OPTIONS = (0.1, 0.02, 3.0)


def _ce_data(dtype: torch.dtype, *, bias: bool = True, ignore_index: int = -100):
    x = torch.randn(2, M, K, dtype=dtype)
    w = torch.randn(C, K, dtype=dtype)
    b = torch.randn(C, dtype=dtype) if bias else None
    t = torch.randint(0, C, (2, M))
    t[0, 1] = t[1, 4] = ignore_index
    return x, w, b, t


def _leaves(tensors, dtype, grads):
    return [
        None if t is None else t.detach().to(dtype).clone().requires_grad_(g)
        for t, g in zip(tensors, grads, strict=True)
    ]


def _native_ce(x, w, b, t, reduction, ignore_index):
    loss = F.cross_entropy(
        F.linear(x, w, b).reshape(-1, C), t.reshape(-1), reduction=reduction, ignore_index=ignore_index
    )
    return loss.view(t.shape) if reduction == "none" else loss


def _grads(loss: Tensor, leaves: list, seed: Tensor) -> list[Tensor | None]:
    """∂(loss · seed)/∂leaf for the leaves that require grad (None for the others)."""
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if not wanted:
        assert not loss.requires_grad
        return [None] * len(leaves)
    found = iter(torch.autograd.grad(loss, wanted, seed))
    return [next(found) if t is not None and t.requires_grad else None for t in leaves]


def _assert_close(ours: list, ref: list, tol: float, dtype: torch.dtype) -> None:
    for i, (a, r) in enumerate(zip(ours, ref, strict=True)):
        assert (a is None) == (r is None), f"gradient {i}: one of ours/reference is missing"
        if a is not None:
            assert a.dtype == dtype and rel_err(a, r) <= tol, f"gradient {i}"


def _check_compiled_ce(reduction, *, bias=True, grads=(True, True, True), ignore_index=-100,
                       dtype=F64, backend="aot_eager"):  # fmt: skip
    """Compiled (fullgraph) == eager == native in loss and every gradient that is wanted."""
    torch._dynamo.reset()
    x, w, b, t = _ce_data(dtype, bias=bias, ignore_index=ignore_index)
    head = torch.compile(linear_cross_entropy, fullgraph=True, backend=backend)
    ours, eager, ref = (_leaves((x, w, b), d, grads) for d in (dtype, dtype, F64))
    loss = head(*ours, t, reduction, ignore_index, CHUNK)
    eager_loss = linear_cross_entropy(*eager, t, reduction, ignore_index, CHUNK)
    ref_loss = _native_ce(*ref, t, reduction, ignore_index)
    assert loss.shape == ref_loss.shape and loss.dtype == dtype
    assert rel_err(loss, ref_loss) <= TOL[dtype] and rel_err(loss, eager_loss) <= TOL[dtype]
    seed = torch.randn(ref_loss.shape, dtype=F64)
    got = _grads(loss, ours, seed.to(dtype))
    _assert_close(got, _grads(ref_loss, ref, seed), TOL[dtype], dtype)
    _assert_close(got, _grads(eager_loss, eager, seed.to(dtype)), TOL[dtype], dtype)


def _check_compiled_mse(reduction, *, bias=True, grads=(True, True, True, True), dtype=F64,
                        backend="aot_eager"):  # fmt: skip
    torch._dynamo.reset()
    x, w, b, _ = _ce_data(dtype, bias=bias)
    y = torch.randn(2, M, C, dtype=dtype)
    head = torch.compile(linear_mse_loss, fullgraph=True, backend=backend)
    ours, eager, ref = (_leaves((x, w, b, y), d, grads) for d in (dtype, dtype, F64))
    loss = head(*ours, reduction, CHUNK)
    eager_loss = linear_mse_loss(*eager, reduction, CHUNK)
    ref_loss = F.mse_loss(F.linear(*ref[:3]), ref[3], reduction=reduction)
    assert loss.shape == ref_loss.shape and loss.dtype == dtype
    assert rel_err(loss, ref_loss) <= TOL[dtype] and rel_err(loss, eager_loss) <= TOL[dtype]
    seed = torch.randn(ref_loss.shape, dtype=F64)
    got = _grads(loss, ours, seed.to(dtype))
    _assert_close(got, _grads(ref_loss, ref, seed), TOL[dtype], dtype)
    _assert_close(got, _grads(eager_loss, eager, seed.to(dtype)), TOL[dtype], dtype)


# ------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_ce_matches_eager_and_native(reduction: str) -> None:
    _check_compiled_ce(reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("grads", [(False, True, True), (True, False, False), (False, False, True)])
def test_compile_ce_requested_gradients_no_bias_custom_ignore_index(reduction, grads) -> None:
    _check_compiled_ce(reduction, grads=grads)
    _check_compiled_ce(reduction, bias=False, grads=grads[:2] + (False,), ignore_index=2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_mse_matches_eager_and_native(reduction: str) -> None:
    _check_compiled_mse(reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "grads", [(False, True, True, False), (True, False, False, True), (True, True, False, False)]
)
def test_compile_mse_requested_gradients_and_no_bias(reduction, grads) -> None:
    _check_compiled_mse(reduction, grads=grads)
    _check_compiled_mse(reduction, bias=False, grads=grads[:2] + (False, grads[3]))


def test_compile_inductor() -> None:
    """Inductor around the opaque ops: the "none" backward op and the mean/sum scaling."""
    _check_compiled_ce("none", backend="inductor")
    _check_compiled_mse("mean", backend="inductor")


def test_compile_no_grad_returns_the_loss_only() -> None:
    torch._dynamo.reset()
    x, w, b, t = _ce_data(F64)
    head = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        loss = head(x, w, b, t)
    assert rel_err(loss, _native_ce(x, w, b, t, "mean", -100)) <= TOL[F64]


def test_compile_checks_class_range_at_run_time() -> None:
    torch._dynamo.reset()
    x, w, b, t = _ce_data(F64)
    head = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    assert rel_err(head(x, w, b, t), _native_ce(x, w, b, t, "mean", -100)) <= TOL[F64]
    bad = t.clone()
    bad[1, 2] = C  # same shapes: the compiled graph is reused, so the op itself must check
    with pytest.raises(ValueError, match=f"target: class index {C} is out of range"):
        head(x, w, b, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="target: class index -1 is out of range"):
        head(x, w, b, bad)


def test_compile_under_autocast_matches_eager() -> None:
    """Autocast casts before the op, and the CE loss comes back in float32, as in eager."""
    torch._dynamo.reset()
    x, w, b, t = _ce_data(torch.float32)
    head = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    ours, eager = (_leaves((x, w, b), torch.float32, (True,) * 3) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(*ours, t, chunk_size=CHUNK)
        eager_loss = linear_cross_entropy(*eager, t, chunk_size=CHUNK)
    assert loss.dtype == eager_loss.dtype == torch.float32
    assert torch.equal(loss, eager_loss)  # the same kernels on the same bfloat16 inputs
    got, want = _grads(loss, ours, torch.tensor(1.0)), _grads(eager_loss, eager, torch.tensor(1.0))
    for g, e in zip(got, want, strict=True):
        assert g is not None and e is not None and g.dtype == torch.float32 and torch.equal(g, e)


def _graphs_of(fn, *args) -> list[str]:
    """The forward and backward graph code AOTAutograd produces for fn(*args).sum()."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[str] = []

    def record(gm: torch.fx.GraphModule, _inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    compiled(*args).sum().backward()
    return graphs


def test_compiled_backward_scales_or_runs_the_backward_op() -> None:
    """mean/sum: backward only scales the gradients forward computed; "none" calls the op."""
    x, w, b, t = _ce_data(F64)
    x, w, b = _leaves((x, w, b), F64, (True,) * 3)
    for reduction, backward_op in (("mean", False), ("none", True)):
        head = functools.partial(linear_cross_entropy, reduction=reduction)
        forward, backward = _graphs_of(head, x, w, b, t)
        assert "torch.ops.manualbp.linear_cross_entropy_forward.default" in forward
        assert ("torch.ops.manualbp.linear_cross_entropy_backward.default" in backward) == backward_op
    y = torch.randn(2, M, C, dtype=F64, requires_grad=True)
    forward, backward = _graphs_of(lambda x, w, y: linear_mse_loss(x, w, None, y, "none"), x, w, y)
    assert "torch.ops.manualbp.linear_mse_forward.default" in forward
    assert "torch.ops.manualbp.linear_mse_backward.default" in backward


# ------------------------------------------------------------------------------ Triton backend


def test_compile_triton_backend_under_interpreter() -> None:
    """use_backend("triton"): the kernels run inside the opaque ops, no graph break."""
    for reduction in ("mean", "none"):
        with mbp.use_backend("triton"):
            _check_compiled_ce(reduction, dtype=torch.float32)
            _check_compiled_mse(reduction, dtype=torch.float32)


# ------------------------------------------------------------------------------ export


def test_the_backend_in_force_is_recorded_in_the_op_call() -> None:
    x, _, _, t = _ce_data(torch.float32)
    head = _Head("ce", "mean").float()

    def recorded_backend() -> str:
        program = torch.export.export(head, (x, t))
        node = next(n for n in program.graph.nodes if "linear_cross_entropy" in str(n.target))
        return node.args[-1]

    assert recorded_backend() == "torch"
    with mbp.use_backend("triton"):
        assert recorded_backend() == "triton"




class _Head(nn.Module):
    def __init__(self, loss: str, reduction: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, K, dtype=F64))
        self.bias = nn.Parameter(torch.randn(C, dtype=F64))
        self.loss, self.reduction = loss, reduction

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if self.loss == "ce":
            return linear_cross_entropy(x, self.weight, self.bias, target, self.reduction, -100, CHUNK)
        return linear_mse_loss(x, self.weight, self.bias, target, self.reduction, CHUNK)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_export_records_the_head_op_and_keeps_its_gradients(loss: str, reduction: str) -> None:
    """Exported with x (and the MSE target) not requiring grad — run with them requiring it:
    forward did not precompute those gradients, so backward computes them through the op."""
    head = _Head(loss, reduction)
    x, _, _, t = _ce_data(F64)
    if loss == "mse":
        t = torch.randn(2, M, C, dtype=F64)
    program = torch.export.export(head, (x, t))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    op = "linear_cross_entropy_forward" if loss == "ce" else "linear_mse_forward"
    assert f"manualbp.{op}.default" in targets
    exported = program.module()
    inputs = [x.requires_grad_(), t.requires_grad_() if loss == "mse" else t]
    out = exported(*inputs)
    params = [head.weight, head.bias]
    if loss == "ce":
        ref = _native_ce(x, *params, t, reduction, -100)
    else:
        ref = F.mse_loss(F.linear(x, *params), t, reduction=reduction)
    assert rel_err(out, ref) <= TOL[F64]
    leaves = [*inputs[: 2 if loss == "mse" else 1], *exported.parameters()]
    seed = torch.randn(ref.shape, dtype=F64)
    ref_leaves = [*inputs[: 2 if loss == "mse" else 1], *params]
    _assert_close(_grads(out, leaves, seed), _grads(ref, ref_leaves, seed), TOL[F64], F64)


def test_op_saves_its_inputs_only_for_gradients_it_did_not_precompute() -> None:
    x, w, b, t = _row_data(F64)
    x, w, b = _leaves((x, w, b), F64, (True,) * 3)
    args = (x, w, b, t, None, "mean", -100, *NO_OPTIONS, CHUNK)
    precomputed = saved_tensor_bytes(
        lambda: fused_loss.linear_cross_entropy_forward(*args, True, True, True, "torch")
    )
    assert precomputed.references == 3  # the three gradients, nothing else (lse is not saved)
    late = saved_tensor_bytes(
        lambda: fused_loss.linear_cross_entropy_forward(*args, False, True, True, "torch")
    )
    assert late.references == 3 + 4  # (grad_x a placeholder), x, weight, bias, target (no class weight)
    loss, *_ = fused_loss.linear_cross_entropy_forward(*args, False, True, True, "torch")
    ref_leaves = _leaves((x, w, b), F64, (True,) * 3)
    ref = F.cross_entropy(F.linear(*ref_leaves), t)
    seed = torch.tensor(1.0, dtype=F64)
    _assert_close(_grads(loss, [x, w, b], seed), _grads(ref, ref_leaves, seed), TOL[F64], F64)


# ------------------------------------------------------------------------------ opcheck


def _row_data(dtype: torch.dtype) -> tuple:
    """The ops take rows: x (14, K), target (14,)."""
    x, w, b, t = _ce_data(dtype)
    return x.reshape(-1, K), w, b, t.reshape(-1)


def _op_samples(backend: str, dtype: torch.dtype) -> list[tuple]:
    x, w, b, t = _row_data(dtype)
    y = torch.randn(x.shape[0], C, dtype=dtype)
    x, w, b, y = _leaves((x, w, b, y), dtype, (True,) * 4)
    x0, w0, b0, y0 = (v.detach() for v in (x, w, b, y))
    t2 = torch.where(t == -100, 2, t)  # for ignore_index=2
    q = torch.softmax(torch.randn(x.shape[0], C, dtype=dtype), -1)  # probability targets
    cw = torch.rand(C, dtype=dtype) + 0.5
    samples: list[tuple] = []
    for reduction in REDUCTIONS:
        samples += [
            (fused_loss.linear_cross_entropy_forward,
             (x, w, b, t, None, reduction, -100, *NO_OPTIONS, CHUNK, True, True, True, backend)),
            (fused_loss.linear_cross_entropy_forward,
             (x0, w, None, t2, None, reduction, 2, *NO_OPTIONS, CHUNK, False, True, False,
              backend)),
            (fused_loss.linear_cross_entropy_forward,
             (x, w, b, t, cw, reduction, -100, *OPTIONS, CHUNK, True, True, True, backend)),
            (fused_loss.linear_cross_entropy_forward,
             (x0, w, None, q, cw, reduction, -100, *OPTIONS, CHUNK, False, True, False,
              backend)),
            (fused_loss.linear_mse_forward,
             (x, w, b, y, reduction, CHUNK, True, True, True, True, backend)),
            (fused_loss.linear_mse_forward,
             (x0, w, None, y0, reduction, CHUNK, False, True, False, False, backend)),
        ]  # fmt: skip
    g_rows, g_out = torch.randn(x.shape[0], dtype=dtype), torch.randn(y.shape, dtype=dtype)
    g_z = torch.randn(x.shape[0], dtype=dtype)
    samples += [
        (fused_loss.linear_cross_entropy_backward,
         (g_rows, g_rows, x0, w0, b0, t, None, -100, *NO_OPTIONS, CHUNK, True, True, True,
          backend)),
        (fused_loss.linear_cross_entropy_backward,
         (g_rows, g_rows, x0, w0, None, t2, None, 2, *NO_OPTIONS, CHUNK, False, True, False,
          backend)),
        (fused_loss.linear_cross_entropy_backward,
         (g_rows, g_z, x0, w0, b0, q, cw, -100, *OPTIONS, CHUNK, True, True, True, backend)),
        (fused_loss.linear_cross_entropy_backward,
         (g_rows, g_z, x0, w0, None, t, cw, -100, *OPTIONS, CHUNK, True, False, True, backend)),
        (fused_loss.linear_mse_backward,
         (g_out, x0, w0, b0, y0, CHUNK, True, True, True, True, backend)),
        (fused_loss.linear_mse_backward,
         (g_out, x0, w0, None, y0, CHUNK, True, False, False, False, backend)),
    ]  # fmt: skip
    return samples


@pytest.mark.parametrize(
    ("backend", "dtype"), [("torch", F64), ("torch", torch.float32), ("triton", torch.float32)]
)
def test_opcheck_head_ops(backend: str, dtype: torch.dtype) -> None:
    for op, args in _op_samples(backend, dtype):
        torch.library.opcheck(op, args)


def test_ops_return_no_aliases_and_placeholders_for_unneeded_gradients() -> None:
    x, w, b, t = _row_data(F64)
    loss, lse, *grads = fused_loss.linear_cross_entropy_forward(
        x, w, b, t, None, "sum", -100, *NO_OPTIONS, CHUNK, False, True, False, "torch")  # fmt: skip
    assert loss.shape == () and [tuple(g.shape) for g in grads] == [(0,), (C, K), (0,)]
    assert lse.shape == t.shape
    loss, _, *grads = fused_loss.linear_cross_entropy_forward(
        x, w, b, t, None, "none", -100, *NO_OPTIONS, CHUNK, True, True, True, "torch")  # fmt: skip
    assert loss.shape == t.shape and all(g.shape == (0,) for g in grads)  # computed in backward
    with pytest.raises(ValueError, match="backend: expected 'torch' or 'triton'"):
        fused_loss.linear_mse_forward(x, w, b, torch.randn(x.shape[0], C, dtype=F64), "mean",
                                      CHUNK, True, True, True, False, "cuda")  # fmt: skip
