"""The benchmark harness (manualbp.bench) and experiments/forward_vs_reverse.py, on CPU.

No timing is asserted: only that the harness runs end to end, writes what it promises, refuses to
time a wrong contender, and that its ceilings and case arithmetic are sane.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from manualbp.bench.__main__ import main
from manualbp.bench.cases import TOLERANCES, Case
from manualbp.bench.common import Reference, max_rel_error
from manualbp.bench.contenders import NativeContender, make_contenders
from manualbp.bench.report import COLUMNS, add_speedups
from manualbp.bench.runner import BenchConfig, run_benchmark
from manualbp.bench.timing import measure_ceilings

REPO = Path(__file__).resolve().parents[1]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_cli_runs_layer_mlp_loss_memory_end_to_end(tmp_path: Path) -> None:
    M, N, K = 8, 12, 6
    argv = [
        "--device", "cpu", "--suites", "layer", "mlp", "loss", "memory", "--shapes", f"{M}x{N}x{K}",
        "--depth", "2", "--dtypes", "float32", "--activations", "gelu", "relu",
        "--contenders", "manualbp-torch", "native", "--rep-ms", "1", "--warmup-ms", "0",
        "--threads", "1", "--out", str(tmp_path), "--name", "tiny", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0

    header, rows = _read_csv(tmp_path / "tiny.csv")
    assert header == list(COLUMNS)
    timed = [r for r in rows if r["suite"] in ("layer", "mlp")]
    # 2 activations × 2 contenders × (3 layer ops + 1 train step)
    assert len(timed) == 2 * 2 * 4
    for row in timed:
        assert row["status"] == "ok", row
        assert row["device"].startswith("CPU") and row["torch"] == torch.__version__ and row["date"]
        assert float(row["median_ms"]) > 0 and float(row["tflops"]) > 0 and float(row["gbps"]) > 0
        assert float(row["floor_ms"]) > 0 and row["floor_bound"] in ("compute", "memory")
        assert float(row["max_rel_err"]) <= TOLERANCES[torch.float32]
        assert row["reference"] == "float64"
        assert math.isclose(float(row["speedup_vs_native"]), 1.0) or row["contender"] != "native"
    loss = [r for r in rows if r["suite"] == "loss" and r["variant"] == "unfused"]
    assert {r["contender"] for r in loss} == {"manualbp-torch", "native"}
    for row in loss:  # the unfused head: linear, then cross-entropy over N = 12 classes
        assert row["status"] == "ok" and float(row["max_rel_err"]) <= TOLERANCES[torch.float32], row
        assert float(row["flops"]) == 6 * M * N * K
    layer_forward = next(r for r in timed if r["suite"] == "layer" and r["op"] == "forward")
    assert float(layer_forward["flops"]) == 2 * M * N * K

    memory = [r for r in rows if r["suite"] == "memory"]
    assert {(r["op"], r["contender"]) for r in memory} >= {
        (what, who) for what in ("layer", "mlp") for who in ("manualbp-torch", "native")
    }
    for row in memory:
        if row["variant"] == "fused":
            continue  # manualbp's fused linear_cross_entropy: its own tests hold it to native
        if row["variant"].startswith("torch-"):
            # torch's own F.linear_cross_entropy (a contender, not ours): what it saves is its
            # business (a variant may report 0 saved bytes through saved_tensors_hooks).
            assert row["status"] == "ok", row
            continue
        assert row["status"] == "ok", row
        assert int(row["saved_bytes"]) > 0
        if row["op"] == "layer":
            # x and W are saved by reference; beyond them, exactly one M×N float32 tensor
            # (a for relu, z for gelu) — for manualbp and for native alike.
            assert int(row["saved_activation_bytes"]) == M * N * 4, row

    text = (tmp_path / "tiny.md").read_text()
    assert "python -m manualbp.bench --device cpu" in text
    assert all(f"## {suite}" in text for suite in ("layer", "mlp", "loss", "memory"))
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Scaled(nn.Module):
    """Multiplies by 1 + 1e-3: a relative error 100 times the float32 tolerance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.001


class WrongContender(NativeContender):
    def __init__(self) -> None:
        super().__init__(None)
        self.name = "wrong"

    def layer_module(self, in_features: int, out_features: int, activation: str) -> nn.Module:
        return nn.Sequential(super().layer_module(in_features, out_features, activation), _Scaled())

    def mlp_module(self, sizes: list[int], activation: str) -> nn.Module:  # type: ignore[override]
        return nn.Sequential(super().mlp_module(sizes, activation), _Scaled())


class BrokenContender(NativeContender):
    def __init__(self) -> None:
        super().__init__(None)
        self.name = "broken"

    def layer_module(self, in_features: int, out_features: int, activation: str) -> nn.Module:
        raise RuntimeError("broken on purpose")

    def mlp_module(self, sizes: list[int], activation: str) -> nn.Module:  # type: ignore[override]
        raise RuntimeError("broken on purpose")


