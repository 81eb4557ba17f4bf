"""Base models: the network that fine-tuning and transfer start from (robuster §4, App. C).

The robuster paper's base model is the victim's own architecture trained with the
victim's recipe on the clean training set, known to the attacker and the defender
alike; with a defense on, it is trained with that defense (ROBUSTER.md, "Scenarios").
A job names it under ``base_model`` in its config:

    base_model:
      recipe: null        # a ``train`` mapping; null: the job's own ``train``
      seed: 0             # of its init and data order: one base model for every trial
      defense: job        # the defense it is trained with: job = the job's own where it acts
      defense_params: {}  #   inside training, else none; a name: that one (§5.4: defend only the base)
      file: null          # a local weights file instead (safetensors or a state dict)
      finetune_lr: 0.001  # fine-tuning multiplies the job's lr by this (App. C: "lr drops by 0.001×")

A trained base model is an artifact (``poisonbench.artifacts``) under
``<home>/base_models/``, keyed by the clean training set's fingerprint, the model and
its parameters, the recipe, the seed and the defense: made once, shared by every trial,
attack and column that names the same one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from poisonbench.artifacts import Artifact, CorruptArtifact, get_or_make
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError
from poisonbench.fitting.fit import fit_clean
from poisonbench.fitting.trainer import quiet_lightning
from poisonbench.fitting.victim import TrainingHooks
from poisonbench.models.classifier import ImageClassifier
from poisonbench.models.weights import load_weights
from poisonbench.params import parse_params, ranged

FORMAT = 1  # bump when what a cached base model holds changes
# ``defense: job``: the base model trains with the job's defense (ROBUSTER.md, "Scenarios":
# "With a defense on, the base model is trained with it"); the job resolves it.
JOB_DEFENSE = "job"


@dataclass(frozen=True)
class BaseModelParams:
    recipe: dict | None = None  # a ``train`` mapping; None: the job's own
    seed: int = ranged(0, 0, 2**32, high_open=True)  # one base model for every trial
    defense: str = JOB_DEFENSE  # trained with this defense; job: the job's (robuster §5.4 names one)
    defense_params: dict = field(default_factory=dict)  # with defense: job, the job's
    file: str | None = None  # a local weights file instead
    finetune_lr: float = ranged(0.001, 0, 1, low_open=True)  # App. C: "lr drops by 0.001×"


def base_model_config(value: Any, where: str, job_defense: tuple[str, Mapping] | None = None) -> dict[str, Any]:
    """The ``base_model`` mapping with its defaults, checked by the shared parameter
    checker (keys, types, ranges), ``defense: job`` resolved to ``job_defense`` (the
    (name, params) the job trains with; None: no defense)."""
    settings = dataclasses.asdict(parse_params(BaseModelParams, value, where, "base_model"))
    if settings["defense"] == JOB_DEFENSE:
        if settings["defense_params"]:
            raise ConfigError(f"base_model.defense_params of {where} must be empty with defense {JOB_DEFENSE!r} "
                              "(it takes the job's); name the defense to give it its own")
        name, params = job_defense if job_defense is not None else ("none", {})
        settings.update(defense=name, defense_params=dict(params))
    return settings


def base_model_artifact(train: ImageSet, model: str, model_params: Mapping, recipe: Mapping,
                        config: Mapping) -> Artifact:
    return Artifact("base_models", {
        "format": FORMAT, "dataset": train.name, "fingerprint": train.fingerprint, "model": model,
        "model_params": dict(model_params), "recipe": dict(recipe), "seed": int(config["seed"]),
        "defense": config["defense"], "defense_params": dict(config["defense_params"])})


def base_model(build: Callable[[], ImageClassifier], train: ImageSet, model: str, model_params: Mapping,
               recipe: Mapping, config: Mapping, *, hooks: TrainingHooks | None = None,
               progress: bool = False) -> tuple[ImageClassifier, float, Path | None]:
    """The base model named by ``config`` (``base_model_config``): its weights loaded into
    a network from ``build``. Returns it, the seconds spent training it (0 when cached
    or a file), and where its weights live."""
    if config["file"] is not None:
        return load_weights(build(), config["file"]), 0.0, Path(config["file"])

    def make(_path: Path) -> ImageClassifier:
        if not progress:
            quiet_lightning()
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(int(config["seed"]), verbose=False)
            net = build()
            fit_clean(net, train, dict(recipe), seed=int(config["seed"]), hooks=hooks, progress=progress,
                      fast_dev_run=bool(recipe.get("fast_dev_run")))
        return net

    def load(path: Path) -> ImageClassifier:
        net = build()
        try:
            net.load_state_dict(load_file(str(path)))
        except RuntimeError as err:
            raise CorruptArtifact(f"it does not hold this model's weights ({str(err).splitlines()[0]})") from None
        return net

    def save(net: ImageClassifier, tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))

    made = get_or_make(base_model_artifact(train, model, model_params, recipe, config),
                       load=load, make=make, save=save)
    return made.value, made.seconds, made.path
