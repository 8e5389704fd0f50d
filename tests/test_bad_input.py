"""Bad input, table-driven, on every backend: each case raises the documented exception type with a
message that names the argument, what was given and what was expected (DESIGN.md, "Errors").

tests/test_errors.py holds the foundation's cases for `functional.linear` and the losses on the
default backend; this file extends them to the modules (`Linear`, `LinearAct`, `MLP` in both modes),
to both backends, and to the inputs it did not cover. Every case also records what native PyTorch
raises for the same mistake, and `test_native_is_no_clearer` checks that our message is at least
as specific (it names the argument, where native often names an internal like "mat1").

A case's `says` fragments are plain substrings, all of which must appear in the message.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import manualbp as mbp
from manualbp.functional import cross_entropy, half_mse_loss, linear, mse_loss

BACKENDS = ["torch", "triton"]  # "triton" runs its kernels on CPU tensors under the interpreter


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[], object]
    error: type[Exception]
    says: tuple[str, ...]
    native: Callable[[], object] | None = None  # the same mistake made with native PyTorch


def _x(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


W, B = (2, 3), (2,)  # weight and bias shapes of the functional cases: in_features=3, out_features=2

# --------------------------------------------------------------------------- functional.linear
# (test_errors.py covers: last dim, 0-d, long/bool input, list input, 1-D weight, bias length,
#  float64 weight, float16 bias, weight on meta, unknown activation.)

LINEAR = [
    Bad("weight 3-D", lambda: linear(_x(4, 3), _x(2, 3, 1), _x(*B)), ValueError,
        ("weight", "2-D", "(out_features, in_features)", "(2, 3, 1)"),
        lambda: F.linear(_x(4, 3), _x(2, 3, 1), _x(*B))),
    Bad("bias 2-D", lambda: linear(_x(4, 3), _x(*W), _x(2, 1)), ValueError,
        ("bias", "expected shape (2,)", "got (2, 1)"),
        lambda: F.linear(_x(4, 3), _x(*W), _x(2, 1))),
    Bad("bias 0-d", lambda: linear(_x(4, 3), _x(*W), _x()), ValueError,
        ("bias", "expected shape (2,)", "got ()")),
    Bad("weight long", lambda: linear(_x(4, 3), _x(*W, dtype=torch.long), _x(*B)), TypeError,
        ("weight", "floating-point", "torch.int64"),
        lambda: F.linear(_x(4, 3), _x(*W, dtype=torch.long), _x(*B))),
    Bad("bias bool", lambda: linear(_x(4, 3), _x(*W), _x(*B, dtype=torch.bool)), TypeError,
        ("bias", "floating-point", "torch.bool"),
        lambda: F.linear(_x(4, 3), _x(*W), _x(*B, dtype=torch.bool))),
    Bad("input complex", lambda: linear(_x(4, 3, dtype=torch.cfloat), _x(*W), None), TypeError,
        ("input", "floating-point", "torch.complex64")),
    Bad("input int32, 1-D", lambda: linear(_x(3, dtype=torch.int32), _x(*W), None), TypeError,
        ("input", "floating-point", "torch.int32")),
    Bad("input float16 vs float32 weight", lambda: linear(_x(4, 3, dtype=torch.half), _x(*W)), TypeError,
        ("weight", "torch.float32", "input", "torch.float16"),
        lambda: F.linear(_x(4, 3, dtype=torch.half), _x(*W))),
    Bad("bias float64", lambda: linear(_x(4, 3), _x(*W), _x(*B, dtype=torch.double)), TypeError,
        ("bias", "torch.float64", "input", "torch.float32"),
        lambda: F.linear(_x(4, 3), _x(*W), _x(*B, dtype=torch.double))),
    Bad("input on meta", lambda: linear(_x(4, 3, device="meta"), _x(*W), _x(*B)), RuntimeError,
        ("weight", "device cpu", "input", "meta", "same device"),
        lambda: F.linear(_x(4, 3, device="meta"), _x(*W), _x(*B))),
    Bad("bias on meta", lambda: linear(_x(4, 3), _x(*W), _x(*B, device="meta")), RuntimeError,
        ("bias", "device meta", "input", "cpu", "same device"),
        lambda: F.linear(_x(4, 3), _x(*W), _x(*B, device="meta"))),
    Bad("weight a list", lambda: linear(_x(4, 3), [[1.0, 2.0, 3.0]] * 2), TypeError,
        ("weight", "torch.Tensor", "list")),
    Bad("bias a list", lambda: linear(_x(4, 3), _x(*W), [1.0, 2.0]), TypeError,
        ("bias", "torch.Tensor", "list")),
    Bad("input a list", lambda: linear([[1.0, 2.0, 3.0]], _x(*W)), TypeError,
        ("input", "torch.Tensor", "list")),
    Bad("input a number", lambda: linear(1.0, _x(*W)), TypeError, ("input", "torch.Tensor", "float")),
    Bad("activation None", lambda: linear(_x(4, 3), _x(*W), None, None), TypeError,
        ("activation", "name (str) or an Activation", "NoneType")),
    Bad("activation softmax", lambda: linear(_x(4, 3), _x(*W), None, "softmax"), ValueError,
        ("activation", "'softmax'", "identity, relu", "gelu")),
    Bad("slope on relu", lambda: linear(_x(4, 3), _x(*W), None, "relu", negative_slope=0.1), ValueError,
        ("negative_slope", "0.1", "leaky_relu")),
    Bad("negative slope", lambda: linear(_x(4, 3), _x(*W), None, "leaky_relu", negative_slope=-0.5),
        ValueError, ("negative_slope", "-0.5", ">= 0")),
]

# --------------------------------------------------------------------------- modules' forward
# The same mistakes reach the modules as their input; `MLP` checks in network mode, its layers in
# layers mode. Each model is built fresh (float32, cpu) with in_features=3.

MODELS = {
    "Linear": lambda: mbp.Linear(3, 2),
    "LinearAct": lambda: mbp.LinearAct(3, 2, "gelu"),
    "MLP network": lambda: mbp.MLP([3, 4, 2], "tanh", mode="network"),
    "MLP layers": lambda: mbp.MLP([3, 4, 2], "tanh", mode="layers"),
    "MLP recompute": lambda: mbp.MLP([3, 4, 2], "silu", recompute=True),
}
MODULE_INPUTS = [
    ("last dim 5", lambda: _x(2, 5), ValueError,
     ("input", "last dimension is 5", "(2, 5)", "in_features=3")),
    ("0-d", lambda: _x(), ValueError, ("input", "at least 1 dimension", "0-d")),
    ("long", lambda: _x(2, 3, dtype=torch.long), TypeError, ("input", "floating-point", "torch.int64")),
    ("bool", lambda: _x(2, 3, dtype=torch.bool), TypeError, ("input", "floating-point", "torch.bool")),
    ("float64 into float32 model", lambda: _x(2, 3, dtype=torch.double), TypeError,
     ("weight", "torch.float32", "input", "torch.float64")),
    ("meta", lambda: _x(2, 3, device="meta"), RuntimeError,
     ("weight", "cpu", "input", "meta", "same device")),
    ("numpy array", lambda: _x(2, 3).numpy(), TypeError, ("input", "torch.Tensor", "ndarray")),
]
MODULES = [
    Bad(f"{model} <- {what}", lambda m=make, i=inp: m()(i()), error, says,
        lambda i=inp: torch.nn.Linear(3, 2)(i()))
    for model, make in MODELS.items()
    for what, inp, error, says in MODULE_INPUTS
]

# --------------------------------------------------------------------------- constructors
# (test_modules.py covers in_features=0, out_features=-1, in_features=3.0 and MLP([3]), [3, 0, 2].)

CONSTRUCTORS = [
    Bad("Linear(-2, 3)", lambda: mbp.Linear(-2, 3), ValueError, ("in_features", "positive int", "-2"),
        lambda: torch.nn.Linear(-2, 3)),
    Bad("Linear(3, 0)", lambda: mbp.Linear(3, 0), ValueError, ("out_features", "positive int", "0")),
    Bad("Linear(True, 3)", lambda: mbp.Linear(True, 3), TypeError, ("in_features", "positive int", "bool")),
    Bad("Linear('3', 3)", lambda: mbp.Linear("3", 3), TypeError, ("in_features", "positive int", "str")),
    Bad("LinearAct(3, -4)", lambda: mbp.LinearAct(3, -4), ValueError, ("out_features", "positive int", "-4")),
    Bad("LinearAct activation 3", lambda: mbp.LinearAct(3, 2, activation=3), TypeError,
        ("activation", "name (str)", "int")),
    Bad("LinearAct activation 'relu6'", lambda: mbp.LinearAct(3, 2, activation="relu6"), ValueError,
        ("activation", "'relu6'", "leaky_relu")),
    Bad("MLP sizes negative", lambda: mbp.MLP([3, -1]), ValueError, ("sizes[1]", "positive int", "-1")),
    Bad("MLP sizes float", lambda: mbp.MLP([3, 2.5, 1]), TypeError, ("sizes[1]", "positive int", "2.5")),
    Bad("MLP sizes a str", lambda: mbp.MLP("32"), TypeError, ("sizes", "sequence of ints", "'32'")),
    Bad("MLP sizes empty", lambda: mbp.MLP([]), ValueError,
        ("sizes", "at least [in_features, out_features]", "[]")),
    Bad("MLP output_activation", lambda: mbp.MLP([3, 2], output_activation="softmax"), ValueError,
        ("activation", "'softmax'", "identity")),
    Bad("MLP mode typo", lambda: mbp.MLP([3, 2], mode="networks"), ValueError,
        ("mode", "network, layers", "'networks'")),
    Bad("MLP recompute in layers mode", lambda: mbp.MLP([3, 2], mode="layers", recompute=True), ValueError,
        ("recompute", "mode='network'", "'layers'")),
    Bad("MLP slope on relu", lambda: mbp.MLP([3, 2], "relu", negative_slope=0.2), ValueError,
        ("negative_slope", "0.2", "leaky_relu")),
]

# --------------------------------------------------------------------------- losses
# (test_errors.py covers: mse target shape/long/float64 and reduction 'avg'; cross-entropy target
#  length, class 3 of 3, class -1, float target, long logits, reduction 'batchmean'.)

_LOGITS, _CLASSES = (4, 3), lambda *v: torch.tensor(v)
_T = lambda: torch.zeros(4, dtype=torch.long)  # noqa: E731

LOSSES = [
    Bad("ce target (4, 1)", lambda: cross_entropy(_x(*_LOGITS), _T().unsqueeze(1)), ValueError,
        ("target", "(4, 1)", "(4, 3)", "expected (4,)"),
        lambda: F.cross_entropy(_x(*_LOGITS), _T().unsqueeze(1))),
    Bad("ce target 0-d for (4, 3)", lambda: cross_entropy(_x(*_LOGITS), torch.tensor(1)), ValueError,
        ("target", "shape ()", "expected (4,)")),
    Bad("ce spatial target", lambda: cross_entropy(_x(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)),
        ValueError, ("target", "(2, 3)", "(2, 3, 4)", "expected (2, 4)"),
        lambda: F.cross_entropy(_x(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))),
    Bad("ce bool target", lambda: cross_entropy(_x(*_LOGITS), _T().bool()), TypeError,
        ("target", "integer class indices", "torch.bool"),
        lambda: F.cross_entropy(_x(*_LOGITS), _T().bool())),
    Bad("ce probabilities target", lambda: cross_entropy(_x(*_LOGITS), torch.full(_LOGITS, 1 / 3)), TypeError,
        ("target", "integer class indices", "torch.float32")),
    Bad("ce class 7 of 3, spatial", lambda: cross_entropy(_x(2, 3, 4), torch.full((2, 4), 7)), ValueError,
        ("target", "class index 7", "0 <= index < 3"),
        lambda: F.cross_entropy(_x(2, 3, 4), torch.full((2, 4), 7))),
    Bad("ce ignore_index is not the -5",
        lambda: cross_entropy(_x(*_LOGITS), _CLASSES(0, -5, 1, 2), ignore_index=-1), ValueError,
        ("target", "class index -5", "ignore_index=-1")),
    Bad("ce 0-d logits", lambda: cross_entropy(_x(), torch.tensor(0)), ValueError,
        ("input", "(C,), (N, C)", "0-d"), lambda: F.cross_entropy(_x(), torch.tensor(0))),
    Bad("ce zero classes", lambda: cross_entropy(_x(4, 0), _T()), ValueError,
        ("input", "(4, 0)", "0 classes", "C >= 1"), lambda: F.cross_entropy(_x(4, 0), _T())),
    Bad("ce target on meta", lambda: cross_entropy(_x(*_LOGITS), _T().to("meta")), RuntimeError,
        ("target", "meta", "input", "cpu"), lambda: F.cross_entropy(_x(*_LOGITS), _T().to("meta"))),
    Bad("ce ignore_index str", lambda: cross_entropy(_x(*_LOGITS), _T(), ignore_index="none"), TypeError,
        ("ignore_index", "int", "str", "'none'"),
        lambda: F.cross_entropy(_x(*_LOGITS), _T(), ignore_index="none")),
    Bad("ce ignore_index float", lambda: cross_entropy(_x(*_LOGITS), _T(), ignore_index=1.5), TypeError,
        ("ignore_index", "int", "float", "1.5"),
        lambda: F.cross_entropy(_x(*_LOGITS), _T(), ignore_index=1.5)),
    Bad("mse broadcast target", lambda: mse_loss(_x(4, 3), _x(1, 3)), ValueError,
        ("target", "(1, 3)", "input shape (4, 3)", "same shape")),
    Bad("mse target on meta", lambda: mse_loss(_x(4, 3), _x(4, 3, device="meta")), RuntimeError,
        ("target", "meta", "input", "cpu"), lambda: F.mse_loss(_x(4, 3), _x(4, 3, device="meta"))),
    Bad("mse input bool", lambda: mse_loss(_x(4, 3, dtype=torch.bool), _x(4, 3)), TypeError,
        ("input", "floating-point", "torch.bool")),
    Bad("half_mse target float16", lambda: half_mse_loss(_x(4, 3), _x(4, 3, dtype=torch.half)), TypeError,
        ("target", "torch.float16", "input", "torch.float32")),
    Bad("half_mse target a list", lambda: half_mse_loss(_x(2), [0.0, 1.0]), TypeError,
        ("target", "torch.Tensor", "list")),
] + [
    Bad(f"{fn.__name__} reduction={red!r}", lambda fn=fn, red=red, args=args: fn(*args(), reduction=red),
        ValueError, ("reduction", "mean, sum, none", repr(red)),
        lambda nfn=nfn, red=red, args=args: nfn(*args(), reduction=red))
    for fn, nfn, args in [
        (mse_loss, F.mse_loss, lambda: (_x(4, 3), _x(4, 3))),
        (half_mse_loss, F.mse_loss, lambda: (_x(4, 3), _x(4, 3))),
        (cross_entropy, F.cross_entropy, lambda: (_x(*_LOGITS), _T())),
    ]
    for red in ["Mean", "elementwise_mean", "avg ", None, 1]
]

# (test_backend.py covers "cuda", "", None and 3 for set_backend/use_backend, and the variable.)
BACKEND_NAMES = [
    Bad("set_backend('tritn')", lambda: mbp.set_backend("tritn"), ValueError,
        ("backend", "auto, torch, triton", "'tritn'")),
    Bad("use_backend('reference')", lambda: mbp.use_backend("reference").__enter__(), ValueError,
        ("backend", "auto, torch, triton", "'reference'")),
]

CASES = LINEAR + MODULES + CONSTRUCTORS + LOSSES + BACKEND_NAMES


def _raise(case: Bad) -> str:
    with pytest.raises(case.error) as info:
        case.call()
    return str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Bad, backend: str) -> None:
    with mbp.use_backend(backend):
        message = _raise(case)
    missing = [part for part in case.says if part not in message]
    assert not missing, f"message {message!r} lacks {missing}"


NATIVE = [c for c in CASES if c.native is not None]


@pytest.mark.parametrize("case", NATIVE, ids=[c.id for c in NATIVE])
def test_native_is_no_clearer(case: Bad) -> None:
    """For the same mistake, our message says strictly more of (argument, given, expected).

    "Clearer" made checkable: native's message (if native raises at all — it accepts a (4, 0)
    logits tensor with an IndexError deep in nll_loss, a str ignore_index with a binding error)
    contains fewer of the case's fragments than ours, which contains all of them.
    """
    assert case.native is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # native's deprecation warning for 'elementwise_mean'
        try:
            case.native()
        except Exception as err:  # noqa: BLE001 — any native failure is a point of comparison
            native_message = str(err)
        else:
            native_message = ""
    message = _raise(case)
    ours = sum(part in message for part in case.says)
    native = sum(part in native_message for part in case.says)
    assert ours == len(case.says) > native, f"native said {native_message!r}, we said {message!r}"


# --------------------------------------------------------------------------- backend-specific


def test_float64_on_triton_is_a_clear_error() -> None:
    """The kernels take float32/float16/bfloat16: float64 is refused by name, never downcast."""
    x, w = _x(4, 3, dtype=torch.double), _x(*W, dtype=torch.double)
    for call in (lambda: linear(x, w), lambda: mbp.MLP([3, 2], dtype=torch.double)(x)):
        with mbp.use_backend("triton"), pytest.raises(TypeError) as info:
            call()
        expected = ("torch.float64", "float32, float16 or bfloat16", "use backend 'torch'")
        assert all(s in str(info.value) for s in expected)


def test_meta_device_torch_computes_shapes_triton_refuses() -> None:
    """The reference runs on "meta" (shapes only, as native); Triton says it cannot run there."""
    x, w, b = _x(5, 3, device="meta"), _x(*W, device="meta"), _x(*B, device="meta")
    with mbp.use_backend("torch"):
        out = linear(x, w, b, "gelu")
    assert out.shape == F.linear(x, w, b).shape and out.device.type == "meta"
    with mbp.use_backend("triton"), pytest.raises(RuntimeError) as info:
        linear(x, w, b, "gelu")
    assert "backend 'triton' cannot run on device meta" in str(info.value)


def test_wrong_state_dict_is_refused_by_name() -> None:
    """Loading weights of the wrong shape fails in load_state_dict, naming the parameter."""
    model = mbp.MLP([3, 4, 2])
    state = mbp.MLP([3, 5, 2]).state_dict()
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(state)
    assert "layers.0.weight" in str(info.value) and "torch.Size([5, 3])" in str(info.value)


def test_integer_like_sizes_are_accepted_as_nn_linear_accepts_them() -> None:
    """The boundary of "bad": numpy integers are sizes (nn.Linear takes them); floats and bools
    are not, whatever their value."""
    import numpy as np

    assert mbp.Linear(np.int64(3), np.int32(2)).weight.shape == torch.nn.Linear(np.int64(3), 2).weight.shape
    assert mbp.LinearAct(np.int64(3), 2).weight.shape == (2, 3)
    assert mbp.MLP([np.int64(3), 4, np.int16(2)]).sizes == [3, 4, 2]
    for bad in (3.0, np.float32(3.0), False):
        with pytest.raises(TypeError, match="in_features: expected a positive int"):
            mbp.Linear(bad, 2)
