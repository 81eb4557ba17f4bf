"""``convex_polytope``: Convex Polytope (Zhu et al., ICML 2019), the robuster paper's
TRANSFER* row (ROBUSTER.md, "Attacks"): the target's features as a convex combination
of the poisons' features,

    loss = ½ ‖φ(t) − Σ_i c_i φ(x_i + δ_i)‖² / ‖φ(t)‖²,   c on the probability simplex,

φ the penultimate features of the victim's base model. At every step the coefficients
are fitted again, from uniform, to the current (augmented) poisons' features by
projected gradient descent on the simplex (``fit_coefficients``; the authors' code, DP
``witch_convex_polytope.py``, does the same at every step), then δ takes a projected
signed-descent step on the loss with c fixed (``feature_collision``: signed Adam,
ε 16/255, budget 1 %). With several target images each has its own coefficients and
the losses add up.

TRANSFER* (Schwarzschild et al. 2021, "Just How Toxic"): the base model's feature
extractor trained on other data (CIFAR-100 for CIFAR-10), the linear layer 10 epochs
with Adam lr 0.1. Those are the scenario's settings in the table spec (``base_model:
{dataset: auxiliary}``, the row's ``train``), not a special case of this attack.

Deviation: the authors estimate the step's Lipschitz constant from one random vector
and halve the step while the objective rises; here the step is 1/λ_max(ΦΦᵀ), exact and
free of random draws, so the fit is deterministic and every step decreases the
objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.base import AttackInput, register_attack
from poisonbench.attacks.feature_collision import SMOKE, FeatureCollisionParams, craft_features
from poisonbench.data.store import PoisonStore

FIT_STEPS = 10_000  # the authors' iteration limit
FIT_TOL = 1e-6  # the authors' stopping rule: relative change of the coefficients


@dataclass(frozen=True)
class ConvexPolytopeParams(FeatureCollisionParams):
    """ε 16/255, budget 1 %, 240 signed-Adam steps (robuster App. C)."""


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of the vector ``v`` onto the probability simplex
    (Duchi et al. 2008: sort, find the threshold, clip)."""
    u = torch.sort(v, descending=True).values
    cumulative = torch.cumsum(u, 0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    active = (u - cumulative / ranks) > 0
    rho = int(active.nonzero().max())
    return (v - cumulative[rho] / ranks[rho]).clamp_min(0)


def fit_coefficients(poisons: torch.Tensor, target: torch.Tensor, steps: int = FIT_STEPS,
                     tol: float = FIT_TOL) -> torch.Tensor:
    """argmin over the simplex of ½‖Φᵀc − t‖² (poisons Φ [N, D], target t [D]), from
    uniform, by projected gradient steps of 1/λ_max(ΦΦᵀ), in float64."""
    phi, t = poisons.detach().double(), target.detach().double()
    gram, rhs = phi @ phi.T, phi @ t
    lipschitz = float(torch.linalg.eigvalsh(gram)[-1])
    c = torch.full((phi.shape[0],), 1.0 / phi.shape[0], dtype=torch.float64, device=phi.device)
    if lipschitz <= 0:  # every poison feature is zero: any c is optimal
        return c.to(poisons.dtype)
    for _ in range(steps):
        new = project_simplex(c - (gram @ c - rhs) / lipschitz)
        change = float(torch.linalg.vector_norm(new - c)) / max(float(torch.linalg.vector_norm(c)), 1e-8)
        c = new
        if change < tol:
            break
    return c.to(poisons.dtype)


def objective(poisons: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_t ½‖φ(t) − Σ_i c_i φ(x_i)‖² / ‖φ(t)‖², c refitted for each target (poisons
    [N, D], targets [T, D])."""
    total = poisons.new_zeros(())
    for target in targets:
        c = fit_coefficients(poisons, target)
        residual = target - c @ poisons
        total = total + 0.5 * residual.pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    return total


@register_attack("convex_polytope", ConvexPolytopeParams, smoke=SMOKE, integrity=True, victim="recipe")
def craft(inp: AttackInput, params: ConvexPolytopeParams) -> PoisonStore:
    return craft_features(inp, params, "convex_polytope", objective, "convex polytope steps")
