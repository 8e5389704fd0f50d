"""torch.compile, torch.export and torch.library.opcheck of the manualbp custom ops.

Graphs are tiny: Inductor on the CPU compiles C++ with gcc, which is what these tests pay for.
The Triton backend is exercised here under the interpreter (conftest sets TRITON_INTERPRET=1),
through the opaque `manualbp::linear_*` ops, and the `triton_op`s that CUDA graphs use are run
eagerly; their decomposition into kernel launches is traced on fake CUDA tensors in
tests/test_triton_op_trace.py, and compiled and run on a GPU by the `cuda`-marked test.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp import functional as MF
from manualbp import ops

from .helpers import TOL, leaf, native_linear_act, rel_err

F64 = torch.float64


def _model(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(
        mbp.Linear(6, 7, dtype=dtype),
        mbp.LinearAct(7, 5, "gelu", dtype=dtype),
        mbp.LinearAct(5, 5, "leaky_relu", negative_slope=0.2, bias=False, dtype=dtype),
        mbp.MLP([5, 4, 4], activation="tanh", dtype=dtype, mode="layers"),
        mbp.MLP([4, 4, 3], activation="sigmoid", dtype=dtype),  # mode="network" (default)
    )


def _ce_step(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return MF.cross_entropy(model(x), target)


def _mse_step(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return MF.mse_loss(model(x), target) + MF.half_mse_loss(model(x), target, reduction="sum")


def _grads(model: nn.Module, x: Tensor, loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, [x, *model.parameters()]))


def _eager_and_compiled(step, model, x, target, **compile_kwargs):
    """Loss and gradients (input and every parameter), eager then compiled with fullgraph."""
    eager_loss = step(model, x, target)
    eager = _grads(model, x, eager_loss)
    compiled_step = torch.compile(step, fullgraph=True, **compile_kwargs)
    compiled_loss = compiled_step(model, x, target)
    compiled = _grads(model, x, compiled_loss)
    return (eager_loss, eager), (compiled_loss, compiled)


def test_compile_fullgraph_reference_matches_eager_float64() -> None:
    torch._dynamo.reset()
    model = _model(F64)
    x = torch.randn(2, 3, 6, dtype=F64, requires_grad=True)  # leading dims are flattened
    target = torch.tensor([[0, 2, 1], [2, -100, 0]])
    (el, eg), (cl, cg) = _eager_and_compiled(
        lambda m, x, t: MF.cross_entropy(m(x).transpose(1, 2), t), model, x, target
    )
    assert rel_err(cl, el) <= TOL[F64]
    for ours, ref in zip(cg, eg, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]
    # ... and eager equals native autograd, so compiled does too.
    native = nn.Sequential(
        nn.Linear(6, 7, dtype=F64),
        nn.Sequential(nn.Linear(7, 5, dtype=F64), nn.GELU()),
        nn.Sequential(nn.Linear(5, 5, bias=False, dtype=F64), nn.LeakyReLU(0.2)),
        nn.Sequential(nn.Linear(5, 4, dtype=F64), nn.Tanh(), nn.Linear(4, 4, dtype=F64)),
        nn.Sequential(nn.Linear(4, 4, dtype=F64), nn.Sigmoid(), nn.Linear(4, 3, dtype=F64)),
    )
    for p_native, p_ours in zip(native.parameters(), model.parameters(), strict=True):
        p_native.data.copy_(p_ours.data)
    nl = nn.functional.cross_entropy(native(x).transpose(1, 2), target)
    ng = _grads(native, x, nl)
    assert rel_err(cl, nl) <= TOL[F64]
    for ours, ref in zip(cg, ng, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


def test_compile_fullgraph_mse_and_half_mse_float64() -> None:
    torch._dynamo.reset()
    model = _model(F64)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    target = torch.randn(4, 3, dtype=F64)
    (el, eg), (cl, cg) = _eager_and_compiled(_mse_step, model, x, target)
    assert rel_err(cl, el) <= TOL[F64]
    for ours, ref in zip(cg, eg, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


def test_compile_backward_runs_the_manualbp_backward_op() -> None:
    """The compiled backward graph calls manualbp::linear_backward (the hand-written backward)."""
    torch._dynamo.reset()
    graphs: list[str] = []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm: torch.fx.GraphModule, _inputs):  # an AOTAutograd compiler that keeps the code
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    layer = mbp.LinearAct(3, 2, "silu", dtype=F64)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    out = torch.compile(layer, fullgraph=True, backend=aot_autograd(fw_compiler=record))(x)
    out.sum().backward()
    forward_code, backward_code = graphs
    assert "torch.ops.manualbp.linear_forward.default" in forward_code
    assert "torch.ops.manualbp.linear_backward.default" in backward_code
    ref = torch.nn.functional.silu(x.detach() @ layer.weight.detach().t() + layer.bias.detach())
    assert rel_err(out, ref) <= TOL[F64]


def test_compile_cross_entropy_checks_targets_at_run_time() -> None:
    torch._dynamo.reset()
    step = torch.compile(lambda z, t: MF.cross_entropy(z, t), fullgraph=True, backend="aot_eager")
    logits = torch.randn(3, 4, dtype=F64)
    assert rel_err(step(logits, torch.tensor([0, 3, 1])), nn.functional.cross_entropy(
        logits, torch.tensor([0, 3, 1])
    )) <= TOL[F64]
    with pytest.raises(ValueError, match="target: class index 4 is out of range"):
        step(logits, torch.tensor([0, 4, 1]))


def test_compile_triton_backend_under_interpreter() -> None:
    """use_backend("triton") compiles with no graph break: the kernels run in the opaque op."""
    torch._dynamo.reset()
    model = nn.Sequential(mbp.LinearAct(5, 6, "gelu"), mbp.Linear(6, 3))
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([2, 0, 1, 1])
    native = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p_native, p_ours in zip(native.parameters(), model.parameters(), strict=True):
            p_native.copy_(p_ours)
    x64 = x.detach().double().requires_grad_()
    ref_loss = nn.functional.cross_entropy(native(x64), target)
    ref_grads = _grads(native, x64, ref_loss)
    with mbp.use_backend("triton"):
        loss = torch.compile(_ce_step, fullgraph=True, backend="aot_eager")(model, x, target)
    grads = _grads(model, x, loss)
    assert rel_err(loss, ref_loss) <= TOL[torch.float32]
    for ours, ref in zip(grads, ref_grads, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.float32]


def test_export_captures_the_ops() -> None:
    model = nn.Sequential(mbp.Linear(4, 5, dtype=F64), mbp.LinearAct(5, 3, "mish", dtype=F64))
    x = torch.randn(2, 4, dtype=F64)
    program = torch.export.export(model, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("manualbp.linear_forward.default") == 2
    y = torch.randn(2, 4, dtype=F64)
    assert rel_err(program.module()(y), model(y)) <= TOL[F64]
    # Saved and loaded (the ops are found again by name: importing manualbp registers them).
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert rel_err(torch.export.load(buffer).module()(y), model(y)) <= TOL[F64]

    # The ops keep their autograd formula: backward through the exported program matches eager.
    target = torch.tensor([0, 2])
    loss_module = _LossModule(model)
    loss_program = torch.export.export(loss_module, (x, target))
    targets = [str(node.target) for node in loss_program.graph.nodes if node.op == "call_function"]
    assert "manualbp.cross_entropy_forward.default" in targets
    y.requires_grad_(True)
    eager = _grads(model, y, loss_module(y, target))
    exported_module = loss_program.module()
    exported_loss = exported_module(y, target)
    exported = torch.autograd.grad(exported_loss, [y, *exported_module.parameters()])
    for ours, ref in zip(exported, eager, strict=True):
        assert rel_err(ours, ref) <= TOL[F64]


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return MF.cross_entropy(self.model(x), target)


# ---------------------------------------------------------------------------------------- opcheck


def _linear_samples(backend: str, dtype: torch.dtype) -> list[tuple]:
    x = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(4, dtype=dtype, requires_grad=True)
    return [
        (x, w, b, "relu", 0.0, backend),
        (x, w, None, "gelu", 0.0, backend),
        (x, w, b, "leaky_relu", 0.3, backend),
        (x, w, b, "identity", 0.0, backend),
    ]


def _linear_backward_samples(backend: str, dtype: torch.dtype) -> list[tuple]:
    g, saved = torch.randn(5, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    x, w = torch.randn(5, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    return [
        (g, x, w, saved, "softplus", 0.0, True, True, True, backend),
        (g, x, w, saved.sigmoid(), "sigmoid", 0.0, False, True, False, backend),
        (g, x, w, saved.relu(), "leaky_relu", 0.1, True, False, False, backend),
    ]


def _loss_samples() -> list[tuple]:
    inp = torch.randn(5, 4, dtype=F64, requires_grad=True)
    tgt = torch.randn(5, 4, dtype=F64, requires_grad=True)
    cls = torch.tensor([0, 3, -100, 2, 1])
    loss, lse, count = ops.cross_entropy_forward(inp.detach(), cls, "mean", -100)
    samples = []
    for reduction in ("mean", "sum", "none"):
        per_example = reduction != "sum"
        grad = torch.randn(5 if reduction == "none" else (), dtype=F64)
        samples += [
            (ops.squared_error_forward, (inp, tgt, reduction, 0.5, per_example)),
            (
                ops.squared_error_backward,
                (grad, inp.detach(), tgt.detach(), reduction, 0.5, per_example, True, False),
            ),
            (ops.cross_entropy_forward, (inp, cls, reduction, -100)),
            (
                ops.cross_entropy_backward,
                (grad, inp.detach(), cls, lse, count, reduction, -100),
            ),
        ]
    return samples


@pytest.mark.parametrize(
    ("backend", "dtype"), [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]
)
def test_opcheck_linear_ops(backend: str, dtype: torch.dtype) -> None:
    for args in _linear_samples(backend, dtype):
        torch.library.opcheck(ops.linear_forward, args)
    for args in _linear_backward_samples(backend, dtype):
        torch.library.opcheck(ops.linear_backward, args)


def test_opcheck_loss_ops() -> None:
    for op, args in _loss_samples():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(("activation", "slope"), [("gelu", 0.0), ("leaky_relu", 0.3), ("sigmoid", 0.0)])
def test_triton_op_autograd_under_interpreter(activation: str, slope: float) -> None:
    """``manualbp::triton_linear_*`` run eagerly (kernels interpreted): values, every gradient and
    the autograd registration. Their tracing into kernel launches is tests/test_triton_op_trace.py."""
    assert ops.triton_ops_available()
    torch.manual_seed(0)
    x64 = torch.randn(17, 33, dtype=F64)
    w64, b64 = torch.randn(20, 33, dtype=F64) / 6, torch.randn(20, dtype=F64)
    g64 = torch.randn(17, 20, dtype=F64)
    x, w, b = (leaf(t.float()) for t in (x64, w64, b64))
    out, _ = ops._triton_forward(x, w, b, activation, slope)
    grads = torch.autograd.grad(out, [x, w, b], g64.float())
    kw = {"negative_slope": slope} if activation == "leaky_relu" else {}
    r64 = [leaf(t) for t in (x64, w64, b64)]
    ref = native_linear_act(*r64, activation, **kw)
    ref_grads = torch.autograd.grad(ref, r64, g64)
    assert rel_err(out, ref) <= TOL[torch.float32]
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert rel_err(ours, theirs) <= TOL[torch.float32]
    # Under the interpreter the kernels cannot run on fake tensors, so opcheck's fake-tensor and
    # AOT-dispatch checks belong to the trace test; schema and autograd registration are checked here.
    torch.library.opcheck(
        ops._triton_forward, (x, w, b, activation, slope),
        test_utils=("test_schema", "test_autograd_registration"),
    )  # fmt: skip


def test_linear_op_matches_eager_function_bitwise() -> None:
    """The op is a thin wrapper: same forward values and gradients as the eager Function."""
    x = torch.randn(3, 2, 5, requires_grad=True)
    layer = mbp.LinearAct(5, 4, "gelu_tanh")
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, layer.weight, layer.bias])
    out = ops.linear(x, layer.weight, layer.bias, layer.act)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.weight, layer.bias])
    assert torch.equal(out, eager)
    for ours, ref in zip(grads, eager_grads, strict=True):
        assert torch.equal(ours, ref)


def test_export_records_the_backend_in_force() -> None:
    """The backend is read at trace time and recorded as a constant argument of the op."""
    model = nn.Sequential(mbp.Linear(3, 2))
    x = torch.randn(1, 3)

    def recorded_args(backend: str) -> tuple:
        with mbp.use_backend(backend):
            program = torch.export.export(model, (x,))
        node = next(n for n in program.graph.nodes if "linear_forward" in str(n.target))
        return tuple(node.args) + tuple(node.kwargs.values())

    assert "triton" not in recorded_args("torch")  # "torch" is the schema default
    assert recorded_args("triton")[-1] == "triton"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_fullgraph_triton_cuda() -> None:
    torch._dynamo.reset()
    model = _model(torch.float32).cuda()
    x = torch.randn(8, 6, device="cuda", requires_grad=True)
    target = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1], device="cuda")
    with mbp.use_backend("triton"):
        (el, eg), (cl, cg) = _eager_and_compiled(_ce_step, model, x, target)
    assert rel_err(cl, el) <= TOL[torch.float32]
    for ours, ref in zip(cg, eg, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.float32]
    # Compiled graphs on CUDA use the triton_op form; opcheck both it and the opaque op.
    cuda_samples = [
        tuple(a.detach().cuda().requires_grad_() if isinstance(a, Tensor) else a for a in args)
        for args in _linear_samples("triton", torch.float32)
    ]
    for args in cuda_samples:
        torch.library.opcheck(ops.linear_forward, args)
        torch.library.opcheck(ops._triton_forward, args[:-1])
    assert ops._traceable_launchers(), "CUDA graphs should trace the Triton backend as triton_ops"
    # And the compiled graphs launch the kernels themselves (no opaque manualbp op left).
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs: object) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with mbp.use_backend("triton"):
        backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
        _eager_and_compiled(_ce_step, model, x, target, backend=backend)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("triton_kernel_wrapper" in t for t in targets), targets
    assert not any("manualbp.linear" in t for t in targets), targets
