"""The reference backend's first-order fast path (manualbp.backends.fast) against the oracle.

The fast δ runs ATen's own activation-backward kernels; the registry's hand-written f′ stays the
documented oracle. Here every kernel is held to the oracle, edge values (±Inf, NaN, the
thresholds) included, and the network-mode workspace and early release are checked for what
they promise: no buffer handed out, bounded, safe under threads, the graph kept when asked.
"""

import copy
import pickle
import threading

import pytest
import torch

import manualbp as mbp
from manualbp.activations import get_activation
from manualbp.backends import fast, reference

ACTS = [a for a in mbp.ACTIVATIONS]
EDGES = [0.0, -0.0, 1.0, -1.0, 20.0, 20.5, 19.5, -20.0, 1e-30, -1e-30, 40.0, -40.0,
         float("inf"), float("-inf"), float("nan")]  # fmt: skip


def _saved(act, z):
    return act(z) if act.uses_output else z


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ACTS)
def test_fast_delta_equals_oracle(name, dtype):
    act = get_activation(name)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(37, 19, generator=gen, dtype=dtype) * 4
    grad = torch.randn(37, 19, generator=gen, dtype=dtype)
    saved = _saved(act, z)
    want = act.delta(grad, saved)
    got = fast.delta(act, grad, saved)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    out = torch.empty_like(grad)
    assert fast.delta(act, grad, saved, out) is out
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    inplace = grad.clone()  # the sweep writes δ over the GEMM's result
    fast.delta(act, inplace, saved, inplace)
    torch.testing.assert_close(inplace, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ACTS)
def test_bound_delta_equals_oracle(name, dtype):
    """The sweep's bound δ kernels (fast.delta_into), written over the gradient as the sweep does."""
    act = get_activation(name)
    bound = fast.delta_into(act)
    if name == "identity":
        assert bound is None  # the sweep uses the gradient itself
        return
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(23, 17, generator=gen, dtype=torch.float64) * 4).to(dtype)
    grad = torch.randn(23, 17, generator=gen, dtype=torch.float64).to(dtype)
    saved = _saved(act, z)
    want = act.delta(grad.double(), saved.double())  # the oracle in float64 on the same values
    inplace = grad.clone()
    assert bound(inplace, saved, inplace) is inplace
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(inplace.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ACTS)
def test_fast_delta_edge_values(name):
    """NaN/Inf/threshold semantics: where the oracle is NaN, Inf or exactly 0, so is the kernel."""
    act = get_activation(name)
    values = torch.tensor(EDGES, dtype=torch.float64)
    z = values.repeat_interleave(len(EDGES))
    grad = values.repeat(len(EDGES))
    saved = _saved(act, z)
    want = act.delta(grad, saved)
    got = fast.delta(act, grad, saved)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ACTS)
