"""The gated MLP's Triton kernels (manualbp.triton_kernels.gated_mlp) against float64 native
autograd, under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1; with
MANUALBP_CUDA_TESTS=1 they run compiled on a GPU).

Every buffer a launcher allocates starts as NaN, so an element a kernel does not write fails the
comparison. Shapes are multiples of no block size (≤ 256); bf16 goes through the `upcast` helper.
Tolerances are tests/helpers.py's TOL (float32 1e-5, float16 2e-3, bfloat16 1e-2), never loosened.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manualbp.activations import get_activation

from .helpers import TOL, rel_err, triton_test_device

pytest.importorskip("triton")

from manualbp.triton_kernels import _utils  # noqa: E402
from manualbp.triton_kernels.gated_mlp import (  # noqa: E402
    gated_delta,
    gated_mlp_backward,
    gated_mlp_forward,
    gated_up,
)

DEVICE, pytestmark = triton_test_device()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ACTS = ["silu", "gelu", "gelu_tanh", "relu", "sigmoid"]
# (M, K=in, N=hidden, out, bias, non_contiguous)
CASES = [
    (17, 64, 129, 33, True, False),
    (130, 5, 33, 200, False, True),
    (1, 200, 70, 3, True, True),
    (65, 33, 256, 17, False, False),
    (33, 129, 17, 64, True, True),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANUALBP_TRITON_AUTOTUNE", "0")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


def _matrix(rows: int, cols: int, dtype: torch.dtype, non_contiguous: bool, scale: float = 1.0):
    if non_contiguous:
        t = (torch.randn(cols, 2 * rows, dtype=torch.float64) * scale)[:, ::2].t()
        assert not t.is_contiguous()
    else:
        t = torch.randn(rows, cols, dtype=torch.float64) * scale
    return t.to(dtype).to(DEVICE)


def _case(i: int, dtype: torch.dtype):
    torch.manual_seed(i)
    M, K, N, n_out, bias, nc = CASES[i % len(CASES)]
    x = _matrix(M, K, dtype, nc)
    wg, wu = _matrix(N, K, dtype, nc, K**-0.5), _matrix(N, K, dtype, False, K**-0.5)
    wd = _matrix(n_out, N, dtype, nc, N**-0.5)
    biases = [_matrix(1, n, dtype, False)[0] for n in (N, N, n_out)] if bias else [None, None, None]
    g = _matrix(M, n_out, dtype, nc)
    return x, wg, wu, wd, biases, g


def _native(x, wg, wu, wd, biases, g, act):
    """Float64 native autograd from the same (rounded) values."""
    values = (x, wg, wu, wd, *biases)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in values]
    x64, wg64, wu64, wd64, bg, bu, bd = leaves
    z_g, z_u = F.linear(x64, wg64, bg), F.linear(x64, wu64, bu)
    h = act.native()(z_g) * z_u
    y = F.linear(h, wd64, bd)
    y.backward(g.double())
    grads = [t.grad if t is not None else None for t in leaves]
    return y.detach(), z_g.detach(), z_u.detach(), h.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ACTS)
def test_gated_up_kernel_parity(name: str, dtype: torch.dtype) -> None:
    i = ACTS.index(name) + DTYPES.index(dtype)
    act = get_activation(name)
    x, wg, wu, wd, (bg, bu, bd), g = _case(i, dtype)
    h, z_g, z_u = gated_up(x, wg, wu, bg, bu, act.kernel_id)
    _, zg_ref, zu_ref, h_ref, _ = _native(x, wg, wu, wd, [bg, bu, bd], g, act)
    assert z_g is not None and z_u is not None
    for ours, ref in ((h, h_ref), (z_g, zg_ref), (z_u, zu_ref)):
        assert ours.dtype == dtype and rel_err(ours, ref) <= TOL[dtype]
    h_only, none_g, none_u = gated_up(x, wg, wu, bg, bu, act.kernel_id, store_z=False)
    assert none_g is None and none_u is None and torch.equal(h_only, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ACTS)
def test_gated_delta_kernel_parity(name: str, dtype: torch.dtype) -> None:
    act = get_activation(name)
    M, N = 37, 70
    dh, z_g, z_u = (_matrix(M, N, dtype, nc) for nc in (True, False, True))
    d_g, d_u, h = gated_delta(dh, z_g, z_u, act.kernel_id)
    dh64, zg64, zu64 = dh.double(), z_g.double(), z_u.double()
    zg64.requires_grad_()
    fz = act.native()(zg64)
    (dg_ref,) = torch.autograd.grad(fz, zg64, dh64 * zu64)
    assert h is not None
    for ours, ref in ((d_g, dg_ref), (d_u, dh64 * fz.detach()), (h, fz.detach() * zu64)):
        assert ours.dtype == dtype and rel_err(ours, ref) <= TOL[dtype]
    assert gated_delta(dh, z_g, z_u, act.kernel_id, store_h=False)[2] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_forward_and_backward_parity(name: str, dtype: torch.dtype) -> None:
    i = 3 * DTYPES.index(dtype) + ["silu", "gelu", "gelu_tanh"].index(name)
    act = get_activation(name)
    x, wg, wu, wd, biases, g = _case(i, dtype)
    y, z_g, z_u = gated_mlp_forward(x, wg, wu, wd, *biases, act.kernel_id)
    y_ref, zg_ref, zu_ref, _, grads_ref = _native(x, wg, wu, wd, biases, g, act)
    assert rel_err(y, y_ref) <= TOL[dtype]
    assert rel_err(z_g, zg_ref) <= TOL[dtype] and rel_err(z_u, zu_ref) <= TOL[dtype]
    has_bias = biases[0] is not None
    needs = (True, True, True, True, has_bias, has_bias, has_bias)
    grads = gated_mlp_backward(g, x, wg, wu, wd, z_g, z_u, act.kernel_id, 0.01, needs)
    for k, (ours, ref) in enumerate(zip(grads, grads_ref, strict=True)):
        if ref is None:
            assert ours is None, k
        else:
            assert ours is not None and ours.dtype == dtype and rel_err(ours, ref) <= TOL[dtype], k


@pytest.mark.parametrize(
    "needs",
    [
        (True, False, False, False, False, False, False),
        (False, False, False, True, False, False, True),
        (False, True, False, False, True, False, False),
        (False, False, False, False, False, False, True),
    ],
)
def test_gated_mlp_backward_only_what_is_asked(needs: tuple[bool, ...]) -> None:
    act = get_activation("silu")
    x, wg, wu, wd, _, g = _case(0, torch.float32)
    biases = [_matrix(1, n, torch.float32, False)[0] for n in (wg.shape[0], wg.shape[0], wd.shape[0])]
    _, z_g, z_u = gated_mlp_forward(x, wg, wu, wd, *biases, act.kernel_id)
    *_, grads_ref = _native(x, wg, wu, wd, biases, g, act)
    grads = gated_mlp_backward(g, x, wg, wu, wd, z_g, z_u, act.kernel_id, 0.01, needs)  # type: ignore[arg-type]
    for k, (ours, ref, need) in enumerate(zip(grads, grads_ref, needs, strict=True)):
        if not need:
            assert ours is None, k
        else:
            assert ours is not None and rel_err(ours, ref) <= TOL[torch.float32], k


def test_launcher_errors_name_the_argument() -> None:
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match="up_weight"):
        gated_up(x, w, w[:5], None, None, 7)
    with pytest.raises((ValueError, TypeError), match="z_u"):
        gated_delta(torch.randn(4, 6, device=DEVICE), torch.randn(4, 6, device=DEVICE), torch.randn(4, 5), 7)


# ------------------------------------------------------------------- through the op, backend "triton"


def _leaves(dtype: torch.dtype, bias: bool):
    torch.manual_seed(11)
    x = _matrix(2 * 9, 12, dtype, False).view(2, 9, 12).requires_grad_()
    wg, wu = (_matrix(20, 12, dtype, False, 12**-0.5).requires_grad_() for _ in range(2))
    wd = _matrix(7, 20, dtype, False, 20**-0.5).requires_grad_()
    biases = [_matrix(1, n, dtype, False)[0].requires_grad_() for n in (20, 20, 7)] if bias else [None] * 3
    return [x, wg, wu, wd, *biases]


def _native_op(x, wg, wu, wd, bg, bu, bd, act="silu"):
    return F.linear(get_activation(act).native()(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_gated_mlp_op_on_the_triton_backend(bias: bool, compiled: bool) -> None:
    import manualbp as mbp
    from manualbp import functional as MF

    torch._dynamo.reset()
    leaves = _leaves(torch.float32, bias)
    present = [t for t in leaves if t is not None]
    ref64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    want = _native_op(*ref64)
    seed = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [t for t in ref64 if t is not None], seed)
    fn = torch.compile(MF.gated_mlp, fullgraph=True) if compiled else MF.gated_mlp
    with mbp.use_backend("triton"):
        got = fn(*leaves)
        got_grads = torch.autograd.grad(got, present, seed.float())
    assert got.dtype == torch.float32 and rel_err(got, want) <= TOL[torch.float32]
    for ours, ref in zip(got_grads, want_grads, strict=True):
        assert rel_err(ours, ref) <= TOL[torch.float32]


def test_triton_backend_records_in_export_and_refuses_float64() -> None:
    import manualbp as mbp
    from manualbp import functional as MF

    layer = mbp.GatedMLP(6, 10, 4, bias=True)
    x = torch.randn(3, 6)
    with mbp.use_backend("triton"):
        program = torch.export.export(layer, (x,))
        nodes = [n for n in program.graph.nodes if str(n.target) == "manualbp.gated_mlp_forward.default"]
        assert len(nodes) == 1 and "triton" in nodes[0].args
        assert rel_err(program.module()(x), layer(x)) <= TOL[torch.float32]
        x64 = torch.randn(3, 6, dtype=torch.float64)
        w = [torch.randn(s, dtype=torch.float64) for s in ((10, 6), (10, 6), (4, 10))]
        with pytest.raises(TypeError, match="backend 'triton'"):
            MF.gated_mlp(x64, *w)
