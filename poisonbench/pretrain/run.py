"""``pretrain``: pre-train a backbone on auxiliary data and write it as safetensors.

What ``poisonbench pretrain`` runs. The backbone file is an ImageClassifier state dict
(keys ``backbone.*`` and ``head.*``; normalization is config, not weights) with a
freshly initialised head sized for the defended dataset, so it loads into
``build_model(model, num_classes, **model_params)`` with ``load_state_dict(strict=True)``
and through the models' ``weights`` parameter (poisonbench.models.weights). The
safetensors header records how it was made: method, defended and auxiliary data
(with the auxiliary set's fingerprint), model, hyperparameters, seed, versions, and the
seconds of training over every attempt (``train_s``; ``resumed_s`` of them spent by
interrupted attempts).

Pre-training resumes: its state is checkpointed every epoch into ``<out>.partial/``
(with ``key.json``, what it is the state of: a run with other settings starts afresh),
a killed run continues there on the next call, and the folder goes once the backbone
is written. The training and the write hold an ``flock`` on ``<out>.lock``
(``poisonbench.artifacts.lock``), so two processes never train into one file at once.
(Inside a process group of several, each rank pre-trains at once without either, as
before: ``fitting.trainer.fits_alone``.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from safetensors.torch import save_file

from poisonbench import __version__, files
from poisonbench.artifacts import lock, partial_dir
from poisonbench.data import load_imageset
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier
from poisonbench.pretrain import simclr, supervised
from poisonbench.pretrain.auxiliary import auxiliary_dataset
from poisonbench.fitting.trainer import fits_alone, quiet_lightning

METHODS = ("simclr", "supervised")

# The model a dataset's recipe is measured with, used when no model is named: the cpu
# profile's victim for digits (configs/profiles/cpu.yaml).
DEFAULT_MODELS: dict[str, tuple[str, dict]] = {"digits": ("small_cnn", {"pool": 1})}

FILE_FORMAT = "poisonbench-backbone/1"


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    method: str
    dataset: str
    aux_dataset: str
    aux_split: str
    aux_size: int
    model: str
    model_params: dict
    params: dict
    metrics: dict
    seconds: float


def default_path(dataset: str, method: str, model: str) -> Path:
    """``<home>/backbones/<dataset>_<method>_<model>.safetensors`` (":" and "/" of a
    model name such as ``timm:resnet152`` become "-")."""
    safe_model = model.replace(":", "-").replace("/", "-")
    return files.home() / "backbones" / f"{dataset}_{method}_{safe_model}.safetensors"


def save_backbone(model: ImageClassifier, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write ``model.state_dict()`` (on the CPU) to ``path`` atomically; returns the path."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    with files.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FILE_FORMAT, **metadata})
    return path


def _work_dir(path: Path, settings: dict) -> Path:
    """``<path>.partial/``, holding the checkpoint of an interrupted pre-training with
    these ``settings`` (``key.json``); the state of other settings is removed first."""
    work = partial_dir(path)
    key = work / "key.json"
    try:
        same = json.loads(key.read_text()) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        same = False
    if not same:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        files.write_json(key, settings)
    return work


def recipe(method: str, dataset: str, epochs: int | None = None, batch_size: int | None = None):
    """The hyperparameters of ``method`` for ``dataset``: its cpu recipe where one exists
    (digits), else the paper defaults; ``epochs`` and ``batch_size`` override them."""
    if method not in METHODS:
        raise ConfigError(f"unknown pre-training method {method!r}; known: {', '.join(METHODS)}")
    module = simclr if method == "simclr" else supervised
    default = simclr.SimCLRParams() if method == "simclr" else supervised.SupervisedParams()
    params = module.RECIPES.get(dataset, default)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
        params = params.with_epochs(epochs)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        params = replace(params, batch_size=batch_size)
    return params


def pretrain(method: str, dataset: str, *, model: str | None = None, model_params: dict | None = None,
             epochs: int | None = None, batch_size: int | None = None, seed: int = 0,
             out: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
             aux: tuple[str, str] | None = None, accelerator: str = "auto",
             on_start: Callable[[str], None] | None = None, if_missing: bool = False) -> PretrainResult | None:
    """Pre-train a ``model`` backbone with ``method`` on the auxiliary data of ``dataset``
    (the dataset to be defended) and write it to ``out`` (default ``default_path``).

    Without ``model`` the dataset's default model is used (digits: small_cnn with
    ``pool: 1``); with it, ``model_params`` are exactly the given ones. ``on_start``
    receives a sentence naming what is trained on what, once every input is checked.
    ``if_missing``: a file found at ``out`` once the lock is held (another process wrote
    it meanwhile) is kept, and the answer is None.
    """
    params = recipe(method, dataset, epochs, batch_size)
    aux_name, aux_split = auxiliary_dataset(dataset, aux)
    if model is None:
        if dataset not in DEFAULT_MODELS:
            raise ConfigError(f"dataset {dataset!r} has no default model for pre-training; name one with --model")
        model, default_params = DEFAULT_MODELS[dataset]
        model_params = {**default_params, **(model_params or {})}
    model_params = dict(model_params or {})
    build_model(model, 1, **model_params)  # a bad model or parameter fails before any data is read

    aux_set = load_imageset(aux_name, data_root, aux_split)
    # The head of the saved file is sized for the defended dataset; its test split is
    # the cheapest place to read the class count from.
    num_classes = aux_set.num_classes if aux_name == dataset else load_imageset(dataset, data_root, "test").num_classes
    path = Path(out) if out is not None else default_path(dataset, method, model)
    # In a process group of several (a DDP job's rank), every rank pre-trains at once, as before.
    alone = fits_alone({"devices": 1, "accelerator": accelerator})
    with lock(path) if alone else contextlib.nullcontext():
        if if_missing and path.is_file():
            return None
        if on_start is not None:
            on_start(f"pre-training {model} with {method} on {aux_name} {aux_split} ({len(aux_set)} images, "
                     f"{params.epochs} epoch{'s' * (params.epochs != 1)}), the auxiliary data for {dataset}")
        settings = {"method": method, "dataset": dataset, "aux_dataset": aux_name, "aux_split": aux_split,
                    "aux_fingerprint": aux_set.fingerprint, "model": model, "model_params": model_params,
                    "num_classes": num_classes, "params": params.to_dict(), "seed": seed, "accelerator": accelerator}
        work = _work_dir(path, settings) if alone else None
        quiet_lightning()
        L.seed_everything(seed, workers=True, verbose=False)
        start = time.perf_counter()
        if method == "simclr":
            net = build_model(model, num_classes, **model_params)
            metrics, resumed_s = simclr.train_simclr(net, aux_set, params, seed=seed, accelerator=accelerator,
                                                     work_dir=work)
        else:
            net = build_model(model, aux_set.num_classes, **model_params)
            # Another dataset's test split measures the backbone on unseen images; when aux is
            # a split of the defended dataset its test split is kept out of pre-training.
            eval_set = load_imageset(aux_name, data_root, "test") if aux_name != dataset else None
            metrics, resumed_s = supervised.train_supervised(net, aux_set, params, seed=seed, eval_set=eval_set,
                                                             accelerator=accelerator, work_dir=work)
            metrics["eval_set"] = (f"{aux_name} test" if eval_set is not None
                                   else f"{aux_name} {aux_split} (training data)")
        seconds = resumed_s + time.perf_counter() - start
        net.reset_head(num_classes)  # only the backbone is pre-trained; the head starts fresh

        meta = {
            "method": method, "dataset": dataset, "aux_dataset": aux_name, "aux_split": aux_split,
            "aux_fingerprint": aux_set.fingerprint, "aux_size": str(len(aux_set)), "model": model,
            "model_params": json.dumps(model_params, sort_keys=True), "num_classes": str(num_classes),
            "params": json.dumps(params.to_dict(), sort_keys=True), "seed": str(seed),
            "metrics": json.dumps(metrics, sort_keys=True), "train_s": f"{seconds:.3f}",
            "resumed_s": f"{resumed_s:.3f}",
            "poisonbench_version": __version__, "torch_version": torch.__version__,
        }
        save_backbone(net, path, meta)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return PretrainResult(path=path, method=method, dataset=dataset, aux_dataset=aux_name, aux_split=aux_split,
                          aux_size=len(aux_set), model=model, model_params=model_params,
                          params=params.to_dict(), metrics=metrics, seconds=seconds)
