"""``backdoor_patch``: BadNets (Gu et al. 2017) as the robuster paper runs it (its
authors' ``witchcoven/witch_patch.py::WitchPatch``).

A random patch of ``size`` × ``size`` pixels, Bernoulli(``prob``) per pixel and
channel, is pasted into the lower-right corner of the trial's poisons (training images
of the adversarial class, ``budget`` of the training set), labels unchanged; at test
time the same patch is pasted into the targets (every test image of the target class,
up to 1,000), and success is the fraction of them classified as the adversarial class.
No optimisation, no surrogate.

The store declares an ℓ0 budget of size² pixels and carries the trigger (uint8
[C,H,W], zero outside the corner) and its mask ([H,W]), so that the job pastes it into
the targets with ``PoisonStore.apply_trigger``.

Deviation: the authors' patch is ``bernoulli / std`` in normalised units, so its pixels
come out as {mean, 1 + mean}, outside the image range; here they are {0, 255}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.attacks.base import AttackInput, params_dict, register_attack
from poisonbench.attacks.crafting import unit_generator
from poisonbench.data.store import PoisonStore
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError
from poisonbench.params import ranged

POSITIONS = ("lower_right",)


@dataclass(frozen=True)
class BackdoorPatchParams:
    size: int = ranged(6, 1, None)  # patch side in pixels (the authors' --eps 6 for patches)
    budget: float = ranged(0.05, 0, 1, low_open=True)  # fraction of the training set poisoned (robuster App. C.1)
    prob: float = ranged(0.5, 0, 1)  # Bernoulli probability of a 255 per pixel and channel
    position: str = "lower_right"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")

    @property
    def pixels(self) -> int:
        """The ℓ0 budget its stores declare: the patch's pixel count."""
        return self.size * self.size


def make_trigger(shape: tuple[int, int, int], params: BackdoorPatchParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(trigger uint8 [C,H,W], mask uint8 [H,W]) for images of ``shape``, from ``seed``."""
    c, h, w = shape
    s = params.size
    if s > h or s > w:
        raise ConfigError(f"a {s}×{s} patch does not fit images of {h}×{w} pixels")
    patch = (torch.rand(c, s, s, generator=unit_generator(seed, 0)) < params.prob).to(torch.uint8) * 255
    trigger = torch.zeros(c, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    trigger[:, h - s:, w - s:] = patch
    mask[h - s:, w - s:] = 1
    return trigger, mask


SMOKE: dict = {}  # nothing to make cheaper


@register_attack("backdoor_patch", BackdoorPatchParams, smoke=SMOKE, norm="l0", budget_param="pixels",
                 integrity=True, targets=None)
def craft(inp: AttackInput, params: BackdoorPatchParams) -> PoisonStore:
    train, target = inp.train, inp.target
    count = poison_count(params.budget, len(train))
    if len(target.poison_index) != count:
        raise ConfigError(f"the trial's target has {len(target.poison_index)} poison images; backdoor_patch with "
                          f"budget {params.budget:g} needs {count}")
    trigger, mask = make_trigger(tuple(train.images.shape[1:]), params, inp.seed)
    index = torch.tensor(target.poison_index, dtype=torch.int64)
    images = torch.where(mask.bool(), trigger, train.images[index])
    targets = torch.tensor(target.target_index, dtype=torch.int64)
    return PoisonStore(
        index=index, images=images, labels=train.labels[index].clone(), attack="backdoor_patch",
        params=params_dict(params), dataset=train.name, base_fingerprint=train.fingerprint,
        norm="l0", eps=float(params.pixels), seed=inp.seed, test_fingerprint=target.test_fingerprint,
        extras={"trigger": trigger, "trigger_mask": mask, "target_index": targets,
                "target_label": torch.full_like(targets, target.adversarial_class)},
    )
