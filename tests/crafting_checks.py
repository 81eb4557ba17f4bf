"""Shared by the attack tests: a tiny random image set, and crafting with an interruption
after a unit, then resuming."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from poisonbench.attacks import crafting
from poisonbench.data.imageset import ImageSet


def random_imageset(per_class: int, side: int = 32, name: str = "tiny") -> ImageSet:
    """Three classes of uniformly random images (seed 0): a set attacks craft on in seconds."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(per_class)
    images = torch.randint(0, 256, (3 * per_class, 3, side, side), dtype=torch.uint8, generator=g)
    return ImageSet(images, labels, ["a", "b", "c"], name=name, split="train")


class Stop(Exception):
    """The interruption a test raises from the unit hook."""


def interrupt_then_resume(attack, imageset, params, seed: int, path: Path, after_unit: int = 1):
    """Craft until ``after_unit`` is finished and stop; craft again from the checkpoint.

    Returns the resumed store and the units the second run computed itself.
    """

    def interrupt(unit: int) -> None:
        if unit == after_unit:
            raise Stop

    with crafting.crafting(crafting.CraftContext(checkpoint=path, every_s=0.0, on_unit=interrupt)):
        with pytest.raises(Stop):
            attack.craft(imageset, params, seed=seed)
    assert path.is_file()  # the interrupted run left its checkpoint
    ctx = crafting.CraftContext(checkpoint=path, every_s=0.0)
    with crafting.crafting(ctx):
        resumed = attack.craft(imageset, params, seed=seed)
    assert not path.exists()  # the checkpoint is removed once the store exists
    return resumed, ctx.units_done
