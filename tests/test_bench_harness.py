"""The benchmark harness's own arithmetic, on CPU, with fake clocks where time matters: the
interleaved block order, medians and ratios, the summary, the grid options, the allocation-event
peak, and a tiny goal-grid run end to end. No test asserts how long anything took."""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import manualbp as mbp
from manualbp.bench import common
from manualbp.bench.__main__ import activation_names, build_parser, main
from manualbp.bench.cases import Case, MlpCell
from manualbp.bench.common import Env, Pending, reference_dtype, time_group
from manualbp.bench.interleave import block_order, calls_per_block, interleaved, quantile
from manualbp.bench.memory import (
    HIDDEN_SAVES,
    Allocations,
    _memory_row,
    allocations,
    measure_memory,
    running_peak,
)
from manualbp.bench.report import add_speedups
from manualbp.bench.runner import BenchConfig, _cases, all_dtypes, all_thread_counts, runs_under
from manualbp.bench.summary import geometric_mean, spreads, summary_lines


class FakeClock:
    """A clock that only moves when a fake contender runs: each call costs its `cost` seconds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def contender(self, name: str, cost: float) -> Callable[[], None]:
        def call() -> None:
            self.now += cost
            self.log.append(name)

        return call


# --------------------------------------------------------------------------------- interleaving


def test_block_order_rotates_and_balances_positions() -> None:
    # two contenders: A B, B A, B A, A B — each leads as often, and each follows the other
    assert [block_order(2, r) for r in range(4)] == [[0, 1], [1, 0], [1, 0], [0, 1]]
    for count in (1, 2, 3, 5):
        rounds = [block_order(count, r) for r in range(2 * count)]
        assert all(sorted(order) == list(range(count)) for order in rounds)
        for position in range(count):
            seen = [order[position] for order in rounds]
            assert all(seen.count(i) == 2 for i in range(count)), (count, position, seen)
    with pytest.raises(ValueError, match="at least one contender"):
        block_order(0, 0)


def test_calls_per_block_sizes_the_slowest_block() -> None:
    assert calls_per_block([1e-3, 4e-3], 0.02) == 5
    assert calls_per_block([0.5], 0.02) == 1  # never fewer than one call
    assert calls_per_block([], 0.02) == 1 and calls_per_block([0.0], 0.02) == 1


def test_interleaved_blocks_medians_and_ratio_with_a_fake_clock() -> None:
    clock = FakeClock()
    costs = {"native": 2e-3, "fast": 1e-3, "slow": 4e-3}
    fns = [clock.contender(name, cost) for name, cost in costs.items()]
    rounds, rep_ms = 6, 120.0
    results = interleaved(fns, warmup_ms=0, rep_ms=rep_ms, rounds=rounds, clock=clock)
    calls = calls_per_block(list(costs.values()), rep_ms / 1e3 / rounds)
    assert calls == 5 and all(r.calls_per_block == calls and r.error is None for r in results)

    names = list(costs)
    # warm-up: one untimed call each, then one timed call each (warmup_ms=0), then the blocks
    assert clock.log[: 2 * len(names)] == names + names
    blocks = clock.log[2 * len(names) :]
    assert len(blocks) == rounds * len(names) * calls
    runs = [blocks[i : i + calls] for i in range(0, len(blocks), calls)]
    assert all(len(set(run)) == 1 for run in runs)  # one uninterrupted block per contender and round
    expected = [names[i] for r in range(rounds) for i in block_order(len(names), r)]
    assert [run[0] for run in runs] == expected

    for result, cost in zip(results, costs.values()):
        assert len(result.block_seconds) == rounds
        assert result.median_ms == pytest.approx(cost * 1e3, rel=1e-9)
    # × native from the medians, as the report computes it
    key = {
        "suite": "mlp",
        "case": "c",
        "dtype": "float32",
        "activation": "relu",
        "op": "train_step",
        "threads": 1,
    }
    rows = [{**key, "contender": n, "status": "ok", "median_ms": r.median_ms} for n, r in zip(names, results)]
    add_speedups(rows)
    assert [round(r["speedup_vs_native"], 9) for r in rows] == [1.0, 2.0, 0.5]


def test_interleaved_median_and_quantiles_ignore_one_slow_block() -> None:
    """A neighbour's burst during one block moves the mean, not the median."""
    clock = FakeClock()
    calls = {"n": 0}

    def bursty() -> None:
        calls["n"] += 1
        # calls 1-2 are the warm-up, then blocks of 5: calls 23-27 are the fifth block
        clock.now += 1e-3 * (50 if 23 <= calls["n"] < 28 else 1)

    (result,) = interleaved([bursty], warmup_ms=0, rep_ms=45.0, rounds=9, clock=clock)
    assert result.calls_per_block == 5
    assert result.median_ms == pytest.approx(1.0, rel=1e-9)
    assert max(result.block_seconds) == pytest.approx(50e-3, rel=1e-9)
    assert result.quantile_ms(0.8) == pytest.approx(1.0, rel=1e-9)
    values = [3.0, 1.0, 2.0, 10.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert quantile(values, q) == pytest.approx(float(torch.quantile(torch.tensor(values), q)))
    assert quantile(values, 0.5) == statistics.median(values)


def test_interleaved_resizes_blocks_when_the_load_changes() -> None:
    """Calls slow down tenfold after the third round: the round that sees it is long, the later
    ones shrink to one call, so a neighbour's burst cannot stretch a timing tenfold."""
    clock = FakeClock()
    calls = {"n": 0}

    def slows_down() -> None:
        calls["n"] += 1
        clock.now += 1e-3 if calls["n"] <= 32 else 1e-2  # 2 warm-up calls + 3 blocks of 10

    (result,) = interleaved([slows_down], warmup_ms=0, rep_ms=90.0, rounds=9, clock=clock)
    assert result.calls_per_block == 10  # the first round's
    assert result.block_seconds == pytest.approx([1e-3] * 3 + [1e-2] * 6, rel=1e-9)
    assert calls["n"] == 2 + 3 * 10 + 10 + 5 * 1


def test_interleaved_keeps_timing_the_others_when_one_fails() -> None:
    clock = FakeClock()
    state = {"calls": 0}

    def breaks_later() -> None:
        state["calls"] += 1
        clock.now += 1e-3
        if state["calls"] > 3:
            raise RuntimeError("broken on purpose")

    good = clock.contender("good", 1e-3)
    results = interleaved([breaks_later, good], warmup_ms=0, rep_ms=20.0, rounds=4, clock=clock)
    assert isinstance(results[0].error, RuntimeError) and results[0].block_seconds == []
    assert results[1].error is None and len(results[1].block_seconds) == 4
    with pytest.raises(ValueError, match="rounds"):
        interleaved([good], warmup_ms=0, rep_ms=1.0, rounds=0, clock=clock)


def test_time_group_times_all_contenders_of_an_op_in_one_interleaved_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = common.interleaved

    def spy(fns, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(fns))
        return real(fns, **kwargs)

    monkeypatch.setattr(common, "interleaved", spy)
    case = Case("layer", 4, 4, 4, torch.float32, "relu")
    env = Env(torch.device("cpu"), warmup_ms=0, rep_ms=1, ceilings=None, rounds=3)
    released: list[str] = []

    def broken_prepare() -> None:
        raise RuntimeError("cannot prepare")

    pending = [
        Pending({"contender": "a"}, lambda: None, release=lambda: released.append("a")),
        Pending({"contender": "b"}, lambda: None, prepare=broken_prepare),
        Pending({"contender": "c"}, lambda: None, release=lambda: released.append("c")),
    ]
    rows = time_group(case, "forward", pending, env)
    assert calls == [2]  # a and c together; b never reached the timer
    assert [r["contender"] for r in rows] == ["a", "b", "c"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and "cannot prepare" in rows[1]["note"]
    assert released == ["a", "c"]
    assert all(r["calls_per_block"] >= 1 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] for r in rows[::2])


# ------------------------------------------------------------------------------------ summary


def test_summary_geomean_min_max_and_counts_below() -> None:
    key = {"suite": "mlp", "dtype": "float32", "activation": "relu", "op": "train_step", "threads": 1}
    ratios = [1.2, 0.99, 0.5, 2.0]
    rows = [
        {**key, "case": f"c{i}", "contender": "ours", "status": "ok", "speedup_vs_native": v}
        for i, v in enumerate(ratios)
    ]
    rows += [
        {**key, "case": "c0", "contender": "native", "status": "ok", "speedup_vs_native": 1.0},
        {**key, "case": "c9", "contender": "ours", "status": "error"},  # not a ratio: left out
    ]
    (spread,) = spreads(rows)
    assert spread.contender == "ours" and spread.count == 4
    assert spread.geomean == pytest.approx((1.2 * 0.99 * 0.5 * 2.0) ** 0.25, rel=1e-12)
    assert (spread.low, spread.high, spread.below_1, spread.below_098) == (0.5, 2.0, 2, 1)
    assert spread.low_case == "c2 float32 relu 1t"
    text = "\n".join(summary_lines(rows))
    assert "## summary" in text
    line = "| mlp | train_step | ours | native | 4 | 1.044 | 0.500 (c2 float32 relu 1t) | 2.000 | 2 | 1 |"
    assert line in text
    assert summary_lines([]) == []
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="positive"):
        geometric_mean([1.0, 0.0])


