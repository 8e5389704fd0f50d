"""`MLP(mode="fused")` (manualbp.ops.fused_mlp on manualbp.triton_kernels.fused_mlp) against float64
native autograd (nn.Linear + the torch activation modules) from the same rounded values, under
Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1; with MANUALBP_CUDA_TESTS=1
they run compiled on a GPU).

Every buffer a launcher allocates starts as NaN, so an element a kernel does not write fails the
comparison. Row counts are multiples of no block size; widths differ per layer (padded inside the
kernels); bf16 goes through the `upcast` helper. Tolerances are tests/helpers.py's TOL.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

import manualbp as mbp

from .helpers import TOL, rel_err, triton_test_device
from .processes import run_bounded

pytest.importorskip("triton")

from manualbp.triton_kernels import _utils, fused_mlp, fused_mlp_acc  # noqa: E402

DEVICE, pytestmark = triton_test_device()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ACTS = list(mbp.ACTIVATIONS)


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


@pytest.fixture(params=["split", "accumulate"])
def backward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Each backward path on every stack: the split one (δ sweep, weight-gradient loop) and the
    accumulating sweep (forced here beyond the sizes `fused_mlp_acc.fits` takes on a GPU: the
    arithmetic does not depend on them); 3 "SMs", so several programs' partials are reduced
    and a program may get tiles past the last row. Checks that the path ran."""
    monkeypatch.setattr(_utils, "num_sms", lambda device: 3)
    monkeypatch.setattr(fused_mlp_acc, "fits", lambda plan, *_: request.param == "accumulate")
    module, name = (fused_mlp, "mlp_backward") if request.param == "split" else (
        fused_mlp_acc, "mlp_backward_accumulated")
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    yield request.param
    assert calls, f"the {request.param} backward did not run"


def _native(model: mbp.MLP) -> nn.Sequential:
    """The same network in float64 native modules, from the model's (rounded) parameters."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        bias = layer.bias is not None
        lin = nn.Linear(layer.in_features, layer.out_features, bias=bias, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(layer.weight.double())
            if layer.bias is not None:
                lin.bias.copy_(layer.bias.double())
        mods += [lin, layer.act.native()]
    return nn.Sequential(*mods).to(DEVICE)


def _run(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """[output, ∇x, ∇ of every parameter] after one backward of <output, g>."""
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    out = model(xi)
    out.backward(g.to(out.dtype))
    grads = [p.grad for p in model.parameters()]
    assert xi.grad is not None and all(q is not None for q in grads)
    return [out.detach(), xi.grad, *grads]  # type: ignore[list-item]


def _check(model: mbp.MLP, x: torch.Tensor, dtype: torch.dtype, native_too: bool = True) -> None:
    """Output, input gradient and every parameter's gradient against native float64 autograd
    (`native_too`) and against network mode in the same dtype (the same roundings)."""
    g = torch.randn(*x.shape[:-1], model.sizes[-1], dtype=torch.float64, device=DEVICE)
    ours = _run(model, x, g.to(dtype))
    assert ours[0].dtype == dtype and all(t.dtype == dtype for t in ours)
    network = mbp.MLP(model.sizes, dtype=dtype, bias=model.layers[0].bias is not None).to(DEVICE)
    for a, b in zip(network.layers, model.layers, strict=True):
        a.act = b.act
    network.load_state_dict(model.state_dict())
    refs = [_run(network, x, g.to(dtype))]
    if native_too:
        refs.append(_run(_native(model), x.double(), g))
    for ref in refs:
        assert len(ours) == len(ref)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            assert a.shape == b.shape and rel_err(a, b) <= TOL[dtype], (i, rel_err(a, b))


def _model(sizes, act, out_act, dtype, bias=True, recompute=False, **kw) -> mbp.MLP:
    model = mbp.MLP(sizes, act, out_act, bias=bias, dtype=dtype, mode="fused", recompute=recompute, **kw)
    return model.to(DEVICE)


# float32 on both backward paths, each 16-bit dtype on one (test_recompute_and_no_bias runs
# every dtype on both).
PATH_CASES = [(torch.float32, "split"), (torch.float32, "accumulate"), (torch.float16, "split"),
              (torch.bfloat16, "accumulate")]  # fmt: skip


@pytest.mark.parametrize(("dtype", "backward_path"), PATH_CASES, indirect=["backward_path"],
                         ids=["fp32-split", "fp32-acc", "fp16-split", "bf16-acc"])  # fmt: skip
@pytest.mark.parametrize("name", ACTS)
def test_every_activation_and_dtype(name: str, dtype: torch.dtype, backward_path: str) -> None:
    """Hidden and output activation `name` (the last layer keeps its own a or z), widths that
    differ per layer, 37 rows; bias on for half the cases. A relu-class output in 16 bits is
    compared with network mode only: a kink whose pre-activation is within a rounding of 0
    flips a whole row of δ against float64 (network and layers mode differ from float64 as
    much there), so float64 native is the oracle for the smooth outputs and every float32."""
    i = ACTS.index(name) + DTYPES.index(dtype)
    kw = {"negative_slope": 0.2} if name == "leaky_relu" else {}
    model = _model([5, 32, 17, 3], name, name, dtype, bias=i % 2 == 0, **kw)
    kinked = name in ("relu", "leaky_relu") and dtype != torch.float32
    _check(model, torch.randn(37, 5, device=DEVICE).to(dtype), dtype, native_too=not kinked)


@pytest.mark.parametrize("rows", [1, 37, 130])
@pytest.mark.parametrize("depth", [1, 4])
def test_rows_and_depth(rows: int, depth: int, backward_path: str) -> None:
    """Odd row counts (a masked tail in every kernel), a single layer and a deeper stack with
    an identity output layer (nothing kept for it)."""
    sizes = [2] + [24] * (depth - 1) + [3]
    model = _model(sizes, "gelu", "identity", torch.float32)
    _check(model, torch.randn(rows, 2, device=DEVICE), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_and_no_bias(recompute: bool, dtype: torch.dtype, backward_path: str) -> None:
    model = _model([7, 40, 40, 64, 1], "silu", "sigmoid", dtype, bias=False, recompute=recompute)
    _check(model, torch.randn(45, 7, device=DEVICE).to(dtype), dtype)


@pytest.mark.parametrize("backward_path", ["split"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_gradient_of_narrow_output_layers(
    dtype: torch.dtype, backward_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers whose output pads to under 64 and whose input does not (128 → 20 and the
    coordinate net's 70 → 1 output) take the weight-gradient loop's transposed dot h_lᵀ δ_l,
    stored back as (out, in), reading δ_l with its padded columns (which the δ sweep writes as
    zeros: NaN-poisoned buffers would show a column it left out); the others δ_lᵀ h_l."""
    real, seen = fused_mlp.grad_weight_transposed, []
    monkeypatch.setattr(fused_mlp, "grad_weight_transposed", lambda pad: seen.append(real(pad)) or seen[-1])
    model = _model([3, 128, 20, 70, 1], "tanh", "identity", dtype)
    _check(model, torch.randn(37, 3, device=DEVICE).to(dtype), dtype)
    assert seen and set(seen) == {(False, True, False, True)}


