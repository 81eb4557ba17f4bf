"""A trial's target in integrity poisoning (the robuster paper, App. C.1).

A trial draws a target class, an adversarial (intended) class uniformly among the
others, the target image(s) from the **test** split of the target class, and the poison
subset from the **training** images of the adversarial class (the authors' code:
``forest/data/kettle_random_experiment.py``). The targets are removed from the
validation set; the poisons are the training images an attack may modify.

The poison subset is a prefix of one seeded permutation of the adversarial class's
training images, so a 1 % budget is a subset of a 5 % budget: within one trial every
row of a table faces the same target, whatever its budget (DESIGN.md, paired trials).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError

# Backdoor success is measured on every test image of the target class, up to this many
# (the authors' code patches 1,000 targets: all of a CIFAR-10 test class).
MAX_TARGETS = 1000


@dataclass(frozen=True)
class Target:
    target_class: int
    adversarial_class: int
    target_index: tuple[int, ...]  # into the test split
    poison_index: tuple[int, ...]  # into the training split, all of the adversarial class
    test_fingerprint: str  # of the test split the targets came from

    def key(self) -> dict:
        """What a poison store crafted for this target depends on (hashed into its key)."""
        return {"target_class": self.target_class, "adversarial_class": self.adversarial_class,
                "target_index": list(self.target_index), "poison_index": list(self.poison_index),
                "test_fingerprint": self.test_fingerprint}

    def describe(self) -> dict:
        """The fields ``result.json`` records."""
        return {"target_index": list(self.target_index), "target_class": self.target_class,
                "adversarial_class": self.adversarial_class}


def poison_count(budget: float, train_size: int) -> int:
    """``ceil(budget · N)`` poisons, as the authors' code counts them."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0 < budget <= 1):
        raise ConfigError(f"a poison budget must be a fraction in (0, 1]; got {budget!r}")
    # round() first: 0.01 * 50000 is 500.00000000000006 in floating point.
    return math.ceil(round(budget * train_size, 9))


def draw_target(train: ImageSet, test: ImageSet, seed: int, budget: float,
                targets: int | None = 1) -> Target:
    """The target of one trial, from ``seed`` alone.

    ``targets``: how many test images of the target class (``None``: all of them, up to
    ``MAX_TARGETS``, as backdoor success is measured).
    """
    classes = train.num_classes
    if classes < 2:
        raise ConfigError(f"integrity poisoning needs at least two classes; {train.name} has {classes}")
    # Hashed first: the first draws of generators seeded with neighbouring integers
    # agree far more often than chance (seeds 1000-1002 all drew class 7).
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"target:{int(seed)}".encode()).digest()[:8], "big"))
    target_class = int(torch.randint(classes, (1,), generator=g))
    others = [c for c in range(classes) if c != target_class]
    adversarial_class = others[int(torch.randint(len(others), (1,), generator=g))]

    in_class = torch.nonzero(test.labels == target_class).flatten()
    wanted = MAX_TARGETS if targets is None else int(targets)
    if wanted < 1 or in_class.numel() == 0 or (targets is not None and in_class.numel() < wanted):
        raise ConfigError(f"the {test.split} split of {test.name} has {in_class.numel()} images of class "
                          f"{target_class}; a trial needs {wanted} target(s) from it")
    chosen = in_class[torch.randperm(in_class.numel(), generator=g)[: min(wanted, in_class.numel())]]

    count = poison_count(budget, len(train))
    candidates = torch.nonzero(train.labels == adversarial_class).flatten()
    if candidates.numel() < count:
        raise ConfigError(f"a budget of {budget:g} needs {count} training images of class {adversarial_class} "
                          f"in {train.name}; it has {candidates.numel()}")
    poisons = candidates[torch.randperm(candidates.numel(), generator=g)[:count]]
    return Target(target_class, adversarial_class, tuple(int(i) for i in chosen.sort().values),
                  tuple(int(i) for i in poisons.sort().values), test.fingerprint)