def test_speedups_per_thread_count_and_against_torch_linear_cross_entropy() -> None:
    key = {"suite": "loss", "case": "m", "dtype": "float32", "activation": "", "op": "fwd+bwd"}

    def row(contender: str, variant: str, threads: int, ms: float) -> dict:
        return {**key, "contender": contender, "variant": variant, "threads": threads,
                "status": "ok", "median_ms": ms}  # fmt: skip

    rows = [
        row("native", "unfused", 1, 4.0), row("native", "torch-fused", 1, 3.0),
        row("native", "torch-chunked", 1, 2.0), row("ours", "fused", 1, 1.0),
        row("native", "unfused", 2, 2.0), row("ours", "fused", 2, 4.0),
    ]  # fmt: skip
    add_speedups(rows)
    assert [r["speedup_vs_native"] for r in rows] == [1.0, 4 / 3, 2.0, 4.0, 1.0, 0.5]
    # the faster of torch's own variants (chunked, 2 ms) is the bar; its own rows get none
    assert rows[3]["speedup_vs_torch_lce"] == 2.0 and rows[0]["speedup_vs_torch_lce"] == 0.5
    assert "speedup_vs_torch_lce" not in rows[1] and "speedup_vs_torch_lce" not in rows[5]
    versus = {(s.contender, s.versus) for s in spreads(rows)}
    assert ("ours (fused)", "native") in versus and any(v.startswith("torch") for _, v in versus)


