"""Edge values: empty batches, NaN and ±Inf, and magnitudes at the ends of the 16-bit ranges.

The oracle is native autograd (`F.linear` + the torch activation, `F.cross_entropy`, `F.mse_loss`):

* an empty batch (M = 0) gives an empty output and all-zero parameter gradients, as native;
* NaN and ±Inf land exactly where native autograd puts them — every output and gradient element's
  class (NaN, +Inf, −Inf, finite) is compared with native autograd in the same dtype (one
  documented exception: GELU at +Inf, where PyTorch's own CPU kernels disagree with each other),
  and in float32/float64 the finite elements are compared with native float64 autograd at the
  per-dtype tolerance;
* float16/bfloat16 accumulate in float32: sums whose partial sums overflow float16, or lose every
  small term in bfloat16, still come out right; results that do overflow the storage dtype are
  Inf exactly where native's are; and each 16-bit result is the float32 value rounded once, to
  nearest-even, as native's.

Triton cases run under the interpreter on CPU tensors, so shapes stay tiny.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import manualbp as mbp
from manualbp.functional import cross_entropy, linear, mse_loss
from tests.helpers import TOL, native_linear_act, rel_err

# NumPy's overflow/invalid warnings from the interpreter are the point of these cases.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

BACKENDS = ["torch", "triton"]
FLOATS = {
    "torch": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float16, torch.bfloat16],  # the kernels take no float64
}
INF, NAN = float("inf"), float("nan")


def _leaves(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run_linear(
    fn: Callable[..., Tensor], x: Tensor, w: Tensor, b: Tensor | None, grad_out: Tensor, *args: object
) -> list[Tensor]:
    """Output and every gradient of one forward/backward through `fn(x, w, b, *args)`."""
    x, w, b = _leaves(x, w, b)
    out = fn(x, w, b, *args)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in (x, w, b) if t is not None]


# ------------------------------------------------------------------------------- empty batch

MODELS = {
    "Linear": lambda dt: mbp.Linear(5, 3, dtype=dt),
    "LinearAct gelu": lambda dt: mbp.LinearAct(5, 3, "gelu", dtype=dt),
    "MLP network": lambda dt: mbp.MLP([5, 4, 3], "silu", "sigmoid", dtype=dt),
    "MLP layers": lambda dt: mbp.MLP([5, 4, 3], "relu", mode="layers", dtype=dt),
    "MLP recompute": lambda dt: mbp.MLP([5, 4, 3], "mish", recompute=True, dtype=dt),
}


def _native_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same model out of nn.Linear and the torch activations, sharing nothing."""
    layers = model.layers if isinstance(model, mbp.MLP) else [model]
    native: list[torch.nn.Module] = []
    for layer in layers:
        linear_ = torch.nn.Linear(layer.in_features, layer.out_features, dtype=layer.weight.dtype)
        linear_.load_state_dict(layer.state_dict())
        native += [linear_, layer.act.native()] if hasattr(layer, "act") else [linear_]
    return torch.nn.Sequential(*native)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2)], ids=["M=0", "3x0", "0x2"])
def test_empty_batch_like_native(backend: str, model_name: str, lead: tuple[int, ...]) -> None:
    dtype = torch.float32
    model = MODELS[model_name](dtype)
    native = _native_twin(model)
    x = torch.randn(*lead, 5, dtype=dtype, requires_grad=True)
    x_native = x.detach().clone().requires_grad_(True)
    with mbp.use_backend(backend):
        out = model(x)
        out.sum().backward()
    ref = native(x_native)
    ref.sum().backward()
    assert out.shape == ref.shape == (*lead, 3)
    assert x.grad is not None and x.grad.shape == x.shape
    for (name, p), p_native in zip(model.named_parameters(), native.parameters(), strict=True):
        assert p.grad is not None, name
        assert torch.equal(p.grad, p_native.grad), name  # all zeros, bitwise, as native
        assert torch.equal(p.grad, torch.zeros_like(p)), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_functional_every_activation(backend: str) -> None:
    """M = 0 through every activation, with and without bias, only weight needing a gradient."""
    for activation in mbp.ACTIVATIONS:
        for bias in (True, False):
            x = torch.randn(0, 4)
            w = torch.randn(3, 4, requires_grad=True)
            b = torch.randn(3, requires_grad=True) if bias else None
            with mbp.use_backend(backend):
                out = linear(x, w, b, activation)
                out.sum().backward()
            assert out.shape == (0, 3), activation
            assert torch.equal(w.grad, torch.zeros(3, 4)), activation
            assert b is None or torch.equal(b.grad, torch.zeros(3)), activation


