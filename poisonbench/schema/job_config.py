"""The job-config schema: the keys of a resolved job config, their types, ranges and
defaults, and the one merge step that builds a config from layers.

Every reader of a job config uses it: table specs and profiles (``poisonbench.bench``),
the job that runs a config (``poisonbench.training``) and the command line. A typo in a
key fails with ``ConfigError`` instead of silently running the default. This module
only reads plain values: no torch, no training code.
"""
from __future__ import annotations

from typing import Any, Mapping

from poisonbench.config import check_keys, check_value, deep_merge, describe
from poisonbench.errors import ConfigError
from poisonbench.params import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range, check_number

CONFIG_FILE = "config.yaml"  # a job directory's resolved config

# The resolved job config without its per-job fields (table, row, column, trial, seeds,
# profile, fast_dev_run), with the values used when no layer sets them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0005,
    "milestones": [50, 75],  # epochs at which lr is multiplied by gamma
    "gamma": 0.1,
    "accelerator": "auto",
    "devices": 1,
    "strategy": "auto",
    "precision": "auto",  # bf16-mixed on CUDA, 32 on CPU (decided by the trainer factory)
    "eval_every": 1,  # epochs between clean test evaluations (curves)
}
DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "resnet18",
    "model_params": {},
    "attack": "none",
    "attack_params": {},
    "ratio": 1.0,  # fraction of the training set that is poisoned
    # Train on the clean remainder only: the ratio·N samples the attack would poison are
    # removed instead (the shortcuts paper's Table 6 baseline, "Clean Data Only").
    "drop_poisoned": False,
    "scenario": "scratch",
    "defense": "none",
    "defense_params": {},
    # What the job does with the (poisoned) training set: train a victim, or analyse
    # the perturbations (the shortcuts paper's Table 1 probes, Figures 2 and 6).
    "task": "train",
    "task_params": {},
    "train": TRAIN_DEFAULTS,
}
SCENARIOS = ("scratch", "finetune", "transfer", "linear_eval")
TASKS = ("train", "separability", "tsne")
# Keys a config may set but that have no default: absent from the configs that do not
# set them, so adding one moves no existing job's hash. ``base_model``: the network that
# finetune and transfer start from (``poisonbench.fitting.base_model``).
OPTIONAL: dict[str, Any] = {"base_model": dict}
# ``train`` keys of the same kind: no default in TRAIN_DEFAULTS, so a config that does not
# set one hashes as before. ``compile``: torch.compile of the victim's network (auto = on
# for CUDA where torch.compile works, off on the CPU); ``resident_data``: the training
# and test sets kept on the device (auto = on CUDA when they fit;
# ``poisonbench.data.module``). Both are auto when absent.
TRAIN_OPTIONAL: dict[str, Any] = {"compile": (str, bool), "resident_data": (str, bool)}
AUTO_TRUE_FALSE = ("auto", True, False)

# Expected types: float accepts an int (and stores it as a float, so `lr: 1` and
# `lr: 1.0` hash alike); "ints" is a list of ints.
TYPES: dict[str, Any] = {
    "dataset": str, "model": str, "model_params": dict, "attack": str,
    "attack_params": dict, "ratio": float, "drop_poisoned": bool, "scenario": str, "defense": str,
    "defense_params": dict, "task": str, "task_params": dict, "train": dict,
}
TRAIN_TYPES: dict[str, Any] = {
    "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "momentum": float,
    "nesterov": bool, "weight_decay": float, "milestones": "ints", "gamma": float,
    "accelerator": str, "devices": (int, str, list), "strategy": str,
    "precision": (str, int), "eval_every": int,
}
# The range of every numeric train value (of milestones: each element); devices may also
# be a string ("auto") or a list of GPU ids, which are left to Lightning.
TRAIN_RANGES: dict[str, Range] = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "momentum": Range(0, 1, high_open=True),
    "weight_decay": NON_NEGATIVE, "milestones": NON_NEGATIVE, "gamma": POSITIVE, "devices": AT_LEAST_1,
    "eval_every": AT_LEAST_1,
}
# The optimisers a job trains with: SGD (every recipe of the papers) and Adam (the
# TRANSFER* scenario: the linear layer 10 epochs with Adam, Schwarzschild et al. 2021).
OPTIMIZERS = ("sgd", "adam")
PARAMS_OF = {"model": "model_params", "attack": "attack_params", "defense": "defense_params",
             "task": "task_params"}


