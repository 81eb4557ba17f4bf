"""``make bench`` section ``packing``: T trials of the small CNN packed into one model
(``poisonbench.models.packed_small_cnn``) against the same T trials trained in turn.

Each trial draws from its own stream (``TrialStream``): the jobs' batch order
(``ShardedBatchSampler`` with the trial's seed) and its own ``torch.Generator`` for
the random crop and flip, on the device. The model and recipe are the cpu profile's
victim (``configs/profiles/cpu.yaml``: small_cnn, batch, SGD settings), the data the
digits training split. Printed per device: training images/s of one trial alone, of
T trials in turn (one step of each, repeated), of the T trials packed (one step of
all), and packed / in turn. On the CPU the steps run with the jobs' thread count
(``CPU_JOB_THREADS``), where packing is exact.

``compare_recipe`` trains T trials through the whole cpu recipe both ways on the same
streams and reports their test accuracies, whether every weight came out identical,
and the seconds each way (tests/test_packed_small_cnn.py runs it as a slow test).

Packing is not wired into the jobs: a job draws its crop and flip from Lightning's
global random state (``VictimModule.on_after_batch_transfer``), so T jobs in one
process would share one stream and their results would depend on their neighbours.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from poisonbench.bench.profiles import load_profile
from poisonbench.data.augment import random_crop_flip, to_float
from poisonbench.data.digits import digits
from poisonbench.data.module import ShardedBatchSampler
from poisonbench.models.packed_small_cnn import PackedSmallCNN, packed_cross_entropy
from poisonbench.threads import CPU_JOB_THREADS, torch_threads

PACKING_TRIALS = 4  # trials per pack in the bench
PACKING_STEPS = {"cpu": 10, "cuda": 50}  # timed training steps per trial per measurement


class TrialStream:
    """One trial's training batches, endless: the jobs' shuffled order from ``seed``
    (``ShardedBatchSampler``, reshuffled each epoch) and a random crop (padding 4) and
    flip drawn from ``generator``, which lives on the images' device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 generator: torch.Generator, padding: int = 4) -> None:
        self.images, self.labels, self.generator, self.padding = images, labels, generator, padding
        self.sampler = ShardedBatchSampler(len(labels), batch_size, shuffle=True, seed=seed)
        self.epoch = 0
        self._order: Iterator[torch.Tensor] = iter(self.sampler)

    def __iter__(self) -> TrialStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = next(self._order, None)
        if index is None:  # the epoch ended: reshuffle, as the jobs' sampler does
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self._order = iter(self.sampler)
            index = next(self._order)
        index = index.to(self.images.device)
        images = random_crop_flip(self.images.index_select(0, index), self.padding, generator=self.generator)
        return to_float(images), self.labels.index_select(0, index)

    def steps_per_epoch(self) -> int:
        return len(self.sampler)


def trial_streams(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  seeds: Sequence[int]) -> list[TrialStream]:
    """One stream per trial seed: order from the seed, augmentation from a generator seeded
    with it on the images' device."""
    return [TrialStream(images, labels, batch_size, seed, torch.Generator(device=images.device).manual_seed(seed))
            for seed in seeds]


def cpu_recipe() -> tuple[dict, dict]:
    """(train settings, small_cnn parameters) of the cpu profile's victim."""
    family = load_profile("cpu").family("shortcuts")
    return dict(family.train), dict(family.override.get("model_params") or {})


