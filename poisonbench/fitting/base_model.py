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
      dataset: null       # the data it is trained on: null = the job's clean training set;
                          # auxiliary = the job dataset's auxiliary data (CIFAR-10 <-> CIFAR-100,
                          # digits' aux split: poisonbench.pretrain.auxiliary); NAME or NAME:SPLIT

A base model trained on another dataset keeps that dataset's classes; the fine-tune and
transfer scenarios re-initialise the linear layer for the job's classes anyway. That is
the TRANSFER* scenario of Schwarzschild et al. (2021), which the robuster paper's Convex
Polytope row uses: the feature extractor trained on CIFAR-100 (``dataset: auxiliary``),
the linear layer trained on CIFAR-10 by the job's own recipe.

A trained base model is an artifact (``poisonbench.artifacts``) under
``<home>/base_models/``, keyed by the clean training set's fingerprint, the model and
its parameters, the recipe, the seed and the defense: made once, shared by every trial,
attack and column that names the same one. Fitted in one process on one device, its
training checkpoints every epoch into ``<entry>.partial/``
(``poisonbench.artifacts.partial_dir``): a fit killed part of the way continues there
on the next call, and the folder goes once the entry is written. (A fit on several
devices is made by each rank at once, without a lock or checkpoints: ``fits_alone``.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from poisonbench.artifacts import Artifact, CorruptArtifact, get_or_make, partial_dir
from poisonbench.data import DATASETS, load_imageset
from poisonbench.data.datasets import check_split
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError
from poisonbench.fitting.fit import fit_clean
from poisonbench.fitting.trainer import fits_alone, quiet_lightning
from poisonbench.fitting.victim import TrainingHooks
from poisonbench.models.classifier import ImageClassifier
from poisonbench.models.weights import load_weights
from poisonbench.params import parse_params, ranged
from poisonbench.schema.job_config import check_train

FORMAT = 1  # bump when what a cached base model holds changes
# ``defense: job``: the base model trains with the job's defense (ROBUSTER.md, "Scenarios":
# "With a defense on, the base model is trained with it"); the job resolves it.
JOB_DEFENSE = "job"
AUXILIARY = "auxiliary"  # ``dataset``: the job dataset's auxiliary data (module docstring)


@dataclass(frozen=True)
class BaseModelParams:
    recipe: dict | None = None  # a ``train`` mapping; None: the job's own
    seed: int = ranged(0, 0, 2**32, high_open=True)  # one base model for every trial
    defense: str = JOB_DEFENSE  # trained with this defense; job: the job's (robuster §5.4 names one)
    defense_params: dict = field(default_factory=dict)  # with defense: job, the job's
    file: str | None = None  # a local weights file instead
    finetune_lr: float = ranged(0.001, 0, 1, low_open=True)  # App. C: "lr drops by 0.001×"
    dataset: str | None = None  # null: the job's clean training set; auxiliary; NAME or NAME:SPLIT

    def __post_init__(self) -> None:
        if self.recipe is not None:  # checked as a job's train mapping, and complete enough to train with
            check_train(self.recipe, "the base model's recipe")
            missing = [key for key in ("epochs", "batch_size", "lr") if key not in self.recipe]
            if missing:
                raise ValueError(f"the base model's recipe needs {missing[0]!r}")
        if self.dataset is not None and self.dataset != AUXILIARY:
            name, split = dataset_split(self.dataset)
            DATASETS.get(name)  # an unknown name lists the known ones
            check_split(split, name)


def dataset_split(value: str) -> tuple[str, str]:
    """``NAME`` or ``NAME:SPLIT`` as (name, split); the split defaults to train."""
    name, _, split = value.partition(":")
    return name, split or "train"


def training_data(config: Mapping, train: ImageSet, data_root: str | Path | None = None,
                  auxiliary: tuple[str, str] | None = None) -> ImageSet:
    """The clean set the base model named by ``config`` is trained on: the job's ``train``
    (dataset null), a named dataset's split, or the job dataset's auxiliary data
    (``auxiliary``: the (name, split) the caller looked up in ``pretrain.auxiliary``)."""
    value = config.get("dataset")
    if value is None:
        return train
    if value == AUXILIARY:
        if auxiliary is None:
            raise ConfigError(f"a base model on the auxiliary data of {train.name} needs that data named")
        name, split = auxiliary
    else:
        name, split = dataset_split(value)
    return load_imageset(name, data_root, split)


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
    or a file), and where its weights live.

    ``train``: the clean set it is trained on (``training_data``); a network from
    ``build`` with another number of classes gets a head for that set's classes."""
    if config["file"] is not None:
        return load_weights(build(), config["file"]), 0.0, Path(config["file"])

    def network() -> ImageClassifier:
        net = build()
        return net if net.num_classes == train.num_classes else net.reset_head(train.num_classes)

    resumed = [0.0]  # seconds of the interrupted fits this one continues
    alone = fits_alone(dict(recipe))  # else every rank of the group fits it, as before, without checkpoints

    def make(path: Path) -> ImageClassifier:
        if not progress:
            quiet_lightning()
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(int(config["seed"]), verbose=False)
            net = network()
            fitted = fit_clean(net, train, dict(recipe), seed=int(config["seed"]), hooks=hooks, progress=progress,
                               fast_dev_run=bool(recipe.get("fast_dev_run")),
                               work_dir=partial_dir(path) if alone else None)
        resumed[0] = fitted.resumed_s
        return net

    def load(path: Path) -> ImageClassifier:
        net = network()
        try:
            net.load_state_dict(load_file(str(path)))
        except RuntimeError as err:
            raise CorruptArtifact(f"it does not hold this model's weights ({str(err).splitlines()[0]})") from None
        return net

    def save(net: ImageClassifier, tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))

    made = get_or_make(base_model_artifact(train, model, model_params, recipe, config),
                       load=load, make=make, save=save, earlier_s=lambda: resumed[0],
                       describe=lambda: {"resumed_s": round(resumed[0], 3)}, exclusive=alone)
    return made.value, made.seconds, made.path