def _quick_cpu_config(tmp_path: Path, **fields: Any) -> BenchConfig:
    """A CPU run of the harness as small and quiet as it goes: one thread, no warm-up, 1 ms of
    timing, no ceilings, plot or progress bar, writing into `tmp_path`."""
    quick = dict(device="cpu", out=tmp_path, warmup_ms=0, rep_ms=1, threads=1,
                 ceilings=False, plot=False, progress=False)  # fmt: skip
    return BenchConfig(**quick, **fields)


def test_correctness_gate_reports_wrong_contender_as_error(tmp_path: Path) -> None:
    config = _quick_cpu_config(
        tmp_path,
        suites=("layer", "mlp"),
        shapes=((5, 7, 3),),
        dtypes=(torch.float32,),
        activations=("tanh",),
        contenders=("native",),
        depth=2,
        extra_contenders=(WrongContender(), BrokenContender()),
    )
    rows = run_benchmark(config).rows
    native = [r for r in rows if r["contender"] == "native"]
    wrong = [r for r in rows if r["contender"] == "wrong"]
    broken = [r for r in rows if r["contender"] == "broken"]
    assert len(native) == len(wrong) == len(broken) == 4  # 3 layer ops + 1 train step
    assert all(r["status"] == "ok" for r in native)
    for row in wrong:
        assert row["status"] == "error" and "wrong result" in row["note"], row
        assert "median_ms" not in row and "speedup_vs_native" not in row
    for row in broken:
        assert row["status"] == "error" and "broken on purpose" in row["note"], row
        assert "median_ms" not in row


