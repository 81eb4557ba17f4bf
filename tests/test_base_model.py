"""Scenarios from a base model: trained once with a recipe on the clean set (cached),
frozen for transfer, fine-tuned with lr × 0.001; a scenario that needs a trained network
and names none is refused."""
from __future__ import annotations

import pytest
import torch

from poisonbench.artifacts import read_cost
from poisonbench.errors import ConfigError
from poisonbench.fitting.base_model import base_model, base_model_config
from poisonbench.models import build_model
from poisonbench.schema.job_config import check_scenario

RECIPE = {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
          "weight_decay": 5e-4, "milestones": [], "gamma": 0.1, "accelerator": "cpu", "devices": 1}


def test_a_base_model_is_trained_once_and_learns(digits, one_thread):
    train, test = digits
    settings = base_model_config({}, "the test")
    build = lambda: build_model("small_cnn", 10)  # noqa: E731
    first, seconds, path = base_model(build, train, "small_cnn", {}, RECIPE, settings)
    again, cached_s, same = base_model(build, train, "small_cnn", {}, RECIPE, settings)
    assert seconds > 0 and cached_s == 0.0 and same == path and read_cost(path)["seconds"] > 0
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        acc = (again.eval()(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert acc > 0.5  # three epochs on digits: well above chance (10 %)
    other = base_model_config({"seed": 1}, "the test")
    _, _, elsewhere = base_model(build, train, "small_cnn", {}, RECIPE, other)
    assert elsewhere != path


def test_scenarios_that_need_a_trained_network_say_so():
    for scenario in ("finetune", "transfer"):
        with pytest.raises(ConfigError, match="base_model"):
            check_scenario({"scenario": scenario, "defense": "none"})
        check_scenario({"scenario": scenario, "defense": "none", "base_model": {}})
        check_scenario({"scenario": scenario, "defense": "pretrained"})
    with pytest.raises(ConfigError, match="unknown scenario"):
        check_scenario({"scenario": "distill"})
    for bad in ({"seed": -1}, {"finetune_lr": 0}, {"finetune_lr": float("nan")}, {"recipe": 3}, {"seeds": 1}):
        with pytest.raises(ConfigError):
            base_model_config(bad, "the test")


def test_transfer_job_from_a_base_model(tmp_path, digits, one_thread):
    from poisonbench.bench.profiles import adhoc_config
    from poisonbench.training.run import prepare_dir, run_job

    config = adhoc_config("cpu", "robuster", [{"dataset": "digits", "scenario": "transfer", "base_model": {}}])
    config.update(table="adhoc", row="r", column="c", trial=0, seed=1, poison_seed=2, profile="cpu",
                  fast_dev_run=True)
    with prepare_dir(tmp_path / "job", config):
        result = run_job(config, tmp_path / "job")
    assert result["base_model"]["path"].endswith(".safetensors")
    assert 0 <= result["metrics"]["test_acc"] <= 100
