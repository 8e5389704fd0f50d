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
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import manualbp as mbp
from manualbp.functional import cross_entropy
from manualbp.lightning import ResumableLoader
from tests.processes import run_bounded

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
    result = run_bounded([sys.executable, "-c", code], env=env, idle_timeout=600)
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


def _digits_tensors(n: int = 10) -> torch.utils.data.TensorDataset:
    """n examples whose x is their own index, so a batch's targets name the examples in it."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return torch.utils.data.TensorDataset(x, torch.arange(n))


def _epochs(loader: ResumableLoader, n_epochs: int) -> list[list[Tensor]]:
    return [[t for _, t in loader] for _ in range(n_epochs)]


def test_resumable_loader_order_is_seeded_per_epoch() -> None:
    """Each epoch is one permutation of the data, seeded by (seed, epoch) only; batches of 3 out
    of 10 examples, the last batch has 1."""
    dataset = _digits_tensors()
    epochs = _epochs(ResumableLoader(dataset, batch_size=3, seed=5), 3)
    for batches in epochs:
        assert [len(t) for t in batches] == [3, 3, 3, 1]
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(10))
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # reshuffled every epoch
    torch.manual_seed(123)  # the global RNG plays no part
    twin = _epochs(ResumableLoader(dataset, batch_size=3, seed=5), 3)
    assert all(torch.equal(a, b) for ours, theirs in zip(epochs, twin) for a, b in zip(ours, theirs))
    other = _epochs(ResumableLoader(dataset, batch_size=3, seed=6), 1)
    assert not torch.equal(torch.cat(other[0]), torch.cat(epochs[0]))
    x, t = next(iter(ResumableLoader(dataset, batch_size=3, seed=5)))
    assert torch.equal(x.squeeze(1), t.float())  # inputs and targets stay paired


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("k", [0, 1, 3, 4])
def test_resumable_loader_state_round_trip(epoch: int, k: int) -> None:
    """Stop after k of epoch `epoch`'s 4 batches, save the state (through torch.save, as in a
    checkpoint), load it into a fresh loader: it serves exactly that epoch's remaining batches and
    then the following epochs. k = 4 closes the epoch, so the fresh loader starts the next one."""
    dataset = _digits_tensors()
    straight = [t for batches in _epochs(ResumableLoader(dataset, 3, seed=5), 4) for t in batches]

    first = ResumableLoader(dataset, 3, seed=5)
    _epochs(first, epoch)
    served = iter(first)
    consumed = [next(served)[1] for _ in range(k)]
    state = _round_trip(first.state_dict(), weights_only=True)
    if k > 0:
        assert state == {"epoch": epoch, "served": k}
    else:  # no batch of this epoch asked for yet: the state is still the previous epoch's end
        assert state == ({"epoch": epoch - 1, "served": 4} if epoch else {"epoch": -1, "served": 0})
    del first, served

    resumed = ResumableLoader(dataset, 3, seed=5)
    resumed.load_state_dict(state)
    # The rest of epoch `epoch` (none when k = 4), then the following epochs up to epoch 3.
    iterations_left = 4 - epoch - (k == 4)
    rest = [t for batches in _epochs(resumed, iterations_left) for t in batches]
    seen = straight[: 4 * epoch] + consumed + rest
    assert len(seen) == len(straight)
    assert all(torch.equal(a, b) for a, b in zip(seen, straight))


def test_resumable_loader_state_before_any_batch_starts_epoch_zero() -> None:
    dataset = _digits_tensors()
    fresh = ResumableLoader(dataset, 3, seed=5)
    assert fresh.state_dict() == {"epoch": -1, "served": 0}
    resumed = ResumableLoader(dataset, 3, seed=5)
    resumed.load_state_dict(fresh.state_dict())
    expected = _epochs(ResumableLoader(dataset, 3, seed=5), 1)[0]
    assert all(torch.equal(a, b) for a, b in zip([t for _, t in resumed], expected, strict=True))


def test_resumable_loader_rejects_bad_arguments() -> None:
    dataset = _digits_tensors()
    with pytest.raises(TypeError, match="dataset"):
        ResumableLoader([(torch.zeros(1), 0)], 3, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(dataset, 0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        ResumableLoader(dataset, 3, seed=0.5)  # type: ignore[arg-type]
    loader = ResumableLoader(dataset, 3, seed=0)
    with pytest.raises(ValueError, match="served"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="served"):
        loader.load_state_dict({"epoch": 0, "served": -1})
    with pytest.raises(ValueError, match="epoch"):
        loader.load_state_dict({"epoch": -2, "served": 0})


@pytest.mark.parametrize("name", ["digits", "regression", "linear_neuron"])
def test_data_modules_train_on_resumable_loaders(name: str) -> None:
    """Every DataModule trains on a ResumableLoader; validation and test stay plain, in order."""
    from manualbp.lightning import DigitsDataModule, LinearNeuronDataModule, RegressionDataModule

    data = {
        "digits": lambda: DigitsDataModule(batch_size=64, seed=2),
        "regression": lambda: RegressionDataModule(num_samples=300, batch_size=64, seed=2),
        "linear_neuron": lambda: LinearNeuronDataModule(steps_per_epoch=3, seed=2),
    }[name]()
    data.setup()
    train = data.train_dataloader()
    assert isinstance(train, ResumableLoader)
    assert (train.dataset, train.batch_size, train.seed) == (data.train_set, data.batch_size, 2)
    for loader, dataset in ((data.val_dataloader(), data.val_set), (data.test_dataloader(), data.test_set)):
        assert type(loader) is torch.utils.data.DataLoader
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler) and loader.dataset is dataset


class Interrupted(RuntimeError):
    """What the interrupting callback raises (KeyboardInterrupt would make Lightning exit)."""


def _lightning_run(optimizer: str, root: Path, stop_after: int | None = None, resume: Path | None = None):
    """Fit MLPClassifier on DigitsDataModule's 1079 training digits in batches of 256 (5 batches an
    epoch, the last of 55; 3 epochs), checkpointing every step.

    `stop_after`: a callback raises once that many steps are done, before that step's checkpoint
    is written (checkpoint callbacks run last), so the last checkpoint is one step earlier.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from manualbp.lightning import DigitsDataModule, MLPClassifier

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
    trainer.fit(model, DigitsDataModule(batch_size=256, seed=0), ckpt_path=resume)
    return trainer, model


