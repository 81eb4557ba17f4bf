"""Attacks: one file per attack, each registered in ``ATTACKS`` on import."""
from poisonbench.attacks.base import ATTACKS, Attack, craft_cached, register_attack
from poisonbench.attacks import (  # noqa: F401  (fill the registry)
    adversarial, error_minimizing, none, random_noise, synthetic,
)

__all__ = ["ATTACKS", "Attack", "craft_cached", "register_attack"]
