"""``adversarial``: adversarial poisons (Fowl et al., NeurIPS 2021, "Adversarial Examples
Make Strong Poisons"); the shortcuts paper's "Adversarial Examples" rows (Tables 1, 2,
5, 6) and its "Error-maximizing" rows (Tables 4, 7).

A crafting model is trained on clean data (``trained_model``), then every training
image gets a PGD perturbation against it, inside the ℓ∞ ball of radius ``eps``:
- ``mode: targeted``: minimise the loss of the label map y → (y + 1) mod C;
- ``mode: untargeted``: maximise the loss of the true label (error-maximizing).
Defaults follow the authors' code (github.com/lhfowl/adversarial_poisons, built on
Geiping et al.'s forest; ``village/options.py``): ResNet-18, 250 signed-gradient steps
of ``tau``·ε = 0.05·ε (their "PGD" step rule), Gaussian initialisation (``randn``),
differentiable augmentation on while crafting, poison batches of 512, and 8 restarts
of which the one with the lowest final mean loss over the whole set is kept (a
parameter: restarts cost their number in time).

Work units are (restart, chunk of ``batch_size`` images): with the model fixed in
eval mode, running all steps on one chunk before the next equals the authors' step-
outer loop up to random streams, and lets crafting resume after a chunk and shard the
chunks over ranks (each rank crafts ``shard(n)`` of the images; the perturbations are
gathered once, at the end).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore

MODES = ("targeted", "untargeted")


@dataclass(frozen=True)
class AdversarialParams:
    eps: float = 8 / 255  # ℓ∞ radius, pixel units (authors' --eps 8)
    mode: str = "targeted"  # targeted (y → y+1 mod C) | untargeted (error-maximizing)
    steps: int = 250  # authors' --attackiter
    tau: float = 0.05  # step size as a fraction of eps (authors' --tau, PGD rule)
    restarts: int = 8  # authors' --restarts; the best (lowest final loss) is kept
    init: str = "randn"  # authors' --init: randn (Gaussian · eps, then projected) | uniform
    augment: bool = True  # differentiable augmentation while crafting (authors' --paugment)
    batch_size: int = 512  # authors' --pbatch
    model: str = "resnet18"  # crafting model (shortcuts paper, Appendix E)
    model_params: dict = field(default_factory=dict)
    activation: str = "relu"  # relu | tanh (shortcuts Table 5)
    surrogate_epochs: int = 40  # forest's "conservative" training recipe (SurrogateRecipe)
    surrogate_lr: float = 0.1
    surrogate_batch_size: int = 128

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.init not in ("randn", "uniform"):
            raise ValueError(f"init must be randn or uniform, got {self.init!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        for name in ("steps", "restarts", "batch_size", "surrogate_epochs", "surrogate_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def recipe(self) -> SurrogateRecipe:
        return SurrogateRecipe(epochs=self.surrogate_epochs, lr=self.surrogate_lr,
                               batch_size=self.surrogate_batch_size)


def _loss(model, inputs, labels, num_classes: int, mode: str, reduction: str = "mean") -> torch.Tensor:
    """The objective PGD descends: CE to y+1 (targeted) or −CE to y (untargeted)."""
    logits = model(inputs)
    if mode == "targeted":
        return F.cross_entropy(logits, (labels + 1) % num_classes, reduction=reduction)
    return -F.cross_entropy(logits, labels, reduction=reduction)


def pgd_chunk(model, x, y, params: AdversarialParams, num_classes: int,
              generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """All PGD steps for one chunk; returns δ and the chunk's summed final loss."""
    step_size = params.tau * params.eps
    delta = crafting.random_start(tuple(x.shape), params.eps, "linf", generator, x.device, params.init)
    delta = crafting.project(delta, x, params.eps, "linf")
    for _ in range(params.steps):
        delta.requires_grad_(True)
        inputs = (x + delta).clamp(0.0, 1.0)
        if params.augment:
            inputs = translate_flip(inputs, generator=generator)
        loss = _loss(model, inputs, y, num_classes, params.mode)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = crafting.project(crafting.step(delta.detach(), grad, step_size, "linf", descend=True),
                                 x, params.eps, "linf")
    with torch.no_grad():
        inputs = (x + delta).clamp(0.0, 1.0)
        if params.augment:
            inputs = translate_flip(inputs, generator=generator)
        final = float(_loss(model, inputs, y, num_classes, params.mode, reduction="sum"))
    return delta, final


SMOKE = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "steps": 3, "restarts": 2,
         "batch_size": 32, "surrogate_epochs": 1, "surrogate_batch_size": 32}


@register_attack("adversarial", AdversarialParams, smoke=SMOKE)
def craft(imageset: ImageSet, params: AdversarialParams, seed: int, device: torch.device) -> PoisonStore:
    ctx = crafting.context()
    model, _ = trained_model(imageset, params.model, params.model_params, params.activation,
                             params.recipe(), seed, device, progress=ctx.progress)
    model.requires_grad_(False)
    n, c = len(imageset), imageset.num_classes
    mine = crafting.shard(n)  # the sample positions this rank crafts
    chunks = [mine[i:i + params.batch_size] for i in range(0, mine.numel(), params.batch_size)]
    per_restart = len(chunks)

    best = torch.zeros((mine.numel(), *imageset.images.shape[1:]))
    best_loss = float("inf")
    current = torch.zeros_like(best)
    current_loss, first = 0.0, 0
    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, extras = resumed
        best, current = tensors["best"], tensors["current"]
        best_loss, current_loss, first = float(extras["best_loss"]), float(extras["current_loss"]), unit + 1

    total = params.restarts * per_restart
    with crafting.progress(f"adversarial ({params.mode}) chunks", total) as advance:
        advance(first)
        for unit in range(first, total):
            restart, k = divmod(unit, per_restart)
            index = chunks[k]
            lo = k * params.batch_size
            x = imageset.images[index].to(device).float().div_(255)
            y = imageset.labels[index].to(device)
            gen = crafting.unit_generator(seed, unit, device)
            delta, loss = pgd_chunk(model, x, y, params, c, gen)
            current[lo:lo + index.numel()] = delta.cpu()
            current_loss += loss
            if k == per_restart - 1:  # restart finished: keep it if its total loss is the lowest
                total_loss = torch.tensor([current_loss], dtype=torch.float64)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(total_loss)
                if float(total_loss) < best_loss:
                    best, best_loss = current.clone(), float(total_loss)
                current_loss = 0.0
            advance(1, loss / max(index.numel(), 1))
            checkpoint.save(unit, {"best": best, "current": current},
                            {"best_loss": best_loss, "current_loss": current_loss})
            crafting.finish_unit(unit)

    levels = crafting.gather(round_linf(best, params.eps), n)
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack="adversarial", params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store
