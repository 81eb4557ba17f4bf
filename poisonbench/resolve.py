"""A job config checked against the registries before any work starts.

``schema.job_config`` checks keys, types and ranges of a config from YAML alone; this module
adds what only the registries know: that the dataset, model, attack and defense
exist and that their parameters (and an analysis task's) are accepted (types and declared ranges, through the
shared checker of ``poisonbench.params``). ``run`` checks every job of its plan, so a
bad row fails in ``--dry-run`` and before the first job, not when it is reached.
"""
from __future__ import annotations

from typing import Mapping

from poisonbench.analysis.tasks import check_task_params
from poisonbench.attacks import ATTACKS
from poisonbench.data import DATASETS
from poisonbench.defenses import DEFENSES
from poisonbench.errors import ConfigError
from poisonbench.fitting.base_model import base_model_config
from poisonbench.models.factory import check_model
from poisonbench.schema.job_config import check_scenario


def check_job(config: Mapping, where: str) -> None:
    """Raise ``ConfigError`` (or ``UnknownNameError``), prefixed by ``where``, unless every
    name and parameter of ``config`` resolves; under ``fast_dev_run`` the attack's smoke
    parameters are laid over its own, as the job itself does."""
    try:
        DATASETS.get(config["dataset"])
        check_model(config["model"], dict(config.get("model_params") or {}))
        attack = ATTACKS.get(config["attack"])
        params = dict(config.get("attack_params") or {})
        attack.params(params)
        if config.get("fast_dev_run") and config["attack"] != "none":
            attack.params({**params, **attack.smoke})
        DEFENSES.get(config.get("defense") or "none").parse_params(config.get("defense_params"))
        check_task_params(config.get("task", "train"), dict(config.get("task_params") or {}))
        check_scenario(config)
        if config.get("base_model") is not None:
            settings = base_model_config(config["base_model"], "the config")
            DEFENSES.get(settings["defense"]).parse_params(settings["defense_params"])
    except ConfigError as err:
        raise type(err)(f"{where}: {err}") from None
