"""The accumulating δ sweep in layer groups (`fused_mlp_acc.py`): each program accumulates one
group's δᵀh and Σδ and carries δ down through the layers above it; the groups' partials are
reduced in a fixed order. Under Triton's interpreter against float64 native autograd and network
mode (tests/test_fused_mlp.py's `_check`), with the group sizes forced to 1, 2 and 3 layers and
every activation (beyond the ones a GPU launch takes: the arithmetic does not depend on them),
depths 1 to 8, odd row counts, bias on and off, the three dtypes, and bitwise reruns.
"""

from __future__ import annotations

import pytest
import torch

import manualbp as mbp

pytest.importorskip("triton")

from manualbp.triton_kernels import _utils, fused_mlp, fused_mlp_acc  # noqa: E402
from manualbp.triton_kernels.activations import ACTIVATION_IDS  # noqa: E402

from .test_fused_mlp import (  # noqa: E402, F401
    DEVICE,
    _check,
    _check_frozen_layer_and_reruns,
    _model,
    _native,
    _poison,
    pytestmark,
)

ACTS = list(mbp.ACTIVATIONS)


@pytest.fixture
def grouped(monkeypatch: pytest.MonkeyPatch):
    """`set(layers)`: the accumulating sweep for every stack (float32 too), in groups of
    `layers` layers (any width), on 3 "SMs"; returns the bounds each launch used."""
    monkeypatch.setattr(_utils, "num_sms", lambda device: 3)
    monkeypatch.setattr(fused_mlp_acc, "fits", lambda plan, *_: True)
    real, seen = fused_mlp_acc.group_bounds, []

    def spy(plan, capability=None):
        seen.append(real(plan, capability))
        return seen[-1]

    monkeypatch.setattr(fused_mlp_acc, "group_bounds", spy)

    def set_layers(layers: int) -> list:
        monkeypatch.setattr(fused_mlp_acc, "group_limits", lambda plan, capability: (2**17, layers))
        return seen

    return set_layers


def _expected_bounds(depth: int, layers: int) -> tuple[int, ...]:
    return (*range(0, depth, layers), depth)


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("depth", range(1, 9))
def test_groups_match_native(depth: int, layers: int, grouped) -> None:
    """fp32, widths that differ per layer; the activation, the bias and the row count (1, 37,
    130: a masked tail, one tile, several per program) vary with the case."""
    seen = grouped(layers)
    case = depth * 3 + layers
    act = ACTS[case % len(ACTS)]
    sizes = [3] + [16 + 8 * (i % 2) for i in range(depth - 1)] + [2]
    model = _model(sizes, act, ACTS[(case + 3) % len(ACTS)], torch.float32, bias=case % 2 == 0)
    rows = (1, 37, 130)[case % 3]
    _check(model, torch.randn(rows, 3, device=DEVICE), torch.float32)
    assert seen and all(b == _expected_bounds(depth, layers) for b in seen)


@pytest.mark.parametrize("name", ACTS)
def test_groups_in_16_bits(name: str, grouped) -> None:
    """Every activation in float16 or bfloat16 (alternating), 4 layers in groups of 1 or 2;
    kinked 16-bit outputs against network mode only (as test_fused_mlp does)."""
    i = ACTS.index(name)
    dtype = (torch.float16, torch.bfloat16)[i % 2]
    seen = grouped(1 + i % 2)
    model = _model([5, 32, 17, 24, 3], name, "tanh", dtype, bias=i % 3 != 0)
    kinked = name in ("relu", "leaky_relu")
    _check(model, torch.randn(45, 5, device=DEVICE).to(dtype), dtype, native_too=not kinked)
    assert seen and all(len(b) == (5 if i % 2 == 0 else 3) for b in seen)


def test_groups_partial_gradients_and_bitwise_reruns(grouped) -> None:
    """5 layers in groups of 2 with a frozen middle layer and an input without grad (a group
    with a layer that accumulates nothing, no ∇x): the rest match float64, and two backward
    passes give bitwise-identical gradients."""
    grouped(2)
    _check_frozen_layer_and_reruns(_model([4, 20, 20, 20, 20, 3], "silu", "identity", torch.float32), 2)


def _plan(sizes: list[int], act: str = "tanh") -> fused_mlp.Plan:
    depth = len(sizes) - 1
    ids = [ACTIVATION_IDS[act]] * (depth - 1) + [0]
    return fused_mlp.Plan(sizes, ids, [0.01] * depth, [True] * depth)


