"""``alignment``: gradient-alignment availability poisons (Fowl, Chiang, Goldblum,
Geiping, Bansal, Czaja and Goldstein, 2021a, "Preventing Unauthorized Use of
Proprietary Data: Poisoning for Secure Dataset Release", arXiv:2103.02683); the
shortcuts paper's Table 2 row "Alignment" (56.65% clean test accuracy, ResNet-18,
CIFAR-10, ℓ∞ ε = 8/255).

The poisons are crafted so that a training step on them moves the model the way a
step on a *reversed* objective on the clean data would: the parameter gradient of the
ordinary training loss on x + δ is aligned (cosine similarity, over all parameters at
once) with a target gradient that un-learns the clean data,

    min_δ 1 − cos(∇_θ CE(f(x + δ), y), ∇_θ L_adv(f(x), y))   s.t. ‖δ‖∞ ≤ ε,

on a crafting model trained on clean data. The paper's target loss is the reverse
cross-entropy L_adv = −log(1 − p_y(x)), whose descent drives the probability of the
true label to 0 without the unbounded growth of −CE; ``target: negative_ce`` (the
plain reversed gradient, −∇_θ CE) is offered as the simpler alternative. The objective
is the "similarity" passenger loss of Geiping et al.'s gradient matching (forest), on
which the paper builds; labels stay the true ones (clean-label).

What we assumed (the authors' code for this paper is not public; their later
adversarial_poisons repository, which produced Fowl et al. 2021b's comparison, has
no alignment recipe):
- the target gradient is computed per poison batch on that batch's clean images
  (no augmentation) and held fixed while the batch is optimised; the paper aligns
  with the reversed loss of "the clean data", and a per-batch target keeps every
  batch's poison tied to its own images, which is what lets crafting run in
  independent, resumable chunks;
- the optimiser and its defaults are those of the authors' forest-based code for
  Fowl et al. 2021b (``village/options.py``): 250 signed PGD steps of 0.05·ε, Gaussian
  initialisation, differentiable augmentation of the poisons, batches of 512 in
  dataset order, 8 restarts with the lowest final objective kept, and a ResNet-18
  crafting model trained with forest's "conservative" recipe.

The crafting driver (restart × chunk units, checkpoints, sharding, the store) is the
one of ``chunked_pgd``, ``craft_by_chunks``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.attacks.base import register_attack
from poisonbench.attacks.chunked_pgd import SMOKE, ChunkedPGDParams, ChunkObjective, craft_by_chunks
from poisonbench.attacks.gradients import cosine, parameter_gradient
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore

TARGETS = ("reverse_ce", "negative_ce")


@dataclass(frozen=True)
class AlignmentParams(ChunkedPGDParams):
    # target loss on clean data: reverse_ce (−log(1 − p_y), the paper) | negative_ce.
    # steps/restarts/tau: the forest / adversarial_poisons defaults (assumed, see above).
    target: str = "reverse_ce"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        super().__post_init__()


def reverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean −log(1 − p_y) = logsumexp(all logits) − logsumexp(logits of the other classes),
    in the stable log-sum-exp form (no 1 − p that rounds to 0)."""
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def negative_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits, labels)


TARGET_LOSSES = {"reverse_ce": reverse_cross_entropy, "negative_ce": negative_cross_entropy}


def target_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: str) -> tuple[torch.Tensor, ...]:
    """∇_θ L_adv(f(x), y) on the clean batch, detached (a constant of the objective)."""
    return tuple(g.detach() for g in parameter_gradient(model, x, y, TARGET_LOSSES[target]))


def alignment_objective(target: str):
    """The factory ``craft_by_chunks`` calls per chunk: 1 − cos(poison gradient, target)."""

    def make(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ChunkObjective:
        goal = target_gradient(model, x, y, target)

        def objective(inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
            return 1 - cosine(parameter_gradient(model, inputs, y, create_graph=create_graph), goal)

        return objective

    return make


@register_attack("alignment", AlignmentParams, smoke=SMOKE, ranks="invariant")
def craft(imageset: ImageSet, params: AlignmentParams, seed: int, device: torch.device) -> PoisonStore:
    return craft_by_chunks(imageset, params, seed, device, "alignment", alignment_objective(params.target),
                           parameter_gradients=True)
