"""The Triton backend's `triton_op`s decompose into kernel launches that Inductor can see.

`torch.compile` on CUDA traces ``manualbp::triton_linear_forward`` / ``triton_linear_backward``
through AOTAutograd, which runs their bodies on fake tensors and records each
`wrap_triton(kernel)[grid](...)` launch as a `triton_kernel_wrapper_functional` node. That only
works when every launcher goes through `wrap_triton` and reads no tensor data on the host. This
file proves it without a GPU: `tests/trace_triton_ops.py` traces the two ops on fake CUDA tensors
(sm_90 and sm_80 config lists, every dtype, output- and z-based activations, every
combination of requested gradients, with and without the split-M weight gradient, autotuning on
and off) in a process without the interpreter, and the tests below check the graphs it prints:

* nothing opaque is left: only allocations, views and kernel launches;
* the launches are the ones the eager backend makes (δ pass, prologue, split reduction...);
* each kernel writes only buffers allocated in the graph, never an input (Inductor's own mutation
  analysis of the kernels' TTIR says which arguments they store to);
* scalars stay Python floats/ints (a slope of 0 must reach the kernel as fp32, not as an int);
* shapes and dtypes of the outputs are those of the fake implementation;
* with autotuning on, Inductor gets the whole config list of the launch's flavour;
* eager launches (outside the `triton_op`s) are not wrapped: they stay plain kernel launches.

The numerics of the compiled kernels are the eager kernels' (same launches, same constexprs);
running them on a GPU is `tests/test_compile.py::test_compile_fullgraph_triton_cuda`.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from manualbp.activations import get_activation
from tests.processes import run_bounded

# Slow: one subprocess traces ~300 op variants (minutes on 2 busy cores); `make test-fast` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SHAPE = (8192, 32, 48)  # M, K, N: one 128×128 output tile on 132 SMs → 4 ranges of M
ODD_SHAPE = (130, 33, 65)  # no split; every dimension off the tile grid


def _case(capability, dtype, activation, needs, *, shape=SPLIT_SHAPE, autotune=True, bias=True):
    return {
        "capability": list(capability),
        "autotune": autotune,
        "dtype": dtype,
        "shape": list(shape),
        "activation": activation,
        "negative_slope": 0.2 if activation == "leaky_relu" else 0.01,
        "needs": [needs[0], needs[1], needs[2] and bias],
        "bias": bias,
    }


NEEDS = [(True, True, True), (False, True, True), (True, False, False), (False, False, True)]
CASES = [
    _case(cap, dtype, act, needs)
    for cap, dtype, act, needs in itertools.product(
        [(9, 0), (8, 0)],
        ["bfloat16", "float16", "float32"],
        ["identity", "relu", "leaky_relu", "sigmoid", "gelu", "mish"],
        NEEDS,
    )
] + [
    _case(cap, dtype, act, needs, shape=ODD_SHAPE, autotune=False, bias=False)
    for cap, dtype, act, needs in itertools.product(
        [(9, 0), (8, 0)], ["bfloat16", "float32"], ["tanh", "silu"], NEEDS[:3]
    )
] + [_case((9, 0), "bfloat16", "gelu", NEEDS[0], shape=(0, 32, 48))]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    stdin = "".join(json.dumps(case) + "\n" for case in CASES)
    # The script prints one line per traced op: the timeout is tied to that progress (a busy
    # 2-core machine can take many minutes in all), and a stuck trace is killed with its group.
    proc = run_bounded(
        [sys.executable, "-m", "tests.trace_triton_ops"],
        input=stdin, cwd=ROOT, env=env, idle_timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "assuming every input is mutated" not in proc.stderr, proc.stderr[-4000:]
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert out[0]["wrapping"] == {"outside_is_kernel": True, "inside_is_wrapper": True}
    assert len(out) == 1 + 2 * len(CASES)
    return out[1:]


def _expected_kernels(record: dict) -> list[str]:
    """The launches the eager backend makes (manualbp.backends.triton.linear_backward)."""
    case = record["case"]
    M, _, N = case["shape"]
    if M == 0:
        return []  # nothing to launch: empty outputs, zero-filled reductions
    if record["op"] == "forward":
        return ["linear_forward_kernel"]
    act = get_activation(case["activation"])
    need_input, need_weight, need_bias = case["needs"]
    both = need_input and (need_weight or need_bias)
    # On sm_90 a 16-bit δ prologue would serialise the wgmma: the launchers run the δ pass.
    routed = tuple(case["capability"]) >= (9, 0) and case["dtype"] in ("float16", "bfloat16")
    kernels = []
    if act.name != "identity" and (both or not act.uses_output or routed):
        kernels.append("delta_kernel")
    if need_input:
        kernels.append("grad_input_kernel")
    if need_weight or need_bias:
        kernels.append("grad_weight_kernel")
        if tuple(case["shape"]) == SPLIT_SHAPE:
            kernels += ["split_reduce_kernel"] * (int(need_weight) + int(need_bias))
    return kernels


def test_every_case_traced(records: list[dict]) -> None:
    assert {json.dumps(r["case"]) for r in records} == {json.dumps(c) for c in CASES}


def test_only_kernel_launches_and_allocations_remain(records: list[dict]) -> None:
    allowed = {
        "aten.empty.memory_format", "aten.new_empty.default", "aten.unsqueeze.default",
        "aten.squeeze.dim", "aten.zero.default", "<built-in function getitem>",
    }  # fmt: skip
    for r in records:
        assert set(r["other_targets"]) <= allowed, (r["case"], r["op"], r["other_targets"])


def test_launches_are_the_eager_backends(records: list[dict]) -> None:
    for r in records:
        assert [k["kernel"] for k in r["launches"]] == _expected_kernels(r), (r["case"], r["op"])


def test_kernels_write_only_buffers_of_their_own(records: list[dict]) -> None:
    for r in records:
        for launch in r["launches"]:
            assert launch["written"], (r["case"], launch)
            for source in launch["written_sources"]:
                assert source is not None and source not in r["placeholders"], (r["case"], launch)


def test_scalars_keep_their_python_types(records: list[dict]) -> None:
    for r in records:
        case = r["case"]
        for launch in r["launches"]:
            scalars = launch["scalars"]
            for name in ("M", "N", "K", "R", "C", "SPLIT", "rows_per_split"):
                assert scalars.get(name, "int") == "int", (name, launch)
            for name in ("negative_slope", "prev_negative_slope"):
                assert scalars.get(name, "float") == "float", (name, launch)
        if case["activation"] == "leaky_relu" and r["launches"]:
            # The first launch applies f (forward) or f′ (δ pass or GEMM prologue): it must get
            # the slope; later GEMMs read δ and ignore theirs.
            assert r["launches"][0]["negative_slope"] == pytest.approx(0.2), (case, r["op"])


def test_outputs_match_the_fake_implementation(records: list[dict]) -> None:
    for r in records:
        case = r["case"]
        M, K, N = case["shape"]
        if r["op"] == "forward":
            z = [0] if get_activation(case["activation"]).uses_output else [M, N]
            expected = [[M, N], z]
        else:
            need_input, need_weight, need_bias = case["needs"]
            expected = [[M, K] if need_input else [0], [N, K] if need_weight else [0],
                        [N] if need_bias else [0]]  # fmt: skip
        assert r["outputs"] == expected, (case, r["op"])
        assert set(r["output_dtypes"]) == {f"torch.{case['dtype']}"}, (case, r["op"])


def test_autotuning_hands_inductor_the_whole_config_list(records: list[dict]) -> None:
    from manualbp.triton_kernels import linear_forward as lf

    for r in records:
        case = r["case"]
        if r["op"] != "forward" or not r["launches"]:
            continue
        (launch,) = r["launches"]
        if not case["autotune"]:
            assert launch["configs"] == 1, case
            continue
        dtype = getattr(torch, case["dtype"])
        act_id = get_activation(case["activation"]).kernel_id
        flavour = lf.config_flavour(act_id, tuple(case["capability"]), dtype)
        assert launch["configs"] == len(lf.CONFIGS[flavour]), case
