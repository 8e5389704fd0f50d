"""DataModules for the experiments: small, seeded, and nothing downloaded.

* `DigitsDataModule` — scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes).
* `RegressionDataModule` — a smooth nonlinear function of three inputs plus Gaussian noise.
* `LinearNeuronDataModule` — the seed's worked example: a linear neuron y = x₁w₁ + x₂w₂ and the
  single training case (x₁, x₂, t) = (1, 1, 0).

Every split and every shuffle order comes from `seed` alone (private `torch.Generator`s), so two
modules built with the same arguments hand out identical batches whatever the global RNG does.
Batches are `(x, target)` pairs: x float32, target int64 class indices (digits) or float32 (N, 1)
values; `Trainer(precision="64-true")` converts them to float64 on the way in.

`train_dataloader()` returns a `ResumableLoader`: epoch e's order is a permutation seeded by
(seed, e), and its `state_dict` (epoch, batches served) goes into Lightning's checkpoints, so a run
interrupted mid-epoch and resumed from its checkpoint sees exactly the batches it would have seen,
and ends on the same weights bit for bit. Validation and test use plain, unshuffled DataLoaders.

Under DDP (`Trainer(strategy="ddp", devices=N)`) the train loader shards each epoch as
`torch.utils.data.DistributedSampler` does (`drop_last=False`): every rank draws the same
(seed, epoch) permutation, pads it by wrapping around to a multiple of the world size, and takes
every world-size-th index from its rank on. So each rank gets ⌈n / N⌉ examples an epoch and the
same number of batches, and one epoch across the ranks covers the data set once (plus at most
N − 1 repeated examples). The rank and world size come from the Trainer the data module is
attached to (or from `torch.distributed` when it is initialised); Lightning does not insert a
sampler itself here, because the loader is not a `DataLoader`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "LinearNeuronDataModule", "RegressionDataModule", "ResumableLoader"]

# A pixel that is constant over the training images (several border pixels are always 0) has
# standard deviation 0. It is only centred (divided by 1, as scikit-learn's StandardScaler does):
# dividing by a tiny floor would blow up the odd validation image that does use that pixel.
_STD_FLOOR = 1e-6


def _check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_non_negative_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded random permutation of range(n) cut into train / val / test index tensors."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n_val + n_test >= n:
        raise ValueError(
            f"val_fraction + test_fraction: {val_fraction} + {test_fraction} leaves no training "
            f"examples out of {n}; expected a sum below 1"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def epoch_seed(seed: int, epoch: int) -> int:
    """The 64-bit generator seed of epoch `epoch`'s shuffle: a hash of the pair (seed, epoch).

    Hashing keeps distinct pairs apart (a sum like 1000·seed + epoch would give seed 0's epoch
    1000 the order of seed 1's epoch 0) and works for any int seed, negative ones included.
    """
    digest = hashlib.blake2b(f"{seed},{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ResumableLoader:
    """Shuffled mini-batches of a TensorDataset whose position survives a checkpoint.

    Each `iter()` is one epoch: epoch e hands out the batches of a permutation seeded by
    (seed, e) alone (see `epoch_seed`), the last batch smaller when `batch_size` does not divide
    the dataset. `state_dict()` records the epoch and how many of its batches were handed out;
    Lightning saves it in every checkpoint (it stores the state of any train loader that has
    `state_dict`/`load_state_dict`) and gives it back to `load_state_dict` on resume, so the next
    `iter()` continues that epoch's order at the first batch not yet served — or, when the
    checkpoint closed the epoch, starts the next epoch. A plain shuffled DataLoader has no such
    state: Lightning warns "your dataloader is not resumable" and a resumed run restarts the
    epoch's order, so it cannot end on the same weights as an uninterrupted one.

    "Served" counts batches the consumer asked for, which is what was trained on because
    Lightning does not prefetch from a loader with a `len()`. The tensors are in memory and a
    batch is one indexing operation, so there are no worker processes.

    With `num_replicas` > 1 (data-parallel training) the loader serves rank `rank`'s shard of
    each epoch, as `DistributedSampler(shuffle=True, drop_last=False)` would: the epoch's
    permutation padded to a multiple of `num_replicas` by wrapping around, then every
    `num_replicas`-th index from `rank` on. Every rank has the same `len()`, so the position in
    a checkpoint (saved by rank 0) is every rank's position; resuming with another world size is
    refused, because a batch count would then mean other examples.
    """

    def __init__(
        self, dataset: TensorDataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not isinstance(dataset, TensorDataset):
            raise TypeError(f"dataset: expected a torch TensorDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        self.seed = seed
        self.num_replicas = _check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank: expected an int in [0, num_replicas={num_replicas}), got {rank!r}")
        self.rank = rank
        self.epoch = -1  # the epoch being (or last) served; -1 before the first iter()
        self.served = 0  # batches of that epoch handed out so far
        self._resume_at: tuple[int, int] | None = None  # (epoch, served) from load_state_dict

    @property
    def shard_size(self) -> int:
        """Examples this rank gets per epoch: ⌈len(dataset) / num_replicas⌉."""
        return -(-len(self.dataset) // self.num_replicas)

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)  # ceil: the last batch may be smaller

    def epoch_order(self, epoch: int) -> Tensor:
        """Epoch `epoch`'s permutation of the dataset indices (the whole data set, every rank)."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(len(self.dataset), generator=generator)

    def shard_order(self, epoch: int) -> Tensor:
        """This rank's indices of epoch `epoch`, in the order they are served."""
        order = self.epoch_order(epoch)
        if self.num_replicas == 1:
            return order
        total = self.shard_size * self.num_replicas
        if total > len(order):  # wrap around (more than once if need be), as DistributedSampler pads
            order = order.repeat(-(-total // len(order)))[:total]
        return order[self.rank : total : self.num_replicas]

    def _next_position(self) -> tuple[int, int]:
        """(epoch, first batch) where the next iter() starts."""
        if self._resume_at is None:
            return self.epoch + 1, 0
        (epoch, served), self._resume_at = self._resume_at, None
        if epoch < 0 or served >= len(self):  # saved before any batch, or at an epoch's end
            return epoch + 1, 0
        return epoch, served

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, start = self._next_position()
        self.epoch, self.served = epoch, start
        order = self.shard_order(epoch)
        for i in range(start, len(self)):
            # Counted before the yield: when the consumer holds batch i, i + 1 batches are served.
            self.served = i + 1
            yield self.dataset[order[i * self.batch_size : (i + 1) * self.batch_size]]

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "served": self.served}
        if self.num_replicas > 1:  # single-process states stay as they were (load defaults to 1)
            state["num_replicas"] = self.num_replicas
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "served"} - set(state)
        if missing:
            raise ValueError(
                f"state: expected the keys 'epoch' and 'served' of ResumableLoader.state_dict(), "
                f"got keys {sorted(state)}"
            )
        replicas = state.get("num_replicas", 1)  # absent in checkpoints of single-process runs
        if replicas != self.num_replicas:
            raise ValueError(
                f"state['num_replicas']: the checkpoint was saved by {replicas!r} data-parallel "
                f"processes; expected {self.num_replicas}, the world size of this run (under another "
                "world size, the count of batches served would point at other examples)"
            )
        epoch, served = state["epoch"], state["served"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < -1:
            raise ValueError(f"state['epoch']: expected an int >= -1, got {epoch!r}")
        self._resume_at = (epoch, _check_non_negative_int("state['served']", served))


class _TensorDataModule(pl.LightningDataModule):
    """Shared plumbing: tensors built once in `setup`; a seeded, resumable train loader.

    `num_workers` applies to the validation and test DataLoaders only: the train loader indexes
    in-memory tensors in the main process (worker processes would add start-up cost and nothing
    else, and would hide its position from the checkpoint).
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seed = seed
        self.num_workers = _check_non_negative_int("num_workers", num_workers)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build()

    def _dataset(self, dataset: TensorDataset | None) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return dataset

    def _eval_loader(self, dataset: TensorDataset | None) -> DataLoader:
        return DataLoader(
            self._dataset(dataset), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def _world(self) -> tuple[int, int]:
        """(num_replicas, rank) of data-parallel training: the Trainer's, else torch.distributed's."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> ResumableLoader:
        replicas, rank = self._world()
        return ResumableLoader(self._dataset(self.train_set), self.batch_size, self.seed, replicas, rank)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8×8 digits: 64 pixel features (0–16), 10 classes, split train/val/test.

    With `normalize` (the default) every pixel is standardised with the mean and standard
    deviation of the *training* split — the seed notes that backpropagation does not need
    normalised inputs but that normalisation can help, and here it does. `normalize=False`
    keeps the raw 0–16 intensities.
    """

    num_features = 64
    num_classes = 10

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        normalize: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self.normalize = normalize
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        try:
            from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
        except ImportError as err:
            raise ImportError(
                "DigitsDataModule: needs scikit-learn for its bundled digits; pip install manualbp[lightning]"
            ) from err

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        y = torch.as_tensor(digits.target, dtype=torch.long)
        train, val, test = split_indices(len(x), self.val_fraction, self.test_fraction, self.seed)
        if self.normalize:
            self.mean = x[train].mean(0)
            std = x[train].std(0)
            self.std = torch.where(std > _STD_FLOOR, std, torch.ones_like(std))
            x = (x - self.mean) / self.std
        return tuple(TensorDataset(x[idx], y[idx]) for idx in (train, val, test))  # type: ignore[return-value]


def regression_target(x: Tensor) -> Tensor:
    """The noiseless function RegressionDataModule samples: sin(πx₀) + x₁x₂ + ½x₂², shape (N, 1)."""
    x0, x1, x2 = x.unbind(-1)
    return (torch.sin(math.pi * x0) + x1 * x2 + 0.5 * x2 * x2).unsqueeze(-1)


class RegressionDataModule(_TensorDataModule):
    """Synthetic regression: x uniform in [−1, 1]³, t = sin(πx₀) + x₁x₂ + ½x₂² + noise·N(0, 1)."""

    num_features = 3
    num_outputs = 1

    def __init__(
        self,
        num_samples: int = 2048,
        noise: float = 0.05,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.num_samples = _check_positive_int("num_samples", num_samples)
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise: expected a finite standard deviation >= 0, got {noise!r}")
        self.noise = float(noise)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.rand(self.num_samples, self.num_features, generator=gen) * 2 - 1
        noise = torch.randn(self.num_samples, 1, generator=gen) * self.noise
        t = regression_target(x) + noise
        train, val, test = split_indices(len(x), self.val_fraction, self.test_fraction, self.seed)
        return tuple(TensorDataset(x[idx], t[idx]) for idx in (train, val, test))  # type: ignore[return-value]


class LinearNeuronDataModule(_TensorDataModule):
    """The seed's linear neuron: inputs (x₁, x₂) = (1, 1), target t = 0, and nothing else.

    An epoch repeats the one case `steps_per_epoch` times (batch size 1), so each optimiser step
    is the seed's update Δw = −η ∂E/∂w on that case. Validation and test use the same case.
    """

    num_features = 2
    num_outputs = 1

    def __init__(self, steps_per_epoch: int = 10, seed: int = 0) -> None:
        super().__init__(batch_size=1, seed=seed)
        self.steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)

    def _build(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        x = torch.tensor([[1.0, 1.0]])
        t = torch.tensor([[0.0]])
        repeated = TensorDataset(x.repeat(self.steps_per_epoch, 1), t.repeat(self.steps_per_epoch, 1))
        single = TensorDataset(x, t)
        return repeated, single, single
