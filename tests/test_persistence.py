"""Nothing lost: saving and loading modules, whole models and training state round-trips exactly.

* `torch.save(model.state_dict())` → `torch.load(..., weights_only=True)` → `load_state_dict` into
  a fresh model gives bit-identical parameters, and the loaded model's forward and backward are
  bit-identical to the original's, on each backend;
* `torch.save(model)` (the whole object, `weights_only=False`) keeps the structure too: the
  activations (by name, with leaky_relu's slope), `MLP.mode` / `recompute`, sizes, dtype;
* a fresh Python process can load a whole saved model (nothing refers to this process' objects);
* training interrupted after k steps and resumed from a checkpoint of model and optimiser state
  ends with the same weights, bit for bit, as training straight through — by hand, and through
  Lightning (a callback raises mid-epoch; `Trainer.fit(ckpt_path=...)` resumes).
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp.functional import cross_entropy

BACKENDS = ["torch", "triton"]

MODELS: dict[str, Callable[[], nn.Module]] = {
    "Linear": lambda: mbp.Linear(6, 5),
    "Linear no bias float16": lambda: mbp.Linear(6, 5, bias=False, dtype=torch.float16),
    "LinearAct mish": lambda: mbp.LinearAct(6, 5, "mish"),
    "LinearAct leaky 0.3": lambda: mbp.LinearAct(6, 5, "leaky_relu", negative_slope=0.3),
    "MLP network": lambda: mbp.MLP([6, 7, 8, 5], "gelu", "sigmoid"),
    "MLP layers no bias": lambda: mbp.MLP([6, 7, 5], "silu", bias=False, mode="layers"),
    "MLP recompute bfloat16": lambda: mbp.MLP([6, 7, 5], "tanh", recompute=True, dtype=torch.bfloat16),
    "MLP leaky 0.2": lambda: mbp.MLP([6, 7, 5], "leaky_relu", negative_slope=0.2),
}


def _bits(t: Tensor) -> Tensor:
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(view)


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


def _round_trip(obj: object, weights_only: bool) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def _forward_backward(model: nn.Module, backend: str) -> list[Tensor]:
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, generator=gen).to(dtype).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with mbp.use_backend(backend):
        out = model(x)
        out.float().square().sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def _structure(model: nn.Module) -> list[tuple]:
    """What a whole-object load must keep besides the weights."""
    out = []
    for name, m in model.named_modules():
        act = getattr(m, "act", None)
        out.append(
            (
                name,
                type(m).__name__,
                None if act is None else (act.name, act.negative_slope),
                getattr(m, "mode", None),
                getattr(m, "recompute", None),
                getattr(m, "sizes", None),
            )
        )
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str, backend: str) -> None:
    model = MODELS[name]()
    state = _round_trip(model.state_dict(), weights_only=True)
    fresh = MODELS[name]()  # another initialisation: different weights until loaded
    fresh.load_state_dict(state)
    _same_state(model.state_dict(), fresh.state_dict())
    for a, b in zip(_forward_backward(model, backend), _forward_backward(fresh, backend), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_whole_object_round_trip(name: str, backend: str) -> None:
    model = MODELS[name]()
    loaded = _round_trip(model, weights_only=False)
    assert type(loaded) is type(model)
    assert _structure(loaded) == _structure(model)
    assert repr(loaded) == repr(model)
    _same_state(model.state_dict(), loaded.state_dict())
    for a, b in zip(_forward_backward(model, backend), _forward_backward(loaded, backend), strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_deepcopy_is_independent_and_identical() -> None:
    """copy.deepcopy (EMA copies, Lightning's model copies) gives equal weights, no shared storage."""
    model = MODELS["MLP network"]()
    twin = copy.deepcopy(model)
    _same_state(model.state_dict(), twin.state_dict())
    with torch.no_grad():
        twin.layers[0].weight.add_(1.0)
    assert not torch.equal(model.layers[0].weight, twin.layers[0].weight)
    assert _structure(twin) == _structure(model)


def test_whole_model_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """Saved here, loaded by a new interpreter: the pickle refers only to importable names."""
    model = MODELS["MLP leaky 0.2"]()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    x = torch.randn(3, 6)
    expected = model(x).detach()
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "assert m.layers[0].act.name == 'leaky_relu' and m.layers[0].act.negative_slope == 0.2\n"
        f"torch.save(m(x).detach(), {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MANUALBP_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


# ------------------------------------------------------------------------------- resume by hand


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, t in batches:
        opt.zero_grad(set_to_none=True)
        cross_entropy(model(x), t).backward()
        opt.step()


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_interrupted_training_resumes_exactly(optimizer: str, tmp_path: Path) -> None:
    """k steps, save model + optimiser state to disk, load into fresh objects, finish: the same
    weights, bit for bit, as one run straight through (the optimiser state is part of "nothing")."""

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(3)
        model = mbp.MLP([6, 16, 16, 4], "gelu")
        if optimizer == "adam":
            return model, torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(10)
    ]
    k = 4

    straight, straight_opt = make()
    _train(straight, straight_opt, batches)

    first, first_opt = make()
    _train(first, first_opt, batches[:k])
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict(), "step": k}, path)
    del first, first_opt

    checkpoint = torch.load(path, weights_only=True)
    resumed, resumed_opt = make()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, batches[checkpoint["step"] :])
    _same_state(straight.state_dict(), resumed.state_dict())


