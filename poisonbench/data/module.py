"""PoisonedDataModule: the poisoned training set and the clean test set as uint8 batches.

Batches are cut by indexing whole uint8 tensors (no per-sample ``__getitem__`` and
collate): a batch sampler yields index tensors and the loader returns
``(images[idx], labels[idx])``. Augmentation and the conversion to float happen on
the batch's device, in the LightningModule's ``on_after_batch_transfer``.

The sampler shards by the trainer's rank itself, so the trainer runs with
``use_distributed_sampler=False`` and the same code serves CPU, one GPU and DDP.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError


class TensorBatches(Dataset):
    """``dataset[index_tensor]`` → (images[index], labels[index])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select is several times faster than advanced indexing for row gathers.
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class ShardedBatchSampler(Sampler):
    """Index tensors of one batch each; reshuffled per epoch from (seed, epoch), and
    split over ``world_size`` ranks. Training shards are padded by wrapping, as
    DistributedSampler does, so every rank takes the same number of optimiser steps;
    evaluation shards are not, so no test image is counted twice."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        if self.world_size > 1:
            if self.shuffle:
                per_rank = -(-self.n // self.world_size)
                order = torch.cat([order, order[: per_rank * self.world_size - self.n]])
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self):
        return iter(torch.split(self._indices(), self.batch_size))

    def __len__(self) -> int:
        return -(-len(self._indices()) // self.batch_size)


def select_poisoned(store: PoisonStore, n_train: int, ratio: float) -> torch.Tensor | None:
    """Positions into ``store`` of the round(ratio·n_train) samples to poison.

    The subset depends on the store's seed only, so every trial of a row sees the same
    poisoned samples. ``None`` means the whole store.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"ratio must lie in [0, 1], got {ratio}")
    m = int(store.index.numel())
    if ratio == 1.0 or m == 0:
        return None
    k = round(ratio * n_train)
    if k > m:
        raise ConfigError(f"ratio {ratio} asks for {k} poisoned samples but the {store.attack} store modifies only {m}")
    gen = torch.Generator().manual_seed(store.seed)
    return torch.randperm(m, generator=gen)[:k].sort().values


def clean_remainder(n_train: int, ratio: float, seed: int) -> torch.Tensor:
    """Sorted indices of the training samples left when round(ratio·n_train) of them,
    drawn with ``seed``, are removed (the shortcuts paper's Table 6 "Clean Data Only")."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"drop_poisoned needs a ratio in [0, 1) so that something is left to train on, got {ratio}")
    k = round(ratio * n_train)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=gen)[k:].sort().values


class PoisonedDataModule(L.LightningDataModule):
    """Training data = ``base`` with (a ``ratio`` of) ``store`` applied; test data clean.

    With ``drop_poisoned`` the ratio·N samples are removed instead of poisoned, and the
    model trains on the clean remainder only.
    """

    def __init__(self, base: ImageSet, test: ImageSet, store: PoisonStore | None = None,
                 ratio: float = 1.0, batch_size: int = 128, eval_batch_size: int = 512,
                 seed: int = 0, drop_poisoned: bool = False) -> None:
        super().__init__()
        self.base, self.test_set, self.store = base, test, store
        self.ratio, self.batch_size, self.eval_batch_size, self.seed = ratio, batch_size, eval_batch_size, seed
        self.drop_poisoned = drop_poisoned
        self.train_set: ImageSet | None = None

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if self.drop_poisoned:
                keep = clean_remainder(len(self.base), self.ratio, self.store.seed if self.store else self.seed)
                b = self.base
                self.train_set = ImageSet(b.images.index_select(0, keep), b.labels.index_select(0, keep),
                                          b.classes, b.name, b.split)
            elif self.store is None:
                self.train_set = self.base
            else:
                subset = select_poisoned(self.store, len(self.base), self.ratio)
                self.train_set = self.store.apply(self.base, subset)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, data: ImageSet, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._rank()
        sampler = ShardedBatchSampler(len(data), batch_size, shuffle, self.seed, rank, world)
        return DataLoader(TensorBatches(data.images, data.labels), sampler=sampler, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)