def test_empty_batch_losses_like_native() -> None:
    """Empty "mean" is 0/0 = NaN, "sum" is 0, "none" is empty — and the gradient is empty."""
    for reduction in ("mean", "sum", "none"):
        cases = [
            (mse_loss, F.mse_loss, torch.randn(0, 3, dtype=torch.float64), torch.randn(0, 3).double()),
            (cross_entropy, F.cross_entropy, torch.randn(0, 4, dtype=torch.float64),
             torch.zeros(0, dtype=torch.long)),
        ]  # fmt: skip
        for ours_fn, native_fn, input, target in cases:
            (a,), (b,) = _leaves(input), _leaves(input)
            ours, ref = ours_fn(a, target, reduction=reduction), native_fn(b, target, reduction=reduction)
            assert ours.shape == ref.shape
            assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.nan_to_num(), ref.nan_to_num())
            ours.sum().backward()
            ref.sum().backward()
            assert a.grad.shape == b.grad.shape == (0, input.shape[1])


# ------------------------------------------------------------------------------- NaN and Inf


def _classes(t: Tensor) -> Tensor:
    """Per element: 0 finite, 1 NaN, 2 +Inf, 3 −Inf."""
    return t.isnan().int() + 2 * t.isposinf().int() + 3 * t.isneginf().int()


def _gelu_pos_inf_quirk(activation: str, z: Tensor, ours: Tensor, native: Tensor) -> Tensor:
    """Where native's own answer is not one answer: GELU at z = +Inf.

    PyTorch's CPU GELU returns NaN for +Inf in its vectorized float32/bfloat16 path and +Inf in its
    scalar path and in float64 (try `F.gelu(torch.full((n,), inf))` for n = 1 and n = 8). The limit
    is +Inf; a backend may give either, so there — and only there — the two are interchangeable.
    """
    if activation != "gelu":
        return torch.zeros_like(ours, dtype=torch.bool)
    both = (ours.isnan() | ours.isposinf()) & (native.isnan() | native.isposinf())
    return both & z.isposinf()


SPECIALS = ["bias", "input", "weight", "grad_out"]


