"""Adaptive crafting (robuster §5.1): an adaptive attacker's surrogate trains with the
victim's defense, the store's key then names the defense (and is the old key without
one), both columns share the trial's target, and a base model trains with the job's
defense unless its settings name another."""
from __future__ import annotations

import dataclasses

import pytest

from poisonbench.attacks import ATTACKS, AttackInput, VictimSpec, craft_cached
from poisonbench.attacks.base import VictimDefense
from poisonbench.data.store import cache_path
from poisonbench.defenses.adversarial_poisoning import AdversarialPoisoning
from poisonbench.errors import ConfigError
from poisonbench.fitting.base_model import base_model_config

TINY = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 1}
TRAIN = {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
         "weight_decay": 0.0005, "milestones": [], "gamma": 0.1, "accelerator": "cpu", "devices": 1,
         "strategy": "auto", "precision": "32", "eval_every": 1}
AP = {"p": 0.75, "steps": 1}


class CountingHooks:
    """Training hooks that change nothing and count what they see."""

    made: list[CountingHooks] = []

    def __init__(self) -> None:
        self.batches = self.steps = 0
        CountingHooks.made.append(self)

    def on_train_batch(self, model, images, labels):
        self.batches += 1
        return images, labels

    def on_before_optimizer_step(self, model, optimizer) -> None:
        self.steps += 1

    def on_train_epoch_start(self, epoch: int) -> None:
        pass


def matching_input(digits, defense: str = "none", hooks: bool = False, seed: int = 3, **params):
    """gradient_matching's params and input against a small_cnn victim with ``defense``
    (and its counting hooks when ``hooks``)."""
    train, test = digits
    attack = ATTACKS.get("gradient_matching")
    p = attack.params({"steps": 1, "batch_size": 64, "surrogate": TINY, **params})
    victim = VictimSpec("small_cnn", {"pool": 1}, TRAIN, defense=defense)
    given = VictimDefense(defense, {}, CountingHooks) if hooks else None
    target = attack.draw_target(train, test, seed, p)
    return p, AttackInput(train, seed, test=test, target=target, victim=victim, defense=given)


def old_key_path(params, inp: AttackInput):
    """The store's path as it was computed before adaptive crafting: every param (there
    was no ``adaptive``), the victim without its defense."""
    attack = ATTACKS.get("gradient_matching")
    old_params = {k: v for k, v in dataclasses.asdict(params).items() if k != "adaptive"}
    return cache_path("gradient_matching", old_params, inp.train.name, inp.train.fingerprint, inp.seed,
                      attack.version, {"target": inp.target.key(), "victim": inp.victim.key(defense=False)})


