"""Shared by the attack tests: craft with an interruption after a unit, then resume."""
from __future__ import annotations

from pathlib import Path

import pytest

from poisonbench.attacks import crafting


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