def test_group_choice_per_capability() -> None:
    """sm_90: pairs of 64-wide layers for the activations whose f′ reads a, single ones for
    those that recompute f(z) up to 4 layers, single ones beyond 4 layers; sm_80: single 64-wide layers
    (pairs at 32) for the activations whose f′ reads a, at most 4 layers;
    the rest — float32,
    layers over 64 × 64, the activations that spill or serialise — take the split path."""
    hopper, ampere = (9, 0), (8, 0)
    bounds = fused_mlp_acc.group_bounds
    assert bounds(_plan([2, 64, 64, 64, 3]), hopper) == (0, 2, 4)
    assert bounds(_plan([2] + [64] * 7 + [3]), hopper) == tuple(range(9))  # pairs up to 4 layers
    assert bounds(_plan([2, 64, 64, 64, 3], "silu"), hopper) == (0, 1, 2, 3, 4)
    assert bounds(_plan([2, 64, 64, 64, 3]), ampere) == (0, 1, 2, 3, 4)
    assert bounds(_plan([32] * 5, "tanh"), ampere) == (0, 2, 4)
    assert bounds(_plan([32] * 5, "silu"), hopper) == (0, 2, 4)
    assert bounds(_plan([32] * 5), None) == bounds(_plan([32] * 5), hopper)  # the interpreter's
    for capability in (hopper, ampere):
        assert fused_mlp_acc.fits(_plan([2, 64, 64, 64, 3]), capability, torch.bfloat16)
        assert not fused_mlp_acc.fits(_plan([2, 64, 64, 64, 3]), capability, torch.float32)
        assert not fused_mlp_acc.fits(_plan([2, 128, 128, 3]), capability)  # 16384 accumulators
        assert not fused_mlp_acc.fits(_plan([2, 64, 64, 3], "mish"), capability)
    assert not fused_mlp_acc.fits(_plan([2, 64, 64, 3], "relu"), hopper)
    assert fused_mlp_acc.fits(_plan([2, 64, 64, 3], "relu"), ampere)
    assert not fused_mlp_acc.fits(_plan([2, 64, 64, 3], "gelu"), ampere)
    assert not fused_mlp_acc.fits(_plan([2, 64, 64, 3], "silu"), ampere)
    assert fused_mlp_acc.fits(_plan([2] + [64] * 3 + [3], "gelu"), hopper)
    assert not fused_mlp_acc.fits(_plan([2] + [64] * 7 + [3], "gelu"), hopper)  # 8 layers
    assert fused_mlp_acc.fits(_plan([2] + [64] * 7 + [3]), hopper)
    assert not fused_mlp_acc.fits(_plan([2] + [64] * 7 + [3]), ampere)  # over 4 layers


def test_group_programs_balance_the_dots() -> None:
    """Programs in proportion to each group's dots per tile (its layers' δᵀh, and the δW of
    every layer from the top down to its lowest), rounded down (no more than the SMs), at
    least 1, at most the tiles."""
    # 4 layers in pairs: the lower pair 2 + 3 dots, the upper 2 + 1
    assert fused_mlp_acc.group_programs((0, 2, 4), 4, 1000, 132) == [82, 49]
    assert fused_mlp_acc.group_programs((0, 2, 4), 4, 10, 132) == [10, 10]
    assert fused_mlp_acc.group_programs((0, 1, 2, 3, 4), 4, 1000, 3) == [1, 1, 1, 1]
    for depth in range(1, 9):
        bounds = tuple(range(depth + 1))
        assert sum(fused_mlp_acc.group_programs(bounds, depth, 10**6, 132)) <= 132


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_resident_forward_takes_its_tiles_in_turn(dtype: torch.dtype, monkeypatch) -> None:
    """The persistent forward (every Wᵀ loaded once per program) on 2 programs for 7 row
    tiles: each program runs several tiles, the last one masked (then the accumulating
    backward, which the launch takes for this stack)."""
    monkeypatch.setattr(_utils, "num_sms", lambda device: 1)
    model = _model([3, 32, 64, 2], "tanh", "identity", dtype)
    assert fused_mlp.forward_resident(_plan([3, 32, 64, 2]), dtype)
    _check(model, torch.randn(200, 3, device=DEVICE).to(dtype), dtype)


def test_resident_forward_choice() -> None:
    """16-bit stacks of widths ≤ 64 and ≤ 64 KB of weights run the resident forward; float32,
    width 128 and larger stacks one tile per program."""
    assert fused_mlp.forward_resident(_plan([2] + [64] * 7 + [3]), torch.bfloat16)  # 53 KB
    assert not fused_mlp.forward_resident(_plan([2, 64, 64, 3]), torch.float32)
    assert not fused_mlp.forward_resident(_plan([2, 128, 3]), torch.float16)
