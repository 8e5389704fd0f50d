"""MLP as one autograd Function (manualbp.ops.network) against native autograd and the per-layer mode."""

import pytest
import torch
from torch import nn

import manualbp as mbp
from manualbp.activations import get_activation
from manualbp.backends import fast
from manualbp.ops import network, network_fast
from manualbp.ops.network import saved_tensor_bytes

from .helpers import TOL, rel_err

GELU_CLASS = [name for name in mbp.ACTIVATIONS if not get_activation(name).uses_output]


def _sizes(depth: int) -> list[int]:
    # Odd widths, none repeated next to each other, so a transposed operand would fail.
    return [7, 11, 5, 9, 6, 13][: depth + 1]


def _native(model: mbp.MLP, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """The same network from torch.nn modules, with the same parameter values, in `dtype`."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        lin = lin.to(dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        lin.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            lin.bias.requires_grad_(layer.bias.requires_grad)
        mods += [lin, layer.act.native()]
    return nn.Sequential(*mods)


def _linears(native: nn.Sequential) -> list[nn.Linear]:
    return [m for m in native if isinstance(m, nn.Linear)]


def _compare(model, native, x, *, grad_x: bool, dtype) -> None:
    """Forward both, backward one random grad_out; every output element and gradient compared."""
    xs = x.detach().to(dtype).clone().requires_grad_(grad_x)
    x64 = xs.detach().double().clone().requires_grad_(grad_x)
    out, ref = model(xs), native(x64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype]
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for i, (layer, lin) in enumerate(zip(model.layers, _linears(native), strict=True)):
        for name in ("weight", "bias"):
            ours, theirs = getattr(layer, name), getattr(lin, name)
            if ours is None:
                continue
            if not ours.requires_grad:
                assert ours.grad is None, f"frozen layers.{i}.{name} received a gradient"
                continue
            assert ours.grad is not None, f"layers.{i}.{name} received no gradient"
            assert ours.grad.dtype == dtype
            assert rel_err(ours.grad, theirs.grad) <= TOL[dtype], f"layers.{i}.{name}"
    if grad_x:
        assert rel_err(xs.grad, x64.grad) <= TOL[dtype]
    else:
        assert xs.grad is None


def _model(depth, activation, output, bias, dtype, **kw) -> mbp.MLP:
    model = mbp.MLP(_sizes(depth), activation, output, bias=bias, dtype=torch.float64, **kw)
    # Values representable in `dtype`, so only the arithmetic differs from the float64 oracle.
    return model.to(dtype)


def test_fast_path_stops_at_lowest_needed_layer(monkeypatch):
    inputs: list[int] = []
    deltas: list[int] = []
    real_input, real_delta_into = network_fast._layer_input, fast.delta_into

    def spy_input(x, acts, kept, kept_inputs, layer):
        inputs.append(layer)
        return real_input(x, acts, kept, kept_inputs, layer)

    def spy_delta_into(act):
        bound = real_delta_into(act)
        if bound is None:
            return None

        def spy(grad, saved, out):
            deltas.append(grad.shape[1])
            return bound(grad, saved, out)

        return spy

    monkeypatch.setattr(network_fast, "_layer_input", spy_input)
    monkeypatch.setattr(fast, "delta_into", spy_delta_into)  # bound when the model's plan is made
    model = mbp.MLP([7, 11, 5, 9, 6], "gelu", dtype=torch.float64)
    model.layers[0].requires_grad_(False)
    model.layers[1].requires_grad_(False)
    model(torch.randn(4, 7, dtype=torch.float64)).sum().backward()
    # Weight gradients of layers 3 and 2 only; one δ formed below the top (δ² = f′ ⊙ δ³W³).
    assert inputs == [3, 2]
    assert deltas == [9]
    assert all(p.grad is None for p in model.layers[:2].parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("activation", mbp.ACTIVATIONS)
def test_parity_with_native(activation, depth, bias, dtype):
    # The output activation alternates so both an identity and a non-identity last layer are seen.
    output = "identity" if depth % 2 else activation
    model = _model(depth, activation, output, bias, dtype)
    native = _native(model)
    x = torch.randn(3, 4, 7).to(dtype)  # 3-D input: rows are the leading dimensions
    _compare(model, native, x, grad_x=depth % 2 == 1, dtype=dtype)


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid", "mish"])
@pytest.mark.parametrize("frozen", [(0,), (1,), (0, 1), (2,), (1, 2)])
def test_frozen_parameters(activation, frozen):
    """Only parameters that require grad get one; the loop stops at the lowest one needed."""
    model = _model(4, activation, "identity", True, torch.float64)
    for i in frozen:
        model.layers[i].requires_grad_(False)
    model.layers[3].bias.requires_grad_(False)  # a weight wanted without its bias
    native = _native(model)
    _compare(model, native, torch.randn(10, 7, dtype=torch.float64), grad_x=False,
             dtype=torch.float64)  # fmt: skip


def test_backward_stops_at_lowest_needed_layer(monkeypatch):
    # The reference loop (the CPU fast path off); test_fast_path_stops_at_lowest_needed_layer
    # holds the fast sweep to the same.
    monkeypatch.setattr(fast, "network_ok", lambda x: False)
    calls: list[tuple[int, bool]] = []
    real = network.reference_step

    def spy(grad, x, weight, *args, **kw):
        calls.append((weight.shape[1], kw["need_prev"]))
        return real(grad, x, weight, *args, **kw)

    monkeypatch.setattr(network, "reference_step", spy)
    model = mbp.MLP([7, 11, 5, 9, 6], "gelu", dtype=torch.float64)
    model.layers[0].requires_grad_(False)
    model.layers[1].requires_grad_(False)
    model(torch.randn(4, 7, dtype=torch.float64)).sum().backward()
    # Layers 3 and 2 (in_features 9 and 5) run; only layer 3 forms a δ for the layer below.
    assert calls == [(9, True), (5, False)]
    assert all(p.grad is None for p in model.layers[:2].parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", mbp.ACTIVATIONS)
def test_network_equals_layers(activation, dtype):
    """Same operations in the same order: bitwise equal to the per-layer mode (reference backend)."""
    net = _model(4, activation, "tanh", True, dtype)
    layers = _model(4, activation, "tanh", True, dtype, mode="layers")
    layers.load_state_dict(net.state_dict())
    x = torch.randn(5, 2, 7, dtype=dtype)
    results = []
    for model in (net, layers):
        xs = x.clone().requires_grad_()
        out = model(xs)
        out.backward(torch.ones_like(out))
        results.append([out, xs.grad, *(p.grad for p in model.parameters())])
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu"])
def test_parity_16bit(activation, dtype):
    model = _model(3, activation, "identity", True, dtype)
    _compare(model, _native(model), torch.randn(33, 7), grad_x=True, dtype=dtype)


def test_gradcheck():
    model = _model(3, "gelu", "sigmoid", True, torch.float64)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())

    def fn(x, *ps):
        return network.mlp_network(
            x, ps[0::2], ps[1::2], [layer.act for layer in model.layers],
            backend=mbp.backends.reference,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (x, *params))


# ------------------------------------------------------------------------------ memory


def _saved(model, x) -> network.SavedBytes:
    return saved_tensor_bytes(lambda: model(x), exclude=[x, *model.parameters()])


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize("output", ["identity", "same"])
@pytest.mark.parametrize("activation", mbp.ACTIVATIONS)
def test_saved_bytes_against_native(activation, output, depth):
    """One (M × width) tensor per layer — two (z and a, as native) for GELU-class hidden layers
    on the CPU fast path —, and never more than native: ≤ 0.5× native for leaky_relu."""
    width, rows = 16, 12
    sizes = [width] * (depth + 1)
    output = activation if output == "same" else output
    model = mbp.MLP(sizes, activation, output)
    native = _native(model, torch.float32)
    x = torch.randn(rows, width)
    ours = _saved(model, x)
    theirs = saved_tensor_bytes(lambda: native(x), exclude=[x, *native.parameters()])
    layer_bytes = rows * width * 4
    # Structural: per hidden layer its a (or z and a), the last layer its tensor f′ reads,
    # except an identity last layer, which keeps none.
    kept = (depth - 1) * (2 if activation in GELU_CLASS else 1) + (output != "identity")
    assert ours.count == kept and ours.total == kept * layer_bytes
    assert all(size == layer_bytes for size in ours.storages.values())
    if output == "identity":
        bound = 0.5 if activation == "leaky_relu" else 1.0
        assert ours.total <= bound * theirs.total
    else:
        assert ours.total <= theirs.total


@pytest.mark.parametrize("activation", ["relu", "gelu", "softplus"])
def test_recompute(activation):
    """recompute=True: bitwise the same gradients, and nothing activation-sized is kept."""
    model = mbp.MLP([7, 11, 5, 9, 3], activation, "sigmoid", dtype=torch.float64)
    again = mbp.MLP([7, 11, 5, 9, 3], activation, "sigmoid", dtype=torch.float64, recompute=True)
    again.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 7, dtype=torch.float64)
    grads = []
    for m in (model, again):
        xs = x.clone().requires_grad_()
        m(xs).square().sum().backward()
        grads.append([xs.grad, *(p.grad for p in m.parameters())])
    for ours, theirs in zip(*grads, strict=True):
        assert torch.equal(ours, theirs)
    assert _saved(again, x).count == 0
    assert _saved(model, x).count == (7 if activation in GELU_CLASS else 4)  # + a next to z


def test_no_grad_keeps_nothing():
    model = mbp.MLP([7, 11, 3], "gelu")
    with torch.no_grad():
        assert _saved(model, torch.randn(4, 7)).count == 0


# ------------------------------------------------------------------------------ module API


def test_state_dict_keys_and_modes():
    model = mbp.MLP([4, 5, 3], "relu", bias=True)
    assert list(model.state_dict()) == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
    ]  # fmt: skip
    assert "mode=layers" in repr(mbp.MLP([4, 3], mode="layers"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        mbp.MLP([4, 3], mode="fuse")
    with pytest.raises(ValueError, match="recompute"):
        mbp.MLP([4, 3], mode="layers", recompute=True)
    with pytest.raises(TypeError, match="recompute"):
        mbp.MLP([4, 3], recompute=1)
    model = mbp.MLP([4, 3])
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(2, 5))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        model([1.0, 2.0, 3.0, 4.0])


# ------------------------------------------------------------------------------ Triton backend


@pytest.mark.parametrize(
    "activation,dtype",
    [("relu", torch.float32), ("gelu", torch.float32), ("leaky_relu", torch.float32),
     ("silu", torch.float16), ("tanh", torch.float16)],
)  # fmt: skip
def test_triton_interpreter_parity(activation, dtype):
    # No bfloat16 case here yet: under the interpreter the layer kernels' float32 → bfloat16
    # stores truncate instead of rounding, which puts a 3-layer network just over the 1e-2 bound
    # (the per-layer mode further still); the loss kernel rounds (test_fused_loss.py covers it).
    model = _model(3, activation, "sigmoid", True, dtype)
    with mbp.use_backend("triton"):
        _compare(model, _native(model), torch.randn(2, 19, 7), grad_x=True, dtype=dtype)


def test_triton_forms_delta_in_the_epilogue(monkeypatch):
    """Inner layers hand δ down through the input-gradient GEMM's epilogue (prev_act_id ≠ 0)."""
    from manualbp.triton_kernels import linear_grad_input as gin

    calls = []
    real = gin.linear_grad_input

    def spy(grad_out, weight, saved=None, act_id=0, *args, **kw):
        calls.append((weight.shape[1], act_id, kw.get("prev_act_id", 0)))
        return real(grad_out, weight, saved, act_id, *args, **kw)

    monkeypatch.setattr(gin, "linear_grad_input", spy)
    model = mbp.MLP([7, 11, 5, 3], "gelu", "identity")
    x = torch.randn(4, 7)
    with mbp.use_backend("triton"):
        model(x).sum().backward()  # x needs no gradient: layer 0 forms no input gradient
    gelu = get_activation("gelu").kernel_id
    assert calls == [(5, 0, gelu), (11, 0, gelu)]


def test_autocast():
    """Under torch.autocast the stack computes in the autocast dtype, as nn.Linear layers do."""
    model = mbp.MLP(_sizes(3), "gelu", "identity").to(torch.bfloat16).float()  # bf16 values
    native = _native(model)
    x = torch.randn(8, 7).bfloat16().float().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    ref = native(x64)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= TOL[torch.bfloat16]
    out.float().sum().backward()
    ref.sum().backward()
    assert x.grad.dtype == torch.float32
    for ours, theirs in zip(model.parameters(), native.parameters(), strict=True):
        assert rel_err(ours.grad, theirs.grad) <= TOL[torch.bfloat16]
    assert rel_err(x.grad, x64.grad) <= TOL[torch.bfloat16]


def _peak_bytes(step) -> int:
    """Highest CPU memory in use above the start while `step()` runs (profiler alloc events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def test_peak_memory_not_above_native():
    """Forward + backward peak ≤ native's for a relu MLP (rows ≫ width: activations dominate).

    Guards against allocations that scale with the kept tensors, e.g. autograd zero-filling a
    gradient for each non-differentiable kept output at the start of backward (+4 × M × width
    here). GELU-class activations are not compared: the reference backend's f′ is a chain of
    torch ops whose temporaries are larger than native's fused GeluBackward kernel.
    """
    model = mbp.MLP([32] * 5, "relu")
    native = _native(model, torch.float32)
    x = torch.randn(1024, 32)
    peaks = []
    for m in (native, model):
        m(x).square().mean().backward()  # warm-up
        m.zero_grad(set_to_none=True)
        peaks.append(_peak_bytes(lambda m=m: m(x).square().mean().backward()))
    assert peaks[1] <= peaks[0]
