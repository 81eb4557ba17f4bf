"""PoisonedDataModule: the poisoned training set and the clean test set as uint8 batches.

Batches are cut by indexing whole uint8 tensors (no per-sample ``__getitem__`` and
collate): a batch sampler yields index tensors and the loader returns
``(images[idx], labels[idx])``. Augmentation and the conversion to float happen on
the batch's device, in the LightningModule's ``on_after_batch_transfer``.

The sampler shards by the trainer's rank itself, so the trainer runs with
``use_distributed_sampler=False`` and the same code serves CPU, one GPU and DDP.

Resident data (``ResidentBatches``): on CUDA, when a set fits (``RESIDENT_LIMIT``), it
is copied to the trainer's device once and its batches are cut there, by index tensors
that live there too (the epoch's order is drawn on the CPU as always and moved once per
epoch): no host copy per step. The loader, its sampler and every random draw stay those
of the host path, so forced on the CPU (``resident=True``) it gives the same batches in
the same order, and the same results, bit for bit.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError

# The largest set (images and labels, bytes) that is kept on a CUDA device by default:
# CIFAR-10's training set is 150 MiB, ImageNet-sized sets stay on the host.
RESIDENT_LIMIT = 4 * 2**30
RESIDENT_CHOICES = ("auto", True, False)


class TensorBatches(Dataset):
    """``dataset[index_tensor]`` → (images[index], labels[index])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select is several times faster than advanced indexing for row gathers.
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class ResidentBatches(TensorBatches):
    """``TensorBatches`` of a set copied once to ``device``: indexed there by the index
    tensors of a ``ShardedBatchSampler`` made for the same device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        super().__init__(images.to(device), labels.to(device))
        self.device = torch.device(device)
        self.source = images  # the host tensor it copies (a set replaced later is copied anew)


def set_bytes(images: torch.Tensor, labels: torch.Tensor) -> int:
    return images.numel() * images.element_size() + labels.numel() * labels.element_size()


def use_resident(choice: str | bool, device: torch.device, nbytes: int) -> bool:
    """Whether a set of ``nbytes`` is kept on ``device``: ``auto`` = on a CUDA device
    when it fits ``RESIDENT_LIMIT``; ``True``/``False`` as told (``True`` on the CPU
    runs the resident code path where the data already is)."""
    if choice not in RESIDENT_CHOICES:
        raise ConfigError(f"resident_data must be auto, true or false; got {choice!r}")
    if choice == "auto":
        return torch.device(device).type == "cuda" and nbytes <= RESIDENT_LIMIT
    return bool(choice)


class ShardedBatchSampler(Sampler):
    """Index tensors of one batch each; reshuffled per epoch from (seed, epoch), and
    split over ``world_size`` ranks. Training shards are padded by wrapping, as
    DistributedSampler does, so every rank takes the same number of optimiser steps;
    evaluation shards are not, so no test image is counted twice.

    With a ``device``, the epoch's order (drawn on the CPU, as without) is moved there
    once and split there: index tensors for a ``ResidentBatches`` on that device."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.device = device

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
        order = self._indices()
        if self.device is not None:
            order = order.to(self.device)
        return iter(torch.split(order, self.batch_size))

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
    model trains on the clean remainder only. ``resident`` (``auto``, ``True``,
    ``False``): whether the sets are kept on the trainer's device (``use_resident``);
    ``resident_used`` says what the last training loader did.
    """

    def __init__(self, base: ImageSet, test: ImageSet, store: PoisonStore | None = None,
                 ratio: float = 1.0, batch_size: int = 128, eval_batch_size: int = 512,
                 seed: int = 0, drop_poisoned: bool = False, resident: str | bool = "auto") -> None:
        super().__init__()
        if resident not in RESIDENT_CHOICES:
            raise ConfigError(f"resident_data must be auto, true or false; got {resident!r}")
        self.base, self.test_set, self.store = base, test, store
        self.ratio, self.batch_size, self.eval_batch_size, self.seed = ratio, batch_size, eval_batch_size, seed
        self.drop_poisoned = drop_poisoned
        self.resident = resident
        self.resident_used = False
        self.train_set: ImageSet | None = None
        self._resident_copies: dict[str, ResidentBatches] = {}

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

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, data: ImageSet, batch_size: int, shuffle: bool) -> tuple[DataLoader, bool]:
        rank, world = self._rank()
        device = self._device()
        if use_resident(self.resident, device, set_bytes(data.images, data.labels)):
            # One copy per set and device while the set stays (val and test share it).
            key = f"{'train' if shuffle else 'eval'} {device}"
            copy = self._resident_copies.get(key)
            if copy is None or copy.source is not data.images:
                copy = self._resident_copies[key] = ResidentBatches(data.images, data.labels, device)
            sampler = ShardedBatchSampler(len(data), batch_size, shuffle, self.seed, rank, world, device=device)
            return DataLoader(copy, sampler=sampler, batch_size=None), True
        sampler = ShardedBatchSampler(len(data), batch_size, shuffle, self.seed, rank, world)
        return DataLoader(TensorBatches(data.images, data.labels), sampler=sampler, batch_size=None), False

    def train_dataloader(self) -> DataLoader:
        self.setup()
        loader, self.resident_used = self._loader(self.train_set, self.batch_size, shuffle=True)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)[0]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)[0]
