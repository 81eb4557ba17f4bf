"""Resident data: the training and test sets kept on the trainer's device, batches cut
there (``poisonbench.data.module.ResidentBatches``). On by default on CUDA only; forced
on the CPU it must give the host path's batches and results bit for bit, under DDP
sharding, on a filtered subset and resumed from a checkpoint."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.data.module import (RESIDENT_LIMIT, PoisonedDataModule, ResidentBatches, ShardedBatchSampler,
                                     use_resident)
from poisonbench.errors import ConfigError
from poisonbench.fitting.fit import fit
from poisonbench.fitting.trainer import checkpoint_path
from poisonbench.models import build_model

RECIPE = {"epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
          "milestones": [1], "accelerator": "cpu"}
N_TRAIN, N_TEST = 128, 32


def _head(data: ImageSet, n: int) -> ImageSet:
    return ImageSet(data.images[:n], data.labels[:n], data.classes, data.name, data.split)


@pytest.fixture(scope="module")
def small(digits):
    train, test = digits
    return _head(train, N_TRAIN), _head(test, N_TEST)


def _batches(dm: PoisonedDataModule, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_auto_is_on_for_cuda_when_the_set_fits_and_off_on_the_cpu():
    cuda = torch.device("cuda")  # a device name needs no GPU
    assert use_resident("auto", cuda, 150 * 2**20)
    assert not use_resident("auto", cuda, RESIDENT_LIMIT + 1)
    assert not use_resident("auto", torch.device("cpu"), 1)
    assert use_resident(True, torch.device("cpu"), RESIDENT_LIMIT + 1) and not use_resident(False, cuda, 1)
    with pytest.raises(ConfigError, match="resident_data"):
        use_resident("yes", cuda, 1)
    with pytest.raises(ConfigError, match="resident_data"):
        PoisonedDataModule(*_fake_sets(), resident="on")


def _fake_sets() -> tuple[ImageSet, ImageSet]:
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    return (ImageSet(images, torch.arange(4), ["a", "b", "c", "d"], "fake", "train"),
            ImageSet(images, torch.arange(4), ["a", "b", "c", "d"], "fake", "test"))


def test_forced_on_the_cpu_it_cuts_the_host_paths_batches_in_every_rank(small):
    train, test = small
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        host = PoisonedDataModule(train, test, None, batch_size=32, seed=5)
        resident = PoisonedDataModule(train, test, None, batch_size=32, seed=5, resident=True)
        host.trainer, resident.trainer = _fake_trainer(rank, world), _fake_trainer(rank, world)
        for epoch in (0, 1):
            a, b = _batches(host, epoch), _batches(resident, epoch)
            assert len(a) == len(b) == -(-(N_TRAIN // world) // 32)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert resident.resident_used and not host.resident_used
        assert isinstance(resident.train_dataloader().dataset, ResidentBatches)
        evals = [torch.cat([y for _, y in dm.val_dataloader()]) for dm in (host, resident)]
        assert torch.equal(*evals)


def test_sampler_on_a_device_yields_index_tensors_there():
    sampler = ShardedBatchSampler(10, 4, shuffle=True, seed=0, device=torch.device("cpu"))
    plain = ShardedBatchSampler(10, 4, shuffle=True, seed=0)
    assert [t.tolist() for t in sampler] == [t.tolist() for t in plain]
    assert all(t.device.type == "cpu" for t in sampler)


def test_a_replaced_training_set_is_copied_again(small):
    train, test = small
    dm = PoisonedDataModule(train, test, None, batch_size=32, resident=True)
    first = dm.train_dataloader().dataset
    assert dm.train_dataloader().dataset is first  # one copy while the set stays
    dm.train_set = _head(train, 100)  # what a defense's filter does
    again = dm.train_dataloader().dataset
    assert again is not first and len(again) == 100


def _fit(data: tuple[ImageSet, ImageSet], resident, subset: torch.Tensor | None = None, **kwargs):
    train, test = data
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    dm = PoisonedDataModule(train, test, None, batch_size=32, seed=3, resident=resident)
    if subset is not None:  # a filter's kept samples, as training.run.filter_training_set sets them
        dm.setup("fit")
        dm.train_set = ImageSet(train.images.index_select(0, subset), train.labels.index_select(0, subset),
                                train.classes, train.name, train.split)
    fitted = fit(model, dm, RECIPE, **kwargs)
    return fitted, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("filtered", [False, True], ids=["whole", "filtered"])
def test_forced_on_the_cpu_training_is_bit_identical(small, filtered):
    subset = torch.arange(0, N_TRAIN, 3) if filtered else None
    host, host_state = _fit(small, "auto", subset)
    resident, resident_state = _fit(small, True, subset)
    assert host.training == {"precision": "32-true", "compile": False, "resident_data": False}
    assert resident.training == {"precision": "32-true", "compile": False, "resident_data": True}
    assert _same(host_state, resident_state)
    assert host.module.curve == resident.module.curve and len(host.module.curve) == RECIPE["epochs"]


class Stop(RuntimeError):
    pass


class StopAt:
    """Training hooks that change nothing and end the fit when epoch ``at`` starts (a
    killed job, after its checkpoint of the epoch before)."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_train_batch(self, model, images, labels):
        return images, labels

    def on_before_optimizer_step(self, model, optimizer) -> None:
        pass

    def on_train_epoch_start(self, epoch: int) -> None:
        if epoch == self.at:
            raise Stop(f"stopped at epoch {epoch}")


@pytest.mark.slow  # three fits: 11 s on the shared 2-core machine
def test_resident_training_resumes_to_the_uninterrupted_result(small, tmp_path):
    whole, whole_state = _fit(small, True, hooks=StopAt(None), job_dir=tmp_path / "whole")
    with pytest.raises(Stop):
        _fit(small, True, hooks=StopAt(1), job_dir=tmp_path / "killed")
    assert checkpoint_path(tmp_path / "killed").is_file()
    resumed, resumed_state = _fit(small, True, hooks=StopAt(None), job_dir=tmp_path / "killed")
    assert resumed.training["resident_data"]
    assert _same(whole_state, resumed_state) and whole.module.curve == resumed.module.curve
