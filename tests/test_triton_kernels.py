"""Triton kernels against float64 native autograd, on CPU under Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, so every kernel here runs
in NumPy on CPU tensors; with MANUALBP_CUDA_TESTS=1 the same tests run the compiled kernels on
the GPU. Every output buffer (and every internal buffer: δ, split partials) is allocated filled
with NaN, so an element a kernel fails to write makes the comparison fail.

Relative error ‖ours − ref‖/‖ref‖ against float64 autograd from the same (rounded) inputs:
float32 ≤ 1e-5, float16 ≤ 2e-3, bfloat16 ≤ 1e-2 (tests/helpers.py: TOL, never loosened).
Shapes are multiples of no block size; each case covers a different (M, N, K) so that every
size of M ∈ {1, 17, 130}, N ∈ {3, 33, 129}, K ∈ {5, 64, 200} appears without the full product.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manualbp.activations import ACTIVATIONS, get_activation

from .helpers import TOL, rel_err, triton_test_device

pytest.importorskip("triton")

from manualbp.triton_kernels import _utils  # noqa: E402
from manualbp.triton_kernels.activations import NAMES, uses_output  # noqa: E402
from manualbp.triton_kernels.delta import linear_delta  # noqa: E402
from manualbp.triton_kernels.linear_forward import linear_forward  # noqa: E402
from manualbp.triton_kernels.linear_grad_input import linear_grad_input  # noqa: E402
from manualbp.triton_kernels.linear_grad_weight import choose_split, linear_grad_weight  # noqa: E402

from manualbp.backends import triton as backend  # noqa: E402

DEVICE, pytestmark = triton_test_device()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (M, N, K, bias, non_contiguous): every size of each dimension appears, bias and layout alternate.
CASES = [
    (1, 33, 200, True, False),
    (17, 3, 64, False, True),
    (130, 129, 5, True, True),
    (17, 129, 200, True, False),
    (130, 3, 200, False, True),
    (1, 129, 64, False, True),
    (130, 33, 64, True, True),
    (17, 33, 5, True, False),
    (1, 3, 5, True, True),
    (130, 129, 200, False, False),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a launcher allocates starts as NaN. On a GPU, also launch each variant with its
    largest config instead of autotuning (one compile per variant, not one per config)."""
    monkeypatch.setenv("MANUALBP_TRITON_AUTOTUNE", "0")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


def _matrix(rows: int, cols: int, dtype: torch.dtype, non_contiguous: bool, scale: float = 1.0):
    """A (rows, cols) tensor in `dtype`; non-contiguous: a transposed view of a strided slice."""
    if non_contiguous:
        t = (torch.randn(cols, 2 * rows, dtype=torch.float64) * scale)[:, ::2].t()
        assert not t.is_contiguous()
    else:
        t = torch.randn(rows, cols, dtype=torch.float64) * scale
    return t.to(dtype).to(DEVICE)


