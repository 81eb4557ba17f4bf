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

The restart × chunk driver (resume, sharding, restart selection) is
``chunked_pgd.craft_by_chunks``, shared with ``tensorclog`` and ``alignment``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.attacks.base import register_attack
from poisonbench.attacks.chunked_pgd import (SMOKE, ChunkedPGDParams, ChunkObjective, ObjectiveFactory,
                                             craft_by_chunks)
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore

MODES = ("targeted", "untargeted")


@dataclass(frozen=True)
class AdversarialParams(ChunkedPGDParams):
    # targeted (y → y+1 mod C) | untargeted (error-maximizing); the rest: the chunked-PGD
    # defaults of adversarial_poisons (250 steps of 0.05·ε, 8 restarts, randn, augment).
    mode: str = "targeted"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        super().__post_init__()


def adversarial_objective(mode: str) -> ObjectiveFactory:
    """The chunk objective PGD descends: CE to y+1 (targeted) or −CE to y (untargeted),
    the batch mean as in the authors' recipes."""

    def make(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ChunkObjective:
        goal = (y + 1) % num_classes if mode == "targeted" else y
        sign = 1.0 if mode == "targeted" else -1.0

        def objective(inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
            return sign * F.cross_entropy(model(inputs), goal)

        return objective

    return make


# Version 2: restarts compared by the sum of chunk means (the authors' average of batch
# losses) instead of the sum of per-image losses, through the shared chunked-PGD driver.
@register_attack("adversarial", AdversarialParams, version=2, smoke=SMOKE, ranks="invariant")
def craft(imageset: ImageSet, params: AdversarialParams, seed: int, device: torch.device) -> PoisonStore:
    return craft_by_chunks(imageset, params, seed, device, "adversarial", adversarial_objective(params.mode))
