"""PackedSmallCNN: T small_cnn trials trained in one pass give, on the CPU at the jobs'
thread count, the same floats as each trial trained alone on the same batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from poisonbench.bench.packing_speed import compare_recipe, cpu_recipe, sgd, trial_streams
from poisonbench.data.digits import digits
from poisonbench.errors import ConfigError
from poisonbench.models import ImageClassifier
from poisonbench.models.packed_small_cnn import PackedSmallCNN, packed_cross_entropy
from poisonbench.models.small_cnn import small_cnn
from poisonbench.threads import CPU_JOB_THREADS, torch_threads


@pytest.fixture(scope="module")
def train_set():
    data = digits(Path("."), "train", False)
    return data.images, data.labels


def test_shapes_unpack_and_checks():
    pack = PackedSmallCNN.from_seeds([0, 1, 2], 10, width=8, pool=2)
    x = torch.rand(3, 5, 3, 32, 32)
    out = pack(x)
    assert out.shape == (3, 5, 10)
    models = pack.unpack()
    assert len(models) == 3 and all(isinstance(m, ImageClassifier) for m in models)
    for t, model in enumerate(models):
        assert torch.equal(model(x[t]), out[t])  # train mode: batch statistics, as the pack
    # unpack copies: later training of the pack leaves them alone
    before = models[0].head.weight.clone()
    with torch.no_grad():
        pack.trials[0].head.weight.add_(1)
    assert torch.equal(models[0].head.weight, before)
    # seeds make distinct models, and the same seeds the same ones
    again = PackedSmallCNN.from_seeds([0, 1, 2], 10, width=8, pool=2)
    alone = PackedSmallCNN.from_seeds([1], 10, width=8, pool=2)
    assert torch.equal(again.trials[1].head.weight, alone.trials[0].head.weight)
    assert not torch.equal(again.trials[0].head.weight, again.trials[1].head.weight)
    loaded = PackedSmallCNN.from_state_dicts([m.state_dict() for m in again.trials], 10, width=8, pool=2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match=r"\[3, B, C, H, W\]"):
        pack(torch.rand(5, 3, 32, 32))
    with pytest.raises(ConfigError, match="one shape"):
        PackedSmallCNN([small_cnn(10, width=8), small_cnn(10, width=16)])
    with pytest.raises(ConfigError, match="small_cnn"):
        PackedSmallCNN([small_cnn(10), torch.nn.Linear(2, 2)])
    assert PackedSmallCNN.from_seeds([0], 10, width=16).grouped  # ≥ 16 channels per group
    assert not PackedSmallCNN.from_seeds([0], 10, width=8).grouped


def test_streams_are_per_trial(train_set):
    images, labels = train_set
    one, two = trial_streams(images, labels, 16, [0, 1])
    again = trial_streams(images, labels, 16, [0])[0]
    for _ in range(3):
        (x1, y1), (x2, y2), (x3, y3) = next(one), next(two), next(again)
        assert x1.shape == (16, 3, 32, 32) and x1.dtype == torch.float32
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
        assert not torch.equal(y1, y2)


@pytest.mark.parametrize("width,pool", [(16, 1), (32, 2), (8, 1)], ids=["w16-grouped", "w32-grouped", "w8-per-trial"])
def test_packed_training_is_bit_identical(train_set, width, pool):
    images, labels = train_set
    train, _ = cpu_recipe()
    seeds, steps = [3, 4, 5], 4
    streams = trial_streams(images, labels, 32, seeds)
    batches = [[next(stream) for stream in streams] for _ in range(steps)]  # the same batches both ways
    with torch_threads(CPU_JOB_THREADS):
        pack = PackedSmallCNN.from_seeds(seeds, 10, width=width, pool=pool).train()
        assert pack.grouped == (width >= 16)
        alone = [model.train() for model in pack.unpack()]
        alone_opts = [sgd(model.parameters(), train) for model in alone]
        pack_opt = sgd(pack.parameters(), train)
        for step in batches:
            logits = []
            for model, opt, (x, y) in zip(alone, alone_opts, step):
                out = model(x)
                opt.zero_grad()
                F.cross_entropy(out, y).backward()
                opt.step()
                logits.append(out.detach())
            x, y = (torch.stack(part) for part in zip(*step))
            out = pack(x)
            pack_opt.zero_grad()
            packed_cross_entropy(out, y).sum().backward()
            pack_opt.step()
            assert torch.equal(out.detach(), torch.stack(logits))
        for model, trained in zip(alone, pack.unpack()):
            ours, theirs = model.state_dict(), trained.state_dict()
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), key
            assert int(theirs["backbone.layers.1.num_batches_tracked"]) == steps
        # Eval mode (running statistics) agrees too, and the trials did move apart.
        probe = images[:8].float() / 255
        pack.eval()
        evaluated = pack(probe.expand(3, *probe.shape))
        for t, model in enumerate(alone):
            assert torch.equal(model.eval()(probe), evaluated[t])
        assert not torch.equal(evaluated[0], evaluated[1])


@pytest.mark.slow
def test_whole_cpu_recipe_packed_equals_separate():
    # Two trials of 15 epochs each way: 155 s on the shared 2-core machine under load (load average 9).
    result = compare_recipe([0, 1])
    assert result["identical"]
    assert result["packed_acc"] == result["separate_acc"]
    assert min(result["packed_acc"]) > 80