def test_an_adaptive_surrogate_trains_with_fresh_hooks_of_the_victims_defense(digits, one_thread):
    CountingHooks.made.clear()
    params, inp = matching_input(digits, "counting", hooks=True, seed=11)
    ATTACKS.get("gradient_matching").craft(inp, params)
    assert len(CountingHooks.made) == 1  # one fresh hooks object, made for the surrogate
    hooks = CountingHooks.made[0]
    batches = -(-len(inp.train) // TRAIN["batch_size"])  # one epoch of the surrogate
    assert hooks.batches == batches and hooks.steps == batches

    CountingHooks.made.clear()
    off = ATTACKS.get("gradient_matching").params({**dataclasses.asdict(params), "adaptive": False})
    ATTACKS.get("gradient_matching").craft(inp, off)
    assert CountingHooks.made == []  # not adaptive: the surrogate trains undefended


def test_store_keys_name_the_defense_only_when_adaptive(digits, one_thread):
    params, plain = matching_input(digits)
    _, defended = matching_input(digits, "counting", hooks=True)
    _, named_only = matching_input(digits, "counting", hooks=False)  # a defense that does not act in training
    undefended, _ = craft_cached("gradient_matching", plain, dataclasses.asdict(params))
    adaptive, seconds = craft_cached("gradient_matching", defended, dataclasses.asdict(params))
    assert adaptive.path != undefended.path and seconds > 0  # its own surrogate, its own store
    assert plain.target == defended.target  # the target comes from the seed alone
    assert adaptive.target.mismatch(plain.target) is None and undefended.target.mismatch(plain.target) is None
    same, seconds = craft_cached("gradient_matching", named_only, dataclasses.asdict(params))
    assert same.path == undefended.path and seconds == 0.0
    off = {**dataclasses.asdict(params), "adaptive": False}
    for inp in (plain, defended):  # not adaptive: one store for both columns
        store, seconds = craft_cached("gradient_matching", inp, off)
        assert store.path == undefended.path and seconds == 0.0


def test_an_undefended_store_keeps_the_key_it_had_before_adaptive_crafting(digits, one_thread):
    params, plain = matching_input(digits)
    store, _ = craft_cached("gradient_matching", plain, dataclasses.asdict(params))
    assert store.path == old_key_path(params, plain)
    assert "adaptive" not in store.params  # the store records how it was crafted, as before
    off = ATTACKS.get("gradient_matching").params({**dataclasses.asdict(params), "adaptive": False})
    _, defended = matching_input(digits, "counting", hooks=True)
    assert old_key_path(off, defended) == craft_cached("gradient_matching", defended, dataclasses.asdict(off))[0].path


def test_hooks_of_another_defense_than_the_victims_are_refused(digits):
    params, inp = matching_input(digits, "counting", hooks=True)
    other = dataclasses.replace(inp, defense=VictimDefense("other", {}, CountingHooks))
    with pytest.raises(ConfigError, match="hooks of defense 'other', but its victim is defended by 'counting'"):
        ATTACKS.get("gradient_matching").craft(other, params)


def _config(**over):
    from poisonbench.bench.profiles import adhoc_config

    layer = {"dataset": "digits", "model": "small_cnn", "attack": "gradient_matching", **over}
    config = adhoc_config("cpu", "robuster", [layer])
    config.update(table="adhoc", row="r", column="c", trial=0, seed=1, poison_seed=2, profile="cpu",
                  fast_dev_run=True)
    return config


def test_the_base_model_trains_with_the_jobs_defense_unless_it_names_another():
    from poisonbench.training.run import _victim_base_model, base_model_settings

    defended = _config(scenario="transfer", base_model={}, defense="adversarial_poisoning", defense_params=AP)
    settings = base_model_settings(defended)
    assert (settings["defense"], settings["defense_params"]) == ("adversarial_poisoning", AP)
    assert _victim_base_model(defended) == {"defense": "adversarial_poisoning", "defense_params": AP}
    undefended = _config(scenario="transfer", base_model={}, defense="none")
    assert base_model_settings(undefended)["defense"] == "none"
    assert _victim_base_model(undefended) == {}  # the key it always had
    # §5.4: a robust base model, the last layer retrained undefended.
    robust_base = _config(scenario="transfer", base_model={"defense": "adversarial_poisoning"}, defense="none")
    assert base_model_settings(robust_base)["defense"] == "adversarial_poisoning"
    plain_base = _config(scenario="transfer", base_model={"defense": "none"}, defense="adversarial_poisoning")
    assert base_model_settings(plain_base)["defense"] == "none"
    # A defense that acts on the network alone does not train the base model.
    swapped = _config(scenario="transfer", base_model={}, defense="pretrained")
    assert base_model_settings(swapped)["defense"] == "none"
    with pytest.raises(ConfigError, match="must be empty with defense .job."):
        base_model_config({"defense": "job", "defense_params": {"p": 0.5}}, "the test")


@pytest.fixture
def counted(monkeypatch):
    """{id of an adversarial_poisoning instance: batches it defended}."""
    seen: dict[int, int] = {}
    plain = AdversarialPoisoning.on_train_batch

    def counting(self, model, images, labels):
        seen[id(self)] = seen.get(id(self), 0) + 1
        return plain(self, model, images, labels)

    monkeypatch.setattr(AdversarialPoisoning, "on_train_batch", counting)
    return seen


def _run(config, path):
    from poisonbench.training.run import prepare_dir, run_job

    with prepare_dir(path, config):
        return run_job(config, path)


def test_paired_columns_of_a_scratch_job_craft_against_their_own_surrogates(tmp_path, counted, one_thread):
    """demo/digits-integrity's gradient-matching row, one trial, both columns."""
    from poisonbench.bench.jobs import expand
    from poisonbench.bench.tables import load_table

    jobs = {j.column: j for j in expand(load_table("demo/digits-integrity"), trials=1, rows=["gradient_matching"],
                                        fast_dev_run=True)}
    undefended = _run(jobs["undefended"].config, tmp_path / "u")
    assert counted == {}
    defended = _run(jobs["defended"].config, tmp_path / "d")
    assert undefended["target"] == defended["target"]
    assert undefended["store"]["path"] != defended["store"]["path"]
    # Two instances: the surrogate's, trained for an epoch, and the victim's own (one batch).
    assert len(counted) == 2 and sorted(counted.values())[0] == 1 and sorted(counted.values())[1] > 1

    # The undefended store is where it was before adaptive crafting.
    config = jobs["undefended"].config
    attack = ATTACKS.get("gradient_matching")
    params = attack.params({**config["attack_params"], **attack.smoke})
    victim = VictimSpec(config["model"], dict(config.get("model_params") or {}), config["train"],
                        config["scenario"], config["defense"], dict(config.get("defense_params") or {}))
    from poisonbench.data import load_imageset

    train, test = load_imageset("digits", split="train"), load_imageset("digits", split="test")
    target = attack.draw_target(train, test, config["poison_seed"], params)
    inp = AttackInput(train, config["poison_seed"], test=test, target=target, victim=victim)
    assert undefended["store"]["path"] == str(old_key_path(params, inp))


def test_a_defended_transfer_job_starts_from_and_crafts_on_a_defended_base_model(tmp_path, counted, one_thread):
    common = {"scenario": "transfer", "base_model": {}, "attack_params": {"loss": "se"}}
    undefended = _run(_config(**common, defense="none"), tmp_path / "u")
    assert counted == {} and undefended["base_model"]["defense"] == "none"
    defended = _run(_config(**common, defense="adversarial_poisoning", defense_params=AP), tmp_path / "d")
    assert defended["base_model"]["defense"] == "adversarial_poisoning"
    assert defended["base_model"]["path"] != undefended["base_model"]["path"]
    assert defended["store"]["path"] != undefended["store"]["path"]
    assert defended["target"] == undefended["target"]
    assert len(counted) == 2  # the base model's defense and the victim's: two instances
