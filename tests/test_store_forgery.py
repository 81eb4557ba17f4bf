"""Stores that lie: each forgery is written here with a valid content hash, so only the
checks against what was asked for (the cache key, the attack's declared budget, its
clean labels, the optional tensors' shapes) can catch it. A forged cache entry is
crafted again; a forged store opened by path is refused with one sentence."""
from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import torch

from poisonbench.attacks import ATTACKS, craft_cached
from poisonbench.attacks.base import check_store, params_dict
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore, cache_path
from poisonbench.errors import PoisonStoreError

EPS = 4 / 255


@pytest.fixture(scope="module")
def base():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(40) % 4, ["a", "b", "c", "d"], name="forgery", split="train")


def key_path(base, name="random_noise", params=None, seed=3):
    attack = ATTACKS.get(name)
    full = params_dict(attack.params({"eps": EPS} if params is None and name == "random_noise" else params))
    return cache_path(name, full, base.name, base.fingerprint, seed, attack.version)


def honest(base, seed=3, **params):
    return ATTACKS.get("random_noise").craft(base, {"eps": EPS, **params}, seed=seed)


def forged(store, **changes):
    """A copy of ``store`` with fields changed; ``save`` gives it a valid content hash."""
    fields = {k: getattr(store, k) for k in ("index", "images", "labels", "attack", "params", "dataset",
                                              "base_fingerprint", "norm", "eps", "seed", "extras")}
    return PoisonStore(**{**fields, **changes})


def one_sentence(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------- the cache key


def test_store_copied_onto_another_seeds_key_is_crafted_again(base, caplog):
    theirs, _ = craft_cached("random_noise", base, {"eps": EPS}, seed=3)
    target = key_path(base, seed=4)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(theirs.path, target)
    with pytest.raises(PoisonStoreError, match="seed 3, not the 4 asked for") as err:
        check_store(PoisonStore.open(target, base), ATTACKS.get("random_noise"),
                    ATTACKS.get("random_noise").params({"eps": EPS}), 4, base)
    assert str(target) in one_sentence(err)

    store, seconds = craft_cached("random_noise", base, {"eps": EPS}, seed=4)
    assert seconds > 0 and store.seed == 4 and not torch.equal(store.images, theirs.images)
    assert PoisonStore.open(target, base).seed == 4  # the honest store replaced the forgery
    assert any(str(target) in r.getMessage() and "crafting it again" in r.getMessage() for r in caplog.records)


def test_store_of_another_attack_is_not_used_as_synthetic(base):
    noise, _ = craft_cached("random_noise", base, {"eps": EPS}, seed=3)
    params = {"eps": 6 / 255, "patch": 8, "class_sep": 10.0}
    target = key_path(base, "synthetic", params, seed=3)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(noise.path, target)
    store, seconds = craft_cached("synthetic", base, params, seed=3)
    assert seconds > 0 and store.attack == "synthetic" and store.norm == "l2"


def test_other_params_are_named(base, tmp_path):
    path = honest(base, kind="classwise").save(tmp_path / "s.safetensors")
    attack = ATTACKS.get("random_noise")
    with pytest.raises(PoisonStoreError, match="differ from those asked for in kind") as err:
        check_store(PoisonStore.open(path, base), attack, attack.params({"eps": EPS}), 3, base)
    assert str(path) in one_sentence(err)


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize("eps", [math.nan, math.inf, -EPS])
def test_declared_budget_must_be_finite(base, tmp_path, eps):
    path = forged(honest(base), eps=eps).save(tmp_path / "s.safetensors")
    with pytest.raises(PoisonStoreError, match="finite and not negative") as err:
        PoisonStore.open(path, base)
    assert str(path) in one_sentence(err)


def test_declared_budget_must_be_the_params_budget(base, caplog):
    # 16/255 noise declared as 16/255: within its declared budget, so it opens; but the
    # key is random_noise at 4/255, whose stores may change pixels by 4/255 at most.
    loud = honest(base, eps=16 / 255)
    lie = forged(loud, params=params_dict(ATTACKS.get("random_noise").params({"eps": EPS})))
    target = key_path(base, seed=5)
    lie.seed = 5
    lie.save(target)
    attack = ATTACKS.get("random_noise")
    with pytest.raises(PoisonStoreError, match=r"declares budget linf 16/255, but random_noise with its params has linf 4/255") as err:
        check_store(PoisonStore.open(target, base), attack, attack.params({"eps": EPS}), 5, base)
    one_sentence(err)
    store, seconds = craft_cached("random_noise", base, {"eps": EPS}, seed=5)
    assert seconds > 0 and store.budget["linf"] <= 4


def test_l2_budget_is_the_image_radius(base):
    attack = ATTACKS.get("synthetic")
    store = attack.craft(base, {"eps": 6 / 255}, seed=0)  # craft runs check_store itself
    assert store.norm == "l2" and math.isclose(store.eps, math.sqrt(3 * 32 * 32) * 6 / 255)
    with pytest.raises(PoisonStoreError, match="declares budget l2"):
        check_store(forged(store, eps=store.eps * 2), attack, attack.params({"eps": 6 / 255}), 0, base)


# ------------------------------------------------------------------ the labels


def test_flipped_labels_of_a_clean_label_attack(base, caplog):
    flipped = honest(base)
    flipped = forged(flipped, labels=(flipped.labels + 1) % 4)
    target = key_path(base, seed=3)
    flipped.save(target)
    attack = ATTACKS.get("random_noise")
    with pytest.raises(PoisonStoreError, match="changes 40 labels, but random_noise is a clean-label attack") as err:
        check_store(PoisonStore.open(target, base), attack, attack.params({"eps": EPS}), 3, base)
    one_sentence(err)
    store, seconds = craft_cached("random_noise", base, {"eps": EPS}, seed=3)
    assert seconds > 0 and torch.equal(store.labels, base.labels[store.index])


def test_attack_that_may_change_labels_is_declared(base):
    from dataclasses import replace

    attack = replace(ATTACKS.get("random_noise"), keeps_labels=False)
    store = honest(base)
    check_store(forged(store, labels=(store.labels + 1) % 4), attack, attack.params({"eps": EPS}), 3, base)


# ------------------------------------------------------------ optional tensors


def integrity_extras(**changes):
    extras = {"trigger": torch.full((3, 32, 32), 200, dtype=torch.uint8),
              "trigger_mask": torch.ones(32, 32, dtype=torch.bool),
              "target_index": torch.tensor([7], dtype=torch.int64),
              "target_label": torch.tensor([2], dtype=torch.int64)}
    extras.update(changes)
    return {k: v for k, v in extras.items() if v is not None}


def test_well_formed_integrity_tensors_open(base, tmp_path):
    path = forged(honest(base), extras=integrity_extras()).save(tmp_path / "s.safetensors")
    assert set(PoisonStore.open(path, base).extras) == {"trigger", "trigger_mask", "target_index", "target_label"}


@pytest.mark.parametrize("changes, match", [
    ({"trigger": torch.full((3, 32, 32), 0.5)}, "trigger must be uint8"),
    ({"trigger": torch.zeros(3, 40, 40, dtype=torch.uint8)}, "trigger must be uint8"),
    ({"trigger": torch.zeros(3, 4, 4, dtype=torch.uint8)}, "trigger must be uint8"),
    ({"trigger": torch.zeros(1, 32, 32, dtype=torch.uint8)}, "trigger must be uint8"),
    ({"trigger": None}, "trigger_mask but no trigger"),
    ({"trigger_mask": torch.ones(5, 5, dtype=torch.bool)}, "trigger_mask must be"),
    ({"trigger_mask": torch.ones(32, 32)}, "trigger_mask must be"),
    ({"trigger_mask": torch.full((32, 32), 3, dtype=torch.uint8)}, "only 0 and 1"),
    ({"target_index": torch.tensor([7.0])}, "target_index must be int64"),
    ({"target_index": torch.tensor([-1])}, "target_index must be int64"),
    ({"target_label": torch.tensor([1, 2])}, "target_label must be int64"),
    ({"target_label": torch.tensor([9])}, r"target_label must lie in \[0, 4\)"),
])
def test_malformed_integrity_tensors_are_refused(base, tmp_path, changes, match):
    path = forged(honest(base), extras=integrity_extras(**changes)).save(tmp_path / "s.safetensors")
    with pytest.raises(PoisonStoreError, match=match) as err:
        PoisonStore.open(path, base)
    assert str(path) in one_sentence(err)


def test_unknown_tensor_is_refused(base, tmp_path):
    path = forged(honest(base), extras={"backdoor": torch.zeros(3)}).save(tmp_path / "s.safetensors")
    with pytest.raises(PoisonStoreError, match="backdoor") as err:
        PoisonStore.open(path, base)
    one_sentence(err)


# ------------------------------------------------------------------- the header


def write_header(path, header) -> None:
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)


