"""Integrity stores: the target, the trigger, the l0 budget and the test fingerprint, and
every way such a store can be bad (each refusal writes the bad store and opens it)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from poisonbench.attacks import ATTACKS, AttackInput
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore, store_key
from poisonbench.errors import PoisonStoreError


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (100, 3, 16, 16), dtype=torch.uint8, generator=g),
                     torch.arange(100) % 4, ["a", "b", "c", "d"], name="tiny", split="train")
    test = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g),
                    torch.arange(40) % 4, ["a", "b", "c", "d"], name="tiny", split="test")
    return train, test


@pytest.fixture()
def patch_store(sets):
    train, test = sets
    attack = ATTACKS.get("backdoor_patch")
    params = attack.params({"size": 3})
    target = attack.draw_target(train, test, 4, params)
    return attack.craft(AttackInput(train, 4, test=test, target=target), params)


def changed(store, **fields):
    """A copy of ``store`` with fields (or ``extras`` entries) replaced; saving rehashes it."""
    extras = {**store.extras, **fields.pop("extras", {})}
    return dataclasses.replace(store, extras={k: v for k, v in extras.items() if v is not None}, path=None, **fields)


def refused(store, tmp_path, base, test, match):
    path = store.save(tmp_path / "bad.safetensors")
    with pytest.raises(PoisonStoreError, match=match) as err:
        PoisonStore.open(path, base, test)
    text = str(err.value)
    assert str(path) in text and text.count(". ") == 0 and "\n" not in text  # one sentence naming the file


def test_round_trip_with_target_and_trigger(sets, patch_store, tmp_path):
    train, test = sets
    path = patch_store.save(tmp_path / "s.safetensors")
    opened = PoisonStore.open(path, train, test)
    assert opened.norm == "l0" and opened.eps == 9 and opened.budget["l0_max"] <= 9
    assert opened.test_fingerprint == test.fingerprint
    for name in ("trigger", "trigger_mask", "target_index", "target_label"):
        assert torch.equal(opened.extras[name], patch_store.extras[name])
    assert opened.target == patch_store.target and opened.target.adversarial_class is not None
    patched = opened.patched_targets(test)
    mask = opened.extras["trigger_mask"].bool()
    assert torch.equal(patched.images[:, :, mask], opened.extras["trigger"][:, mask].expand(len(patched), -1, -1))
    assert torch.equal(patched.images[:, :, ~mask], test.images[opened.extras["target_index"]][:, :, ~mask])
    assert torch.equal(patched.labels, test.labels[opened.extras["target_index"]])


def test_the_test_fingerprint_is_hashed(sets, patch_store, tmp_path):
    train, test = sets
    path = patch_store.save(tmp_path / "s.safetensors")
    data = path.read_bytes().replace(test.fingerprint.encode(), b"f" * len(test.fingerprint), 1)
    path.write_bytes(data)
    with pytest.raises(PoisonStoreError, match="content hash"):
        PoisonStore.open(path, train)


def test_an_availability_store_keeps_its_content_hash_and_key():
    # Values computed with the code before integrity stores existed (tests of this file's
    # commit): a store without test_fingerprint must hash and key exactly as it did.
    images = (torch.arange(4 * 3 * 8 * 8) % 251).to(torch.uint8).view(4, 3, 8, 8)
    base = ImageSet(images, torch.tensor([0, 1, 0, 1]), ["a", "b"], name="golden", split="train")
    store = PoisonStore(index=torch.tensor([1, 3]), images=(images[[1, 3]].to(torch.int16) + 2).to(torch.uint8),
                        labels=torch.tensor([1, 1]), attack="random_noise",
                        params={"eps": 2 / 255, "kind": "samplewise"}, dataset="golden",
                        base_fingerprint=base.fingerprint, norm="linf", eps=2 / 255, seed=3)
    assert store.metadata()["content_sha256"] == "f9126fb4888574512a699a922a9f866ddb3137645529598de2ec28607213fb95"
    assert "test_fingerprint" not in store.metadata()
    assert store_key("random_noise", store.params, "golden", base.fingerprint, 3) == "5230ab989c2789a6e09bcaae"


def test_targets_from_another_test_split_are_refused(sets, patch_store, tmp_path):
    train, test = sets
    other = ImageSet(test.images.flip(0), test.labels, test.classes, name="tiny", split="test")
    refused(patch_store, tmp_path, train, other, "targets from a test split with fingerprint")


def test_target_indices_outside_the_test_split_are_refused(sets, patch_store, tmp_path):
    train, test = sets
    far = torch.tensor([len(test) + 3], dtype=torch.int64)
    store = changed(patch_store, extras={"target_index": far, "target_label": torch.tensor([1])})
    refused(store, tmp_path, train, test, r"target indices must lie in \[0, 40\)")


def test_targets_without_a_test_fingerprint_are_refused_against_a_test_split(sets, patch_store, tmp_path):
    train, test = sets
    refused(changed(patch_store, test_fingerprint=None), tmp_path, train, test, "does not name the test split")
    path = changed(patch_store, test_fingerprint=None).save(tmp_path / "old.safetensors")
    assert PoisonStore.open(path, train).test_fingerprint is None  # without a test split it opens


def test_a_trigger_outside_its_mask_is_refused(sets, patch_store, tmp_path):
    train, test = sets
    trigger = patch_store.extras["trigger"].clone()
    trigger[:, 0, 0] = 7
    refused(changed(patch_store, extras={"trigger": trigger}), tmp_path, train, test, "not zero outside its trigger_mask")


def test_a_mask_larger_than_the_l0_budget_is_refused(sets, patch_store, tmp_path):
    train, test = sets
    mask = patch_store.extras["trigger_mask"].clone()
    mask[0, 0] = 1
    refused(changed(patch_store, extras={"trigger_mask": mask}), tmp_path, train, test,
            "covers 10 pixels, more than the declared l0 budget 9")


def test_poisons_changed_outside_the_mask_are_refused(sets, patch_store, tmp_path):
    train, test = sets
    images = patch_store.images.clone()
    images[0, :, 0, 0] ^= 1
    refused(changed(patch_store, images=images), tmp_path, train, test, "1 poisons differ from the clean images outside")


def test_more_changed_pixels_than_the_l0_budget_are_refused(sets, patch_store, tmp_path):
    train, test = sets
    images = patch_store.images.clone()
    images[0, 1, 0, :4] ^= 1  # one channel is enough to change a pixel
    store = changed(patch_store, images=images, extras={"trigger": None, "trigger_mask": None})
    refused(store, tmp_path, train, test, r"over budget: 1[0-3] changed pixels in one image > declared l0 9")


def test_pasting_needs_a_trigger(sets, tmp_path):
    train, _ = sets
    store = ATTACKS.get("random_noise").craft(train, {"eps": 2 / 255}, seed=1)
    assert store.target is None and "l0_max" not in store.budget
    with pytest.raises(PoisonStoreError, match="no trigger"):
        store.apply_trigger(train.images[:2])
