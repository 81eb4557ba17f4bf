"""``make bench`` section ``gpu``: how close victim training and crafting come to the
hardware, measured in one run.

1. **Job path vs plain loop.** Victim epochs through the job's own training path
   (``poisonbench.fitting.fit``: ``PoisonedDataModule`` with resident data, the
   ``VictimModule``, the Lightning trainer of ``build_trainer``, ``train.compile``
   auto, the profile's precision) beside a plain PyTorch loop over the same data on
   the device (same model, batch, augmentation, optimiser; bf16 autocast and
   channels_last on CUDA, as the job trains there; eager). Each gives seconds per
   epoch, images/s, achieved TFLOP/s (forward+backward FLOPs per image counted with
   ``torch.utils.flop_counter``: 3.33 GFLOP for the CIFAR ResNet-18) and the fraction
   of the device's peak (``PEAK_BF16_TFLOPS``; an unknown device says so).
2. **Workers per device.** The job path in K = 1, 2, 4, 8 worker processes on the one
   device at once (plain processes, started together after their warm-up epoch):
   total images/s.
3. **Crafting.** Seconds per 1,000 images per PGD step (forward, backward to the
   input, signed step, projection) on the crafting model, in fp32 and under bf16
   autocast with channels_last, and how far the bf16 loss lies from the fp32 one.

On a CUDA device the sizes are the paper's (ResNet-18, 50,000 CIFAR-shaped images,
batch 128; crafting batch 512). Without one the section runs a tiny version on the
CPU (the cpu profile's small CNN, a few hundred images, K = 1, 2) so that it is
tested; its figures say nothing about a GPU. The first epoch of every run is a
warm-up (compilation, cuDNN's algorithm search) and is not timed.
"""
from __future__ import annotations

import math
import multiprocessing
import queue
import re
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from poisonbench.bench.profiles import load_profile
from poisonbench.data.augment import random_crop_flip, to_float
from poisonbench.data.imageset import ImageSet
from poisonbench.data.module import PoisonedDataModule
from poisonbench.fitting.fit import fit
from poisonbench.fitting.trainer import quiet_lightning
from poisonbench.models import build_model

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets,
# by a pattern of the device's name; the first match wins (H100 PCIe before H100).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when the table does not know it."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


@dataclass(frozen=True)
class Sizes:
    model: str
    model_params: dict
    profile: str  # whose shortcuts recipe (batch size, optimiser) the victim trains with
    images: int  # training images per epoch
    epochs: int  # epochs per run: 1 warm-up, the middle ones timed, 1 untimed at the end
    workers: tuple[int, ...]
    worker_images: int
    craft_model: str
    craft_params: dict
    craft_batch: int
    craft_steps: tuple[int, int]  # (warm-up, timed)
    extra: dict = field(default_factory=dict)


GPU_SIZES = Sizes("resnet18", {}, "paper", 50_000, 4, (1, 2, 4, 8), 10_000, "resnet18", {}, 512, (3, 10))
CPU_SIZES = Sizes("small_cnn", {"pool": 1, "width": 16}, "cpu", 256, 4, (1, 2), 256,
                  "small_cnn", {"pool": 1, "width": 16}, 32, (1, 3))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sig(x: float, digits: int = 3) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{round(x, decimals):,.{decimals}f}"


