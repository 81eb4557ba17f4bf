"""``bullseye``: Bullseye Polytope (Aghakhani et al., EuroS&P 2021), the robuster paper's
fine-tuning and transfer rows (ROBUSTER.md, "Attacks"): the poisons' mean feature onto
the targets' mean feature,

    loss = ‖mean_i φ(x_i + δ_i) − mean_j φ(t_j)‖²,

φ the penultimate features of the victim's base model, minimised by projected signed
descent (``feature_collision``: signed Adam, ε 16/255, budget 1 %). The mean over
targets is Bullseye's multi-draw form: it applies when a trial draws several target
images (the attack's ``targets`` count; one in the robuster tables). As the authors'
code (DP ``witch_bullseye.py``), without the paper's 1/‖φ(t)‖² scale; a signed step
does not see a positive scale anyway. The authors' code takes the mean over the
features' coordinates where this takes the squared norm (the same up to that scale).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.base import AttackInput, register_attack
from poisonbench.attacks.feature_collision import SMOKE, FeatureCollisionParams, craft_features
from poisonbench.data.store import PoisonStore


@dataclass(frozen=True)
class BullseyeParams(FeatureCollisionParams):
    """ε 16/255, budget 1 %, 240 signed-Adam steps (robuster App. C)."""


def objective(poisons: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """‖mean_i φ(x_i) − mean_j φ(t_j)‖² (poisons [N, D], targets [T, D])."""
    return (poisons.mean(dim=0) - targets.mean(dim=0)).pow(2).sum()


@register_attack("bullseye", BullseyeParams, smoke=SMOKE, integrity=True, victim="recipe")
def craft(inp: AttackInput, params: BullseyeParams) -> PoisonStore:
    return craft_features(inp, params, "bullseye", objective, "bullseye steps")
