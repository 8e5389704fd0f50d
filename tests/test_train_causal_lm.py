"""experiments/train_causal_lm.py: the converted LLaMA with the fused head is the native model's
loss and gradients (float64), keeps fewer saved bytes, and the script trains both and writes
its report and plot."""

from __future__ import annotations

import copy

import torch

from experiments import train_causal_lm as lm
from manualbp.nn import GatedMLP

from .helpers import TOL, rel_err

SMALL = ["--vocab", "96", "--hidden", "16", "--intermediate", "40", "--heads", "2",
         "--batch", "3", "--seq", "12"]  # fmt: skip


def test_converted_model_with_fused_head_has_native_loss_and_gradients_in_float64() -> None:
    cfg = lm.Config(vocab=96, hidden=16, intermediate=40, heads=2, seq=12)
    native = lm.build_model(cfg).double()
    ours = copy.deepcopy(native)
    lm.convert(ours)
    assert sum(isinstance(m, GatedMLP) for m in ours.modules()) == cfg.layers
    gen = torch.Generator().manual_seed(5)
    ids = lm.BigramLanguage(cfg.vocab, gen).sample(3, cfg.seq, gen)
    expected = lm.native_loss(native, ids)
    expected_grads = torch.autograd.grad(expected, list(native.parameters()))
    loss = lm.fused_loss(ours, ids)
    grads = torch.autograd.grad(loss, list(ours.parameters()))
    assert rel_err(loss, expected) <= TOL[torch.float64]
    assert len(grads) == len(expected_grads) > 0
    for (name, _), got, want in zip(ours.named_parameters(), grads, expected_grads, strict=True):
        assert rel_err(got, want) <= TOL[torch.float64], name


def test_bigram_language_follows_its_successor_table() -> None:
    gen = torch.Generator().manual_seed(0)
    language = lm.BigramLanguage(50, gen)
    ids = language.sample(4, 30, gen)
    for row in ids:
        for prev, nxt in zip(row[:-1], row[1:], strict=True):
            assert nxt in language.successors[prev]
    assert abs(language.entropy_rate() - 1.1319) < 1e-3


def test_script_trains_both_models_and_writes_its_report(tmp_path) -> None:
    out = tmp_path / "lm"
    result = lm.main([*SMALL, "--steps", "4", "--out", str(out)])
    native, ours = result["native"], result["manualbp"]
    assert len(native.losses) == len(ours.losses) == 4
    # Same init, same batches: the curves agree to float32 rounding over a few steps.
    assert max(abs(a - b) for a, b in zip(native.losses, ours.losses, strict=True)) < 1e-4
    assert native.losses[-1] < native.losses[0]
    memory = result["memory"]
    halves = memory["GatedMLP only (native head)"], memory["fused head only (native MLPs)"]
    assert memory["manualbp (GatedMLP + fused head)"] < min(halves)
    assert max(halves) < memory["native"]
    text = out.with_suffix(".md").read_text()
    assert "python -m experiments.train_causal_lm --vocab 96" in text and "| 4 |" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