def _native(x, w, b, act, g):
    """Float64 native autograd from the same values: returns (a, z, grad_x, grad_w, grad_b)."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    z = F.linear(x64, w64, b64)
    z.retain_grad()
    a = act.native()(z)
    a.backward(g.double())
    return a.detach(), z.detach(), x64.grad, w64.grad, (b64.grad if b is not None else None)


def _act(name: str):
    return get_activation(name, negative_slope=0.2) if name == "leaky_relu" else get_activation(name)


def test_kernel_ids_match_the_registry():
    assert tuple(ACTIVATIONS) == NAMES
    for i, name in enumerate(NAMES):
        assert get_activation(name).kernel_id == i
        assert get_activation(name).uses_output == uses_output(i), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_backend_layer_parity(name, dtype):
    """Forward and full backward through the backend (δ pass + both GEMMs) against native."""
    i = NAMES.index(name) + 3 * DTYPES.index(dtype)
    M, N, K, has_bias, nc = CASES[i % len(CASES)]
    act = _act(name)
    x = _matrix(M, K, dtype, nc)
    w = _matrix(N, K, dtype, nc, scale=K**-0.5)
    b = _matrix(1, N, dtype, False)[0] if has_bias else None
    g = _matrix(M, N, dtype, nc)

    out, saved = backend.linear_forward(x, w, b, act)
    a_ref, z_ref, gx_ref, gw_ref, gb_ref = _native(x, w, b, act, g)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, a_ref) <= TOL[dtype]
    assert rel_err(saved, a_ref if act.uses_output else z_ref) <= TOL[dtype]
    if act.uses_output:
        assert saved is out

    gi, gw, gb = backend.linear_backward(
        g, x, w, saved, act, need_input=True, need_weight=True, need_bias=has_bias
    )
    assert gi.dtype == gw.dtype == dtype
    assert rel_err(gi, gx_ref) <= TOL[dtype]
    assert rel_err(gw, gw_ref) <= TOL[dtype]
    if has_bias:
        assert rel_err(gb, gb_ref) <= TOL[dtype]
    else:
        assert gb is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("name", "need"),
    [("gelu", "weight"), ("relu", "input"), ("mish", "bias"), ("tanh", "weight+bias")],
)
def test_backend_single_consumer(name, need, dtype):
    """Only some gradients asked for: relu/tanh form δ in the one GEMM's prologue, gelu/mish in
    the δ pass; the bias-only path skips the weight GEMM's dot."""
    M, N, K = 130, 33, 64
    act = _act(name)
    x = _matrix(M, K, dtype, True)
    w = _matrix(N, K, dtype, False, scale=K**-0.5)
    b = _matrix(1, N, dtype, False)[0]
    g = _matrix(M, N, dtype, False)
    _, saved = backend.linear_forward(x, w, b, act)
    _, _, gx_ref, gw_ref, gb_ref = _native(x, w, b, act, g)
    flags = {f"need_{k}": k in need.split("+") for k in ("input", "weight", "bias")}
    gi, gw, gb = backend.linear_backward(g, x, w, saved, act, **flags)
    for got, ref, wanted in ((gi, gx_ref, "input"), (gw, gw_ref, "weight"), (gb, gb_ref, "bias")):
        if wanted in need:
            assert rel_err(got, ref) <= TOL[dtype], wanted
        else:
            assert got is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["identity", "gelu"])
def test_grad_weight_split_k_forced(name, dtype):
    """Split over M (fp32 partials + ordered reduction) matches native and is bitwise repeatable."""
    M, N, K = 200, 33, 129  # 200 rows → ranges of 64 rows: 4, 3 or 2 of them
    act = _act(name)
    x = _matrix(M, K, dtype, True)
    w = _matrix(N, K, dtype, False, scale=K**-0.5)
    b = _matrix(1, N, dtype, False)[0]
    g = _matrix(M, N, dtype, True)
    _, saved = backend.linear_forward(x, w, b, act)
    _, _, _, gw_ref, gb_ref = _native(x, w, b, act, g)
    for split in (1, 3, 4):
        gw, gb = linear_grad_weight(g, x, saved, act.kernel_id, split_k=split)
        assert rel_err(gw, gw_ref) <= TOL[dtype], split
        assert rel_err(gb, gb_ref) <= TOL[dtype], split
    gw2, gb2 = linear_grad_weight(g, x, saved, act.kernel_id, split_k=4)
    assert torch.equal(gw, gw2) and torch.equal(gb, gb2)


