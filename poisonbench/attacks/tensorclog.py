"""``tensorclog``: TensorClog (Shen, Zhu and Ma, IEEE Access 2019, "TensorClog: An
Imperceptible Poisoning Attack on Deep Neural Network Applications"); the shortcuts
paper's Table 2 row "TensorClog" (48.07% clean test accuracy, ResNet-18, CIFAR-10,
ℓ∞ ε = 8/255).

Training makes progress only where the loss has a gradient: TensorClog perturbs the
training images so that the parameter gradient of a (pre-trained) crafting model on
them is as small as possible,

    min_δ ‖∇_θ L(f_θ(x + δ), y)‖₂   s.t. ‖δ‖∞ ≤ ε,

with L the mean cross-entropy of a poison batch to its true labels (clean-label) and
the norm taken over all parameters at once.

The shortcuts paper's numbers come from Fowl et al. 2021b's comparison, which ran the
``tensorclog`` recipe of their code (github.com/lhfowl/adversarial_poisons,
``village/shop/forgemaster_tensorclog.py``, built on Geiping et al.'s forest). Its
objective and defaults are the ones here: the crafting model trained on clean data
first (forest's "conservative" recipe, ``SurrogateRecipe``) and kept in eval mode;
the objective on each poison batch of 512 images in dataset order (no shuffling);
250 signed-gradient PGD steps of 0.05·ε; Gaussian initialisation; differentiable
augmentation on while crafting; 8 restarts of which the one with the lowest final
objective is kept. (The original TensorClog attacks transfer learning with a penalty
on the perturbation's norm; the forest recipe replaces both by the full model and a
hard ℓ∞ ball, and that is the variant the tables compare.)

This module also holds what the parameter-gradient attacks share (``alignment`` uses
it): ``parameter_gradient`` (a per-batch gradient w.r.t. the model's parameters that
can itself be differentiated, i.e. double backward) and ``craft_by_chunks``, the
resumable restart × chunk PGD driver. Work units are (restart, chunk): the crafting
model is fixed, so running all steps on one chunk before the next equals the authors'
step-outer loop over fixed batches up to random streams. With several ranks, each
crafts the chunks of its ``shard(n)`` of the images (so the batches, and hence the
result, depend on the number of ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from poisonbench.attacks import crafting
from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore

# A chunk's objective: built once per chunk from (model, clean images, labels, number of
# classes), then called on the (augmented) poisoned inputs with ``create_graph`` telling
# whether it will be differentiated w.r.t. the inputs. PGD descends it.
ChunkObjective = Callable[[torch.Tensor, bool], torch.Tensor]
ObjectiveFactory = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], ChunkObjective]


@dataclass(frozen=True)
class TensorClogParams:
    eps: float = 8 / 255  # ℓ∞ radius, pixel units (authors' --eps 8; shortcuts Table 2)
    steps: int = 250  # authors' --attackiter
    tau: float = 0.05  # step size as a fraction of eps (authors' --tau, PGD rule)
    restarts: int = 8  # authors' --restarts; the best (lowest final objective) is kept
    init: str = "randn"  # authors' --init: randn (Gaussian · eps, then projected) | uniform
    augment: bool = True  # differentiable augmentation while crafting (authors' --paugment)
    batch_size: int = 512  # authors' --pbatch: the objective is a per-batch gradient norm
    model: str = "resnet18"  # crafting model (shortcuts paper, Appendix E; authors' --net)
    model_params: dict = field(default_factory=dict)
    activation: str = "relu"  # relu | tanh (shortcuts Table 5)
    surrogate_epochs: int = 40  # forest's "conservative" training recipe (SurrogateRecipe)
    surrogate_lr: float = 0.1
    surrogate_batch_size: int = 128

    def __post_init__(self) -> None:
        check_pgd_params(self)

    def recipe(self) -> SurrogateRecipe:
        return SurrogateRecipe(epochs=self.surrogate_epochs, lr=self.surrogate_lr,
                               batch_size=self.surrogate_batch_size)


def check_pgd_params(params: Any) -> None:
    """The checks every chunked-PGD params dataclass shares (ValueError → ConfigError)."""
    if params.init not in ("randn", "uniform"):
        raise ValueError(f"init must be randn or uniform, got {params.init!r}")
    if not 0 < params.eps <= 1:
        raise ValueError(f"eps must lie in (0, 1] (pixel units), got {params.eps}")
    if not params.tau > 0:
        raise ValueError(f"tau must be positive, got {params.tau}")
    for name in ("steps", "restarts", "batch_size", "surrogate_epochs", "surrogate_batch_size"):
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(params, name)}")


# ------------------------------------------------------------ parameter gradients


def parameter_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                       create_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """∇_θ loss_fn(model(inputs), labels) over the parameters that require gradients.

    ``torch.autograd.grad`` returns the gradients instead of accumulating them into
    ``.grad``, so the model's parameters stay untouched; with ``create_graph`` the
    result can be differentiated again (w.r.t. the inputs: double backward).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(inputs), labels)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def gradient_norm(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The ℓ2 norm of all parameter gradients together."""
    return torch.sqrt(sum(g.pow(2).sum() for g in grads))


def tensorclog_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ChunkObjective:
    """‖∇_θ CE(f(x + δ), y)‖₂ of the batch (forgemaster_tensorclog's explosion_loss)."""

    def objective(inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return gradient_norm(parameter_gradient(model, inputs, y, create_graph=create_graph))

    return objective


# ------------------------------------------------------------------- PGD driver


def pgd_chunk(objective: ChunkObjective, x: torch.Tensor, params: Any,
              generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """All signed PGD steps descending ``objective`` on one chunk; returns δ and the
    chunk's objective after the last step (one more augmentation draw)."""
    step_size = params.tau * params.eps
    delta = crafting.random_start(tuple(x.shape), params.eps, "linf", generator, x.device, params.init)
    delta = crafting.project(delta, x, params.eps, "linf")
    for _ in range(params.steps):
        delta.requires_grad_(True)
        inputs = (x + delta).clamp(0.0, 1.0)
        if params.augment:
            inputs = translate_flip(inputs, generator=generator)
        (grad,) = torch.autograd.grad(objective(inputs, True), delta)
        delta = crafting.project(crafting.step(delta.detach(), grad, step_size, "linf", descend=True),
                                 x, params.eps, "linf")
    inputs = (x + delta).clamp(0.0, 1.0)
    if params.augment:
        inputs = translate_flip(inputs, generator=generator)
    final = float(objective(inputs, False).detach())
    return delta.detach(), final


def craft_by_chunks(imageset: ImageSet, params: Any, seed: int, device: torch.device, name: str,
                    make_objective: ObjectiveFactory) -> PoisonStore:
    """Restarts × chunks of ``batch_size`` images, each chunk's δ by ``pgd_chunk`` on the
    objective ``make_objective`` builds for it; the restart with the lowest summed final
    objective is kept. Resumable after any unit; sharded over ranks."""
    ctx = crafting.context()
    model, _ = trained_model(imageset, params.model, params.model_params, params.activation,
                             params.recipe(), seed, device, progress=ctx.progress)
    # Eval mode (BN statistics fixed, as the authors' client.eval()); the parameters must
    # require gradients for ∇_θ, but torch.autograd.grad never writes their .grad.
    model.eval().requires_grad_(True)
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
    with crafting.progress(f"{name} chunks", total) as advance:
        advance(first)
        for unit in range(first, total):
            restart, k = divmod(unit, per_restart)
            index = chunks[k]
            lo = k * params.batch_size
            x = imageset.images[index].to(device).float().div_(255)
            y = imageset.labels[index].to(device)
            gen = crafting.unit_generator(seed, unit, device)
            delta, loss = pgd_chunk(make_objective(model, x, y, c), x, params, gen)
            current[lo:lo + index.numel()] = delta.cpu()
            current_loss += loss
            if k == per_restart - 1:  # restart finished: keep it if its total objective is the lowest
                total_loss = torch.tensor([current_loss], dtype=torch.float64)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(total_loss)
                if float(total_loss) < best_loss:
                    best, best_loss = current.clone(), float(total_loss)
                current_loss = 0.0
            advance(1, loss)
            checkpoint.save(unit, {"best": best, "current": current},
                            {"best_loss": best_loss, "current_loss": current_loss})
            crafting.finish_unit(unit)

    levels = crafting.gather(round_linf(best, params.eps), n)
    store = PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=add_levels(imageset.images, levels),
        labels=imageset.labels.clone(), attack=name, params=params_dict(params),
        dataset=imageset.name, base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
    checkpoint.remove()
    return store


SMOKE = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "steps": 3, "restarts": 2,
         "batch_size": 32, "surrogate_epochs": 1, "surrogate_batch_size": 32}


@register_attack("tensorclog", TensorClogParams, smoke=SMOKE)
def craft(imageset: ImageSet, params: TensorClogParams, seed: int, device: torch.device) -> PoisonStore:
    return craft_by_chunks(imageset, params, seed, device, "tensorclog", tensorclog_objective)
