"""The GPU path's switches: the optional ``train.compile`` and ``train.resident_data``
keys (absent, no job hash moves), what result.json records of them, and the
leaderboard's precision line. The CUDA checks are marked ``gpu``."""
from __future__ import annotations

import copy

import pytest
import torch

from poisonbench.bench import runner
from poisonbench.bench.jobs import job_hash
from poisonbench.bench.render import _precision
from poisonbench.errors import ConfigError
from poisonbench.fitting.victim import VictimModule, resolve_compile
from poisonbench.models import build_model
from poisonbench.schema.job_config import check_job_config, check_train
from poisonbench.schema.result import result_problem

TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "accelerator": "cpu"}


def test_compile_and_resident_data_are_optional_train_keys():
    for value in ("auto", True, False):
        assert check_train({"compile": value, "resident_data": value}, "test")["compile"] == value
    with pytest.raises(ConfigError, match="train.compile in test must be auto, true or false"):
        check_train({"compile": "yes"}, "test")
    with pytest.raises(ConfigError, match="train.resident_data"):
        check_train({"resident_data": 1}, "test")
    with pytest.raises(ConfigError, match="train.compile"):
        VictimModule(build_model("small_cnn", 10), 10, {**TRAIN, "compile": "always"})


def test_a_config_without_the_keys_hashes_as_before_and_one_with_them_is_valid():
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=1, rows=None,
                       fast_dev_run=False)[0]
    job = plan.jobs[0]
    assert "compile" not in job.config["train"] and "resident_data" not in job.config["train"]
    assert job_hash(job.config) == job.hash
    config = copy.deepcopy(job.config)
    config["train"]["compile"] = False
    check_job_config(config, "a config")
    assert job_hash(config) != job.hash  # set, it is part of what the job is


def test_compile_auto_is_off_on_the_cpu():
    assert not resolve_compile("auto", on_cuda=False)
    assert resolve_compile(True, on_cuda=False) and not resolve_compile(False, on_cuda=True)


def _result(training) -> tuple[dict, dict]:
    config = {"train": {"precision": "auto"}}
    result = {"format_version": 1, "job": "abc", "config": config, "metrics": {"test_acc": 50.0}}
    if training is not None:
        result["training"] = training
    return config, result


def test_result_training_record_is_optional_and_checked():
    for training in (None, {"precision": "bf16-mixed", "compile": True, "resident_data": True}):
        config, result = _result(training)
        assert result_problem("abc", config, result) is None
    config, result = _result({"precision": "bf16-mixed", "compile": "yes", "resident_data": True})
    assert "training record" in result_problem("abc", config, result)


def test_leaderboard_states_the_precision_trained_in():
    assert _precision(_result({"precision": "bf16-mixed", "compile": True, "resident_data": True})[1]) \
        == "auto (bf16-mixed)"
    assert _precision(_result(None)[1]) == "auto"  # a result from before the record
    assert _precision({"config": {"train": {"precision": "32-true"}},
                       "training": {"precision": "32-true"}}) == "32-true"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_keep_the_data_resident_and_compile(digits):
    from poisonbench.data.module import PoisonedDataModule
    from poisonbench.fitting.fit import fit

    train, test = digits
    model = build_model("resnet18", 10)
    recipe = {**TRAIN, "accelerator": "gpu", "milestones": []}
    fitted = fit(model, PoisonedDataModule(train, test, None, batch_size=64), recipe)
    assert fitted.training == {"precision": "bf16-mixed", "compile": True, "resident_data": True}
    assert not any("_orig_mod" in k for k in fitted.module.state_dict())  # checkpoints keep the plain names
    optimizer = fitted.trainer.optimizers[0]
    assert optimizer.defaults.get("fused") and torch.backends.cudnn.benchmark
