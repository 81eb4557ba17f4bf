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

The restart × chunk PGD driver is ``chunked_pgd.craft_by_chunks``. This module also
holds what the parameter-gradient attacks share (``alignment`` uses it):
``parameter_gradient``, a per-batch gradient w.r.t. the model's parameters that can
itself be differentiated (double backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poisonbench.attacks.base import register_attack
from poisonbench.attacks.chunked_pgd import SMOKE, ChunkedPGDParams, ChunkObjective, craft_by_chunks
from poisonbench.attacks.gradients import gradient_norm, parameter_gradient
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore


@dataclass(frozen=True)
class TensorClogParams(ChunkedPGDParams):
    """The chunked-PGD parameters with their forest defaults; the objective has none."""


def tensorclog_objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> ChunkObjective:
    """‖∇_θ CE(f(x + δ), y)‖₂ of the batch (forgemaster_tensorclog's explosion_loss)."""

    def objective(inputs: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return gradient_norm(parameter_gradient(model, inputs, y, create_graph=create_graph))

    return objective


@register_attack("tensorclog", TensorClogParams, smoke=SMOKE, ranks="invariant")
def craft(imageset: ImageSet, params: TensorClogParams, seed: int, device: torch.device) -> PoisonStore:
    return craft_by_chunks(imageset, params, seed, device, "tensorclog", tensorclog_objective,
                           parameter_gradients=True)
