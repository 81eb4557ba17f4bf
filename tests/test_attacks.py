"""Every registered attack crafts on a tiny set: dtype, budget, determinism; plus the
synthetic attack's algorithm (Algorithms 1 and 2 of the shortcuts paper)."""
from __future__ import annotations

import math

import pytest
import torch

from poisonbench.attacks import ATTACKS
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError, UnknownNameError


@pytest.fixture(scope="module")
def base():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 10, 20])])  # uneven, as SVHN
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSet(images, labels, ["a", "b", "c"], name="tiny", split="train")


# Integrity attacks craft against a trial's target: tests/test_integrity_attacks.py.
@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if not ATTACKS.get(n).integrity])
def test_every_attack_crafts(name, base):
    attack = ATTACKS.get(name)
    store = attack.craft(base, attack.smoke, seed=0)
    again = attack.craft(base, attack.smoke, seed=0)
    assert torch.equal(store.labels, base.labels[store.index])  # clean-label
    assert store.images.dtype == torch.uint8 and store.index.dtype == torch.int64
    assert torch.equal(store.images, again.images)  # deterministic in the seed
    store.verify(base)  # within its declared budget
    if store.index.numel():
        other = attack.craft(base, attack.smoke, seed=1)
        assert not torch.equal(store.images, other.images)


def test_unknown_attack_and_param():
    with pytest.raises(UnknownNameError, match="known: .*synthetic"):
        ATTACKS.get("synthetc")
    with pytest.raises(ConfigError, match="unknown parameter 'radius'"):
        ATTACKS.get("synthetic").params({"radius": 1})
    with pytest.raises(ConfigError, match="kind"):
        ATTACKS.get("random_noise").params({"kind": "pixelwise"})


def test_random_noise_linf_and_classwise(base):
    store = ATTACKS.get("random_noise").craft(base, {"eps": 8 / 255, "kind": "classwise"}, seed=0)
    delta = store.images.int() - base.images.int()
    assert delta.abs().max() <= 8
    inner = (base.images > 8) & (base.images < 247)  # not clipped
    a, b = torch.where(base.labels == 0)[0][:2]
    both = inner[a] & inner[b]
    assert torch.equal(delta[a][both], delta[b][both])  # one pattern per class


def test_synthetic_patches_norm_and_separability(base):
    eps, p = 6 / 255, 8
    store = ATTACKS.get("synthetic").craft(base, {"eps": eps, "patch": p}, seed=0)
    assert store.norm == "l2" and store.eps == pytest.approx(math.sqrt(3 * 32 * 32) * eps)
    # Algorithm 1: constant on every p×p patch wherever no clipping happened.
    grey = ImageSet(torch.full_like(base.images, 128), base.labels, base.classes, name="grey")
    delta = ATTACKS.get("synthetic").craft(grey, {"eps": eps, "patch": p}, seed=0).images.float() - 128
    patches = delta.view(60, 3, 4, p, 4, p)
    assert torch.equal(patches.amax(dim=(3, 5)), patches.amin(dim=(3, 5)))
    # Scaled onto the sphere of radius sqrt(d)·ε' (rounding to whole levels stays inside).
    norms = delta.flatten(1).norm(dim=1) / 255
    assert torch.all(norms <= store.eps + 1e-6) and torch.all(norms > 0.9 * store.eps)
    # Algorithm 2: the classes are linearly separable (a least-squares probe fits them).
    x = torch.cat([delta.flatten(1), torch.ones(60, 1)], 1)
    y = torch.nn.functional.one_hot(base.labels, 3).float()
    w = torch.linalg.lstsq(x, y).solution
    assert ((x @ w).argmax(1) == base.labels).float().mean() == 1.0


def test_synthetic_patch_one_is_pixelwise(base):
    grey = ImageSet(torch.full_like(base.images, 128), base.labels, base.classes, name="grey")
    delta = ATTACKS.get("synthetic").craft(grey, {"patch": 1}, seed=0).images.float() - 128
    patches = delta.view(60, 3, 4, 8, 4, 8)
    assert not torch.equal(patches.amax(dim=(3, 5)), patches.amin(dim=(3, 5)))


def test_synthetic_class_sep_matters(base):
    """With a tiny class_sep the perturbations of different classes overlap far more."""
    grey = ImageSet(torch.full_like(base.images, 128), base.labels, base.classes, name="grey")

    def spread(sep):
        d = ATTACKS.get("synthetic").craft(grey, {"class_sep": sep}, seed=0).images.float().flatten(1) - 128
        means = torch.stack([d[base.labels == c].mean(0) for c in range(3)])
        within = torch.stack([d[base.labels == c].std(0).mean() for c in range(3)]).mean()
        return (means[0] - means[1]).norm() / within

    assert spread(10.0) > 2 * spread(0.01)
