"""``make bench``: the speed targets of the foundation, as ratios measured in one run.

1. ``synthetic`` on 50,000 CIFAR-shaped images on one CPU core (target ≤ 0.5 s),
   beside a straightforward float32 implementation (the authors' NumPy recipe).
2. PoisonedDataModule throughput vs plain uint8 tensor indexing of the same batches
   (target ratio ≤ 1.3).
3. Lightning ``fit`` vs a plain PyTorch loop: same model, batches and steps, CPU
   (target ratio ≤ 1.15).

Timings are medians over repeats after a warm-up; the first (cold) call is printed
too, since it pays the page faults of fresh allocations.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """(cold seconds, median warm seconds)."""
    start = time.perf_counter()
    fn()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


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

    torch.set_num_threads(1)
    base = fake_cifar(50_000)
    attack = ATTACKS.get("synthetic")
    params = attack.params({})
    cold, ours = timed(lambda: attack.craft_fn(base, params, 0, torch.device("cpu")), repeats)
    _, naive = timed(lambda: straightforward_synthetic(base), max(1, repeats // 2))
    print(f"synthetic, 50,000 × 3×32×32, 1 core: {ours:.3f} s (cold {cold:.3f} s; target ≤ 0.5 s); "
          f"straightforward float32: {naive:.3f} s; speed-up {naive / ours:.1f}×")
    torch.set_num_threads(torch.get_num_interop_threads())


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
    from poisonbench.training.trainer import build_trainer
    from poisonbench.training.victim import VictimModule

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    bench_synthetic(args.repeats)
    bench_datamodule(args.repeats)
    bench_fit(args.steps, args.repeats)


if __name__ == "__main__":
    main()
