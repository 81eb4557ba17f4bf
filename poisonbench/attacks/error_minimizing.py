"""``error_minimizing``: unlearnable examples (Huang et al., ICLR 2021), sample-wise and
class-wise; the shortcuts paper's Tables 1, 2, 4–7 use its perturbations.

Bi-level min-min optimisation (the shortcuts paper, Eq. 2): a randomly initialised
crafting model is trained for ``train_steps`` steps on the perturbed data, then the
perturbations take ``steps`` signed-gradient steps of size ``step_size`` that *lower*
the model's loss, inside the ℓ∞ ball of radius ``eps``; the rounds repeat until the
model's accuracy on the perturbed data reaches ``stop_accuracy``. Defaults are the
authors' README commands (github.com/HanxunH/Unlearnable-Examples): ℓ∞ 8/255, step
0.8/255, 20 steps and stop error 0.01 (sample-wise), 1 step and stop error 0.1
(class-wise), 10 model steps per round, ResNet-18 with SGD lr 0.1, momentum 0.9,
weight decay 5e-4, batch 512, no augmentation while crafting.

Class-wise: each batch's per-sample updates are averaged per class into that class's
one perturbation (the authors' ``universal_perturbation``).

Deviations, written down here and in the tables' notes:
- every round draws its model batches from its own permutation, a function of (seed,
  round): the authors' loader runs on across rounds. This is what makes a resumed
  run identical to an uninterrupted one.
- ``max_rounds`` caps the rounds (the authors loop until the stop criterion holds).
- the authors' ``stop_error`` is the error rate; here it is ``stop_accuracy`` = 100·(1 − error).
- δ starts uniform in [−ε, ε] (drawn from the seed's own generator); the authors' README
  command starts it at zero. Not a parameter with their default: that default would
  change every store crafted so far, the cpu profile's demo and shortcuts results
  included, under their unchanged cache keys. The tables' notes say so.

Several ranks (``ranks="invariant"``: the store does not depend on their number, so
it keeps the one-device cache key). The expensive part is the PGD over all n samples
each round; the ``train_steps`` model steps are cheap. So:
- every rank holds the whole δ and the crafting model, and runs the same model steps
  (same seed, same batches); rank 0's parameters and buffers are then broadcast, so
  replicas cannot drift apart through non-deterministic kernels;
- sample-wise, each rank runs the PGD on its share of the *same* batches the one-rank
  run makes (batches rank, rank + world, … of ``batch_size`` consecutive samples) and
  the new δ is all-gathered before the next round; with augmentation on, a rank draws
  and discards the augmentation of the batches it skips, so every batch sees the
  draws it sees on one rank;
- class-wise, the PGD's per-class mean update runs over the batches in order, so
  every rank computes it whole (redundantly: it is one signed step per round) and
  rank 0's δ is broadcast;
- the stopping accuracy is counted on each rank's batches and summed over the ranks.
With the model in eval mode during the PGD (BatchNorm uses running statistics), each
batch's computation is the one-rank computation, so on CPU (one thread per process)
a 2- or 3-rank run gives the one-rank store bit for bit (tests/test_distributed_crafting.py);
on GPUs it is equal up to what non-deterministic kernels change between two one-GPU
runs as well. The checkpoint is
``shared``: rank 0 writes the one-rank file, and a run may resume on another number
of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import build_crafting_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.params import ranged

KINDS = ("samplewise", "classwise")


@dataclass(frozen=True)
class ErrorMinimizingParams:
    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (Huang et al. 2021; shortcuts Table 2)
    kind: str = "samplewise"  # samplewise | classwise
    steps: int | None = ranged(None, 1, None)  # signed steps per round; None: 20 sample-wise, 1 class-wise (authors' README)
    step_size: float = ranged(0.8 / 255, 0, 1, low_open=True)  # pixel units (authors' README: --step_size 0.8)
    train_steps: int = ranged(10, 1, None)  # model steps per round (authors' --train_step default)
    # % on the perturbed data; None: 99 sample-wise, 90 class-wise; above 100: never stop early (max_rounds)
    stop_accuracy: float | None = ranged(None, 0, None, low_open=True)
    max_rounds: int = ranged(100, 1, None)  # a cap the authors do not have (see the module docstring)
    batch_size: int = ranged(512, 1, None)  # authors' --train_batch_size default
    lr: float = ranged(0.1, 0, None, low_open=True)  # crafting model's SGD (authors' configs/cifar10/resnet18.yaml)
    momentum: float = ranged(0.9, 0, 1, high_open=True)
    weight_decay: float = ranged(5e-4, 0, None)
    model: str = "resnet18"  # crafting model (the shortcuts paper, Appendix E)
    model_params: dict = field(default_factory=dict)
    activation: str = "relu"  # relu | tanh (shortcuts Table 5)
    augment: bool = False  # the authors craft without augmentation

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        for name in ("train_steps", "max_rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def pgd_steps(self) -> int:
        return self.steps if self.steps is not None else (20 if self.kind == "samplewise" else 1)

    @property
    def stop(self) -> float:
        return self.stop_accuracy if self.stop_accuracy is not None else (99.0 if self.kind == "samplewise" else 90.0)


def _perturbed(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (images + delta).clamp(0.0, 1.0)


def _min_min(model, x, y, delta, params: ErrorMinimizingParams, generator) -> torch.Tensor:
    """``pgd_steps`` signed steps that lower the loss of (x + δ, y); δ stays in its ball."""
    for _ in range(params.pgd_steps):
        delta = delta.detach().requires_grad_(True)
        inputs = _perturbed(x, delta)
        if params.augment:
            inputs = translate_flip(inputs, generator=generator)
        loss = F.cross_entropy(model(inputs), y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = crafting.project(crafting.step(delta.detach(), grad, params.step_size, "linf", descend=True),
                                 x, params.eps, "linf")
    return delta.detach()


def _skip_draws(generator: torch.Generator, size: int, steps: int) -> None:
    """Consume what ``_min_min``'s augmentation draws for a batch of ``size`` (its
    random shifts and flips depend on the batch size only), without the batch."""
    for _ in range(steps):
        translate_flip(torch.zeros(size, 1, 1, 1), generator=generator)


SMOKE = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "steps": 2, "train_steps": 2,
         "max_rounds": 2, "batch_size": 32}


@register_attack("error_minimizing", ErrorMinimizingParams, smoke=SMOKE, ranks="invariant")
def craft(imageset: ImageSet, params: ErrorMinimizingParams, seed: int, device: torch.device) -> PoisonStore:
    ctx = crafting.context()
    n = len(imageset)
    images = imageset.images.to(device).float().div_(255)
    labels = imageset.labels.to(device)
    rows = n if params.kind == "samplewise" else imageset.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_crafting_model(params.model, imageset.num_classes, params.model_params, params.activation)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    init = crafting.unit_generator(seed, 10**6)
    delta = ((torch.rand((rows, *images.shape[1:]), generator=init) * 2 - 1) * params.eps).to(device)

    rank, world = crafting.rank_world()
    sharded = world > 1 and params.kind == "samplewise"  # class-wise: every rank computes the whole PGD

    def mine(start: int) -> bool:  # the batch at ``start`` is this rank's (always, on one rank)
        return (start // params.batch_size) % world == rank

    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s, shared=True)
    first, accuracy = 0, 0.0
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, extras = resumed
        delta = tensors["delta"].to(device)
        crafting.load_module_tensors(model, tensors)
        crafting.load_optimizer_tensors(optimizer, tensors)
        first, accuracy = unit + 1, float(extras["accuracy"])

    def sample_delta(index: torch.Tensor) -> torch.Tensor:
        return delta[index] if params.kind == "samplewise" else delta[labels[index]]

    with crafting.progress("error-minimizing rounds", params.max_rounds) as advance:
        advance(first)
        for unit in range(first, params.max_rounds):
            if accuracy >= params.stop:
                break
            gen = crafting.unit_generator(seed, unit)
            order = torch.randperm(n, generator=gen).to(device)
            # 1. the crafting model: train_steps steps on the perturbed data.
            model.train()
            for step in range(params.train_steps):
                start = (step * params.batch_size) % n
                index = order[start:start + params.batch_size]
                inputs = _perturbed(images[index], sample_delta(index))
                if params.augment:
                    inputs = translate_flip(inputs, generator=gen)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(inputs), labels[index]).backward()
                optimizer.step()
            crafting.broadcast_module(model)  # rank 0's model on every rank (nothing on one rank)
            # 2. the perturbations: minimise the loss of the current model.
            model.eval()
            model.requires_grad_(False)
            for start in range(0, n, params.batch_size):
                if sharded and not mine(start):  # another rank's batch
                    if params.augment:
                        _skip_draws(gen, min(params.batch_size, n - start), params.pgd_steps)
                    continue
                index = torch.arange(start, min(start + params.batch_size, n), device=device)
                x, y = images[index], labels[index]
                eta = _min_min(model, x, y, sample_delta(index), params, gen)
                if params.kind == "samplewise":
                    delta[index] = eta
                else:  # the mean update of each class's samples, kept inside the ball
                    for c in torch.unique(y).tolist():
                        delta[c] = eta[y == c].mean(dim=0).clamp(-params.eps, params.eps)
            if sharded:  # every rank's batches, on every rank
                own = crafting.shard(n, params.batch_size).to(device)
                delta = crafting.gather(delta[own], n, params.batch_size)
            elif world > 1:
                crafting.broadcast_(delta)
            model.requires_grad_(True)
            # 3. stop when the model fits the perturbed data.
            correct, loss_sum = 0, 0.0
            with torch.no_grad():
                for start in range(0, n, params.batch_size):
                    if not mine(start):
                        continue
                    index = torch.arange(start, min(start + params.batch_size, n), device=device)
                    logits = model(_perturbed(images[index], sample_delta(index)))
                    correct += int((logits.argmax(1) == labels[index]).sum())
                    loss_sum += float(F.cross_entropy(logits, labels[index], reduction="sum"))
            if world > 1:  # the count is exact; the loss is only shown
                totals = crafting.reduce_sum(torch.tensor([float(correct), loss_sum], dtype=torch.float64))
                correct, loss_sum = int(totals[0]), float(totals[1])
            accuracy = 100.0 * correct / n
            advance(1, loss_sum / n)
            checkpoint.save(unit, {"delta": delta, **crafting.module_tensors(model),
                                   **crafting.optimizer_tensors(optimizer)}, {"accuracy": accuracy})
            crafting.finish_unit(unit)

    levels = round_linf(delta.cpu(), params.eps)
    if params.kind == "classwise":
        levels = levels[imageset.labels]
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack="error_minimizing", params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store
