"""``poison_frogs``: Poison Frogs (Shafahi et al., NeurIPS 2018) as the robuster paper ran
it (transfer; ROBUSTER.md, "Attacks"): each poison's features collide with the target's,

    loss = mean_i ‖φ(x_i + δ_i) − φ(t)‖²,

φ the penultimate features of the victim's base model, minimised by projected signed
descent (``feature_collision``: signed Adam, ε 16/255, budget 1 %) instead of the
original paper's forward-backward splitting with a penalty.

Per-poison form, kept on purpose: the authors' code (DP ``witch_poison_frogs.py``)
computes the collision of the poisons' *batch mean* feature, ‖mean_i φ(x_i) − φ(t)‖²,
which is Bullseye Polytope with one target (``bullseye``), not Poison Frogs. Here every
poison is pulled onto the target on its own. With several target images φ(t) is their
mean feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.base import AttackInput, register_attack
from poisonbench.attacks.feature_collision import SMOKE, FeatureCollisionParams, craft_features
from poisonbench.data.store import PoisonStore


@dataclass(frozen=True)
class PoisonFrogsParams(FeatureCollisionParams):
    """ε 16/255, budget 1 %, 240 signed-Adam steps (robuster App. C)."""


def objective(poisons: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i ‖φ(x_i) − φ(t)‖² (poisons [N, D], targets [T, D]; φ(t) their mean)."""
    return (poisons - targets.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean()


@register_attack("poison_frogs", PoisonFrogsParams, smoke=SMOKE, integrity=True, victim="recipe")
def craft(inp: AttackInput, params: PoisonFrogsParams) -> PoisonStore:
    return craft_features(inp, params, "poison_frogs", objective, "poison frogs steps")
