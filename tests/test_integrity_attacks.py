"""Integrity attacks: the attack input, cache keys with the target and the victim,
backdoor_patch's store and gradient matching on digits."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from crafting_checks import interrupt_then_resume
from poisonbench.attacks import ATTACKS, AttackInput, VictimSpec, craft_cached
from poisonbench.attacks.base import check_store
from poisonbench.attacks.gradient_matching import poison_loss
from poisonbench.attacks.surrogate import surrogate_spec
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError, PoisonStoreError

# The cpu profile's victim recipe (configs/profiles/cpu.yaml) on a small_cnn.
CPU_TRAIN = {"epochs": 15, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
             "weight_decay": 0.0005, "milestones": [12], "gamma": 0.1, "accelerator": "cpu", "devices": 1,
             "strategy": "auto", "precision": "32", "eval_every": 15}
TINY = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 2}


def backdoor(digits, seed=3, **params):
    train, test = digits
    attack = ATTACKS.get("backdoor_patch")
    p = attack.params(params)
    return attack, p, AttackInput(train, seed, test=test, target=attack.draw_target(train, test, seed, p))


def matching(digits, seed=3, victim=None, **params):
    train, test = digits
    attack = ATTACKS.get("gradient_matching")
    p = attack.params({"steps": 4, "batch_size": 64, "surrogate": TINY, **params})
    target = attack.draw_target(train, test, seed, p)
    return attack, p, AttackInput(train, seed, test=test, target=target, victim=victim)


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if ATTACKS.get(n).integrity])
def test_every_integrity_attack_crafts_with_its_smoke_params(name, digits, one_thread):
    train, test = digits
    attack = ATTACKS.get(name)
    params = attack.params(attack.smoke)
    target = attack.draw_target(train, test, 0, params)
    inp = AttackInput(train, 0, test=test, target=target)
    store = attack.craft(inp, params)
    assert torch.equal(store.images, attack.craft(inp, params).images)  # deterministic in the seed
    assert torch.equal(store.labels, train.labels[store.index])  # clean-label
    assert store.index.tolist() == list(target.poison_index) and store.target.mismatch(target) is None
    assert not torch.equal(store.images, train.images[store.index])
    assert not torch.equal(store.images, attack.craft(dataclasses.replace(inp, seed=1), params).images)


def test_an_integrity_attack_needs_a_target(digits):
    train, _ = digits
    with pytest.raises(ConfigError, match="integrity attack: it needs a trial's target"):
        ATTACKS.get("backdoor_patch").craft(train, {}, seed=0)
    with pytest.raises(ConfigError, match="integrity attack"):
        craft_cached("gradient_matching", train, {}, 0)


def test_backdoor_patch_pastes_a_lower_right_patch_into_its_budget_of_the_adversarial_class(digits, one_thread):
    train, test = digits
    attack, params, inp = backdoor(digits)
    store = attack.craft(inp, params)
    target = inp.target
    assert len(target.target_index) == int((test.labels == target.target_class).sum())  # all of the class
    assert store.index.tolist() == list(target.poison_index) and len(store.index) == poison_count(0.05, len(train))
    assert torch.equal(store.labels, train.labels[store.index])  # clean label
    assert bool((store.labels == target.adversarial_class).all())
    assert store.norm == "l0" and store.eps == 36 and store.budget["l0_max"] <= 36
    trigger, mask = store.extras["trigger"], store.extras["trigger_mask"].bool()
    assert int(mask.sum()) == 36 and bool(mask[-6:, -6:].all())  # the lower-right 6×6 corner
    assert set(trigger[:, mask].unique().tolist()) == {0, 255} and not bool(trigger[:, ~mask].any())
    assert torch.equal(store.images[:, :, mask], trigger[:, mask].expand(len(store.index), -1, -1))
    assert torch.equal(store.images[:, :, ~mask], train.images[store.index][:, :, ~mask])
    assert store.target.target_index == target.target_index
    assert set(store.target.target_label) == {target.adversarial_class}
    assert torch.equal(attack.craft(inp, params).extras["trigger"], trigger)  # the seed alone decides
    other = attack.craft(dataclasses.replace(inp, seed=4), params).extras["trigger"]
    assert not torch.equal(other, trigger)


def test_a_target_drawn_for_another_budget_is_refused(digits):
    attack, params, inp = backdoor(digits, budget=0.01)
    with pytest.raises(ConfigError, match="has 9 poison images; backdoor_patch with budget 0.05 needs 45"):
        attack.craft(inp, attack.params())


def test_the_cache_key_adds_the_target(digits, one_thread):
    attack, params, inp = backdoor(digits)
    first, seconds = craft_cached("backdoor_patch", inp, {})
    again, again_s = craft_cached("backdoor_patch", inp, {})
    assert again.path == first.path and again_s == 0.0
    _, _, other = backdoor(digits, seed=9)
    moved, _ = craft_cached("backdoor_patch", dataclasses.replace(other, seed=3), {})
    assert moved.path != first.path  # same seed and params, another target
    with pytest.raises(PoisonStoreError, match="another trial's target: its target images differ"):
        check_store(first, attack, params, 3, inp.train, other.target)


def test_an_availability_attack_takes_an_attack_input_with_its_old_key(digits, one_thread):
    train, _ = digits
    plain, _ = craft_cached("random_noise", train, {"eps": 2 / 255}, 5)
    via_input, seconds = craft_cached("random_noise", AttackInput(train, 5), {"eps": 2 / 255})
    assert via_input.path == plain.path and seconds == 0.0


def test_gradient_matching_keys_the_victim_recipe_but_not_its_defense(digits, one_thread):
    victim = VictimSpec("small_cnn", {"pool": 1}, dict(CPU_TRAIN, epochs=1))
    attack, params, inp = matching(digits, victim=victim, steps=1)
    base, _ = craft_cached("gradient_matching", inp, dataclasses.asdict(params))
    defended = dataclasses.replace(inp, victim=dataclasses.replace(victim, defense="adversarial_poisoning"))
    elsewhere = dataclasses.replace(inp, victim=dataclasses.replace(victim, train={**victim.train, "devices": 4}))
    for same in (defended, elsewhere):  # the store serves every defense column and device count
        store, seconds = craft_cached("gradient_matching", same, dataclasses.asdict(params))
        assert store.path == base.path and seconds == 0.0
    recipe = dataclasses.replace(inp, victim=dataclasses.replace(victim, train={**victim.train, "lr": 0.01}))
    store, _ = craft_cached("gradient_matching", recipe, dataclasses.asdict(params))
    assert store.path != base.path


def test_gradient_matching_without_a_victim_or_surrogate_is_refused(digits):
    attack, params, inp = matching(digits, surrogate={})
    with pytest.raises(ConfigError, match="give the victim, or the surrogate param"):
        attack.craft(inp, params)
    transfer = VictimSpec("small_cnn", {"pool": 1}, CPU_TRAIN, scenario="transfer")
    with pytest.raises(ConfigError, match="needs its base model's weights"):
        attack.craft(dataclasses.replace(inp, victim=transfer), params)


def test_gradient_matching_lowers_the_matching_loss_within_its_budget(digits, one_thread):
    train, test = digits
    # Without augmentation the loss crafting lowers is the one measured here; a surrogate
    # that fits digits a little (an untrained one gives every image the same gradient).
    surrogate = {"model": "small_cnn", "model_params": {"width": 8, "pool": 1}, "epochs": 4}
    attack, params, inp = matching(digits, steps=40, augment=False, surrogate=surrogate)
    store = attack.craft(inp, params)
    assert store.norm == "linf" and store.budget["linf"] <= 16
    assert store.index.tolist() == list(inp.target.poison_index)
    assert torch.equal(store.labels, train.labels[store.index])
    assert store.target.target_index == inp.target.target_index and store.test_fingerprint == test.fingerprint
    name, model_params, recipe = surrogate_spec(inp.victim, params.surrogate, "gradient_matching")
    model, seconds = trained_model(train, name, model_params, "relu", recipe, inp.seed, torch.device("cpu"))
    assert seconds == 0.0  # the surrogate the craft trained, from the cache
    x_t = test.images[list(inp.target.target_index)].float() / 255
    y_adv = torch.tensor([inp.target.adversarial_class])
    clean = train.images[store.index].float() / 255
    before = poison_loss(model, clean, store.labels, x_t, y_adv)
    after = poison_loss(model, store.images.float() / 255, store.labels, x_t, y_adv)
    assert after < 0.9 * before, (before, after)


def test_gradient_matching_resumes_to_the_same_store(digits, tmp_path, one_thread):
    attack, params, inp = matching(digits, steps=3, restarts=2)
    whole = attack.craft(inp, params)
    resumed, units = interrupt_then_resume(attack, inp, params, inp.seed, tmp_path / "p.safetensors", after_unit=3)
    assert units == [4, 5]
    assert torch.equal(resumed.images, whole.images)


def test_the_surrogate_recipe_is_the_victims(digits):
    victim = VictimSpec("small_cnn", {"pool": 1}, CPU_TRAIN)
    _, params, inp = matching(digits, victim=victim, surrogate={})
    name, model_params, recipe = surrogate_spec(inp.victim, params.surrogate, "gradient_matching")
    assert (name, model_params) == ("small_cnn", {"pool": 1})
    assert {k: recipe[k] for k in ("epochs", "lr", "milestones", "batch_size")} == \
        {"epochs": 15, "lr": 0.05, "milestones": [12], "batch_size": 64}
    _, params, inp = matching(digits, victim=victim, surrogate={"epochs": 2, "model": "small_cnn"})
    assert surrogate_spec(inp.victim, params.surrogate, "gradient_matching")[2]["epochs"] == 2
    _, params, inp = matching(digits)  # no victim: the default recipe, scaled to the given epochs
    assert surrogate_spec(inp.victim, params.surrogate, "gradient_matching")[2]["milestones"] == SurrogateRecipe(epochs=2).train_config()["milestones"]


@pytest.mark.slow
def test_gradient_matching_makes_a_fresh_victim_misclassify_its_target(digits):
    """Four trials on digits with the cpu recipe, 5 % budget, ε 16/255, 240 steps: poisons
    crafted on a surrogate trained with the victim's recipe make a freshly initialised
    victim classify its target as the adversarial class in some trials, where the same
    victim trained on the clean set does in none (measured: 1 of 4, against 0 of 4)."""
    import lightning as L

    from poisonbench.fitting.fit import fit_clean
    from poisonbench.fitting.trainer import quiet_lightning
    from poisonbench.models import build_model

    quiet_lightning()
    train, test = digits
    victim = VictimSpec("small_cnn", {"pool": 1}, CPU_TRAIN)
    attack = ATTACKS.get("gradient_matching")
    params = attack.params({"budget": 0.05})
    hits = {"clean": 0, "poisoned": 0}
    start, trials = time.perf_counter(), 4
    for k in range(trials):
        target = attack.draw_target(train, test, 1000 + k, params)
        store = attack.craft(AttackInput(train, 1000 + k, test=test, target=target, victim=victim), params)
        x_t = test.images[list(target.target_index)].float() / 255
        for name, data in (("clean", train), ("poisoned", store.apply(train))):
            L.seed_everything(5000 + k, verbose=False)  # the victim's own init, not the surrogate's
            net = build_model("small_cnn", train.num_classes, pool=1)
            fit_clean(net, data, CPU_TRAIN, seed=5000 + k)
            with torch.no_grad():
                hits[name] += int(net.eval()(x_t).argmax(1)[0]) == target.adversarial_class
    print(f"gradient matching on digits: {hits} of {trials} trials, {time.perf_counter() - start:.0f} s")
    assert hits["poisoned"] >= 1 and hits["poisoned"] > hits["clean"]
