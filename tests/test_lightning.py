"""The Lightning layer: data modules, the manual/native LightningModules, the callbacks, the CLI.

The central check is convergence (DESIGN.md, item 5): the same model trained with manualbp's
backward and with native autograd, from the same seed, follows the same loss curve.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from manualbp.activations import Activation
from manualbp.backends import fast
from manualbp.lightning import (
    DEFAULT_PARITY_THRESHOLDS,
    DigitsDataModule,
    GradientParityCallback,
    LinearNeuronDataModule,
    MLPClassifier,
    MLPRegressor,
    NativeMLP,
    RegressionDataModule,
    ResumableLoader,
    SavedActivationMemoryCallback,
    gradient_parity,
)
from manualbp.lightning.data import regression_target, split_indices
from manualbp.nn import MLP
from tests.helpers import TOL, rel_err

CONFIGS = Path(__file__).resolve().parents[1] / "manualbp" / "lightning" / "configs"
DIGITS_SIZES = [64, 32, 10]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These matrices are tiny: intra-op threads only add synchronisation (and contend with the
    # other pytest-xdist worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(batch_size=32, seed=0)
    data.setup()
    return data


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _batch(data: pl.LightningDataModule, dtype: torch.dtype = torch.float64) -> tuple:
    x, target = next(iter(data.train_dataloader()))
    return x.to(dtype), target.to(dtype) if target.is_floating_point() else target


# ------------------------------------------------------------------------------------------ data


def test_split_indices_partition_and_seed():
    train, val, test = split_indices(1797, 0.2, 0.2, seed=0)
    assert (len(train), len(val), len(test)) == (1079, 359, 359)
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(1797))
    again = split_indices(1797, 0.2, 0.2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    assert not torch.equal(split_indices(1797, 0.2, 0.2, seed=1)[0], train)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.5, 0.0, seed=0)
    with pytest.raises(ValueError, match="leaves no training"):
        split_indices(10, 0.5, 0.5, seed=0)


def test_digits_seeded_and_normalised(digits):
    from sklearn.datasets import load_digits

    x_train, y_train = digits.train_set.tensors
    assert x_train.shape == (1079, 64) and x_train.dtype == torch.float32
    assert y_train.dtype == torch.long and set(y_train.tolist()) == set(range(10))
    # normalize=False keeps the raw 0-16 pixels of the very same images.
    raw = DigitsDataModule(normalize=False, seed=0)
    raw.setup()
    raw_train = raw.train_set.tensors[0]
    train_idx = split_indices(1797, 0.2, 0.2, seed=0)[0]
    expected = torch.as_tensor(load_digits().data[train_idx.numpy()], dtype=torch.float32)
    assert torch.equal(raw_train, expected)
    # Standardised with the training split's statistics; pixels constant over the training
    # images are only centred (std 1), so they stay 0 there and sane on validation images.
    assert torch.equal((raw_train - digits.mean) / digits.std, x_train)
    constant = (raw_train == raw_train[0]).all(0)
    assert constant.any() and (x_train[:, constant] == 0).all() and (digits.std[constant] == 1).all()
    assert x_train.mean(0).abs().max() < 1e-5
    assert (x_train[:, ~constant].std(0) - 1).abs().max() < 1e-5
    assert digits.val_set.tensors[0].abs().max() < 100  # 46 here; a tiny std floor gave ~1e6
    # The same seed gives the same tensors, whatever the global RNG does meanwhile.
    torch.manual_seed(123)
    twin = DigitsDataModule(batch_size=32, seed=0)
    twin.setup()
    for ours, theirs in zip(
        digits.train_set.tensors + digits.val_set.tensors, twin.train_set.tensors + twin.val_set.tensors
    ):
        assert torch.equal(ours, theirs)


def test_shuffle_order_depends_on_seed_only(digits):
    first = next(iter(digits.train_dataloader()))
    torch.manual_seed(99)
    again = next(iter(digits.train_dataloader()))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = DigitsDataModule(batch_size=32, seed=1)
    other.setup()
    assert not torch.equal(next(iter(other.train_dataloader()))[1], first[1])


def test_regression_data_seeded():
    data = RegressionDataModule(num_samples=500, noise=0.0, seed=3)
    data.setup()
    x, t = data.train_set.tensors
    assert x.shape == (350, 3) and t.shape == (350, 1)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(t, regression_target(x))  # noise 0: exactly the function
    noisy = RegressionDataModule(num_samples=500, noise=0.1, seed=3)
    noisy.setup()
    xn, tn = noisy.train_set.tensors
    assert torch.equal(xn, x)  # same seed, same inputs
    residual = (tn - regression_target(xn)).std().item()
    assert 0.08 < residual < 0.12
    with pytest.raises(ValueError, match="noise"):
        RegressionDataModule(noise=-1.0)


def test_linear_neuron_data_is_the_seed_case():
    data = LinearNeuronDataModule(steps_per_epoch=4)
    data.setup()
    batches = list(data.train_dataloader())
    assert len(batches) == 4
    for x, t in batches:
        assert x.tolist() == [[1.0, 1.0]] and t.tolist() == [[0.0]]


# --------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("module_class", [MLPClassifier, MLPRegressor])
def test_native_backend_starts_from_the_same_weights(module_class):
    sizes = [5, 7, 3]
    torch.manual_seed(0)
    manual = module_class(sizes, backend="manual")
    after_manual = torch.rand(3)
    torch.manual_seed(0)
    native = module_class(sizes, backend="native")
    after_native = torch.rand(3)
    assert isinstance(manual.net, MLP) and isinstance(native.net, NativeMLP)
    manual_state, native_state = manual.net.state_dict(), native.net.state_dict()
    assert manual_state.keys() == native_state.keys()
    assert all(torch.equal(manual_state[k], native_state[k]) for k in manual_state)
    # Both draw the same numbers from the RNG, so what follows stays in step too.
    assert torch.equal(after_manual, after_native)
    x = torch.randn(11, 5, dtype=torch.float64)
    assert rel_err(manual.double()(x), native.double()(x)) <= TOL[torch.float64]


def test_init_seed_ignores_the_global_rng():
    torch.manual_seed(1)
    a = MLPClassifier([4, 3], init_seed=7)
    torch.manual_seed(2)
    b = MLPClassifier([4, 3], init_seed=7, backend="native")
    assert torch.equal(a.net.layers[0].weight, b.net.layers[0].weight)


@pytest.mark.parametrize(
    "module_class, activation, loss",
    [
        (MLPClassifier, "relu", None),
        (MLPClassifier, "gelu", None),
        (MLPRegressor, "tanh", "mse"),
        (MLPRegressor, "silu", "half_mse"),
    ],
)
def test_module_gradients_match_native_float64(module_class, activation, loss):
    kwargs = {} if loss is None else {"loss": loss}
    data = (
        DigitsDataModule(batch_size=16)
        if module_class is MLPClassifier
        else RegressionDataModule(batch_size=16)
    )
    data.setup()
    sizes = [data.num_features, 9, 6, 10 if module_class is MLPClassifier else 1]
    model = module_class(sizes, activation=activation, **kwargs).double()
    parity = gradient_parity(model, _batch(data))
    assert set(parity) == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert max(parity.values()) <= TOL[torch.float64], parity
    # The native backend's loss is the manual one's, value for value.
    x, target = _batch(data)
    output = model(x)
    assert rel_err(model.manual_loss(output, target), model.native_loss(output, target)) <= TOL[torch.float64]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="backend: expected one of 'manual', 'native', got 'xla'"):
        MLPClassifier([4, 2], backend="xla")
    with pytest.raises(ValueError, match="optimizer"):
        MLPClassifier([4, 2], optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        MLPRegressor([4, 1], lr=0.0)
    with pytest.raises(ValueError, match="loss"):
        MLPRegressor([4, 1], loss="huber")
    with pytest.raises(ValueError, match="sizes"):
        MLPClassifier([4, 1])
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientParityCallback(every_n_steps=0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sgd", (torch.optim.SGD, 0.0)),
        ("momentum", (torch.optim.SGD, 0.5)),
        ("adam", (torch.optim.Adam, None)),
    ],
)
def test_optimizer_choice(name, expected):
    optimizer = MLPClassifier([4, 3], optimizer=name, lr=0.01, momentum=0.5).configure_optimizers()
    assert type(optimizer) is expected[0] and optimizer.defaults["lr"] == 0.01
    if expected[1] is not None:
        assert optimizer.defaults["momentum"] == expected[1]


def test_plain_sgd_is_the_seed_update_on_the_linear_neuron():
    # y = x₁w₁ + x₂w₂ on (1, 1, 0) with E = (t − y)²: ∂E/∂wᵢ = 2y, so every step subtracts 2ηy
    # from each weight and y shrinks by the factor 1 − 4η.
    lr = 0.1
    model = MLPRegressor([2, 1], activation="identity", bias=False, optimizer="sgd", lr=lr)
    w0 = model.net.layers[0].weight.detach().double().clone()
    y0 = w0.sum().item()
    _trainer(max_steps=3, precision="64-true", limit_val_batches=0).fit(
        model, LinearNeuronDataModule(steps_per_epoch=3)
    )
    w3 = model.net.layers[0].weight.detach()
    y = y0
    expected = w0.clone()
    for _ in range(3):
        expected -= lr * 2 * y
        y *= 1 - 4 * lr
    assert rel_err(w3, expected) <= TOL[torch.float64]
    assert math.isclose(w3.sum().item(), y0 * (1 - 4 * lr) ** 3, rel_tol=1e-12)


# ---------------------------------------------------------------------------------- convergence


class _LossCurve(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


LEARNING_RATES = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01}
PRECISION_DTYPE = {"64-true": torch.float64, "32-true": torch.float32}


def _train_curve(backend: str, optimizer: str, precision: str, steps: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = MLPClassifier(DIGITS_SIZES, backend=backend, optimizer=optimizer, lr=LEARNING_RATES[optimizer])
    curve = _LossCurve()
    _trainer(max_steps=steps, precision=precision, limit_val_batches=0, callbacks=[curve]).fit(
        model, DigitsDataModule(batch_size=32, seed=0)
    )
    return curve.losses, model.net.state_dict()


@pytest.mark.parametrize("precision", ["64-true", "32-true"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_manual_and_native_training_follow_the_same_loss_curve(optimizer, precision):
    # Every step's loss and the final weights, relative to the native run, within the dtype's
    # tolerance. Measured worst over the 40 steps: 7e-16 (float64) and 4e-7 (float32) for the
    # loss, 3e-16 and 2e-7 for the weights.
    steps = 40
    tol = TOL[PRECISION_DTYPE[precision]]
    manual_losses, manual_state = _train_curve("manual", optimizer, precision, steps)
    native_losses, native_state = _train_curve("native", optimizer, precision, steps)
    assert len(manual_losses) == len(native_losses) == steps
    assert manual_losses[-1] < 0.7 * manual_losses[0]  # it did learn
    worst = max(abs(m - n) / abs(n) for m, n in zip(manual_losses, native_losses))
    assert worst <= tol, (worst, manual_losses, native_losses)
    for name, value in native_state.items():
        assert rel_err(manual_state[name], value) <= tol, name


# ------------------------------------------------------------------------------------ callbacks


def test_parity_callback_logs_every_layer(tmp_path):
    parity = GradientParityCallback(every_n_steps=2)
    logger = pl.loggers.CSVLogger(tmp_path, name="parity")
    model = MLPClassifier(DIGITS_SIZES)
    _trainer(
        max_steps=5,
        precision="64-true",
        limit_val_batches=0,
        callbacks=[parity],
        logger=logger,
        log_every_n_steps=1,
    ).fit(model, DigitsDataModule(batch_size=32))
    assert [step for step, _ in parity.history] == [0, 2, 4]
    names = {f"layers.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    for _, values in parity.history:
        assert set(values) == names
        assert max(values.values()) <= DEFAULT_PARITY_THRESHOLDS[torch.float64]
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [row for row in rows if row.get("parity/layers.0.weight")]
    assert [int(row["step"]) for row in logged] == [0, 2, 4]
    assert {f"parity/{n}" for n in names} | {"parity/max"} <= set(rows[0])


@pytest.mark.parametrize("precision", ["64-true", "32-true"])
def test_parity_callback_raises_on_a_broken_gradient(precision):
    # The hand-written backward made 1% wrong for one parameter: a hook scales the gradient it
    # hands to layers.1.weight (the native copy the callback builds has fresh parameters).
    model = MLPClassifier(DIGITS_SIZES)
    model.net.layers[1].weight.register_hook(lambda grad: grad * 1.01)
    parity = GradientParityCallback(every_n_steps=1)
    with pytest.raises(RuntimeError, match=r"gradient parity: layers\.1\.weight differs .* at step 0"):
        _trainer(max_steps=2, precision=precision, limit_val_batches=0, callbacks=[parity]).fit(
            model, DigitsDataModule(batch_size=32)
        )
    (step, values), *_ = parity.history
    assert step == 0 and math.isclose(values["layers.1.weight"], 0.01, rel_tol=1e-3)
    assert values["layers.0.weight"] <= TOL[PRECISION_DTYPE[precision]]


def test_parity_callback_raises_when_delta_is_wrong(monkeypatch):
    # Break the seed's δ = ∂C/∂a ⊙ f′ itself, inside the hand-written backward, by 1%: the hidden
    # layer's gradients go wrong (native autograd never calls the registry's `delta`).
    # The CPU fast path forms δ with ATen's kernels (manualbp.backends.fast.delta, and the kernels
    # it binds once per model: delta_into, delta_fresh): broken too.
    correct = Activation.delta
    monkeypatch.setattr(Activation, "delta", lambda self, grad, saved: correct(self, grad, saved) * 1.01)
    correct_fast = fast.delta
    broken_fast = lambda act, grad, saved, out=None: correct_fast(act, grad, saved) * 1.01  # noqa: E731
    monkeypatch.setattr(fast, "delta", broken_fast)
    correct_into, correct_fresh = fast.delta_into, fast.delta_fresh

    def broken_into(act):
        bound = correct_into(act)
        return None if bound is None else (lambda g, s, o: bound(g, s, o).mul_(1.01))

    monkeypatch.setattr(fast, "delta_into", broken_into)
    monkeypatch.setattr(fast, "delta_fresh", lambda act: (lambda g, s: correct_fresh(act)(g, s) * 1.01))
    parity = GradientParityCallback(every_n_steps=1)
    with pytest.raises(RuntimeError, match=r"gradient parity: layers\.0\.weight differs .* at step 0"):
        _trainer(max_steps=2, precision="64-true", limit_val_batches=0, callbacks=[parity]).fit(
            MLPClassifier(DIGITS_SIZES), DigitsDataModule(batch_size=32)
        )
    assert math.isclose(parity.history[0][1]["layers.0.weight"], 0.01, rel_tol=1e-3)


def test_saved_activation_memory_callback_counts_activations():
    counts = {}
    for backend in ("manual", "native"):
        memory = SavedActivationMemoryCallback()
        torch.manual_seed(0)
        _trainer(max_steps=2, precision="64-true", limit_val_batches=0, callbacks=[memory]).fit(
            MLPClassifier(DIGITS_SIZES, backend=backend), DigitsDataModule(batch_size=32)
        )
        assert [step for step, _ in memory.history] == [0, 1]
        counts[backend] = memory.history[0][1]
    # At least x (32×64) and the hidden activation (32×32) in float64, never the weights; and no
    # more than native autograd keeps, but for the loss's per-row statistics (manualbp's
    # cross-entropy keeps the logits and a logsumexp per row where native keeps log_softmax).
    floor = 8 * 32 * (64 + 32)
    assert floor <= counts["manual"] <= counts["native"] + 2 * 8 * 32, counts


# ------------------------------------------------------------------------------------------- CLI


def test_cli_fit_linear_neuron_then_resume(tmp_path, monkeypatch):
    from manualbp.lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["train"])  # pytest's own arguments are not the CLI's
    args = [
        "fit",
        "--config",
        str(CONFIGS / "linear_neuron.yaml"),
        "--runs_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    first = main([*args, "--trainer.max_epochs=1"])
    steps_per_epoch = first.datamodule.steps_per_epoch
    assert first.trainer.global_step == steps_per_epoch
    checkpoint = tmp_path / "linear_neuron" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert (tmp_path / "linear_neuron" / "version_0" / "metrics.csv").is_file()

    # The seed's parabola: each plain-SGD step subtracts 2ηy from both weights, so y = w₁ + w₂
    # shrinks by 1 − 4η per step and wᵢ after n steps is wᵢ⁽⁰⁾ − (y⁽⁰⁾ − y⁽ⁿ⁾)/2.
    lr = first.model.hparams.lr
    torch.manual_seed(0)  # seed_everything: 0 in the config, so these are the run's initial weights
    hparams = {k: v for k, v in first.model.hparams.items() if not k.startswith("_")}  # _class_path
    w0 = MLPRegressor(**hparams).net.layers[0].weight.detach().double()

    def expected_weight(steps: int) -> torch.Tensor:
        y0 = w0.sum()
        return w0 - (y0 - y0 * (1 - 4 * lr) ** steps) / 2

    assert rel_err(first.model.net.layers[0].weight, expected_weight(steps_per_epoch)) <= TOL[torch.float32]

    reloaded = MLPRegressor.load_from_checkpoint(checkpoint)
    assert dict(reloaded.hparams) == hparams
    assert torch.equal(reloaded.net.layers[0].weight, first.model.net.layers[0].weight)

    # Resuming continues from the checkpoint's weights (a fresh start would be 10 steps short).
    resumed = main([*args, "--trainer.max_epochs=2", f"--ckpt_path={checkpoint}"])
    assert resumed.trainer.global_step == 2 * steps_per_epoch
    weight = resumed.model.net.layers[0].weight
    assert rel_err(weight, expected_weight(2 * steps_per_epoch)) <= TOL[torch.float32]
    assert rel_err(weight, expected_weight(steps_per_epoch)) > 1e-3
    assert (tmp_path / "linear_neuron" / "version_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config", ["digits.yaml", "regression.yaml", "linear_neuron.yaml"])
def test_configs_parse(config):
    from manualbp.lightning.cli import main

    cli = main(["--config", str(CONFIGS / config), "--trainer.logger=false"], run=False)
    assert cli.model.hparams.backend == "manual"
    assert any(isinstance(c, GradientParityCallback) for c in cli.trainer.callbacks)


# ------------------------------------------------------------------------------- data parallel


def _served(loader: ResumableLoader, batches: int | None = None) -> list[torch.Tensor]:
    out = []
    for i, batch in enumerate(loader):
        out.append(batch[0])
        if batches is not None and i + 1 == batches:
            break
    return out


@pytest.mark.parametrize("replicas", [2, 3])
def test_resumable_loader_shards_like_distributed_sampler(replicas):
    n = 101  # not a multiple of 2 or 3: the shards are padded by wrapping around
    data = torch.utils.data.TensorDataset(torch.arange(n, dtype=torch.float64).unsqueeze(1))
    loaders = [ResumableLoader(data, 8, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    shard = -(-n // replicas)
    assert all(loader.shard_size == shard and len(loader) == -(-shard // 8) for loader in loaders)
    for epoch in (0, 1):
        shards = [loader.shard_order(epoch) for loader in loaders]
        # DistributedSampler's layout of the same permutation: rank r takes r, r + R, r + 2R, ...
        order = ResumableLoader(data, 8, seed=5).epoch_order(epoch)
        padded = torch.cat([order, order[: shard * replicas - n]])
        for r, indices in enumerate(shards):
            assert torch.equal(indices, padded[r::replicas])
        # One epoch over the ranks covers the data set once, plus the < R padding examples.
        assert sorted(torch.cat(shards).unique().tolist()) == list(range(n))
        assert len(torch.cat(shards)) == shard * replicas < n + replicas
    # What each rank serves is its shard, in order.
    served = torch.cat(_served(loaders[1])).squeeze(1).long()
    assert torch.equal(served, loaders[1].shard_order(0))


def test_resumable_loader_resumes_a_shard_mid_epoch_bit_identically():
    data = torch.utils.data.TensorDataset(torch.randn(203, 4))
    uninterrupted = ResumableLoader(data, 16, seed=1, num_replicas=2, rank=1)
    reference = _served(uninterrupted) + _served(uninterrupted)  # epochs 0 and 1
    first = ResumableLoader(data, 16, seed=1, num_replicas=2, rank=1)
    head = _served(first, batches=3)
    state = first.state_dict()
    assert state == {"epoch": 0, "served": 3, "num_replicas": 2}
    resumed = ResumableLoader(data, 16, seed=1, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    tail = _served(resumed) + _served(resumed)
    assert len(head + tail) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, reference))

    other_world = ResumableLoader(data, 16, seed=1, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match=r"num_replicas.*saved by 2 .*expected 4"):
        other_world.load_state_dict(state)
    single = ResumableLoader(data, 16, seed=1)
    single.load_state_dict({"epoch": 0, "served": 2})  # a checkpoint from before sharding: 1 process
    with pytest.raises(ValueError, match="rank: expected an int in"):
        ResumableLoader(data, 16, seed=1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas: expected a positive int"):
        ResumableLoader(data, 16, seed=1, num_replicas=0)


@pytest.mark.slow
def test_ddp_two_ranks_each_train_on_half_the_data(tmp_path):
    import json

    from tests.ddp_fit import fit
    from tests.processes import loopback_dist_env, run_bounded

    single = fit(1)
    single_steps = single.global_step
    assert single_steps == len(single.train_dataloader) == math.ceil(1079 / 32)

    env = loopback_dist_env()
    root = Path(__file__).resolve().parents[1]
    done = run_bounded(
        [sys.executable, "-m", "tests.ddp_fit", "2", tmp_path], cwd=root, env=env, idle_timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, record in enumerate(ranks):
        assert (record["rank"], record["world_size"], record["num_replicas"]) == (r, 2, 2)
        assert record["global_step"] == record["len"] == math.ceil(math.ceil(1079 / 2) / 32)
    # The step count halves (34 → 17), and the two shards together are the data set once.
    assert ranks[0]["global_step"] == math.ceil(single_steps / 2)
    shards = [set(record["shard"]) for record in ranks]
    assert shards[0] | shards[1] == set(range(1079))
    assert len(shards[0] & shards[1]) <= 1  # the one padding example of an odd data set


def test_cli_fit_prints_a_summary_and_draws_manual_vs_native(tmp_path, monkeypatch, capsys, caplog):
    import logging
    import warnings

    from manualbp.lightning.cli import main, resolve_config
    from manualbp.lightning.plots import find_comparison, read_metrics

    monkeypatch.setattr(sys, "argv", ["manualbp-train"])
    args = ["fit", "--config", "linear_neuron", "--runs_dir", str(tmp_path), "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manual = main(args)
    out = capsys.readouterr().out
    run_dir = tmp_path / "linear_neuron" / "version_0"
    (line,) = [row for row in out.splitlines() if row.startswith("linear_neuron: ")]
    assert line.startswith("linear_neuron: manual backward, 2 epochs (20 steps) in ")
    assert f"outputs in {run_dir} (metrics.csv, checkpoints/, curves.png)" in line
    assert "val/loss " in line and "train/loss " in line and manual.summary == line
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [epoch for epoch, _ in read_metrics(run_dir / "metrics.csv")["val/loss"]] == [0, 1]
    # Lightning's advertising and the LeafSpec FutureWarning are silenced inside the entry point...
    assert "Tip:" not in caplog.text
    assert not [w for w in caught if "LeafSpec" in str(w.message)], [str(w.message) for w in caught]
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        assert not logging.getLogger(name).filters  # ...and only there

    native = main([*args, "--model.init_args.backend", "native", "--run_name", "native"])
    native_dir = tmp_path / "native" / "version_0"
    assert find_comparison(native_dir, dict(native.model.hparams)) == ("manual", run_dir)
    assert native.curves_path == native_dir / "curves.png" and native.curves_path.is_file()
    assert "native: native backward, 2 epochs (20 steps)" in capsys.readouterr().out

    assert resolve_config("digits") == str(CONFIGS / "digits.yaml")
    assert resolve_config("digits.yaml") == str(CONFIGS / "digits.yaml")
    with pytest.raises(FileNotFoundError, match=r"--config: 'nope' is neither a file nor a packaged"):
        resolve_config("nope")


def test_resumable_loader_with_more_ranks_than_examples():
    data = torch.utils.data.TensorDataset(torch.arange(3, dtype=torch.float64).unsqueeze(1))
    shards = [ResumableLoader(data, 2, seed=0, num_replicas=8, rank=r).shard_order(0) for r in range(8)]
    assert all(len(s) == 1 for s in shards)  # every rank gets one example, as DistributedSampler
    order = ResumableLoader(data, 2, seed=0).epoch_order(0)
    assert torch.equal(torch.cat(shards), order.repeat(3)[:8])