@pytest.mark.parametrize("header, match", [
    ([1, 2, 3], "header that is a JSON list"),
    ("text", "header that is a JSON str"),
    ({"__metadata__": ["attack", "x"]}, "metadata that is not a mapping"),
    ({"__metadata__": {"eps": 0.1}}, "metadata that is not a mapping"),
])
def test_header_that_is_not_a_mapping(base, tmp_path, header, match):
    path = tmp_path / "s.safetensors"
    write_header(path, header)
    with pytest.raises(PoisonStoreError, match=match) as err:
        PoisonStore.open(path, base)
    assert str(path) in one_sentence(err)


def test_params_metadata_that_is_a_list(base, tmp_path):
    from poisonbench.data.store import content_sha256

    store = honest(base)
    tensors, meta = store.tensors(), store.metadata()
    meta["params"] = "[1, 2]"
    meta["content_sha256"] = content_sha256(tensors, meta)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(PoisonStoreError, match="params metadata that is a JSON list") as err:
        PoisonStore.open(tmp_path / "s.safetensors", base)
    one_sentence(err)



# ------------------------------------------------------- a store given by path


def test_store_given_by_path_is_held_to_its_own_attack(capsys, tmp_path, digits):
    from poisonbench.cli import main

    train, _ = digits
    store = ATTACKS.get("random_noise").craft(train, {"eps": EPS}, seed=0)
    path = forged(store, labels=(store.labels + 1) % 10).save(tmp_path / "flipped.safetensors")
    argv = ["train", "--dataset", "digits", "--model", "small_cnn", "--fast-dev-run", "--store", str(path),
            "--out", str(tmp_path / "job")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "changes" in err and "random_noise is a clean-label attack" in err and str(path) in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "job" / "result.json").exists()


def test_store_of_an_unknown_attack_keeps_its_own_budget(base):
    from poisonbench.attacks.base import check_declared

    store = forged(honest(base), attack="someone_elses", labels=(honest(base).labels + 1) % 4)
    assert check_declared(store, base) is store  # verified by PoisonStore alone; no declaration to hold it to