def test_fast_layer_equals_reference(name):
    act = get_activation(name)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    g = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    a_ref, s_ref = reference.linear_forward(x, w, b, act)
    a, s = fast.linear_forward(x, w, b, act)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)
    flags = dict(need_input=True, need_weight=True, need_bias=True)
    for got, want in zip(
        fast.linear_backward(g, x, w, s, act, **flags),
        reference.linear_backward(g, x, w, s_ref, act, **flags),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


def test_workspace_reused_and_never_handed_out():
    # δ temporaries of 256 KiB and more reuse buffers (smaller ones are allocated fresh).
    model = mbp.MLP([6, 256, 256, 3], "gelu", dtype=torch.float64)
    x = torch.randn(128, 6, dtype=torch.float64)
    first = _grads(model, x)
    held = model._workspace.nbytes
    assert held > 0  # the sweep gave its δ buffers back
    buffers = {b.data_ptr() for b in model._workspace._free}
    second = _grads(model, x)
    assert {b.data_ptr() for b in model._workspace._free} == buffers  # reused, not reallocated
    assert model._workspace.nbytes == held
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
        assert a.untyped_storage().data_ptr() not in buffers
    # Copies and pickles of the module start with an empty workspace.
    assert copy.deepcopy(model)._workspace.nbytes == 0
    assert pickle.loads(pickle.dumps(model))._workspace.nbytes == 0


def test_workspace_bounded():
    ws = fast.Workspace(max_buffers=2)
    like = torch.empty(0)
    bufs = [ws.take(n, like) for n in (3, 5, 7)]
    for b in bufs:
        ws.give(b)
    assert sorted(b.numel() for b in ws._free) == [5, 7]
    assert ws.take(6, like).numel() == 7


@pytest.mark.parametrize("width, rows", [(16, 12), (256, 128)])  # the second: workspace in use
def test_threads_share_a_module(width, rows):
    model = mbp.MLP([6, width, width, 3], "relu", dtype=torch.float64)
    xs = [torch.randn(rows, 6, dtype=torch.float64) for _ in range(4)]

    def grads_of(x):
        params = list(model.parameters())
        return torch.autograd.grad(model(x).square().sum(), params)

    want = [grads_of(x) for x in xs]
    got: list = [None] * len(xs)

    def work(i):
        for _ in range(20):
            got[i] = grads_of(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            assert torch.equal(a, b)


def test_retain_graph_keeps_the_kept_tensors():
    model = mbp.MLP([6, 8, 8, 3], "gelu", dtype=torch.float64)
    x = torch.randn(10, 6, dtype=torch.float64)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for a, p in zip(once, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * a)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_workspace_lent_to_forward_stays_with_its_graph():
    """Layer 0's kept tensor lives in the workspace buffer (256 KiB here): a second forward
    before the backward, or a retained graph while other steps run, must not share it."""
    model = mbp.MLP([6, 256, 256, 3], "gelu", dtype=torch.float64)
    layers = mbp.MLP([6, 256, 256, 3], "gelu", dtype=torch.float64, mode="layers")
    layers.load_state_dict(model.state_dict())
    x1, x2, x3 = (torch.randn(128, 6, dtype=torch.float64) for _ in range(3))

    def grads(m, *steps):
        m.zero_grad(set_to_none=True)
        for step in steps:
            step(m)
        return [p.grad.clone() for p in m.parameters()]

    def two_forwards(m):
        (m(x1).square().sum() + m(x2).sin().sum()).backward()

    def retained(m):
        loss = m(x1).square().sum()
        loss.backward(retain_graph=True)
        m(x2).sin().sum().backward()  # takes and gives back the workspace's buffer
        m(x3).cos().sum().backward()
        loss.backward()

    def hooked(m):  # saved-tensor hooks see every kept tensor; none is the workspace's
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = m(x1).square().sum()
        m(x2).sin().sum().backward()
        loss.backward()

    for step in (two_forwards, retained, hooked):
        for a, b in zip(grads(model, step), grads(layers, step), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert model._workspace.nbytes == 128 * 256 * 8  # bounded: one buffer held


def test_in_place_change_of_the_output_is_caught():
    model = mbp.MLP([6, 8, 3], "relu", output_activation="sigmoid", dtype=torch.float64)
    out = model(torch.randn(4, 6, dtype=torch.float64))
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("name", ["identity", "relu", "gelu", "tanh"])
def test_layer_module_fast_node_matches_native(name):
    """LinearAct/Linear on the CPU fast path (manualbp.ops.linear_fast): first and second order
    and forward-mode tangents equal native autograd's in float64."""
    torch.manual_seed(0)
    layer = mbp.LinearAct(5, 4, name, dtype=torch.float64)
    lin = torch.nn.Linear(5, 4, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(layer.weight)
        lin.bias.copy_(layer.bias)
    native = torch.nn.Sequential(lin, get_activation(name).native())
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    node = out.grad_fn.next_functions[0][0]  # behind the view restoring the leading dims
    assert type(node).__name__ == "FastLinearActFunctionBackward"
    ref = native(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ours = torch.autograd.grad(out.sin().sum(), [x, *layer.parameters()], create_graph=True)
    theirs = torch.autograd.grad(ref.sin().sum(), [x, *native.parameters()], create_graph=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    second = torch.autograd.grad(ours[0].square().sum(), x)[0]  # through the differentiable backward
    torch.testing.assert_close(second, torch.autograd.grad(theirs[0].square().sum(), x)[0],
                               rtol=1e-10, atol=1e-12)  # fmt: skip
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(layer(fwAD.make_dual(x.detach(), tangent))).tangent
        want = fwAD.unpack_dual(native(fwAD.make_dual(x.detach(), tangent))).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