def check_set(mapping: Any, where: str) -> dict[str, Any]:
    """Validate a partial config (``defaults``, a ``set``, an ``override``)."""
    check_keys(mapping, [*DEFAULTS, *OPTIONAL], where)
    checked: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == "train":
            checked[key] = check_train(value, where)
            continue
        checked[key] = check_value(value, TYPES.get(key) or OPTIONAL[key], f"{key} in {where}")
    if "scenario" in checked and checked["scenario"] not in SCENARIOS:
        raise ConfigError(
            f"scenario in {where} must be one of {', '.join(SCENARIOS)}; got {checked['scenario']!r}"
        )
    if "task" in checked and checked["task"] not in TASKS:
        raise ConfigError(f"task in {where} must be one of {', '.join(TASKS)}; got {checked['task']!r}")
    if "ratio" in checked:
        check_number(checked["ratio"], float, Range(0, 1), f"ratio in {where}")
    return checked

def check_train(mapping: Any, owner: str) -> dict[str, Any]:
    """Validate the ``train`` mapping of ``owner`` (e.g. "table x row 'y' set")."""
    check_keys(mapping, [*TRAIN_DEFAULTS, *TRAIN_OPTIONAL], f"{owner} train")
    checked = {k: check_value(v, TRAIN_TYPES.get(k) or TRAIN_OPTIONAL[k], f"train.{k} in {owner}")
               for k, v in mapping.items()}
    for key in TRAIN_OPTIONAL:
        if key in checked and checked[key] not in AUTO_TRUE_FALSE:
            raise ConfigError(f"train.{key} in {owner} must be auto, true or false; got {checked[key]!r}")
    for key, value in checked.items():
        bounds = TRAIN_RANGES.get(key)
        for item in value if key == "milestones" else [value]:  # devices: [0, 1] are GPU ids
            if bounds is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
                check_number(item, float, bounds, f"train.{key} in {owner}")
    if "optimizer" in checked and checked["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer in {owner} must be one of {', '.join(OPTIMIZERS)}; "
                          f"got {checked['optimizer']!r}")
    return checked

def merge_layer(config: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """One merge step of a cell's config (see the module docstring for the params rule)."""
    base = dict(config)
    for name, params in PARAMS_OF.items():
        if name in layer and layer[name] != base.get(name):
            base[params] = {}
    return deep_merge(base, layer)


# The per-job fields of a job config (bench/jobs.py, cli.py train), beside DEFAULTS' keys.
JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "table": (str,), "row": (str,), "column": (str,), "trial": (int,), "seed": (int,),
    "poison_seed": (int,), "profile": (str, type(None)), "fast_dev_run": (bool,),
    "store_sha256": (str, type(None)),
}


def check_job_config(config: Any, where: str) -> None:
    """Raise ``ConfigError`` unless ``config`` is a whole job config (``where`` names it, e.g.
    its config.yaml): every key known, every value of its type and in its range."""
    check_keys(config, [*DEFAULTS, *OPTIONAL, *JOB_FIELDS], where)
    missing = [k for k in ("dataset", "model", "attack", "train", "seed") if k not in config]
    if missing:
        raise ConfigError(f"{where} has no {missing[0]!r}; it is required")
    check_set({k: v for k, v in config.items() if k in DEFAULTS or k in OPTIONAL}, where)
    for key, kinds in JOB_FIELDS.items():
        if key not in config:
            continue
        value = config[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{key} in {where} must be {' or '.join(KIND_NAMES[k] for k in kinds)}; "
                              f"got {describe(value)}")
        if key in ("seed", "poison_seed", "trial"):
            check_number(value, int, Range(0, 2**32, high_open=True), f"{key} in {where}")


KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", type(None): "null"}


# Scenarios that start from a network trained before: a base model, or the backbone the
# ``pretrained`` defense puts in place (shortcuts Table 4).
FROM_TRAINED = ("finetune", "transfer")


def check_scenario(config: Mapping[str, Any]) -> None:
    """``ConfigError`` unless the scenario is known and, where it starts from a trained
    network, the config says which (fine-tuning a fresh network would silently be
    training from scratch)."""
    scenario = config.get("scenario", "scratch")
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if scenario in FROM_TRAINED and config.get("base_model") is None and config.get("defense") != "pretrained":
        raise ConfigError(f"scenario {scenario!r} starts from a trained network: set base_model "
                          "(e.g. base_model: {} for one trained with the job's recipe on the clean "
                          "training set) or use the pretrained defense")
