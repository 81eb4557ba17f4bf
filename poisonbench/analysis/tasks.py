"""The analysis tasks a table job can run instead of training a victim (``task`` in the
job config): the shortcuts paper's linear-separability probes (Table 1, Table 5) and
the t-SNE figures of perturbations (Figures 2 and 6).

What is analysed is the row's perturbations (poisoned minus clean training images,
labelled with their samples' labels); a row without perturbations (attack ``none``)
analyses the clean images themselves, the paper's "Clean Data" baseline.

``task_params``:
- ``separability``: ``probe`` (linear | two_layer) and any other ``ProbeParams`` field;
  ``projection`` (none | random | pca) and ``dims`` (default: the paper's ratio of
  samples to dimensions, ``features.ratio_dims``) project the unit rows first;
  ``shuffle_labels`` permutes the labels with a fixed seed (the control row: the same
  perturbations without their class structure). The metric is the probe's training
  accuracy in percent (``probe_acc``); ``probe_dims`` is the dimension it was fitted in.
- ``tsne``: ``classes`` (default the first three), ``max_points_per_class`` (500); the
  job writes ``tsne.png`` and its metric is the number of embedded points (``points``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from poisonbench.analysis.features import PROJECTIONS, clean_features, perturbations, ratio_dims
from poisonbench.analysis.probe import ProbeParams, separability
from poisonbench.analysis.tsne import tsne_figure
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError
from poisonbench.params import parse_params

SHUFFLE_SEED = 0  # one permutation for every trial: trials differ in the probe's init only
TASK_KEYS = {
    "separability": ({"probe", "projection", "dims", "shuffle_labels"}
                     | {f.name for f in dataclasses.fields(ProbeParams)} - {"kind"}),
    "tsne": {"classes", "max_points_per_class"},
}


def check_task_params(task: str, params: dict) -> None:
    """``ConfigError`` (one sentence) unless ``params`` are valid ``task_params`` of ``task``:
    checked before any work, at plan time (``poisonbench.resolve``) and in the job."""
    if task == "train":
        return
    unknown = sorted(set(params) - TASK_KEYS.get(task, set()))
    if unknown:
        allowed = ", ".join(sorted(TASK_KEYS.get(task, set())))
        raise ConfigError(f"unknown task_params {', '.join(map(repr, unknown))} for task {task!r}; allowed: {allowed}")
    if task != "separability":
        return
    if params.get("projection", "none") not in PROJECTIONS:
        raise ConfigError(f"task_params.projection must be one of {', '.join(PROJECTIONS)}; "
                          f"got {params['projection']!r}")
    dims = params.get("dims")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise ConfigError(f"task_params.dims must be a positive integer; got {dims!r}")
    if not isinstance(params.get("shuffle_labels", False), bool):
        raise ConfigError(f"task_params.shuffle_labels must be true or false; got {params['shuffle_labels']!r}")
    probe = {k: v for k, v in params.items() if k not in ("probe", "projection", "dims", "shuffle_labels")}
    parse_params(ProbeParams, {"kind": params.get("probe", "linear"), **probe}, f"task {task!r}", "task_params")


def analysed(store: PoisonStore, base: ImageSet) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(features, labels, what) of a row: its perturbations, or clean images without any."""
    if store.index.numel() == 0:
        features, labels = clean_features(base)
        return features, labels, "clean images"
    features, labels = perturbations(store, base)
    return features, labels, "perturbations"


def run_task(config: dict, base: ImageSet, store: PoisonStore, job_dir: Path, seed: int,
             fast: bool = False) -> tuple[dict, dict, dict]:
    """(metrics, timings, files) of the analysis ``config["task"]``."""
    task, params = config["task"], dict(config.get("task_params") or {})
    check_task_params(task, params)
    features, labels, what = analysed(store, base)
    if fast:  # --fast-dev-run: the same path on a handful of samples
        features, labels = features[:64], labels[:64]
    start = time.perf_counter()
    if task == "separability":
        kind = params.pop("probe", "linear")
        projection, dims = params.pop("projection", "none"), params.pop("dims", None)
        if params.pop("shuffle_labels", False):
            labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(SHUFFLE_SEED))]
            what += ", labels shuffled"
        if fast:
            params = {**params, "steps": 1, "iters_per_step": 2}
        probe = ProbeParams(kind=kind, **params)
        acc = separability(features, labels, base.num_classes, kind=kind, seed=seed, params=probe,
                           projection=projection, dims=dims)
        n, d = features.shape
        fitted_dims = d if projection == "none" else min(d, ratio_dims(n, d) if dims is None else dims)
        return ({"probe_acc": acc, "probe_dims": float(fitted_dims)},
                {"analysis_s": round(time.perf_counter() - start, 3)}, {"analysed": what})
    if task == "tsne":
        classes = tuple(params.get("classes", (0, 1, 2)))
        path = job_dir / "tsne.png"
        panels = tsne_figure([(f"{config['attack']}: {what}", features, labels)], path, classes=classes,
                             seed=seed, max_points_per_class=params.get("max_points_per_class", 500),
                             class_names=base.classes, **({"max_iter": 250} if fast else {}))
        points = sum(int(embedding.shape[0]) for embedding, _ in panels)
        return ({"points": float(points)}, {"analysis_s": round(time.perf_counter() - start, 3)},
                {"analysed": what, "figure": str(path.resolve())})
    raise ConfigError(f"unknown task {task!r}; known: train, separability, tsne")
