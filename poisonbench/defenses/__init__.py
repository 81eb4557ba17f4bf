"""Defenses: one file per defense, each registered in ``DEFENSES`` on import.

A defense hooks in at one of four places (DESIGN.md, "Training scenarios"): before
training (filters), per batch, per optimizer step, or by replacing the backbone; the
extension point is ``poisonbench.defenses.base``. ``none`` is the undefended baseline.
"""
from poisonbench.defenses.base import DEFENSES, Defense, NoParams, build_defense, register_defense
from poisonbench.defenses import adversarial_poisoning, adversarial_training, pretrained  # noqa: F401  (fill the registry)
from poisonbench.defenses import cutmix, dp_sgd, maxup, random_noise  # noqa: F401  (fill the registry)
from poisonbench.defenses import activation_clustering, deep_knn, spectral_signatures  # noqa: F401  (fill the registry)

__all__ = ["DEFENSES", "Defense", "NoParams", "build_defense", "register_defense"]