def fake_set(n: int, seed: int, split: str):
    """``n`` random CIFAR-shaped uint8 images, 10 classes."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(n) % 10, [str(c) for c in range(10)], name="fake", split=split)


def flops_per_image(model_name: str, model_params: dict) -> float:
    """Forward + backward FLOPs of one 32×32 image (cross-entropy loss), counted
    (``torch.utils.flop_counter``: matrix products and convolutions)."""


    # On the meta device: shapes only, nothing computed.
    model = build_model(model_name, 10, **model_params).to("meta")
    x = torch.empty(2, 3, 32, 32, device="meta")
    y = torch.zeros(2, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 2


def recipe(sizes: Sizes, device: torch.device) -> dict:
    """The profile's shortcuts recipe for ``sizes.epochs`` epochs on ``device``, no
    evaluation and no learning-rate step inside the run."""
    train = dict(load_profile(sizes.profile).family("shortcuts").train)
    on_cuda = device.type == "cuda"
    return {**train, "epochs": sizes.epochs, "milestones": [], "eval_every": sizes.epochs + 1,
            "accelerator": "gpu" if on_cuda else "cpu", "devices": [device.index or 0] if on_cuda else 1}


class EpochClock:
    """Training hooks that change nothing and note the (synchronised) start of every
    epoch; at the start of the second, a ``barrier`` (if any) lines workers up."""

    def __init__(self, device: torch.device, barrier=None) -> None:
        self.device, self.barrier = device, barrier
        self.stamps: list[float] = []

    def on_train_batch(self, model, images, labels):
        return images, labels

    def on_before_optimizer_step(self, model, optimizer) -> None:
        pass

    def on_train_epoch_start(self, epoch: int) -> None:
        sync(self.device)
        if epoch == 1 and self.barrier is not None:
            self.barrier.wait()
        self.stamps.append(time.perf_counter())

    def timed(self) -> float:
        """Seconds of the epochs between the warm-up and the last one."""
        return self.stamps[-1] - self.stamps[1]


@dataclass
class Run:
    what: str
    images: int  # images trained in the timed window
    seconds: float
    detail: str = ""

    @property
    def per_s(self) -> float:
        return self.images / self.seconds


def job_path(sizes: Sizes, device: torch.device, n: int, barrier=None) -> Run:
    """Epochs of ``fit`` (the job's path) on ``n`` random images; the middle ones timed."""
    quiet_lightning()
    torch.manual_seed(0)
    train = recipe(sizes, device)
    model = build_model(sizes.model, 10, **sizes.model_params)
    data = PoisonedDataModule(fake_set(n, 0, "train"), fake_set(256, 1, "test"), None,
                              batch_size=int(train["batch_size"]), seed=0)
    clock = EpochClock(device, barrier)
    fitted = fit(model, data, train, hooks=clock)
    done = fitted.training
    detail = (f"precision {done['precision']}, compile {'on' if done['compile'] else 'off'}, "
              f"resident data {'on' if done['resident_data'] else 'off'}")
    return Run("job path (fit)", n * (sizes.epochs - 2), clock.timed(), detail)


def plain_loop(sizes: Sizes, device: torch.device, n: int) -> Run:
    """The same epochs as a plain PyTorch loop over the same data on the device."""
    torch.manual_seed(0)
    train = recipe(sizes, device)
    on_cuda = device.type == "cuda"
    model = build_model(sizes.model, 10, **sizes.model_params).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=train["lr"], momentum=train["momentum"],
                          weight_decay=train["weight_decay"], nesterov=train["nesterov"],
                          **({"fused": True} if on_cuda else {}))
    data = fake_set(n, 0, "train")
    images, labels = data.images.to(device), data.labels.to(device)
    batch = int(train["batch_size"])
    model.train()
    stamps = []
    for _ in range(sizes.epochs):
        sync(device)
        stamps.append(time.perf_counter())
        order = torch.randperm(n, device=device)
        for idx in torch.split(order, batch):
            x = to_float(random_crop_flip(images.index_select(0, idx)))
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                loss = F.cross_entropy(model(x), labels.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    detail = f"{'bf16 autocast, channels_last, fused SGD' if on_cuda else 'fp32'}, eager"
    return Run("plain loop", n * (sizes.epochs - 2), stamps[-1] - stamps[1], detail)


def _worker(sizes: Sizes, device: str, n: int, threads: int, barrier, results) -> None:
    torch.set_num_threads(threads)
    try:
        run = job_path(sizes, torch.device(device), n, barrier)
        results.put((run.images, run.seconds, None))
    except BaseException as err:  # noqa: BLE001 - told to the parent, which says it
        barrier.abort()
        results.put((0, 0.0, f"{type(err).__name__}: {err}"))


def workers(sizes: Sizes, device: torch.device, k: int) -> float:
    """Total images/s of ``k`` worker processes training on ``device`` at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    cores = multiprocessing.cpu_count()
    threads = max(1, cores // k)
    procs = [ctx.Process(target=_worker, args=(sizes, str(device), sizes.worker_images, threads, barrier, results))
             for _ in range(k)]
    for p in procs:
        p.start()
    got = []
    while len(got) < k:
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and results.empty():  # killed without a word (out of memory, a signal)
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a worker process died with exit code {dead[0].exitcode}") from None
    for p in procs:
        p.join()
    errors = [e for _, _, e in got if e]
    if errors:
        raise RuntimeError(f"a worker failed: {errors[0]}")
    return sum(images / seconds for images, seconds, _ in got)


@dataclass
class CraftCost:
    dtype: str
    per_1000_s: float
    loss: float


def craft_cost(sizes: Sizes, device: torch.device, bf16: bool) -> CraftCost:
    """Seconds per 1,000 images per PGD step (ℓ∞ 8/255, signed step 2/255) on the
    crafting model in eval mode; with ``bf16``, under bf16 autocast in channels_last."""
    torch.manual_seed(0)
    model = build_model(sizes.craft_model, 10, **sizes.craft_params).to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((sizes.craft_batch, 3, 32, 32), generator=gen).to(device)
    y = torch.randint(0, 10, (sizes.craft_batch,), generator=gen).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    eps, step = 8 / 255, 2 / 255
    delta = torch.zeros_like(x)
    warmup, timed = sizes.craft_steps
    gaps, first_loss = [], None
    for i in range(warmup + timed):
        sync(device)
        start = time.perf_counter()
        delta.requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        sync(device)
        gaps.append(time.perf_counter() - start)
        if first_loss is None:
            first_loss = float(loss.detach())
    per_step = statistics.median(gaps[warmup:])
    return CraftCost("bf16" if bf16 else "fp32", per_step * 1000 / sizes.craft_batch, first_loss)


def bench_gpu(devices, sizes: Sizes | None = None) -> dict[str, float]:
    """Print the section's figures for the first CUDA device in ``devices`` (the tiny
    version on the CPU when there is none) and return them by name."""
    cuda = [d for d in devices if d.type == "cuda"]
    device = cuda[0] if cuda else torch.device("cpu")
    sizes = sizes or (GPU_SIZES if cuda else CPU_SIZES)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops(name)
        print(f"gpu: {device}, {name}; bf16 dense peak "
              f"{f'{peak:,.0f} TFLOP/s' if peak else 'unknown (not in PEAK_BF16_TFLOPS)'}", flush=True)
    else:
        name, peak = "cpu", None
        print("gpu: no CUDA device; the tiny CPU version (small sizes, figures say nothing about a GPU)",
              flush=True)
    figures: dict[str, float] = {}
    flops = flops_per_image(sizes.model, sizes.model_params)
    figures["gflop_per_image"] = flops / 1e9
    print(f"gpu: {sizes.model}, {sig(flops / 1e9)} GFLOP per 32×32 image forward+backward (counted)", flush=True)

    def show(run: Run, key: str) -> None:
        tflops = run.per_s * flops / 1e12
        share = f"{tflops / peak:.1%} of peak" if peak else "peak unknown"
        epoch_s = sizes.images / run.per_s
        figures[f"{key}_images_per_s"], figures[f"{key}_tflops"] = run.per_s, tflops
        figures[f"{key}_epoch_s"] = epoch_s
        print(f"gpu: {run.what} ({run.detail}), {sizes.images:,} images: {sig(epoch_s)} s per epoch, "
              f"{sig(run.per_s)} images/s, {sig(tflops)} TFLOP/s, {share}", flush=True)

    ours = job_path(sizes, device, sizes.images)
    show(ours, "job")
    plain = plain_loop(sizes, device, sizes.images)
    show(plain, "plain")
    figures["job_over_plain"] = plain.per_s / ours.per_s
    per_50k = 50_000 / ours.per_s
    figures["job_50k_epoch_s"] = per_50k
    print(f"gpu: job path / plain loop {figures['job_over_plain']:.2f}× the time (target ≤ 1.05); "
          f"{sig(per_50k)} s per 50,000-image epoch through the job path (target ≤ 1.0 s on an H100/H200)",
          flush=True)

    for bf16 in (False, True):
        cost = craft_cost(sizes, device, bf16)
        figures[f"craft_{cost.dtype}_per_1000_s"] = cost.per_1000_s
        figures[f"craft_{cost.dtype}_loss"] = cost.loss
    fp32, bf16 = figures["craft_fp32_per_1000_s"], figures["craft_bf16_per_1000_s"]
    gap = abs(figures["craft_bf16_loss"] - figures["craft_fp32_loss"]) / figures["craft_fp32_loss"]
    print(f"gpu: crafting PGD step, {sizes.craft_model}, batch {sizes.craft_batch}: fp32 {sig(fp32)} s, "
          f"bf16 {sig(bf16)} s per 1,000 images per step (bf16 takes {bf16 / fp32:.2f}× the fp32 time; first-step loss "
          f"{figures['craft_fp32_loss']:.4f} fp32, {figures['craft_bf16_loss']:.4f} bf16, {gap:.2%} apart)",
          flush=True)

    for k in sizes.workers:
        total = workers(sizes, device, k)
        figures[f"workers_{k}_images_per_s"] = total
        tflops = total * flops / 1e12
        share = f", {tflops / peak:.1%} of peak" if peak else ""
        print(f"gpu: {k} worker process{'es' if k > 1 else ''} on {device}, {sizes.worker_images:,} images each: "
              f"{sig(total)} images/s in total, {sig(tflops)} TFLOP/s{share}", flush=True)
    return figures