def _special_case(where: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (5, 4), w (8, 4), b (8,), grad_out (5, 8) with NaN/±Inf placed in one of them.

    Specials in the bias set whole columns of z to NaN/±Inf (so each activation is evaluated there
    and its f′ too); in x they fill rows, in w columns (through the GEMM, as native's); in grad_out
    single elements of δ. The other finite values stay small, and ±1e4 stays inside float16.
    """
    x, w = torch.randn(5, 4), torch.randn(8, 4)
    b, grad_out = torch.randn(8), torch.randn(5, 8)
    if where == "bias":
        b = torch.tensor([INF, -INF, NAN, 0.0, 30.0, -30.0, 1e4, -1e4])
    elif where == "input":
        x[1, 2], x[3, 0], x[4, 1] = NAN, INF, -INF
    elif where == "weight":
        w[1, 2], w[3, 0], w[5, 1] = NAN, INF, -INF
    else:
        grad_out[1, 3], grad_out[2, 0], grad_out[3, 1], grad_out[4, 4] = INF, NAN, -INF, INF
    return x.to(dtype), w.to(dtype), b.to(dtype), grad_out.to(dtype)


def _check_specials(
    activation: str, where: str, dtype: torch.dtype, ours: list[Tensor], native: list[Tensor],
    native64: list[Tensor], z: Tensor,
) -> None:  # fmt: skip
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, o, n, n64 in zip(names, ours, native, native64, strict=True):
        mismatch = _classes(o) != _classes(n)
        if name == "output":
            mismatch &= ~_gelu_pos_inf_quirk(activation, z, o, n)
        assert not mismatch.any(), (
            f"{activation}, specials in {where}, {name}: NaN/Inf at different places than native\n"
            f"ours:\n{o}\nnative:\n{n}"
        )
        if dtype in (torch.float16, torch.bfloat16):
            # Finite 16-bit values are the parity tests' subject: among NaN columns the few
            # finite gradient sums here are ill-conditioned (native bfloat16 itself misses tanh's
            # grad_bias by 1.5 % against float64), so a tolerance on them would test the data.
            continue
        finite = o.isfinite() & n64.isfinite()
        assert rel_err(o[finite], n64[finite]) <= TOL[dtype], f"{activation}, {where}, {name}"


def _specials_params() -> list[tuple[str, torch.dtype, str]]:
    # Every special placement in float32 (and float64 on the reference); the 16-bit dtypes get
    # the bias placement, which reaches every activation's f and f′ at NaN/±Inf directly.
    out = []
    for backend in BACKENDS:
        for dtype in FLOATS[backend]:
            for where in SPECIALS if dtype in (torch.float32, torch.float64) else ["bias"]:
                out.append((backend, dtype, where))
    return out


@pytest.mark.parametrize(
    "backend,dtype,where", _specials_params(), ids=[f"{b}-{str(d)[6:]}-{w}" for b, d, w in _specials_params()]
)
def test_nan_inf_land_where_native_puts_them(backend: str, dtype: torch.dtype, where: str) -> None:
    for activation in mbp.ACTIVATIONS:
        x, w, b, grad_out = _special_case(where, dtype)
        with mbp.use_backend(backend):
            ours = _run_linear(linear, x, w, b, grad_out, activation)
        native = _run_linear(native_linear_act, x, w, b, grad_out, activation)
        native64 = _run_linear(native_linear_act, *(t.double() for t in (x, w, b, grad_out)), activation)
        z = F.linear(x.double(), w.double(), b.double())
        _check_specials(activation, where, dtype, ours, native, native64, z)


def test_relu_family_derivative_at_nan_and_zero_like_native() -> None:
    """ReLU′ and LeakyReLU′ at z = NaN, 0, ±Inf with Inf/NaN upstream: native's selects, not products.

    threshold_backward gives exactly 0 where a ≤ 0 even when grad_out is Inf (a product would give
    NaN), and passes grad_out through where a is NaN (NaN ≤ 0 is false).
    """
    z = torch.tensor([NAN, 0.0, -0.0, INF, -INF, -1.0, 2.0, NAN])
    grad = torch.tensor([1.0, INF, NAN, -INF, INF, INF, NAN, NAN]).unsqueeze(0)
    x, w = torch.ones(1, 1), torch.zeros(8, 1)  # z comes from the bias alone
    for backend in BACKENDS:
        for activation in ("relu", "leaky_relu"):
            with mbp.use_backend(backend):
                ours = _run_linear(linear, x, w, z, grad, activation)
            native = _run_linear(native_linear_act, x, w, z, grad, activation)
            for o, n in zip(ours, native, strict=True):
                assert torch.equal(_classes(o), _classes(n)), f"{backend} {activation}:\n{o}\n{n}"
                assert torch.equal(o[o.isfinite()], n[n.isfinite()]), f"{backend} {activation}"


# ------------------------------------------------------------------------------- losses


def _loss_classes(
    ours_fn: Callable[..., Tensor], native_fn: Callable[..., Tensor], input: Tensor, target: Tensor, **kw
) -> None:
    """Loss and input gradient: the same NaN/Inf classes as native, and equal finite values."""
    (a,), (b,) = _leaves(input), _leaves(input)
    ours, ref = ours_fn(a, target, **kw), native_fn(b, target, **kw)
    g = torch.ones_like(ref)
    ours.backward(g)
    ref.backward(g)
    for name, o, n in (("loss", ours, ref), ("grad", a.grad, b.grad)):
        assert torch.equal(_classes(o), _classes(n)), f"{kw} {name}:\nours {o}\nnative {n}"
        finite = n.isfinite()
        assert rel_err(o[finite], n[finite]) <= TOL[input.dtype], f"{kw} {name}"


def _special_logits() -> tuple[Tensor, Tensor]:
    logits = torch.randn(7, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, -100, -100, 2])
    logits[0, 3] = -INF  # one class impossible, not the target: finite loss, 0 gradient there
    logits[1, 1] = -INF  # the target is impossible: loss +Inf, gradient still finite
    logits[2, 0] = INF  # +Inf logit: NaN row (Inf − Inf), as native
    logits[3, 2] = NAN
    logits[4] = NAN  # ignored rows with NaN/Inf logits: no loss; gradient as native's
    logits[5, 1] = INF
    logits[6] = -INF  # every logit −Inf: NaN (−Inf − (−Inf))
    return logits, target


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("rows", ["each", "finite_rows_only"])
def test_cross_entropy_special_logits_like_native(reduction: str, rows: str) -> None:
    logits, target = _special_logits()
    if rows == "finite_rows_only":
        # Keep the rows whose loss is finite, plus the ignored NaN/Inf ones: a "mean" that
        # must stay finite although ignored rows hold NaN.
        keep = torch.tensor([0, 1, 4, 5]) if reduction == "none" else torch.tensor([0, 4, 5])
        logits, target = logits[keep], target[keep]
        _loss_classes(cross_entropy, F.cross_entropy, logits, target, reduction=reduction)
        return
    for i in range(len(target)):  # one row at a time, so each row's classes show on their own
        row = slice(i, i + 1)
        _loss_classes(cross_entropy, F.cross_entropy, logits[row], target[row], reduction=reduction)
    _loss_classes(cross_entropy, F.cross_entropy, logits, target, reduction=reduction)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_entropy_all_ignored_like_native(reduction: str, dtype: torch.dtype) -> None:
    """No counted row: "mean" is NaN (0/0) and the gradient exactly zero; extra dims too."""
    logits = torch.randn(2, 3, 4).to(dtype)
    _loss_classes(cross_entropy, F.cross_entropy, logits, torch.full((2, 4), -100), reduction=reduction)
    seven = torch.full((2, 4), 7)
    _loss_classes(cross_entropy, F.cross_entropy, logits, seven, reduction=reduction, ignore_index=7)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mse_special_values_like_native(reduction: str) -> None:
    input = torch.tensor([[1.0, INF, -INF, NAN], [INF, 0.0, 2.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([[INF, INF, 1.0, 0.0], [1.0, NAN, 2.0, -INF]], dtype=torch.float64)
    _loss_classes(mse_loss, F.mse_loss, input, target, reduction=reduction)
    _loss_classes(mse_loss, F.mse_loss, input[:1, 2:], target[:1, 2:], reduction=reduction)


# ------------------------------------------------------------------------------- 16-bit ranges

K = 64  # the reduction length of the magnitude cases: longer than any block's partial sum
RESULTS = ["output", "grad_input", "grad_weight", "grad_bias"]


def _trap(case: str) -> Tensor:
    """A length-K vector whose sum goes wrong if accumulated in the storage dtype.

    cancel   terms ±3e4 whose partial sums pass float16's 65504, while the sum is 0.5
    absorb   one 256 and 63 ones: a bfloat16 accumulator stops at 256 (spacing 2); the sum is 319
    tiny     1e-3 against 1e-3: products 1e-6 are float16 subnormals (a 1.3 % rounding each) if
             rounded one by one; the sum 6.4e-5 is a normal float16
    """
    if case == "cancel":
        v = torch.zeros(K)
        v[:3], v[3:6], v[6] = 3e4, -3e4, 0.5
    elif case == "absorb":
        v = torch.ones(K)
        v[0] = 256.0
    else:
        v = torch.full((K,), 1e-3)
    return v


def _trap_operands(case: str, result: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(x, w, grad_out) with the trap along the reduction that forms `result`, of length K.

    output = x wᵀ reduces over a row of x (K = 64); grad_input = δ W over a row of δ (N = 64);
    grad_weight = δᵀ x over a column of x and grad_bias = Σ δ over a column of δ (M = 64), with
    the identity activation (δ = grad_out). The other dimensions are 8.
    """
    m, n, k = {"output": (8, 8, K), "grad_input": (8, K, 8)}.get(result, (K, 8, 8))
    fill = 1e-3 if case == "tiny" else 1.0
    x, w, grad_out = torch.full((m, k), fill), torch.full((n, k), fill), torch.full((m, n), fill)
    v = _trap(case)
    if result == "output":
        x[0] = v
    elif result == "grad_input":
        grad_out[0] = v
    elif result == "grad_weight":
        x[:, 0] = v
    else:
        grad_out[:, 0] = v
    return x.to(dtype), w.to(dtype), grad_out.to(dtype)


TRAPS = {("cancel", torch.float16), ("absorb", torch.bfloat16), ("tiny", torch.float16)}


def _storage_dtype_dot(v: Tensor, other: Tensor, dtype: torch.dtype) -> float:
    """v · other with every product and partial sum rounded to `dtype`: what a 16-bit
    accumulator would give."""
    acc = torch.zeros((), dtype=dtype)
    for a, b in zip(v.to(dtype), other.to(dtype), strict=True):
        acc = acc + a * b
    return float(acc)


def test_the_traps_are_traps() -> None:
    """Each (case, dtype) in TRAPS misses by more than the tolerance with a 16-bit accumulator,
    so the test below can fail: a backend that accumulated in the storage dtype would."""
    for case, dtype in TRAPS:
        v = _trap(case)
        other = torch.full((K,), 1e-3 if case == "tiny" else 1.0)
        exact = float(v.to(dtype).double() @ other.to(dtype).double())
        naive = _storage_dtype_dot(v, other, dtype)
        assert not abs(naive - exact) <= TOL[dtype] * abs(exact), (case, dtype, naive, exact)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["cancel", "absorb", "tiny"])
def test_16bit_sums_accumulate_in_float32(backend: str, dtype: torch.dtype, case: str) -> None:
    """Every element within the dtype's tolerance of the exact sum. The pairs in TRAPS defeat a
    16-bit accumulator (see test_the_traps_are_traps); the others are plain checks."""
    for index, result in enumerate(RESULTS):
        x, w, grad_out = _trap_operands(case, result, dtype)
        b = torch.zeros(w.shape[0], dtype=dtype)
        with mbp.use_backend(backend):
            ours = _run_linear(linear, x, w, b, grad_out)[index]
        exact = _run_linear(F.linear, *(t.double() for t in (x, w, b, grad_out)))[index]
        assert ours.isfinite().all(), f"{case} {result}: overflow"
        # Elementwise, not in norm: the trap is one row or column among larger sums.
        worst = ((ours.double() - exact) / exact.abs()).abs().max().item()
        assert worst <= TOL[dtype], f"{case} {result}: worst relative error {worst:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_overflow_only_where_native_overflows(backend: str) -> None:
    """Results beyond float16's range are Inf exactly where native's are; bfloat16 holds them."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.full((3, K), 2000.0)
        x[1] = 1.0  # row 1 sums to 64: finite
        x[2, ::2] = -2000.0  # row 2 cancels to 0: finite although every term is large
        w = torch.ones(5, K)
        w[3] = -1.0  # column 3 overflows to −Inf for row 0
        b, grad_out = torch.zeros(5), torch.ones(3, 5)
        args = [t.to(dtype) for t in (x, w, b, grad_out)]
        with mbp.use_backend(backend):
            ours = _run_linear(linear, *args)
        native = _run_linear(F.linear, *args)
        for name, o, n in zip(["output", "grad_input", "grad_weight", "grad_bias"], ours, native):
            assert torch.equal(_classes(o), _classes(n)), f"{dtype} {name}:\nours {o}\nnative {n}"
            assert torch.equal(o[o.isfinite()], n[n.isfinite()]), f"{dtype} {name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_results_are_rounded_once_to_nearest(backend: str, dtype: torch.dtype) -> None:
    """Small integers: every product and sum is exact in float32 whatever the order, so the one
    right 16-bit answer is the exact value rounded to nearest-even — as native's `.to(dtype)`.

    Results reach several thousand, past the integers bfloat16 (8-bit significand) and float16
    (11-bit) hold exactly, so many must be rounded; a truncating conversion (round toward zero)
    is one unit in the last place off on those nearer the upper neighbour.
    """
    gen = torch.Generator().manual_seed(7)
    m, k, n = 33, 40, 35
    ints = lambda *shape: torch.randint(-16, 17, shape, generator=gen).double()  # noqa: E731
    x, w, b, grad_out = ints(m, k), ints(n, k), ints(n), ints(m, n)
    exact = _run_linear(F.linear, x, w, b, grad_out)  # float64: exact for these integers
    with mbp.use_backend(backend):
        ours = _run_linear(linear, *(t.to(dtype) for t in (x, w, b, grad_out)))
    for name, o, e in zip(RESULTS, ours, exact, strict=True):
        expected = e.to(dtype)
        wrong = (o != expected).sum().item()
        assert wrong == 0, f"{name}: {wrong} of {o.numel()} elements not the nearest {dtype} value"