def test_split_heuristic(monkeypatch: pytest.MonkeyPatch):
    gpu = torch.device("cuda")
    # Too few rows to split, or already enough output tiles: no split.
    assert choose_split(130, 33, 64, torch.device("cpu")) == 1
    # With 132 SMs: 64 tiles of 128 × 128 → 2 ranges (128 programs fill 97 % of a wave, 3 would
    # fill 73 % of two); 16 tiles → 8 ranges (128 programs); capped by rows / 2048.
    monkeypatch.setattr(_utils, "num_sms", lambda device: 132)
    assert choose_split(65536, 1024, 1024, gpu) == 2
    assert choose_split(65536, 512, 512, gpu) == 8
    assert choose_split(4096, 256, 256, gpu) == 2
    assert choose_split(65536, 4096, 4096, gpu) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("prev", "name"), [("relu", "gelu"), ("gelu", "identity"), ("tanh", "silu"), ("softplus", "leaky_relu")]
)
def test_grad_input_epilogue_fusion(prev, name, dtype):
    """δ⁽ˡ⁻¹⁾ = f′⁽ˡ⁻¹⁾(saved⁽ˡ⁻¹⁾) ⊙ (δ⁽ˡ⁾ W⁽ˡ⁾) in one launch, against two native layers."""
    M, K0, K, N = 17, 5, 129, 33  # layer 1: K0 → K, layer 2: K → N
    act1, act2 = _act(prev), _act(name)
    x0 = _matrix(M, K0, dtype, False)
    w1 = _matrix(K, K0, dtype, False, scale=K0**-0.5)
    w2 = _matrix(N, K, dtype, True, scale=K**-0.5)
    g = _matrix(M, N, dtype, True)
    a1, saved1 = backend.linear_forward(x0, w1, None, act1)
    _, saved2 = backend.linear_forward(a1, w2, None, act2)
    # Native: z1 → a1 → z2 → a2 in float64 from the same 16-bit values of a1's inputs.
    x64, w1_64, w2_64 = x0.double(), w1.double(), w2.double()
    z1 = F.linear(x64, w1_64).requires_grad_()
    a2 = act2.native()(F.linear(act1.native()(z1), w2_64))
    a2.backward(g.double())
    out = linear_grad_input(
        g, w2, saved2, act2.kernel_id, act2.negative_slope,
        prev_act_id=act1.kernel_id, prev_saved=saved1, prev_negative_slope=act1.negative_slope,
    )  # fmt: skip
    assert rel_err(out, z1.grad) <= TOL[dtype]


def test_alloc_hook_writes_exactly_the_view():
    """Outputs may be strided views into a larger buffer (the fused loss writes row blocks of the
    full gradient): every element of the view is written, nothing around it."""
    M, N, K = 17, 33, 64
    g = _matrix(M, N, torch.float16, False)
    w = _matrix(N, K, torch.float16, False, scale=0.125)
    big = torch.full((M + 3, K + 5), float("nan"), dtype=torch.float16, device=DEVICE)
    view = big[1 : 1 + M, 2 : 2 + K]
    out = linear_grad_input(g, w, alloc=lambda shape, dtype, device: view)
    assert out.data_ptr() == view.data_ptr()
    assert rel_err(out, g.double() @ w.double()) <= TOL[torch.float16]
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[1 : 1 + M, 2 : 2 + K] = False
    assert torch.isnan(big[outside]).all()
    with pytest.raises(ValueError, match=r"alloc\(...\) result: got shape \(3, 3\)"):
        linear_grad_input(g, w, alloc=lambda *_: torch.empty(3, 3, dtype=torch.float16, device=DEVICE))


def test_forward_store_z_and_empty_reduction():
    """store_z on an output-derivable activation; K = 0 gives f(b)."""
    x = _matrix(17, 64, torch.float32, False)
    w = _matrix(33, 64, torch.float32, False, scale=0.125)
    a, z = linear_forward(x, w, None, NAMES.index("sigmoid"), store_z=True)
    assert rel_err(z, x.double() @ w.double().t()) <= 1e-5
    assert rel_err(a, torch.sigmoid(z.double())) <= 1e-5
    b = _matrix(1, 33, torch.float32, False)[0]
    a0, _ = linear_forward(x[:, :0], w[:, :0], b, NAMES.index("silu"))
    assert rel_err(a0, F.silu(b.double()).expand(17, 33)) <= 1e-6
    gw, gb = linear_grad_weight(_matrix(17, 33, torch.float32, False), x[:, :0])
    assert gw.shape == (33, 0) and not torch.isnan(gb).any()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # σ(−90), NumPy
