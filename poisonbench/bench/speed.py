"""``make bench``: the speed figures of poisonbench, each measured in one run.

CPU baselines, each a ratio against a plain implementation timed in the same run:

1. ``synthetic``: the ``synthetic`` attack on 50,000 CIFAR-shaped images on one CPU
   core (target ≤ 0.5 s), beside a straightforward float32 implementation (the
   authors' NumPy recipe).
2. ``datamodule``: PoisonedDataModule throughput vs plain uint8 tensor indexing of the
   same batches (target ratio ≤ 1.3).
3. ``fit``: Lightning ``fit`` vs a plain PyTorch loop: same model, batches and steps,
   CPU (target ratio ≤ 1.15).

Costs on each ``--device`` (no target; what a run will take):

4. ``crafting``: seconds per 1,000 images per PGD step of ``error_minimizing`` (its
   own ``_min_min``: eval mode, no augmentation) and ``adversarial`` (the shared
   ``chunked_pgd.pgd_chunk`` with its objective, differentiable ``translate_flip`` on),
   for the paper's crafting model (ResNet-18) and the cpu profile's ``small_cnn``
   (pool 1, width 16), with the memory peak: CUDA ``max_memory_allocated``, or on
   the CPU the growth of the resident set, sampled.
5. ``projection``: the PGD cost of ``adversarial`` on CIFAR-10 (250 steps × 50,000
   images × 1 or 8 restarts, ResNet-18), projected from the measured time of a few
   steps, beside the authors' "several hours" (Fowl et al. 2021b). The crafting
   model's own training is not included.
6. ``features``: images/s of ``linear_eval.extract_features`` (uncached) through a
   ResNet-18 backbone: the CIFAR-form ``resnet18`` at 32×32, timm's ``resnet18`` at
   32×32, and timm's ``resnet18`` with ``image_size: 224`` (bicubic resize in the
   model's ``normalize`` layer, as the ``pretrained`` defense builds its ImageNet
   extractors; the shortcuts paper, Appendix E).
7. ``lbfgs``: seconds of ``probe.fit_lbfgs`` with linear_eval's probe (50 L-BFGS
   steps, Appendix E) on 50,000 × 512 random features and 10 classes.
8. ``adv_poisoning``: one training step defended by ``adversarial_poisoning`` (the
   robuster paper's 5 steps at p = 0.75, gradient matching) over a plain training step
   (forward, backward, SGD), same model and batch, for small_cnn (the cpu profile's)
   and ResNet-18 (the issue's target: ≤ ~4×).
9. ``gradient_matching``: seconds per 100 poisons per crafting step of
   ``gradient_matching`` (cosine, augmentation on) against small_cnn and ResNet-18.
10. ``training_defenses``: one training step defended by each of ``dp_sgd``,
   ``random_noise``, ``cutmix`` (every batch mixed), ``maxup`` and robuster's
   adversarial training (signed Adam, ε 8/255) over a plain step, same model and
   batch, small_cnn and ResNet-18 (batch sizes as ``adv_poisoning``).
11. ``filters``: seconds of each training-set filter's decision (``suspects``: spectral
    signatures, activation clustering with ICA, deep k-NN) on 50,000 × 512 random
    features, 10 classes, 500 poisons, on the CPU (scikit-learn and NumPy); the feature
    model's training and the feature extraction are not included.
12. ``integrity_crafting``: seconds per poison per crafting step of ``hidden_trigger``
   (features, greedy pairs, signed Adam) and of ``metapoison`` (per ensemble model: a
   K = 2 unroll and the target's loss back to the poisons), against small_cnn and
   ResNet-18, and MetaPoison's unroll over one plain training step (forward, backward,
   SGD) on the same batch.
13. ``feature_collision``: seconds per poison per crafting step of ``poison_frogs``,
   ``bullseye`` and ``convex_polytope`` (their shared step, augmentation on; Convex
   Polytope refits its coefficients every step) against small_cnn and ResNet-18.
14. ``packing``: training images/s of the cpu profile's small_cnn victim on digits, one
   trial alone, T trials in turn and T trials packed into one model (grouped
   convolutions, each trial its own sampler and augmentation stream), and packed / in
   turn (``poisonbench.bench.packing_speed``).

15. ``gpu``: the GPU path (``poisonbench.bench.gpu_speed``): a ResNet-18 CIFAR-10-shaped
   epoch through the job path beside a plain PyTorch loop over the same on-device data,
   with images/s, TFLOP/s and the fraction of the device's peak; the same with K = 1,
   2, 4, 8 worker processes per GPU; crafting cost per 1,000 images per PGD step in
   fp32 and bf16. On the first CUDA device of ``--device``; without one, a tiny CPU
   version.

``--only crafting,features`` picks sections (default: all). ``--device`` says where
sections 4–15 run: ``auto`` (default) = the CPU, and the GPU too when CUDA is
available; or a comma list such as ``cpu``, ``cuda`` or ``cpu,cuda:1``. The sizes
depend on the device (small on a CPU) and are printed with every figure.

Timings are medians over repeats after a warm-up, with ``torch.cuda.synchronize``
around every GPU timing; the first (cold) call is printed where it matters, since it
pays the page faults of fresh allocations.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from poisonbench.bench.gpu_speed import bench_gpu
from poisonbench.bench.packing_speed import bench_packing

SECTIONS = ("synthetic", "datamodule", "fit", "crafting", "projection", "features", "lbfgs", "adv_poisoning",
            "gradient_matching", "training_defenses", "filters", "integrity_crafting",
            "feature_collision", "packing", "gpu")
MiB, GiB = 2**20, 2**30


# ----------------------------------------------------------------------- helpers


def sync(device: torch.device | None) -> None:
    """Wait for the work queued on a GPU, so that a clock reading covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device | None = None) -> tuple[float, float]:
    """(cold seconds, median warm seconds); each call synchronised on a GPU ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


def sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits in fixed notation (no 1.2e+03), thousands grouped."""
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{round(x, decimals):,.{decimals}f}"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def parse_sections(spec: str) -> list[str]:
    """The sections a comma list names, in the order of ``SECTIONS``."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    for name in names:
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--only: unknown section {name!r}; known: {', '.join(SECTIONS)}{hint}")
    if not names:
        raise ValueError(f"--only: no section named; known: {', '.join(SECTIONS)}")
    return [name for name in SECTIONS if name in names]


def parse_devices(spec: str) -> list[torch.device]:
    """``auto``: the CPU, and the current CUDA device when CUDA is available; otherwise
    the devices of a comma list (``cpu``, ``cuda``, ``cuda:1``), each checked as the
    crafting devices are (``poisonbench.attacks.distributed.parse_devices``)."""
    from poisonbench.attacks.distributed import parse_devices as checked
    from poisonbench.errors import ConfigError

    if spec.strip() == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices: list[torch.device] = []
    for part in spec.split(","):
        try:
            (device,) = checked(part)  # one at a time: the bench may mix the CPU and GPUs
        except ConfigError as err:
            raise ValueError(f"--device: {err}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: {part.strip()!r} is neither the CPU nor a CUDA device")
        if device not in devices:
            devices.append(device)
    return devices


@contextlib.contextmanager
def temporary_home() -> Iterator[str]:
    """``$POISONBENCH_HOME`` pointed at an empty temporary folder, so that no cache is hit."""
    saved = os.environ.get("POISONBENCH_HOME")
    with tempfile.TemporaryDirectory(prefix="poisonbench-bench-") as folder:
        os.environ["POISONBENCH_HOME"] = folder
        try:
            yield folder
        finally:
            if saved is None:
                os.environ.pop("POISONBENCH_HOME", None)
            else:
                os.environ["POISONBENCH_HOME"] = saved


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``), so that
    a rise of the resident set counts pages a block needs, not pages freed before it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class MemoryPeak:
    """The memory peak of a ``with`` block on ``device``; ``str()`` says what was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, and how
    far it rose over what was allocated when the block began (the model and the batch).
    CPU: how far the process's resident set rose over its size when the block began,
    read from /proc/self/statm every 5 ms by a thread (torch's kernels release the GIL),
    after glibc's ``malloc_trim`` has returned the heap's free pages; memory the
    allocator still holds and reuses is not counted, so it is a lower bound. Without
    /proc: the rise of the lifetime peak ``ru_maxrss``, which stays 0 unless the block
    sets a new peak for the process.
    """

    INTERVAL_S = 0.005

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.text = "memory not measured"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryPeak:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._trimmed = _trim_heap()
            self._start = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start = _maxrss_bytes()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.text = (f"peak CUDA memory {peak / GiB:.2f} GiB (max_memory_allocated; "
                         f"+{(peak - self._start) / GiB:.2f} GiB over the model and batch)")
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rise = max(self._peak, _rss_bytes()) - self._start
            trimmed = "after malloc_trim; " if self._trimmed else ""
            self.text = (f"peak RSS +{rise / MiB:.0f} MiB over the start (/proc/self/statm every 5 ms, "
                         f"{trimmed}a lower bound: memory the allocator reuses is not counted)")
        else:
            rise = _maxrss_bytes() - self._start
            self.text = f"ru_maxrss +{rise / MiB:.0f} MiB (0 unless this sets the process's peak)"

    def __str__(self) -> str:
        return self.text


def device_header(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return (f"GPU {device}: {torch.cuda.get_device_name(device)}, {props.total_memory / GiB:.0f} GiB, "
            f"CUDA {torch.version.cuda}")


# ------------------------------------------------------------------- CPU baselines


def fake_cifar(n: int, classes: int = 10, seed: int = 0):
    from poisonbench.data.imageset import ImageSet

    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(n) % classes, [str(c) for c in range(classes)], name="fake", split="train")


def straightforward_synthetic(base, eps: float = 6 / 255, patch: int = 8, seed: int = 0) -> np.ndarray:
    """The authors' recipe in float32 NumPy: expand, normalise, add, clip, quantise."""
    from sklearn.datasets import make_classification

    n, c, h, w = base.images.shape
    k = base.num_classes
    grid = h // patch
    points, labels = make_classification(
        n_samples=n, n_features=c * grid * grid, n_informative=c * grid * grid, n_redundant=0,
        n_repeated=0, n_classes=k, n_clusters_per_class=1, class_sep=10.0, flip_y=0.0, random_state=seed)
    points = points.reshape(n, grid, grid, c).astype(np.float32)
    noise = np.repeat(np.repeat(points, patch, 2), patch, 1)
    flat = noise.reshape(n, -1)
    flat *= math.sqrt(c * h * w) * eps / np.linalg.norm(flat, axis=1, keepdims=True)
    images = base.images.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    out = np.empty_like(images)
    targets = base.labels.numpy()
    for cls in range(k):
        out[targets == cls] = images[targets == cls] + noise[labels == cls][: int((targets == cls).sum())]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def bench_synthetic(repeats: int) -> None:
    from poisonbench.attacks import ATTACKS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = fake_cifar(50_000)
    attack = ATTACKS.get("synthetic")
    params = attack.params({})
    cold, ours = timed(lambda: attack.craft_fn(base, params, 0, torch.device("cpu")), repeats)
    _, naive = timed(lambda: straightforward_synthetic(base), max(1, repeats // 2))
    print(f"synthetic, 50,000 × 3×32×32, 1 core: {ours:.3f} s (cold {cold:.3f} s; target ≤ 0.5 s); "
          f"straightforward float32: {naive:.3f} s; speed-up {naive / ours:.1f}×")
    torch.set_num_threads(threads)


def bench_datamodule(repeats: int) -> None:
    from poisonbench.attacks import ATTACKS
    from poisonbench.data.module import PoisonedDataModule, ShardedBatchSampler

    base, test = fake_cifar(50_000), fake_cifar(1_000, seed=1)
    store = ATTACKS.get("synthetic").craft(base, {}, seed=0)
    module = PoisonedDataModule(base, test, store, batch_size=128, seed=0)
    module.setup()
    images, labels = module.train_set.images, module.train_set.labels
    sampler = ShardedBatchSampler(len(labels), 128, shuffle=True, seed=0)
    batches = list(sampler)

    def plain():
        for idx in batches:
            images[idx], labels[idx]

    def loader():
        for _ in module.train_dataloader():
            pass

    _, t_plain = timed(plain, repeats)
    _, t_loader = timed(loader, repeats)
    print(f"PoisonedDataModule epoch of 50,000 (batch 128): {t_loader:.3f} s; plain uint8 indexing "
          f"{t_plain:.3f} s; ratio {t_loader / t_plain:.2f} (target ≤ 1.3)")


def bench_fit(steps: int, repeats: int) -> None:
    import torch.nn.functional as F

    from poisonbench.data.augment import random_crop_flip, to_float
    from poisonbench.data.module import PoisonedDataModule
    from poisonbench.models import build_model
    from poisonbench.fitting.trainer import build_trainer
    from poisonbench.fitting.victim import VictimModule

    batch = 128
    base, test = fake_cifar(steps * batch), fake_cifar(batch, seed=1)
    train = {"epochs": 1, "batch_size": batch, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
             "milestones": [], "accelerator": "cpu", "precision": "32-true"}

    def plain():
        torch.manual_seed(0)
        model = build_model("small_cnn", 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [])
        model.train()
        dm = PoisonedDataModule(base, test, None, batch_size=batch, seed=0)
        for images, labels in dm.train_dataloader():
            x = to_float(random_crop_flip(images))
            loss = F.cross_entropy(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()

    def lightning():
        torch.manual_seed(0)
        module = VictimModule(build_model("small_cnn", 10), 10, train)
        trainer = build_trainer(train, None)
        trainer.limit_val_batches = 0
        trainer.fit(module, datamodule=PoisonedDataModule(base, test, None, batch_size=batch, seed=0))

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    _, t_plain = timed(plain, repeats)
    _, t_fit = timed(lightning, repeats)
    print(f"Lightning fit, small_cnn, {steps} steps of {batch}, CPU: {t_fit:.3f} s; plain loop {t_plain:.3f} s; "
          f"ratio {t_fit / t_plain:.2f} (target ≤ 1.15)")


# ------------------------------------------------------------- costs per device

CRAFT_ATTACKS = ("error_minimizing", "adversarial")
# The paper's crafting model (shortcuts, Appendix E) and the cpu profile's
# (configs/profiles/cpu.yaml, attack_override).
CRAFT_MODELS: dict[str, dict] = {"resnet18": {}, "small_cnn": {"pool": 1, "width": 16}}
CRAFT_STEPS = {"cpu": (1, 3), "cuda": (3, 10)}  # (warm-up, timed) PGD steps per device type
# Images per PGD batch: the attacks' batch_size (512) on a GPU; fewer on a CPU, where
# one ResNet-18 step on 512 images takes half a minute.
CRAFT_BATCH = {"cpu": {"resnet18": 64, "small_cnn": 256}, "cuda": {"resnet18": 512, "small_cnn": 512}}
CRAFT_WHAT = {"error_minimizing": "its _min_min: eval mode, no augmentation",
              "adversarial": "chunked_pgd.pgd_chunk: eval mode, translate_flip on"}


class StepClock(nn.Module):
    """A crafting model that notes the (synchronised) time of each forward call.

    PGD calls its model once per step, so the gaps between calls are whole steps as the
    attack runs them (forward, backward, signed step, projection, the next input's
    clamp and augmentation), without the random start before the first step.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device = model, device
        self.stamps: list[float] = []

    def stamp(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stamp()
        return self.model(x)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


@dataclass
class StepCost:
    attack: str
    model: str
    device: torch.device
    batch: int
    steps: int
    step_s: float  # median seconds of one PGD step on ``batch`` images
    memory: str

    @property
    def per_1000_s(self) -> float:
        return self.step_s * 1000 / self.batch


def craft_step(attack: str, model_name: str, model_params: dict, device: torch.device, batch: int,
               steps: int, warmup: int, seed: int = 0) -> StepCost:
    """Run ``warmup + steps`` PGD steps of ``attack`` through the attack's own step
    function on a random batch; the median of the last ``steps`` and the memory peak."""
    from poisonbench.attacks import crafting
    from poisonbench.attacks.surrogate import build_crafting_model

    if attack not in CRAFT_ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(CRAFT_ATTACKS)}, got {attack!r}")
    torch.manual_seed(seed)
    model = build_crafting_model(model_name, 10, model_params).to(device)
    model.eval().requires_grad_(False)  # how both attacks hold their crafting model while crafting
    clock = StepClock(model, device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 3, 32, 32), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    stream = crafting.unit_generator(seed, 0, device)
    total = warmup + steps
    with MemoryPeak(device) as memory:
        if attack == "error_minimizing":
            from poisonbench.attacks.error_minimizing import ErrorMinimizingParams, _min_min

            params = ErrorMinimizingParams(steps=total)
            delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * params.eps).to(device)  # craft()'s start
            _min_min(clock, x, y, delta, params, stream)
            clock.stamp()  # the end of the last step
        else:
            from poisonbench.attacks.adversarial import AdversarialParams, adversarial_objective
            from poisonbench.attacks.chunked_pgd import pgd_chunk

            params = AdversarialParams(steps=total, batch_size=batch)
            # pgd_chunk's final evaluation of the objective calls the model once more: the end of the last step.
            pgd_chunk(adversarial_objective(params.mode)(clock, x, y, 10), x, params, stream)
    gaps = clock.gaps()
    if len(gaps) != total:  # the attack no longer calls its model once per step: fix this benchmark
        raise RuntimeError(f"{attack}: expected {total + 1} model calls for {total} PGD steps, got {len(clock.stamps)}")
    return StepCost(attack, model_name, device, batch, steps, statistics.median(gaps[warmup:]), str(memory))


def bench_crafting(devices: Sequence[torch.device], attacks: Sequence[str] = CRAFT_ATTACKS,
                   models: dict[str, dict] | None = None, batch: int | None = None,
                   steps: int | None = None, warmup: int | None = None) -> list[StepCost]:
    """Seconds per 1,000 images per PGD step of each attack × crafting model × device."""
    models = CRAFT_MODELS if models is None else models
    costs = []
    for device in devices:
        default_warmup, default_steps = CRAFT_STEPS[device.type]
        w = default_warmup if warmup is None else warmup
        s = default_steps if steps is None else steps
        for attack in attacks:
            for name, params in models.items():
                b = batch or CRAFT_BATCH[device.type].get(name, 512)
                cost = craft_step(attack, name, params, device, b, s, w)
                print(f"crafting {attack} ({CRAFT_WHAT[attack]}), {name}, {device}, batch {b}, "
                      f"median of {plural(s, 'step')} after {w}: {sig(cost.per_1000_s)} s per 1,000 images per step "
                      f"({sig(cost.step_s)} s per step); {cost.memory}")
                costs.append(cost)
    return costs


CIFAR10_TRAIN = 50_000
ADVERSARIAL_STEPS = 250  # adversarial_poisons' --attackiter
RESTARTS = (1, 8)  # 8: adversarial_poisons' --restarts default


def bench_projection(costs: Sequence[StepCost]) -> None:
    """The PGD hours of ``adversarial`` on CIFAR-10 from measured per-step costs."""
    for cost in costs:
        per_restart_h = cost.per_1000_s * CIFAR10_TRAIN / 1000 * ADVERSARIAL_STEPS / 3600
        hours = ", ".join(f"{sig(per_restart_h * r)} h with {plural(r, 'restart')}" for r in RESTARTS)
        print(f"adversarial on CIFAR-10, {cost.model}, {cost.device}: projected from a measured fraction "
              f"({plural(cost.steps, 'step')} of {plural(cost.batch, 'image')}): "
              f"{ADVERSARIAL_STEPS} steps × {CIFAR10_TRAIN:,} images: "
              f"{hours} (8: the authors' default); authors: \"several hours\" (Fowl et al. 2021b); "
              "PGD only, the crafting model's training not included")


# (label, model, build_model parameters, side of the images the backbone sees)
FEATURE_MODELS: tuple[tuple[str, str, dict, int], ...] = (
    ("resnet18 (CIFAR form)", "resnet18", {}, 32),
    ("timm:resnet18", "timm:resnet18", {}, 32),
    # as the pretrained defense builds its ImageNet extractors (configs/tables/shortcuts/table4.yaml)
    ("timm:resnet18, image_size=224 (bicubic in normalize)", "timm:resnet18",
     {"image_size": 224, "mean": "imagenet", "std": "imagenet"}, 224),
)
# Images per measurement, by device type and model label: seconds on two CPU cores.
FEATURE_IMAGES = {"cpu": {"resnet18 (CIFAR form)": 128, "timm:resnet18": 256},
                  "cuda": {}}
FEATURE_IMAGES_224 = {"cpu": 32, "cuda": 5_000}
FEATURE_IMAGES_DEFAULT = {"cpu": 256, "cuda": 10_000}


def bench_features(devices: Sequence[torch.device], repeats: int, images: int | None = None,
                   batch_size: int | None = None,
                   rows: Sequence[tuple[str, str, dict, int]] = FEATURE_MODELS) -> dict[tuple[str, str], float]:
    """Images/s of linear_eval's ``extract_features`` (uncached) on 32×32 uint8 images."""
    from poisonbench.models import build_model
    from poisonbench.fitting.features import EXTRACT_BATCH, extract_features, feature_key

    batch_size = batch_size or EXTRACT_BATCH
    rates = {}
    with temporary_home():  # cache=False reads no cache; an empty home makes sure
        for device in devices:
            for label, name, params, side in rows:
                if images is not None:
                    n = images
                elif side == 224:
                    n = FEATURE_IMAGES_224[device.type]
                else:
                    n = FEATURE_IMAGES[device.type].get(label, FEATURE_IMAGES_DEFAULT[device.type])
                torch.manual_seed(0)
                model = build_model(name, 10, **params)
                data = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0))

                def run() -> None:
                    out = extract_features(model, data, device, batch_size, cache=False)
                    if out.cached or tuple(out.values.shape) != (n, model.feature_dim):
                        raise RuntimeError(f"extract_features returned {tuple(out.values.shape)} "
                                           f"(cached={out.cached}); expected {(n, model.feature_dim)} computed")

                cold, warm = timed(run, repeats, device)
                start = time.perf_counter()
                feature_key(model, data)
                key_s = time.perf_counter() - start
                rates[(label, str(device))] = n / warm
                print(f"features {label}, {side}×{side} into the backbone, {device}, {plural(n, 'image')} in "
                      f"batches of {batch_size}: {sig(n / warm)} images/s ({sig(warm)} s, median of {repeats}; cold "
                      f"{sig(cold)} s); the cache key alone {sig(key_s, 2)} s")
                del model
    return rates


def bench_lbfgs(devices: Sequence[torch.device], n: int = 50_000, d: int = 512, classes: int = 10,
                repeats: int | None = None, probe=None) -> dict[str, float]:
    """Seconds of linear_eval's L-BFGS fit (``probe.fit_lbfgs``) on random features."""
    from poisonbench.analysis.probe import fit_lbfgs
    from poisonbench.fitting.linear_eval import LINEAR_EVAL_PROBE

    probe = probe or LINEAR_EVAL_PROBE
    gen = torch.Generator().manual_seed(0)
    features = torch.rand((n, d), generator=gen)  # non-negative, like pooled ReLU features
    labels = torch.randint(0, classes, (n,), generator=gen)
    cap = probe.steps * probe.iters_per_step
    seconds = {}
    for device in devices:
        reps = repeats or (1 if device.type == "cpu" else 3)
        m = min(n, 1_000)  # warm-up: kernels, BLAS handles and the allocator, on a small fit
        fit_lbfgs(features[:m], labels[:m], classes, replace(probe, steps=1), 0, device)
        times, fit = [], None
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            fit = fit_lbfgs(features, labels, classes, probe, 0, device)
            sync(device)
            times.append(time.perf_counter() - start)
        s = statistics.median(times)
        seconds[str(device)] = s
        stop = (f"torch's tolerances stopped it before the {cap:,}-iteration cap" if fit.iterations < cap
                else f"the {cap:,}-iteration cap")
        print(f"L-BFGS linear fit (probe.fit_lbfgs with linear_eval's probe: {probe.steps} steps × "
              f"≤{probe.iters_per_step} iterations, lr {probe.lr}), {n:,} × {d} random features, {classes} "
              f"random classes, {device}: {sig(s)} s (median of {reps}; {fit.iterations} iterations, "
              f"{fit.evaluations} loss evaluations, {sig(s / max(fit.evaluations, 1) * 1000)} ms each; {stop})")
    return seconds


def bench_filters(n: int = 50_000, d: int = 512, classes: int = 10, poisons: int = 500,
                  names: Sequence[str] = ("spectral_signatures", "activation_clustering", "deep_knn")) -> dict[str, float]:
    """Seconds of each filter's ``suspects`` on random features (CPU, one run each)."""
    from poisonbench.defenses import build_defense

    rng = np.random.default_rng(0)
    features = rng.random((n, d), dtype=np.float32)  # non-negative, like pooled ReLU features
    labels = rng.integers(0, classes, n)
    seconds = {}
    for name in names:
        defense = build_defense(name)
        start = time.perf_counter()
        flagged = defense.suspects(features, labels, num_classes=classes, poison_count=poisons, seed=0)
        seconds[name] = time.perf_counter() - start
        params = ", ".join(f"{k} {v}" for k, v in vars(defense.params).items())
        print(f"filter {name} ({params}), {n:,} × {d} random features, {classes} classes, {poisons:,} poisons, cpu: "
              f"{sig(seconds[name])} s ({len(flagged):,} removed)")
    return seconds


# ---------------------------------------------------------------------------- CLI


ADV_POISONING_BATCH = {"cpu": {"small_cnn": 128, "resnet18": 32}, "cuda": {"small_cnn": 128, "resnet18": 128}}


GM_POISONS = {"cpu": 100, "cuda": 500}  # poisons per matching batch: the cost scales with them
GM_STEPS = 3


def bench_gradient_matching(devices: Sequence[torch.device], steps: int = GM_STEPS,
                            models: dict[str, dict] | None = None, poisons: int | None = None) -> None:
    """Seconds per 100 poisons per step of gradient matching's crafting step (the
    attack's own ``step_loss`` and ``SignedAdam``), after one warm-up step."""
    from poisonbench.attacks.gradient_matching import GradientMatchingParams, step_loss
    from poisonbench.attacks.gradients import gradient_norm, parameter_gradient
    from poisonbench.attacks.steps import SignedAdam
    from poisonbench.models import build_model

    params = GradientMatchingParams()
    for device in devices:
        n = poisons or GM_POISONS[device.type]
        for name, kwargs in (models or {"small_cnn": {"pool": 1, "width": 16}, "resnet18": {}}).items():
            torch.manual_seed(0)
            model = build_model(name, 10, **kwargs).to(device).eval()
            g = torch.Generator(device=device).manual_seed(0)
            clean = torch.rand(n, 3, 32, 32, generator=g, device=device)
            labels = torch.randint(0, 10, (n,), generator=g, device=device)
            target = torch.rand(1, 3, 32, 32, generator=g, device=device)
            goal = tuple(x.detach() for x in parameter_gradient(model, target, labels[:1]))
            norm = gradient_norm(goal)
            opt = SignedAdam(clean, params.eps, generator=g)

            def one_step() -> None:
                grad, _ = step_loss(model, clean, opt.delta, labels, goal, norm, params, g)
                opt.step(grad)
                sync(device)

            one_step()  # warm-up
            start = time.perf_counter()
            for _ in range(steps):
                one_step()
            per_step = (time.perf_counter() - start) / steps
            print(f"gradient_matching {name}, {device}: {sig(per_step * 100 / n)} s per 100 poisons per step "
                  f"({n} poisons, mean of {steps} steps)")


INTEGRITY_POISONS = {"cpu": 50, "cuda": 500}  # poisons per crafting batch (hidden trigger: 5 % of CIFAR is 2,500)


def bench_integrity_crafting(devices: Sequence[torch.device], steps: int = GM_STEPS,
                             models: dict[str, dict] | None = None, poisons: int | None = None) -> dict[str, float]:
    """Seconds per poison per crafting step of ``hidden_trigger`` and ``metapoison`` (their
    own ``step_loss`` and ``SignedAdam``; MetaPoison with one ensemble model, so multiply by
    the ensemble size), and MetaPoison's unroll over a plain training step on the same
    batch. Returns the figures by label."""
    import torch.nn.functional as F

    from poisonbench.attacks import hidden_trigger, metapoison
    from poisonbench.attacks.steps import SignedAdam
    from poisonbench.models import build_model

    ht, mp = hidden_trigger.HiddenTriggerParams(), metapoison.MetaPoisonParams()
    out = {}
    for device in devices:
        n = poisons or INTEGRITY_POISONS[device.type]
        for name, kwargs in (models or {"small_cnn": {"pool": 1, "width": 16}, "resnet18": {}}).items():
            torch.manual_seed(0)
            model = build_model(name, 10, **kwargs).to(device).eval()
            g = torch.Generator().manual_seed(0)
            clean = torch.rand(n, 3, 32, 32, generator=g).to(device)
            labels = torch.randint(0, 10, (n,), generator=g).to(device)
            x_t, y_t = torch.rand(1, 3, 32, 32, generator=g).to(device), labels[:1]
            with torch.no_grad():
                source = model.features(torch.rand(n, 3, 32, 32, generator=g).to(device))
            opt = SignedAdam(clean, ht.eps, generator=g)

            def per_step(step) -> float:
                step()  # warm-up
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                return (time.perf_counter() - start) / steps

            def hidden() -> None:
                grad, _ = hidden_trigger.step_loss(model, clean, opt.delta, source, ht, g)
                opt.step(grad)
                sync(device)

            def unrolled() -> None:
                grad, _ = metapoison.step_loss([model], clean, opt.delta, labels, x_t, y_t, mp, g)
                opt.step(grad)
                sync(device)

            sgd = torch.optim.SGD(model.parameters(), lr=0.1)

            def plain() -> None:
                model.train()
                sgd.zero_grad(set_to_none=True)
                F.cross_entropy(model(clean), labels).backward()
                sgd.step()
                model.eval()
                sync(device)

            t_hidden, t_meta, t_plain = per_step(hidden), per_step(unrolled), per_step(plain)
            out.update({f"hidden_trigger {name} {device}": t_hidden / n, f"metapoison {name} {device}": t_meta / n,
                        f"unroll ratio {name} {device}": t_meta / t_plain})
            print(f"hidden_trigger {name}, {device}: {sig(t_hidden / n)} s per poison per step "
                  f"({n} poisons, mean of {steps} steps)")
            print(f"metapoison {name}, {device}: {sig(t_meta / n)} s per poison per step per ensemble model "
                  f"(K = {mp.unroll} unroll; {n} poisons, mean of {steps} steps)")
            print(f"metapoison unroll {name}, {device}: {sig(t_meta)} s per unrolled step, {sig(t_plain)} s per "
                  f"plain training step on the same {n} images: ratio {sig(t_meta / t_plain)}")
    return out


FC_POISONS = {"cpu": 50, "cuda": 500}  # robuster's 1 % of CIFAR-10 is 500 poisons
FC_STEPS = 3


def bench_feature_collision(devices: Sequence[torch.device], steps: int = FC_STEPS,
                            models: dict[str, dict] | None = None, poisons: int | None = None) -> dict[str, float]:
    """Seconds per poison per crafting step of each feature-collision attack (the shared
    ``feature_collision.step_gradient`` and ``SignedAdam``), after one warm-up step."""
    from poisonbench.attacks import bullseye, convex_polytope, poison_frogs
    from poisonbench.attacks.feature_collision import FeatureCollisionParams, features, step_gradient
    from poisonbench.attacks.steps import SignedAdam
    from poisonbench.models import build_model

    params, costs = FeatureCollisionParams(), {}
    objectives = {"poison_frogs": poison_frogs.objective, "bullseye": bullseye.objective,
                  "convex_polytope": convex_polytope.objective}
    for device in devices:
        n = poisons or FC_POISONS[device.type]
        for name, kwargs in (models or {"small_cnn": {"pool": 1, "width": 16}, "resnet18": {}}).items():
            torch.manual_seed(0)
            model = build_model(name, 10, **kwargs).to(device).eval().requires_grad_(False)
            g = torch.Generator(device=device).manual_seed(0)
            clean = torch.rand(n, 3, 32, 32, generator=g, device=device)
            goal = features(model, torch.rand(1, 3, 32, 32, generator=g, device=device))
            for attack, objective in objectives.items():
                opt = SignedAdam(clean, params.eps, generator=g)

                def one_step() -> None:
                    grad, _ = step_gradient(model, clean, opt.delta, goal, objective, params, g)
                    opt.step(grad)
                    sync(device)

                one_step()  # warm-up
                start = time.perf_counter()
                for _ in range(steps):
                    one_step()
                per_poison = (time.perf_counter() - start) / steps / n
                costs[f"{attack} {name} {device}"] = per_poison
                print(f"{attack} {name}, {device}: {sig(per_poison)} s per poison per step "
                      f"({n} poisons, mean of {steps} steps)")
    return costs


def training_step_setup(name: str, model_params: dict, device: torch.device,
                        batch: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """(model in train mode, SGD, random images, labels) for timing one training step,
    the same in every run (seed 0)."""
    from poisonbench.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 10, **model_params).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 3, 32, 32), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return model, opt, x, y


def bench_adversarial_poisoning(devices: Sequence[torch.device], repeats: int,
                                models: dict[str, dict] | None = None, batch: int | None = None,
                                params: dict | None = None) -> dict[str, float]:
    """Seconds of a defended and a plain training step, and their ratio, per model × device."""
    import torch.nn.functional as F

    from poisonbench.defenses import build_defense

    models = CRAFT_MODELS if models is None else models
    ratios = {}
    for device in devices:
        for name, model_params in models.items():
            b = batch or ADV_POISONING_BATCH[device.type].get(name, 128)
            model, opt, x, y = training_step_setup(name, model_params, device, b)
            defense = build_defense("adversarial_poisoning", params or {})

            def plain(images=x, labels=y):
                loss = F.cross_entropy(model(images), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def defended():
                plain(*defense.on_train_batch(model, x, y))

            _, t_plain = timed(plain, repeats, device)
            _, t_defended = timed(defended, repeats, device)
            p = defense.params
            ratios[f"{name} {device}"] = t_defended / t_plain
            print(f"adversarial_poisoning ({p.attack}, {plural(p.steps, 'step')}, p {p.p:g}), {name}, {device}, batch {b}: "
                  f"{sig(t_defended)} s per defended step, {sig(t_plain)} s per plain step, "
                  f"ratio {sig(t_defended / t_plain)} (issue's target ≤ ~4)")
    return ratios


# The defenses of the training_defenses section, each at its paper setting.
TRAINING_DEFENSES = {"dp_sgd": {"noise": 0.01}, "random_noise": {}, "cutmix": {"prob": 1.0}, "maxup": {},
                     "adversarial_training": {"method": "signed_adam", "eps": 8 / 255}}


def bench_training_defenses(devices: Sequence[torch.device], repeats: int,
                            models: dict[str, dict] | None = None, batch: int | None = None) -> dict[str, float]:
    """Seconds of a step defended by each training-time defense over a plain step, per
    defense × model × device (the step: defense's batch, forward, backward, its gradient
    hook, SGD)."""
    import torch.nn.functional as F

    from poisonbench.defenses import build_defense

    models = CRAFT_MODELS if models is None else models
    ratios = {}
    for device in devices:
        for name, model_params in models.items():
            b = batch or ADV_POISONING_BATCH[device.type].get(name, 128)
            model, opt, x, y = training_step_setup(name, model_params, device, b)

            def step(defense):
                images, labels = defense.on_train_batch(model, x, y)
                loss = F.cross_entropy(model(images), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                defense.on_before_optimizer_step(model, opt)
                opt.step()

            def seconds(defense) -> float:
                sync(device)
                start = time.perf_counter()
                step(defense)
                sync(device)
                return time.perf_counter() - start

            plain = build_defense("none")
            step(plain)  # warm-up
            for defense_name, params in TRAINING_DEFENSES.items():
                defense = build_defense(defense_name, params)
                step(defense)  # warm-up
                # Plain and defended steps alternate, so load on a shared machine hits both alike.
                pairs = [(seconds(plain), seconds(defense)) for _ in range(max(repeats, 1))]
                t_plain = statistics.median(a for a, _ in pairs)
                t_defended = statistics.median(b for _, b in pairs)
                ratio = statistics.median(b / a for a, b in pairs)
                ratios[f"{defense_name} {name} {device}"] = ratio
                shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
                print(f"{defense_name}{f' ({shown})' if shown else ''}, {name}, {device}, batch {b}: "
                      f"{sig(t_defended)} s per defended step, {sig(t_plain)} s per plain step, "
                      f"ratio {sig(ratio)} (median of {len(pairs)} alternating pairs)")
    return ratios


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="sections: " + ", ".join(SECTIONS) + "; see the module docstring for what each shows")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTIONS",
                        help="comma list of sections to run (default: all): " + ",".join(SECTIONS))
    parser.add_argument("--device", default="auto",
                        help="where crafting, projection, features, lbfgs and adv_poisoning run: auto (default: the CPU, and "
                             "the GPU too when CUDA is available) or a comma list such as cpu, cuda, cpu,cuda:1; "
                             "synthetic, datamodule and fit always run on the CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after the warm-up (default 3)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the fit section (default 40)")
    args = parser.parse_args(argv)
    try:
        sections = parse_sections(args.only)
        devices = parse_devices(args.device)
    except ValueError as err:
        parser.error(str(err))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    for device in devices:
        if device.type == "cuda":
            print(device_header(device))
    took: dict[str, float] = {}
    costs: list[StepCost] = []
    for section in sections:
        start = time.perf_counter()
        if section == "synthetic":
            bench_synthetic(args.repeats)
        elif section == "datamodule":
            bench_datamodule(args.repeats)
        elif section == "fit":
            bench_fit(args.steps, args.repeats)
        elif section == "crafting":
            costs = bench_crafting(devices)
        elif section == "projection":
            adversarial = [c for c in costs if c.attack == "adversarial" and c.model == "resnet18"]
            if not adversarial:  # crafting was not run: measure what the projection needs
                adversarial = bench_crafting(devices, attacks=("adversarial",), models={"resnet18": {}})
            bench_projection(adversarial)
        elif section == "features":
            bench_features(devices, args.repeats)
        elif section == "lbfgs":
            bench_lbfgs(devices)
        elif section == "adv_poisoning":
            bench_adversarial_poisoning(devices, args.repeats)
        elif section == "gradient_matching":
            bench_gradient_matching(devices)
        elif section == "training_defenses":
            bench_training_defenses(devices, args.repeats)
        elif section == "filters":
            bench_filters()
        elif section == "integrity_crafting":
            bench_integrity_crafting(devices)
        elif section == "feature_collision":
            bench_feature_collision(devices)
        elif section == "packing":
            bench_packing(devices, repeats=args.repeats)
        elif section == "gpu":
            bench_gpu(devices)
        took[section] = time.perf_counter() - start
    print("section seconds: " + ", ".join(f"{name} {s:.0f}" for name, s in took.items()))


if __name__ == "__main__":
    main()
