"""The Hopper path of the GEMMs (TMA tensor descriptors, persistent tile loop) against float64
native autograd, run under Triton's interpreter.

The launchers pick the path (`_utils.tma_path`): sm_90+, 16-bit, every operand a valid TMA base.
Under the interpreter the capability is answered as (9, 0) (`hopper` fixture), so the kernels run
their real descriptor loads (`tl.make_tensor_descriptor`, zero padding past the edges) and their
persistent tile loop (3 programs striding over every tile), bf16 through the upcast helper.
Each parity test also checks, from the captured launch, that the TMA path was the one taken.
Shapes: odd M, N and K that are multiples of no block but keep 16-byte row strides (a
descriptor needs them); the fallback tests cover the layouts a descriptor cannot address.
Bounds: tests/helpers.py TOL (float16 ≤ 2e-3, bfloat16 ≤ 1e-2), never loosened.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .helpers import TOL, rel_err, triton_test_device

pytest.importorskip("triton")

from manualbp.triton_kernels import _utils  # noqa: E402
from manualbp.triton_kernels.activations import NAMES  # noqa: E402
from manualbp.triton_kernels.linear_forward import linear_forward  # noqa: E402
from manualbp.triton_kernels.linear_grad_input import linear_grad_input  # noqa: E402
from manualbp.triton_kernels.linear_grad_weight import linear_grad_weight  # noqa: E402

from manualbp.activations import get_activation  # noqa: E402

DEVICE, pytestmark = triton_test_device()

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
# On a GPU the device decides; under the interpreter the tests answer sm_90.
CAPABILITY = torch.cuda.get_device_capability(DEVICE) if DEVICE.type == "cuda" else (9, 0)
TMA_EXPECTED = CAPABILITY >= (9, 0)


@pytest.fixture(autouse=True)
def _hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capability (9, 0) under the interpreter; NaN-filled buffers; no autotuning on a GPU."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(_utils, "gemm_capability", lambda device: CAPABILITY)
    monkeypatch.setenv("MANUALBP_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(_utils, "empty", _nan_empty)


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _randn(rows: int, cols: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(rows, cols, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _act(name: str):
    return get_activation(name, negative_slope=0.2) if name == "leaky_relu" else get_activation(name)


def tma_flags(fn, *args, **kwargs) -> list[tuple[str, bool]]:
    """(kernel, USE_TMA) of each GEMM launch `fn(*args)` makes on a device of CAPABILITY."""
    with _utils.captured_launches(CAPABILITY) as launches:
        fn(*args, **kwargs)
    return [(launch.kernel.__name__, launch.kwargs["USE_TMA"]) for launch in launches if launch.configs]


# (M, N, K): odd M; N and K multiples of 8 (16-byte rows) but of no block size; more tiles than
# the 3 persistent programs, so that each program runs several.
SHAPES = [(131, 72, 200), (37, 136, 40), (1, 24, 264)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_tma_parity(name, dtype):
    """a = f(x Wᵀ + b) and z through descriptor loads, every activation, with and without bias."""
    act = _act(name)
    for i, (M, N, K) in enumerate(SHAPES[:2]):
        x, w = _randn(M, K, dtype), _randn(N, K, dtype, K**-0.5)
        b = _randn(1, N, dtype)[0] if i == 0 else None
        assert tma_flags(linear_forward, x, w, b, act.kernel_id, act.negative_slope) == [
            ("linear_forward_kernel", TMA_EXPECTED)
        ]
        a, z = linear_forward(x, w, b, act.kernel_id, act.negative_slope, store_z=True)
        z_ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert rel_err(z, z_ref) <= TOL[dtype], (M, N, K)
        assert rel_err(a, act.native()(z_ref)) <= TOL[dtype], (M, N, K)


def test_forward_tma_single_row_and_k_tail():
    """One row (a tile mostly past the edge) and K = 264 (a partial last K-step): zero padding."""
    M, N, K = SHAPES[2]
    bf16 = torch.bfloat16
    x, w, b = _randn(M, K, bf16), _randn(N, K, bf16, K**-0.5), _randn(1, N, bf16)[0]
    a, _ = linear_forward(x, w, b, 0)
    assert rel_err(a, F.linear(x.double(), w.double(), b.double())) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_input_tma_parity(name, dtype):
    """grad_input = δ W through descriptor loads, for δ of every activation (formed by the δ
    pass, as on sm_90) and for every f′_prev epilogue (δ⁽ˡ⁻¹⁾ of the layer below)."""
    act = _act(name)
    M, N, K = SHAPES[NAMES.index(name) % 2]
    g, w = _randn(M, N, dtype), _randn(N, K, dtype, N**-0.5)
    z, z_prev = _randn(M, N, dtype), _randn(M, K, dtype)
    saved, prev_saved = _saved(act, z), _saved(act, z_prev)
    expected = [("grad_input_kernel", TMA_EXPECTED)]
    assert tma_flags(linear_grad_input, g, w, saved, act.kernel_id, act.negative_slope) == expected
    out = linear_grad_input(g, w, saved, act.kernel_id, act.negative_slope)
    assert rel_err(out, _delta_ref(act, g, z) @ w.double()) <= TOL[dtype], (M, N, K)
    # The same activation as the layer below's: its f′ applied in the epilogue.
    kw = dict(prev_act_id=act.kernel_id, prev_saved=prev_saved, prev_negative_slope=act.negative_slope)
    assert tma_flags(linear_grad_input, g, w, **kw) == expected
    out = linear_grad_input(g, w, **kw)
    assert rel_err(out, _delta_ref(act, g.double() @ w.double(), z_prev)) <= TOL[dtype], (M, N, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_weight_tma_parity(name, dtype):
    """(grad_weight, grad_bias) = (δᵀx, Σδ) through descriptor loads, δ of every activation
    (the δ pass, as on sm_90), without a split and split over M (3 ranges of 64 rows, tiles
    ending at the range boundaries and past M), bias fused, absent and alone."""
    act = _act(name)
    M, N, K = 131 + 40 * (NAMES.index(name) % 2), 72, 40
    g, x, z = _randn(M, N, dtype), _randn(M, K, dtype), _randn(M, N, dtype)
    delta = _delta_ref(act, g, z)
    gw_ref, gb_ref = delta.t() @ x.double(), delta.sum(0)
    args = (g, x, _saved(act, z), act.kernel_id, act.negative_slope)
    for split in (1, 3):
        assert tma_flags(linear_grad_weight, *args, split_k=split) == [("grad_weight_kernel", TMA_EXPECTED)]
        gw, gb = linear_grad_weight(*args, split_k=split)
        assert rel_err(gw, gw_ref) <= TOL[dtype], split
        assert rel_err(gb, gb_ref) <= TOL[dtype], split
    gw, gb = linear_grad_weight(*args, need_bias=False, split_k=1)
    assert gb is None and rel_err(gw, gw_ref) <= TOL[dtype]
    # Bias alone: no weight tiles, nothing for a descriptor to load.
    assert tma_flags(linear_grad_weight, *args, need_weight=False) == [("grad_weight_kernel", False)]
    gw, gb = linear_grad_weight(*args, need_weight=False)
    assert gw is None and rel_err(gb, gb_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_falls_back_to_pointers(dtype):
    """grad_input and grad_weight take the pointer path where an operand is no valid TMA base
    (each layout of `_layouts` in the place of each operand), with the same results."""
    M, K = 40, 64  # operands (40, 64) and (64, 64): each layout in each place
    square_layouts = _layouts(dtype, 64)
    for label, (t, ok) in _layouts(dtype).items():
        square = _randn(64, 64, dtype, 0.125)
        for g, w in ((t, square), (square[:40], square_layouts[label][0])):
            flags = tma_flags(linear_grad_input, g, w)
            assert flags == [("grad_input_kernel", ok and TMA_EXPECTED)], label
            assert rel_err(linear_grad_input(g, w), g.double() @ w.double()) <= TOL[dtype], label
        x = _randn(M, K, dtype)
        for g, xx in ((t, x), (x, t)):
            flags = tma_flags(linear_grad_weight, g, xx, split_k=1)
            assert flags == [("grad_weight_kernel", ok and TMA_EXPECTED)], label
            gw, gb = linear_grad_weight(g, xx, split_k=1)
            assert rel_err(gw, g.double().t() @ xx.double()) <= TOL[dtype], label
            assert rel_err(gb, g.double().sum(0)) <= TOL[dtype], label


def _delta_ref(act, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """grad ⊙ f′(z) by float64 native autograd."""
    z64 = z.double().requires_grad_()
    act.native()(z64).backward(grad.double())
    return z64.grad


def _saved(act, z: torch.Tensor) -> torch.Tensor:
    """What a forward saves for f′: a = f(z) (rounded to the dtype) or z itself."""
    return act.native()(z.double()).to(z.dtype) if act.uses_output else z


def _layouts(dtype: torch.dtype, rows: int = 40) -> dict[str, tuple[torch.Tensor, bool]]:
    """Operands of shape (rows, 64) and whether a descriptor can address them."""
    base = _randn(rows + 1, 72, dtype)
    return {
        "contiguous": (_randn(rows, 64, dtype), True),
        "padded rows (stride 72)": (base[:rows, :64], True),
        "transposed": (_randn(64, rows, dtype).t(), False),
        "column step 2": (_randn(rows, 128, dtype)[:, ::2], False),
        "row stride 65 (130 bytes)": (_randn(rows, 65, dtype)[:, :64], False),
        "base 2 bytes past alignment": (base.flatten()[1 : 1 + rows * 72].view(rows, 72)[:, :64], False),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_falls_back_to_pointers(monkeypatch: pytest.MonkeyPatch, dtype):
    """Where a descriptor cannot address an operand the launch takes the pointer path of the same
    kernel, and computes the same result; float32 and sm_80 always do."""
    w = _randn(24, 64, dtype, 0.125)
    for label, (x, ok) in _layouts(dtype).items():
        expected = [("linear_forward_kernel", ok and TMA_EXPECTED)]
        assert tma_flags(linear_forward, x, w, None, 0) == expected, label
        assert tma_flags(linear_forward, w, x, None, 0) == expected, label
        a, _ = linear_forward(x, w, None, 0)
        assert rel_err(a, F.linear(x.double(), w.double())) <= TOL[dtype], label
    x = _randn(40, 64, dtype)
    assert tma_flags(linear_forward, x.float(), w.float(), None, 0) == [("linear_forward_kernel", False)]
    monkeypatch.setattr(_utils, "gemm_capability", lambda device: (8, 0))
    assert tma_flags(linear_forward, x, w, None, 0) == [("linear_forward_kernel", False)]


def test_descriptor_rules():
    """`descriptor_ok`: unit last stride, 16-byte row stride and base, no empty dimension."""
    for label, (t, ok) in _layouts(torch.float16).items():
        assert _utils.descriptor_ok(t) is ok, label
    assert not _utils.descriptor_ok(torch.empty(0, 64, dtype=torch.float16))
    assert not _utils.descriptor_ok(torch.empty(8, 0, dtype=torch.float16))
    assert _utils.persistent_programs(torch.device("cpu"), 25) == 3
    assert _utils.persistent_programs(torch.device("cpu"), 2) == 2