@pytest.mark.parametrize("name", NAMES)
def test_activation_extremes(name):
    """f through the forward epilogue and δ through the δ pass at large and tiny |z| (fp32)."""
    act = _act(name)
    zs = torch.tensor(
        [0.0, 1e-6, 1e-4, 0.05, 0.124, 0.126, 0.5, 1.0, 3.0, 8.0, 15.0, 19.9, 20.1, 30.0, 90.0],
        dtype=torch.float64,
    )
    z = torch.cat([zs, -zs]).reshape(2, 15)
    # x @ I = z exactly: the forward GEMM applies f to exactly these values.
    eye = torch.eye(15, dtype=torch.float32, device=DEVICE)
    a, _ = linear_forward(z.float().to(DEVICE), eye, None, act.kernel_id, act.negative_slope)
    z64 = z.clone().requires_grad_()
    a64 = act.native()(z64)
    g = torch.linspace(-2, 2, 30, dtype=torch.float64).reshape(2, 15)
    a64.backward(g)
    assert rel_err(a, a64) <= 1e-6
    saved = a if act.uses_output else z.float().to(DEVICE)
    delta = linear_delta(g.float().to(DEVICE), saved, act.kernel_id, act.negative_slope)
    ok = (delta.double().cpu() - z64.grad).abs() <= 1e-6 + 1e-5 * z64.grad.abs()
    if act.uses_output:
        # f′ from a rounded fp32 output is ill-conditioned where f saturates (tanh(30) == 1).
        ok |= a64.detach().abs() > 0.999
    assert ok.all(), (delta, z64.grad)


def test_relu_and_leaky_nan_inf_semantics():
    """A select, not a multiply: an Inf gradient where a ≤ 0 gives 0, like threshold_backward."""
    a = torch.tensor([[0.0, -0.0, 1.0, float("nan"), 2.0, -1.0]])
    g = torch.tensor([[float("inf"), float("nan"), float("inf"), 1.0, 3.0, float("-inf")]])
    relu = linear_delta(g.to(DEVICE), a.to(DEVICE), NAMES.index("relu"))
    torch.testing.assert_close(relu.cpu(), torch.ops.aten.threshold_backward(g, a, 0.0), equal_nan=True)
    leaky = linear_delta(g.to(DEVICE), a.to(DEVICE), NAMES.index("leaky_relu"), 0.1)
    ref = torch.ops.aten.leaky_relu_backward(g, a, 0.1, True)
    torch.testing.assert_close(leaky.cpu(), ref, equal_nan=True)


def test_backward_is_deterministic():
    act = _act("silu")
    x = _matrix(130, 64, torch.float16, True)
    w = _matrix(33, 64, torch.float16, False, scale=0.125)
    g = _matrix(130, 33, torch.float16, False)
    _, saved = backend.linear_forward(x, w, None, act)
    r1 = backend.linear_backward(g, x, w, saved, act, need_input=True, need_weight=True, need_bias=True)
    r2 = backend.linear_backward(g, x, w, saved, act, need_input=True, need_weight=True, need_bias=True)
    for t1, t2 in zip(r1, r2, strict=True):
        assert torch.equal(t1, t2)


# --- errors: the argument is named, with what was given and what was expected -------------------


def test_launcher_errors():
    x = torch.randn(4, 5, device=DEVICE)
    w = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight: got shape \(3, 6\), expected \(3, 5\)"):
        linear_forward(x, torch.randn(3, 6, device=DEVICE), None, 0)
    with pytest.raises(TypeError, match="weight: got dtype torch.float16, expected torch.float32"):
        linear_forward(x, w.half(), None, 0)
    with pytest.raises(TypeError, match="x: got dtype torch.float64"):
        linear_forward(x.double(), w.double(), None, 0)
    with pytest.raises(ValueError, match="x: got a 3-D tensor"):
        linear_forward(x[None], w, None, 0)
    with pytest.raises(ValueError, match=r"bias: got shape \(4,\), expected \(3,\)"):
        linear_forward(x, w, torch.randn(4, device=DEVICE), 0)
    with pytest.raises(ValueError, match=r"act_id: got 10, expected an id in \[0, 10\)"):
        linear_forward(x, w, None, 10)
    with pytest.raises(TypeError, match="act_id: expected an int"):
        linear_forward(x, w, None, "relu")
    with pytest.raises(ValueError, match="negative_slope: got -0.1"):
        linear_forward(x, w, None, 2, -0.1)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        linear_forward([[1.0]], w, None, 0)
    g = torch.randn(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="saved: got None"):
        linear_grad_input(g, w, None, 5)
    with pytest.raises(ValueError, match="prev_saved: got None"):
        linear_grad_input(g, w, prev_act_id=1)
    with pytest.raises(ValueError, match=r"split_k: got 0, expected None or an int >= 1"):
        linear_grad_weight(g, x, split_k=0)
    with pytest.raises(ValueError, match=r"x: got shape \(5, 5\), expected \(4, 5\)"):
        linear_grad_weight(g, torch.randn(5, 5, device=DEVICE))