def test_recompute_keeps_only_the_input() -> None:
    from manualbp.ops.network import saved_tensor_bytes

    x = torch.randn(50, 6, device=DEVICE)
    kept = {}
    for recompute in (False, True):
        model = _model([6, 32, 32, 2], "gelu", "identity", torch.float32, recompute=recompute)
        saved = saved_tensor_bytes(lambda m=model: m(x), exclude=[x, *model.parameters()])
        kept[recompute] = saved.total
    assert kept[True] == 0 and kept[False] == 2 * 50 * 32 * 4  # z of both gelu layers


def test_leading_dims_and_non_contiguous_input(backward_path: str) -> None:
    model = _model([6, 16, 5], "tanh", "identity", torch.float32)
    x = torch.randn(3, 9, 12, device=DEVICE)[..., ::2]
    assert not x.is_contiguous()
    _check(model, x, torch.float32)


def _check_frozen_layer_and_reruns(model: mbp.MLP, frozen: int) -> None:
    """Layer `frozen` without grad and an input without grad: every other parameter matches
    float64 native, and two backward passes give bitwise-identical gradients (no atomics)."""
    model.layers[frozen].requires_grad_(False)
    x = torch.randn(70, model.sizes[0], device=DEVICE)
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(p.grad is None for p in model.layers[frozen].parameters())
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    native = _native(model)
    native(x.double()).square().sum().backward()
    refs = [p.grad for i, p in enumerate(native.parameters()) if i // 2 != frozen]
    assert len(refs) == len(grads[0])
    for ours, ref in zip(grads[0], refs, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.float32]


def test_only_some_gradients_and_determinism(backward_path: str) -> None:
    """A frozen first layer and an input without grad: the others still match; two backward
    passes give bitwise-identical gradients (no atomics)."""
    _check_frozen_layer_and_reruns(_model([4, 20, 20, 3], "relu", "identity", torch.float32), 0)


def test_create_graph_second_order() -> None:
    """A backward with grad mode on is differentiable (network mode's reference loop)."""
    model = _model([3, 16, 1], "tanh", "identity", torch.float32)
    native = _native(model)
    x = torch.randn(9, 3, device=DEVICE)
    results = []
    for net, dt in ((model, torch.float32), (native, torch.float64)):
        xi = x.to(dt).requires_grad_()
        (gx,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        params = list(net.parameters())
        second = torch.autograd.grad(gx.square().sum(), [xi, *params], materialize_grads=True)
        results.append((gx, *second))
    for ours, ref in zip(*results, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.float32]


def test_accumulating_path_is_taken_for_small_stacks() -> None:
    """Which stacks a launch gives the accumulating sweep (the AOT-clean ones; the group sizes
    are tests/test_fused_mlp_groups.py's)."""
    from manualbp.triton_kernels.activations import ACTIVATION_IDS as ids

    def plan(sizes, act):
        depth = len(sizes) - 1
        return fused_mlp.Plan(sizes, [ids[act]] * (depth - 1) + [0], [0.01] * depth, [True] * depth)

    for capability in ((9, 0), (8, 0)):
        assert fused_mlp_acc.fits(plan([2, 64, 3], "sigmoid"), capability)
        assert fused_mlp_acc.fits(plan([2] + [64] * 3 + [3], "tanh"), capability)
        assert not fused_mlp_acc.fits(plan([2, 128, 3], "tanh"), capability)  # 16384 accumulators
        assert not fused_mlp_acc.fits(plan([32, 32, 32], "mish"), capability)


def test_functional_entry_matches_module() -> None:
    model = _model([5, 16, 2], "mish", "identity", torch.float32)
    x = torch.randn(11, 5, device=DEVICE)
    layers = list(model.layers)
    out = mbp.functional.fused_mlp(x, [m.weight for m in layers], [m.bias for m in layers],
                                   [m.act for m in layers])  # fmt: skip
    assert torch.equal(out, model(x))


@pytest.mark.parametrize(
    ("sizes", "match"),
    [([4, 129, 2], "wider than 128"), ([4] + [16] * 9, "1 to 8"), ([200, 8], "wider than 128")],
)
def test_sizes_it_cannot_run(sizes: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        mbp.MLP(sizes, mode="fused")
    assert "mode='network'" in str(err.value)


def test_float64_is_a_clear_error() -> None:
    model = _model([4, 8, 2], "relu", "identity", torch.float64)
    with pytest.raises(TypeError, match="float64.*mode='network'"):
        model(torch.randn(3, 4, dtype=torch.float64, device=DEVICE))


def test_default_mode_is_network() -> None:
    assert mbp.MLP([4, 8, 2]).mode == "network"
    assert "mode=fused" in repr(mbp.MLP([4, 8, 2], mode="fused"))


def test_cpu_without_the_interpreter_is_a_clear_error() -> None:
    code = (
        "import torch, manualbp as mbp\n"
        "m = mbp.MLP([2, 16, 1], mode='fused')\n"
        "try:\n    m(torch.randn(3, 2))\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_bounded([sys.executable, "-c", code], idle_timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERR mode='fused'" in proc.stdout and "TRITON_INTERPRET" in proc.stdout
    assert "mode='network'" in proc.stdout


def test_neural_field_example_trains_like_network_mode() -> None:
    """experiments/neural_field.py at a tiny size: the fused fit learns (the loss falls, the
    PSNR rises) and follows network mode's loss curve from the same seed to rounding."""
    from experiments.neural_field import fit

    kw = dict(size=8, steps=12, width=16, depth=3, frequencies=2, lr=5e-2, device=DEVICE.type)
    fused, network = fit(mode="fused", **kw), fit(mode="network", **kw)  # type: ignore[arg-type]
    assert len(fused.losses) == 12 and fused.losses[-1] < 0.7 * fused.losses[0]
    assert fused.psnr > 10 * math.log10(1 / fused.losses[0])
    for ours, ref in zip(fused.losses, network.losses, strict=True):
        assert abs(ours - ref) <= 1e-4 * ref


def test_retain_graph_and_in_place_on_the_output() -> None:
    """A retained graph backpropagates twice to the same gradients; modifying the output that
    backward reads (a sigmoid output layer keeps its a) in place is caught, not used."""
    model = _model([4, 16, 3], "tanh", "sigmoid", torch.float32)
    x = torch.randn(21, 4, device=DEVICE)
    out = model(x)
    out.sum().backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out.sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters(), strict=True))
    out = model(x)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_autocast_runs_in_the_autocast_dtype() -> None:
    """Under torch.autocast a float32 model computes in bfloat16, as network mode does there;
    the gradients arrive in float32."""
    x = torch.randn(19, 5, device=DEVICE)
    results = []
    for mode in ("fused", "network"):
        torch.manual_seed(3)
        model = mbp.MLP([5, 16, 2], "silu", mode=mode).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        results.append([out, *(p.grad for p in model.parameters())])
    for ours, ref in zip(*results, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.bfloat16]