@pytest.mark.filterwarnings("ignore")  # Lightning's tips and deprecations; the one that matters is checked
@pytest.mark.parametrize("optimizer,stop_after", [("adam", 3), ("adam", 6), ("momentum", 9)])
def test_lightning_interrupted_run_resumes_to_the_same_weights(
    optimizer: str, stop_after: int, tmp_path: Path
) -> None:
    """The library's DigitsDataModule, interrupted after `stop_after` steps (the last checkpoint
    mid-epoch 0, at epoch 0's end, mid-epoch 1), resumed from last.ckpt: bit-identical weights to
    a straight run."""
    _, straight = _lightning_run(optimizer, tmp_path / "straight")
    with pytest.raises(Interrupted):
        _lightning_run(optimizer, tmp_path / "run", stop_after=stop_after)
    last = tmp_path / "run" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    steps = stop_after - 1  # truly mid-run
    assert checkpoint["global_step"] == steps
    # The train loader's position went into the checkpoint: epoch e, batches served in it (1-5).
    epoch = (steps - 1) // 5
    loader_state = {"epoch": epoch, "served": steps - 5 * epoch}
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [loader_state]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_trainer, resumed = _lightning_run(optimizer, tmp_path / "resumed", resume=last)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed_trainer.global_step == 15
    _same_state(straight.state_dict(), resumed.state_dict())
