"""``random_noise``: uniform ℓ∞ noise, the control of the shortcuts paper (Huang et al.
2021 show it barely hurts; a class-wise version is a shortcut of its own).

Sample-wise: an independent δ ~ U[-ε, ε]^d per image. Class-wise: one δ per class,
added to every image of that class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.params import ranged

KINDS = ("samplewise", "classwise")


@dataclass(frozen=True)
class RandomNoiseParams:
    eps: float = ranged(8 / 255, 0, 1)  # ℓ∞ radius in pixel units (shortcuts Table 2 budget)
    kind: str = "samplewise"  # samplewise | classwise

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must lie in [0, 1] (pixel units), got {self.eps}")


@register_attack("random_noise", RandomNoiseParams)
def craft(imageset: ImageSet, params: RandomNoiseParams, seed: int, device: torch.device) -> PoisonStore:
    """Uniform noise in the ℓ∞ ball of radius eps, per sample or per class."""
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = imageset.images.shape
    rows = n if params.kind == "samplewise" else imageset.num_classes
    # Uniform over the whole pixel levels of [-ε, ε]: what survives uint8 storage.
    bound = int(params.eps * 255 + 1e-6)
    levels = torch.randint(-bound, bound + 1, (rows, c, h, w), generator=gen, dtype=torch.int16)
    if params.kind == "classwise":
        levels = levels[imageset.labels]
    images = add_levels(imageset.images, levels)
    return PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=images, labels=imageset.labels.clone(),
        attack="random_noise", params=params_dict(params), dataset=imageset.name,
        base_fingerprint=imageset.fingerprint, norm="linf", eps=params.eps, seed=seed,
    )