# ------------------------------------------------------------------------------- resume in Lightning


class ResumableLoader:
    """Shuffled batches whose position survives a checkpoint.

    Epoch e's order is a permutation seeded by (seed, e); `state_dict` records the epoch and how
    many of its batches were handed out, and Lightning stores it in the checkpoint (it saves the
    state of any train loader with `state_dict`/`load_state_dict`). A plain DataLoader has none,
    so a mid-epoch resume would restart the epoch's order (Lightning warns "your dataloader is not
    resumable") and could not end with the same weights.
    """

    def __init__(self, dataset: torch.utils.data.TensorDataset, batch_size: int, seed: int) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.served = -1, 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):  # noqa: ANN204 — a generator of (x, target) batches
        if self._resume is not None:
            (epoch, start), self._resume = self._resume, None
            if start >= len(self):  # the checkpoint closed an epoch: the next one starts afresh
                epoch, start = epoch + 1, 0
        else:
            epoch, start = self.epoch + 1, 0
        self.epoch, self.served = epoch, start
        gen = torch.Generator().manual_seed(1000 * self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=gen)
        for i in range(start, len(self)):
            self.served = i + 1
            yield self.dataset[order[i * self.batch_size : (i + 1) * self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (state["epoch"], state["served"])


class Interrupted(RuntimeError):
    """What the interrupting callback raises (KeyboardInterrupt would make Lightning exit)."""


def _lightning_run(optimizer: str, root: Path, stop_after: int | None = None, resume: Path | None = None):
    """Fit MLPClassifier on 80 digits (5 batches an epoch, 3 epochs), checkpointing every step.

    `stop_after`: a callback raises once that many steps are done, before that step's checkpoint
    is written (checkpoint callbacks run last), so the last checkpoint is one step earlier.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from manualbp.lightning import DigitsDataModule, MLPClassifier

    class Digits80(DigitsDataModule):
        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            self.train_set = torch.utils.data.TensorDataset(*self.train_set[:80])

        def train_dataloader(self) -> ResumableLoader:  # type: ignore[override]
            return ResumableLoader(self.train_set, self.batch_size, self.seed)

    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if trainer.global_step == stop_after:
                raise Interrupted(f"stopped after step {stop_after}")

    every_step = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=0)
    callbacks: list[pl.Callback] = [every_step]
    if stop_after is not None:
        callbacks.insert(0, Interrupt())
    trainer = pl.Trainer(
        max_epochs=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=True, default_root_dir=root, callbacks=callbacks,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    model = MLPClassifier([64, 16, 10], "gelu", optimizer=optimizer, lr=0.05, init_seed=0)
    trainer.fit(model, Digits80(batch_size=16, seed=0), ckpt_path=resume)
    return trainer, model


@pytest.mark.filterwarnings("ignore")  # Lightning's tips and deprecations; the one that matters is checked
@pytest.mark.parametrize("optimizer,stop_after", [("adam", 3), ("adam", 6), ("momentum", 9)])
def test_lightning_interrupted_run_resumes_to_the_same_weights(
    optimizer: str, stop_after: int, tmp_path: Path
) -> None:
    """Interrupted after `stop_after` steps (mid-epoch 0, right after epoch 0's last checkpointed
    step, mid-epoch 1), resumed from last.ckpt: bit-identical weights to a straight run."""
    _, straight = _lightning_run(optimizer, tmp_path / "straight")
    with pytest.raises(Interrupted):
        _lightning_run(optimizer, tmp_path / "run", stop_after=stop_after)
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stop_after - 1  # truly mid-run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_trainer, resumed = _lightning_run(optimizer, tmp_path / "resumed", resume=last)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed_trainer.global_step == 15
    _same_state(straight.state_dict(), resumed.state_dict())