def test_backend_rejects_mismatched_registry_entry():
    act = get_activation("relu")
    bad = type("Fake", (), {"name": "relu", "kernel_id": 5, "uses_output": True, "negative_slope": 0.0})()
    x, w = torch.randn(4, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    backend.linear_forward(x, w, None, act)
    with pytest.raises(ValueError, match="kernel_id 5"):
        backend.linear_forward(x, w, None, bad)


def test_is_available():
    assert backend.is_available(DEVICE) == (True, "")
    ok, reason = backend.is_available("meta")
    assert not ok and "meta" in reason


def _kernels_launched(capability, fn, *args, **kwargs) -> list[tuple[str, int | None]]:
    """(kernel name, ACT) of each launch `fn(*args)` makes as on a device of `capability`."""
    with _utils.captured_launches(capability) as launches:
        fn(*args, **kwargs)
    return [(launch.kernel.__name__, launch.kwargs.get("ACT")) for launch in launches]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm90_16bit_prologue_goes_through_the_delta_pass(dtype):
    """On sm_90 a 16-bit δ prologue would serialise the wgmma: the launchers run the δ pass and
    the plain GEMM (ACT = identity) instead; sm_80 and float32 keep the prologue."""
    M, N, K = 130, 33, 64
    relu = NAMES.index("relu")
    g, saved = _matrix(M, N, dtype, False), _matrix(M, N, dtype, False)
    x, w = _matrix(M, K, dtype, False), _matrix(N, K, dtype, False)
    routed = dtype != torch.float32
    for fn, args, name in (
        (linear_grad_input, (g, w, saved, relu), "grad_input_kernel"),
        (linear_grad_weight, (g, x, saved, relu), "grad_weight_kernel"),
    ):
        on_sm90 = _kernels_launched((9, 0), fn, *args)
        assert on_sm90 == ([("delta_kernel", relu), (name, 0)] if routed else [(name, relu)])
        assert _kernels_launched((8, 0), fn, *args) == [(name, relu)]


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_routed_prologue_parity(monkeypatch: pytest.MonkeyPatch, name, dtype):
    """The routed path (δ pass + plain GEMMs, as on sm_90) computes the same gradients."""
    monkeypatch.setattr(_utils, "gemm_capability", lambda device: (9, 0))
    M, N, K = 130, 33, 64
    act = _act(name)
    x = _matrix(M, K, dtype, True)
    w = _matrix(N, K, dtype, False, scale=K**-0.5)
    b = _matrix(1, N, dtype, False)[0]
    g = _matrix(M, N, dtype, False)
    _, saved = backend.linear_forward(x, w, b, act)
    _, _, gx_ref, gw_ref, gb_ref = _native(x, w, b, act, g)
    gi = linear_grad_input(g, w, saved, act.kernel_id, act.negative_slope)
    gw, gb = linear_grad_weight(g, x, saved, act.kernel_id, act.negative_slope)
    assert rel_err(gi, gx_ref) <= TOL[dtype]
    assert rel_err(gw, gw_ref) <= TOL[dtype]
    assert rel_err(gb, gb_ref) <= TOL[dtype]