def test_triton_contender_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    (triton,) = make_contenders(["manualbp-triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "--interpreter" in reason
    with pytest.raises(ValueError, match="contenders: unknown name 'nope'"):
        make_contenders(["nope"])


def test_fused_contender_in_the_mlp_suite_only(tmp_path: Path) -> None:
    """manualbp-fused (MLP(mode="fused")) times the mlp suite's train step, passing the
    correctness gate under the interpreter, and sits out the layer suite and too-wide MLPs."""
    config = _quick_cpu_config(
        tmp_path,
        suites=("layer", "mlp"),
        shapes=((37, 16, 3), (9, 130, 3)),
        dtypes=(torch.float32,),
        activations=("tanh",),
        contenders=("native", "manualbp-fused"),
        depth=2,
    )
    rows = [r for r in run_benchmark(config).rows if r["contender"] == "manualbp-fused"]
    mlp = [r for r in rows if r["suite"] == "mlp"]
    assert [(r["N"], r["status"]) for r in mlp] == [(16, "ok"), (130, "skipped")], mlp
    assert "128" in mlp[1]["note"] and "mode='network'" in mlp[1]["note"]
    layer = [r for r in rows if r["suite"] == "layer"]
    assert layer and all(r["status"] == "skipped" and "mlp suite only" in r["note"] for r in layer)


def test_ceilings_and_roofline_are_positive() -> None:
    ceilings = measure_ceilings(torch.device("cpu"), [torch.float32], warmup_ms=0, rep_ms=1)
    assert ceilings.peak_flops[torch.float32] > 0 and ceilings.bandwidth > 0
    case = Case("layer", 64, 32, 16, torch.float32, "gelu")
    for op in ("forward", "backward", "fwd+bwd"):
        floor, bound = ceilings.floor_seconds(case.flops(op), case.min_bytes(op), case.dtype)
        assert floor > 0 and bound in ("compute", "memory")
    assert case.flops("fwd+bwd") == 3 * case.flops("forward") == 6 * 64 * 32 * 16
    # forward reads x, W, b and writes a, float32
    assert case.min_bytes("forward") == 4 * (64 * 16 + 32 * 16 + 32 + 64 * 32)
    mlp = Case("mlp", 8, 5, 3, torch.float64, "relu", depth=3)
    assert mlp.sizes() == [3, 5, 5, 5] and mlp.parameter_count() == 3 * 5 + 5 + 2 * (5 * 5 + 5)
    assert mlp.flops("train_step") == 6 * 8 * (3 * 5 + 2 * 25) - 2 * 8 * 3 * 5


def test_max_rel_error_and_speedups() -> None:
    ref = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)
    err, where = max_rel_error([ref, ref * (1 + 1e-3)], [ref, ref], ["a", "b"])
    assert where == "b" and err == pytest.approx(1e-3, rel=1e-9)
    assert max_rel_error([ref.clone().fill_(float("nan"))], [ref], ["a"])[0] == math.inf
    assert max_rel_error([ref.view(3, 2)], [ref], ["a"])[0] == math.inf
    assert max_rel_error([None], [ref], ["a"])[0] == math.inf
    # The gate allows max(dtype tolerance, 2 × native eager's own error).
    case = Case("mlp", 4, 4, 4, torch.bfloat16, "gelu", depth=4)
    reference = Reference([ref], ["loss"], torch.float64, native_error=0.02)
    assert reference.gate([ref * (1 + 0.03)], case)[1] is None
    err, note = reference.gate([ref * (1 + 0.05)], case)
    assert err == pytest.approx(0.05, rel=1e-9) and "wrong result" in note and "loss" in note
    strict = Reference([ref], ["loss"], torch.float64, native_error=0.0)
    assert strict.gate([ref * (1 + 0.009)], case)[1] is None  # bfloat16 tolerance 1e-2
    assert strict.gate([ref * (1 + 0.011)], case)[1] is not None
    key = {"suite": "layer", "case": "1x1x1", "dtype": "float32", "activation": "gelu", "op": "forward"}
    rows = [
        {**key, "contender": "native", "status": "ok", "median_ms": 2.0},
        {**key, "contender": "fast", "status": "ok", "median_ms": 0.5},
        {**key, "contender": "bad", "status": "error"},
    ]
    add_speedups(rows)
    assert [r.get("speedup_vs_native") for r in rows] == [1.0, 4.0, None]


def _forward_vs_reverse():
    path = REPO / "experiments" / "forward_vs_reverse.py"
    spec = importlib.util.spec_from_file_location("forward_vs_reverse", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forward_vs_reverse_gradients_agree_with_native_autograd() -> None:
    fvr = _forward_vs_reverse()
    sizes, batch = [3, 4, 5, 2], 6
    theta, x, y = fvr.problem(sizes, batch, seed=1)
    assert theta.numel() == fvr.parameter_count(sizes) == 3 * 4 + 4 + 4 * 5 + 5 + 5 * 2 + 2

    # Independent reference: the same network as nn modules, the seed's E = ½ mean ‖a − y‖².
    linears = [nn.Linear(a, b, dtype=torch.float64) for a, b in zip(sizes[:-1], sizes[1:])]
    with torch.no_grad():
        for layer, (weight, bias) in zip(linears, fvr.unflatten(theta, sizes)):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    net = nn.Sequential(linears[0], nn.Tanh(), linears[1], nn.Tanh(), linears[2])
    loss = 0.5 * nn.functional.mse_loss(net(x), y, reduction="sum") / batch
    loss.backward()
    expected = torch.cat([t for layer in linears for t in (layer.weight.grad.flatten(), layer.bias.grad)])
    assert float(fvr.loss(theta, sizes, x, y)) == pytest.approx(loss.item(), rel=1e-12)

    for method, gradient in fvr.GRADIENTS.items():
        got = gradient(theta, sizes, x, y)
        assert got.shape == expected.shape, method
        assert fvr.rel_error(got, expected) <= 1e-10, method


def test_forward_vs_reverse_script_writes_csv_and_png(tmp_path: Path) -> None:
    fvr = _forward_vs_reverse()
    argv = ["--hidden", "2", "3", "--batch", "2", "--min-time", "0", "--out", str(tmp_path), "--threads", "1"]
    assert fvr.main(argv) == 0
    header, rows = _read_csv(tmp_path / "forward_vs_reverse.csv")
    assert {"parameters", "method", "seconds", "max_rel_err_vs_reverse"} <= set(header)
    assert {r["method"] for r in rows} == set(fvr.METHODS) and len(rows) == 2 * len(fvr.METHODS)
    assert all(float(r["max_rel_err_vs_reverse"]) <= 1e-10 and float(r["seconds"]) > 0 for r in rows)
    assert (tmp_path / "forward_vs_reverse.png").read_bytes()[:4] == b"\x89PNG"


def test_help_shows_defaults_and_the_program_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from manualbp.bench.__main__ import build_parser, program_name

    assert program_name("/venv/bin/manualbp-bench") == "manualbp-bench"
    assert program_name("/site-packages/manualbp/bench/__main__.py") == "python -m manualbp.bench"
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps at the terminal width
    text = build_parser(prog="manualbp-bench").format_help()
    assert text.startswith("usage: manualbp-bench ")
    for default in ("(default: bench-results)", "(default: bench)", "(default: 4)", "(default: 0)",
                    "(default: layer mlp loss memory)", "(default: 25.0)"):  # fmt: skip
        assert default in text, default
    # Options whose help spells out their default, or that have none, are left alone.
    assert "(default: None)" not in text and "(default: False)" not in text
    args = build_parser().parse_args([])
    assert args.out == Path("bench-results")  # relative: the working directory, not the package