def sgd(parameters, train: dict) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=train["lr"], momentum=train.get("momentum", 0.0),
                           nesterov=bool(train.get("nesterov", False)), weight_decay=train.get("weight_decay", 0.0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _threads(device: torch.device):
    return torch_threads(CPU_JOB_THREADS) if device.type == "cpu" else contextlib.nullcontext()


def bench_packing(devices: Sequence[torch.device], trials: int = PACKING_TRIALS, steps: int | None = None,
                  repeats: int = 3, batch: int | None = None, model_params: dict | None = None) -> dict[str, float]:
    """Images/s of one trial, ``trials`` in turn and ``trials`` packed, per device; returns
    ``{"<what> <device>": images/s}`` and ``"ratio <device>"`` (packed / in turn)."""
    train, params = cpu_recipe()
    params = params if model_params is None else model_params
    batch = batch or train["batch_size"]
    data = digits(Path("."), "train", False)
    figures: dict[str, float] = {}
    for device in devices:
        n_steps = steps or PACKING_STEPS[device.type]
        images, labels = data.images.to(device), data.labels.to(device)
        seeds = list(range(trials))
        with _threads(device):
            pack = PackedSmallCNN.from_seeds(seeds, data.num_classes, **params).to(device).train()
            alone = [model.train() for model in pack.unpack()]
            alone_opts = [sgd(model.parameters(), train) for model in alone]
            alone_streams = trial_streams(images, labels, batch, seeds)
            pack_opt = sgd(pack.parameters(), train)
            pack_streams = trial_streams(images, labels, batch, seeds)

            def step_alone(t: int) -> None:
                x, y = next(alone_streams[t])
                loss = F.cross_entropy(alone[t](x), y)
                alone_opts[t].zero_grad(set_to_none=True)
                loss.backward()
                alone_opts[t].step()

            def step_packed() -> None:
                x, y = zip(*(next(stream) for stream in pack_streams))
                loss = packed_cross_entropy(pack(torch.stack(x)), torch.stack(y)).sum()
                pack_opt.zero_grad(set_to_none=True)
                loss.backward()
                pack_opt.step()

            def rate(run, images_per_step: int) -> float:
                _sync(device)
                start = time.perf_counter()
                for _ in range(n_steps):
                    run()
                _sync(device)
                return n_steps * images_per_step / (time.perf_counter() - start)

            def in_turn() -> None:
                for t in range(trials):
                    step_alone(t)

            step_packed(), in_turn()  # warm-up
            # The three alternate within each round, so load on a shared machine hits all alike.
            rounds = [(rate(lambda: step_alone(0), batch), rate(in_turn, trials * batch),
                       rate(step_packed, trials * batch)) for _ in range(max(repeats, 1))]
        one, turn, packed = (statistics.median(r[i] for r in rounds) for i in range(3))
        ratio = statistics.median(r[2] / r[1] for r in rounds)
        figures.update({f"one {device}": one, f"in_turn {device}": turn, f"packed {device}": packed,
                        f"ratio {device}": ratio})
        shown = ", ".join(f"{k} {v}" for k, v in params.items())
        threads = f", {CPU_JOB_THREADS} thread{'s' if CPU_JOB_THREADS > 1 else ''}" if device.type == "cpu" else ""
        print(f"packing small_cnn ({shown or 'defaults'}; {'grouped' if pack.grouped else 'per-trial'} middle convs), "
              f"{device}{threads}, batch {batch}, {n_steps} steps, digits with crop and flip: "
              f"1 trial {one:,.0f} images/s; {trials} trials in turn {turn:,.0f} images/s; "
              f"{trials} trials packed {packed:,.0f} images/s; packed / in turn {ratio:.2f} "
              f"(median of {len(rounds)} rounds)")
    return figures


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(to_float(chunk)).argmax(1) for chunk in images.split(256)])
    model.train()
    return float((predicted == labels).float().mean()) * 100


def compare_recipe(seeds: Sequence[int], device: torch.device | str = "cpu", epochs: int | None = None) -> dict:
    """Train the trials of ``seeds`` through the cpu recipe on digits, separately (in turn)
    and packed, on the same per-trial streams; return their test accuracies (%), whether
    every state tensor is identical, and the seconds each way."""
    device = torch.device(device)
    train, params = cpu_recipe()
    epochs = epochs or train["epochs"]
    data, test = digits(Path("."), "train", False), digits(Path("."), "test", False)
    images, labels = data.images.to(device), data.labels.to(device)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    result: dict = {}
    with _threads(device):
        pack = PackedSmallCNN.from_seeds(seeds, data.num_classes, **params).to(device).train()
        alone = [model.train() for model in pack.unpack()]

        def fit(model, streams, loss_of) -> None:  # the recipe's SGD and milestones, one batch per stream per step
            opt = sgd(model.parameters(), train)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(train.get("milestones", [])), train.get("gamma", 0.1))
            for _ in range(epochs):
                for _ in range(streams[0].steps_per_epoch()):
                    loss = loss_of(model, [next(stream) for stream in streams])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()

        start = time.perf_counter()
        for model, stream in zip(alone, trial_streams(images, labels, train["batch_size"], seeds)):
            fit(model, [stream], lambda m, batches: F.cross_entropy(m(batches[0][0]), batches[0][1]))
        _sync(device)
        result["separate_s"] = time.perf_counter() - start

        start = time.perf_counter()
        fit(pack, trial_streams(images, labels, train["batch_size"], seeds),
            lambda m, batches: packed_cross_entropy(m(torch.stack([x for x, _ in batches])),
                                                    torch.stack([y for _, y in batches])).sum())
        _sync(device)
        result["packed_s"] = time.perf_counter() - start

        result["separate_acc"] = [_accuracy(model, test_images, test_labels) for model in alone]
        result["packed_acc"] = [_accuracy(model, test_images, test_labels) for model in pack.unpack()]
        result["identical"] = all(
            torch.equal(a, b) for one, two in zip(alone, pack.unpack())
            for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    return result
