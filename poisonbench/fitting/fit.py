"""Fitting a classifier with a recipe: the one place where a network is trained.

A victim, a crafting surrogate, a base model and a supervised pre-training run are the
same act: a ``VictimModule`` (scenario, optional training hooks) fitted by the Lightning
trainer that ``build_trainer`` makes from a ``train`` recipe (a job config's ``train``
mapping). ``fit`` takes a prepared data module (a poisoned training set, the clean test
set); ``fit_clean`` fits on one clean image set, as the attacker's and the defender's
auxiliary models are.

Both resume: ``fit`` from the job directory's checkpoint, ``fit_clean`` from one in the
``work_dir`` it is given (a cached base model's or surrogate's ``<entry>.partial/``,
``poisonbench.artifacts.partial_dir``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.data.module import PoisonedDataModule
from poisonbench.fitting.trainer import CHECKPOINT_FILE, build_trainer, checkpoint_path, resumed_seconds
from poisonbench.fitting.victim import TrainingHooks, VictimModule

# Without a held-out set, the first images of the training set stand in for the
# evaluation set: the models fitted here are measured elsewhere, or not at all.
STAND_IN_EVAL = 256

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """The trained module, its trainer (for metrics and the world size), the seconds
    ``trainer.fit`` took, how it trained (``training``: what result.json records), and the
    seconds of the interrupted attempts it resumed (their last checkpoint's count; 0 for a
    fresh fit)."""

    module: VictimModule
    trainer: L.Trainer
    seconds: float
    training: dict
    resumed_s: float = 0.0


def fit(model: torch.nn.Module, datamodule: PoisonedDataModule, recipe: dict, *, scenario: str = "scratch",
        hooks: TrainingHooks | None = None, job_dir: Path | None = None, fast_dev_run: bool = False,
        loggers: list | None = None, progress: bool = False, checkpoint: Path | None = None) -> Fitted:
    """Train ``model`` in place with ``recipe`` on ``datamodule``'s training set.

    With a ``job_dir`` (not a fast-dev-run), the training state is checkpointed there
    every epoch, and a checkpoint found there is resumed from: a job killed or requeued
    mid-training continues where it stopped, to the result an uninterrupted run gives
    (bit-identical on one process). Whether an earlier attempt's checkpoint is still
    there is the job directory's business (``training.run.prepare_dir``).
    ``checkpoint``: that file somewhere else (a fit without a job directory).
    """
    module = VictimModule(model, datamodule.num_classes, recipe, scenario=scenario, defense=hooks)
    if checkpoint is None and job_dir is not None:
        checkpoint = checkpoint_path(job_dir)
    ckpt = None if fast_dev_run else checkpoint
    trainer = build_trainer(recipe, job_dir, fast_dev_run=fast_dev_run, extra_loggers=loggers,
                            progress_bar=progress, checkpoint=ckpt)
    resume = ckpt if ckpt is not None and ckpt.is_file() else None
    if resume is not None:
        log.warning("resuming %s from its checkpoint %s", job_dir or "a fit", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    seconds = time.perf_counter() - start
    training = {"precision": str(trainer.precision), "compile": module.compiled,
                "resident_data": datamodule.resident_used}
    return Fitted(module, trainer, seconds, training, resumed_seconds(trainer))


def fit_clean(model: torch.nn.Module, train_set: ImageSet, recipe: dict, *, seed: int,
              eval_set: ImageSet | None = None, scenario: str = "scratch", hooks: TrainingHooks | None = None,
              progress: bool = False, fast_dev_run: bool = False, work_dir: Path | None = None) -> Fitted:
    """Train ``model`` in place on the clean ``train_set`` (measured on ``eval_set``, by
    default the first training images).

    With a ``work_dir``, the training state is checkpointed there every epoch and a
    checkpoint found there is resumed from (as ``fit`` does in a job directory); the
    caller removes it once what the fit makes is kept. Nothing else is written there.
    """
    if eval_set is None:
        eval_set = ImageSet(train_set.images[:STAND_IN_EVAL], train_set.labels[:STAND_IN_EVAL],
                            train_set.classes, train_set.name, train_set.split)
    data = PoisonedDataModule(train_set, eval_set, None, batch_size=int(recipe["batch_size"]), seed=int(seed),
                              resident=recipe.get("resident_data", "auto"))
    return fit(model, data, recipe, scenario=scenario, hooks=hooks, progress=progress, fast_dev_run=fast_dev_run,
               checkpoint=Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None)