# ------------------------------------------------------------------------------- grid options


def test_grid_options_parse() -> None:
    parser = build_parser(prog="manualbp-bench")
    args = parser.parse_args(["--depth", "3"])
    assert args.depths == [3] and args.rounds == 9 and args.threads is None
    args = parser.parse_args(
        ["--depths", "2", "4", "8", "--threads", "1", "2", "--mlp-shapes", "32x64", "8x4x2", "--rounds", "5"]
    )
    assert args.depths == [2, 4, 8] and args.threads == [1, 2] and args.rounds == 5
    assert args.mlp_shapes == [(32, 64, 64), (8, 4, 2)]
    for bad in ("32", "0x64", "axb", "1x2x3x4"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--mlp-shapes", bad])
    assert activation_names(["all"]) == list(mbp.ACTIVATIONS)
    assert activation_names(["gelu", "all"])[0] == "gelu" and len(activation_names(["gelu", "all"])) == len(
        mbp.ACTIVATIONS
    )


def test_mlp_cells_parse_and_sample_the_grid() -> None:
    cell = MlpCell.parse("4096x2048:2:relu,gelu:bf16:1")
    assert cell == MlpCell((4096, 2048, 2048), (2,), ("relu", "gelu"), (torch.bfloat16,), (1,))
    assert MlpCell.parse("32x8x4") == MlpCell((32, 8, 4))
    assert MlpCell.parse("32x8:*:*:float32") == MlpCell((32, 8, 8), dtypes=(torch.float32,))
    for bad in ("32", "0x8", "32x8:x", "32x8:0", "32x8:2:relu:float32:0", "32x8:1:relu:f32:1:extra"):
        with pytest.raises(ValueError, match="mlp cell"):
            MlpCell.parse(bad)
    with pytest.raises(ValueError, match="unknown dtype"):
        MlpCell.parse("32x8:2:relu:float8")
    args = build_parser().parse_args(["--mlp-cells", "64x128:2,4"])
    assert args.mlp_cells == [MlpCell((64, 128, 128), (2, 4))]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--mlp-cells", "64x128:two"])

    config = BenchConfig(
        suites=("mlp",),
        mlp_cells=(cell, MlpCell((8, 16, 16))),
        depths=(2, 8),
        activations=("tanh",),
        dtypes=(torch.float32,),
        threads=(2,),
        device="cpu",
    )
    timing, _ = _cases(config)  # only the cells: no product from --shapes
    got = [(c.M, c.depth, c.activation, str(c.dtype), c.threads) for c in timing]
    assert got == [
        (4096, 2, "relu", "torch.bfloat16", 1), (4096, 2, "gelu", "torch.bfloat16", 1),
        (8, 2, "tanh", "torch.float32", None), (8, 8, "tanh", "torch.float32", None),
    ]  # fmt: skip
    assert all_thread_counts(config) == [2, 1] and all_dtypes(config) == [torch.float32, torch.bfloat16]
    assert [runs_under(c, 2, config) for c in timing] == [False, False, True, True]
    assert [runs_under(c, 1, config) for c in timing] == [True, True, False, False]


def test_cases_cover_the_grid() -> None:
    config = BenchConfig(
        suites=("layer", "mlp", "loss"),
        shapes=((4, 5, 6),),
        mlp_shapes=((32, 64, 64), (8, 16, 16)),
        loss_shapes=((8, 10, 4),),
        depths=(2, 4, 8),
        activations=("relu", "gelu"),
        dtypes=(torch.float32, torch.bfloat16),
        device="cpu",
    )
    timing, memory = _cases(config)
    mlp = [c for c in timing if c.suite == "mlp"]
    assert len(mlp) == 2 * 2 * 3 * 2 and memory == []
    expected = itertools.product(
        [(32, 64, 64), (8, 16, 16)], [2, 4, 8], ["relu", "gelu"], [torch.float32, torch.bfloat16]
    )
    assert sorted((c.M, c.N, c.K, c.depth, c.activation, str(c.dtype)) for c in mlp) == sorted(
        (*shape, depth, act, str(dtype)) for shape, depth, act, dtype in expected
    )
    assert len([c for c in timing if c.suite == "layer"]) == 2 * 2  # --shapes × activations × dtypes
    assert [(c.M, c.N, c.K) for c in timing if c.suite == "loss"] == [(8, 10, 4)] * 2
    assert BenchConfig(depth=3).depths == ()  # --depth alone: one depth
    assert [c.depth for c in _cases(BenchConfig(suites=("mlp",), depth=3))[0]] == [3]


# --------------------------------------------------------------------------------- peak memory


def test_running_peak_and_allocation_events_of_a_known_pattern() -> None:
    assert running_peak([100, 200, -100, 50, -250]) == Allocations(peak=300, net=0)
    assert Allocations(300, 200).then(Allocations(150, -50)) == Allocations(350, 150)
    mib = 1 << 20

    def pattern() -> list[torch.Tensor]:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a  # freed: 3 MiB was the peak
        c = torch.empty(mib // 2, dtype=torch.uint8)
        return [b, c]

    measured, kept = allocations(pattern, torch.device("cpu"))
    assert measured == Allocations(peak=3 * mib, net=2 * mib + mib // 2)
    assert sum(t.numel() for t in kept) == 2 * mib + mib // 2


class _KeepsGradInCtx(torch.autograd.Function):
    """Computes its gradient in forward and keeps it as a ctx attribute, as torch's chunked
    F.linear_cross_entropy does: invisible to saved-tensor hooks."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.grad = 2 * x
        return (x * x).sum()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        return grad_out * ctx.grad


def test_measure_memory_sees_tensors_kept_outside_save_for_backward() -> None:
    x = torch.randn(1024, 256, requires_grad=True)
    nbytes = x.numel() * 4

    def backward(loss: torch.Tensor) -> object:
        return torch.autograd.grad(loss, [x])

    hidden = measure_memory(lambda: _KeepsGradInCtx.apply(x), backward, [x], torch.device("cpu"))
    assert hidden.saved == 0 and hidden.extra == 0
    assert nbytes <= hidden.retained <= nbytes + 64  # the kept gradient (+ the scalar loss)
    assert hidden.peak >= 2 * nbytes  # the kept gradient and the returned one
    row = _memory_row(Case("loss", 4, 4, 4, torch.float32, ""), "loss", "v", "c", hidden)
    assert row["note"] == HIDDEN_SAVES and row["retained_bytes"] == hidden.retained

    native = measure_memory(lambda: (x * x).sum(), backward, [x], torch.device("cpu"))
    assert native.saved == nbytes and native.extra == 0 and native.retained <= 64  # saves x itself
    assert _memory_row(Case("loss", 4, 4, 4, torch.float32, ""), "loss", "v", "c", native)["note"] == ""


# ------------------------------------------------------------------------------ end to end


def test_cli_times_a_tiny_goal_grid_per_thread_count(tmp_path: Path) -> None:
    argv = [
        "--device", "cpu", "--suites", "mlp", "loss", "memory", "--mlp-shapes", "8x12", "--depths", "1", "2",
        "--loss-shapes", "16x10x6", "--dtypes", "float32", "--activations", "relu", "tanh",
        "--contenders", "manualbp-torch", "manualbp-layers", "native", "--memory-contenders", "native",
        "--threads", "1", "2", "--rounds", "3", "--rep-ms", "1", "--warmup-ms", "0", "--no-ceilings",
        "--no-plot", "--out", str(tmp_path), "--name", "grid", "--no-progress",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    with (tmp_path / "grid.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    mlp = [r for r in rows if r["suite"] == "mlp"]
    # 2 thread counts × 2 depths × 2 activations × 3 contenders
    assert len(mlp) == 24 and all(r["status"] == "ok" for r in mlp), mlp
    assert {(r["threads"], r["depth"]) for r in mlp} == {(t, d) for t in "12" for d in "12"}
    for r in mlp:
        assert int(r["calls_per_block"]) >= 1 and float(r["q20_ms"]) <= float(r["median_ms"])
        if r["contender"] == "native":
            assert math.isclose(float(r["speedup_vs_native"]), 1.0)
    loss = [r for r in rows if r["suite"] == "loss"]
    assert {r["variant"] for r in loss} >= {"unfused", "torch-fused", "torch-chunked"}
    memory = [r for r in rows if r["suite"] == "memory"]
    assert memory and {r["threads"] for r in memory} == {"1"}  # measured once, not per thread count
    assert all(r["status"] == "ok" and int(r["peak_bytes"]) > 0 for r in memory), memory
    text = (tmp_path / "grid.md").read_text()
    assert "--threads 1 2" in text and "interleaved medians" in text and "3 rounds" in text
    assert "## summary" in text and "| mlp | train_step | manualbp-layers | native | 8 |" in text


def test_reference_dtype_float64_where_cheap_else_float32_for_16_bit() -> None:
    env = Env(torch.device("cpu"), warmup_ms=0, rep_ms=1, ceilings=None, ref64_max_flops=1e6)
    small = Case("loss", 8, 16, 4, torch.bfloat16, "")
    large = Case("loss", 2048, 8192, 256, torch.bfloat16, "")
    assert reference_dtype(small, env) == torch.float64
    assert reference_dtype(large, env) == torch.float32  # never bfloat16 against bfloat16
    assert reference_dtype(Case("loss", 2048, 8192, 256, torch.float16, ""), env) == torch.float32
    assert reference_dtype(Case("mlp", 4096, 2048, 2048, torch.float32, "relu", 2), env) == torch.float32
