"""Attacks: one file per attack, each registered in ``ATTACKS`` on import."""
from poisonbench.attacks.base import ATTACKS, Attack, AttackInput, VictimSpec, craft_cached, register_attack
from poisonbench.attacks import (  # noqa: F401  (fill the registry)
    adversarial, alignment, backdoor_patch, deepconfuse, error_minimizing, gradient_matching, none, ntga,
    random_noise, synthetic, tensorclog,
)
from poisonbench.attacks import hidden_trigger, metapoison  # noqa: F401,E402  (robuster's integrity attacks)
from poisonbench.attacks import bullseye, convex_polytope, poison_frogs  # noqa: F401  (feature collision)

__all__ = ["ATTACKS", "Attack", "AttackInput", "VictimSpec", "craft_cached", "register_attack"]
