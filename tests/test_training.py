"""Data module, device-side augmentation and the victim's scenarios."""
from __future__ import annotations

import pytest
import torch

from poisonbench.attacks import ATTACKS
from poisonbench.data.augment import random_crop_flip
from poisonbench.data.module import PoisonedDataModule, ShardedBatchSampler, select_poisoned
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.fitting.trainer import build_trainer
from poisonbench.fitting.victim import VictimModule

TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
         "milestones": [], "accelerator": "cpu"}


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(64):
        found = any(torch.equal(y[i], padded[i, :, r:r + 32, c:c + 32]) or
                    torch.equal(y[i], padded[i, :, r:r + 32, c:c + 32].flip(-1))
                    for r in range(9) for c in range(9))
        assert found, i
    assert (y == 0).any()  # some crops reach into the zero padding
    xf = x.float().requires_grad_()
    random_crop_flip(xf).sum().backward()  # differentiable for crafting
    assert xf.grad is not None


def test_sampler_shards_and_reshuffles():
    full = torch.cat(list(ShardedBatchSampler(10, 4, shuffle=True, seed=0)))
    assert sorted(full.tolist()) == list(range(10))
    ranks = [torch.cat(list(ShardedBatchSampler(10, 4, True, 0, rank=r, world_size=3))) for r in range(3)]
    assert all(len(r) == 4 for r in ranks) and set(torch.cat(ranks).tolist()) == set(range(10))
    evals = [torch.cat(list(ShardedBatchSampler(10, 4, False, 0, rank=r, world_size=3))) for r in range(3)]
    assert sorted(torch.cat(evals).tolist()) == list(range(10))  # evaluation counts each image once
    assert [len(ShardedBatchSampler(10, 4, False, 0, rank=r, world_size=3)) for r in range(3)] == [1, 1, 1]
    s = ShardedBatchSampler(10, 4, shuffle=True, seed=0)
    first = torch.cat(list(s))
    s.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(s)))


def test_ratio_poisons_a_fixed_fraction(digits):
    train, test = digits
    store = ATTACKS.get("synthetic").craft(train, {}, seed=0)
    subset = select_poisoned(store, len(train), 0.5)
    assert len(subset) == round(0.5 * len(train))
    assert torch.equal(subset, select_poisoned(store, len(train), 0.5))  # same for every trial
    dm = PoisonedDataModule(train, test, store, ratio=0.5, batch_size=64)
    dm.setup()
    changed = (dm.train_set.images != train.images).flatten(1).any(1)
    assert changed.sum() <= len(subset) and changed.sum() > 0.9 * len(subset)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
    with pytest.raises(ConfigError, match="ratio"):
        select_poisoned(store, len(train), 1.5)


@pytest.mark.parametrize("scenario", ["scratch", "finetune", "transfer"])
def test_scenarios(digits, scenario):
    train, test = digits
    model = build_model("small_cnn", 10)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    head_before = model.head.weight.detach().clone()
    module = VictimModule(model, 10, TRAIN, scenario=scenario)
    if scenario != "scratch":
        assert not torch.equal(model.head.weight, head_before)  # re-initialised classifier
    trainer = build_trainer(TRAIN, None)
    trainer.fit(module, datamodule=PoisonedDataModule(train, test, None, batch_size=64))
    moved = any(not torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert moved == (scenario != "transfer")  # transfer trains the linear layer only
    assert len(module.curve) == 1 and 0 <= module.curve[0][1] <= 100


def test_unknown_scenario_and_precision():
    from poisonbench.fitting.trainer import resolve_precision

    with pytest.raises(ConfigError, match="unknown scenario"):
        VictimModule(build_model("small_cnn", 10), 10, TRAIN, scenario="distill")
    assert resolve_precision("auto", "cpu") == "32-true"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_bf16_and_channels_last(digits):
    from poisonbench.fitting.trainer import resolve_precision

    assert resolve_precision("auto", "auto") == "bf16-mixed"
    train, test = digits
    module = VictimModule(build_model("resnet18", 10), 10, {**TRAIN, "accelerator": "gpu"})
    trainer = build_trainer({**TRAIN, "accelerator": "gpu"}, None)
    trainer.fit(module, datamodule=PoisonedDataModule(train, test, None, batch_size=64))
    assert module.channels_last and trainer.precision == "bf16-mixed"
