"""What the training-set filters share: the features they look at, and the filter shape.

The robuster paper's filters (§5.2, Table 2, Figure 3; the authors'
``forest/filtering_defenses.py``) judge each training sample by its penultimate
features (``model.features``) of the un-augmented poisoned training set, from

- the base model, when the job starts from one (fine-tuning, transfer): the model the
  defender already holds, passed to the hook as ``base_model``;
- otherwise (from scratch) a model first trained on the poisoned set itself, with the
  job's model and recipe (``train``; a smoke fit under ``fast_dev_run``) and the job's
  seed, undefended. It is trained by the shared fitting code
  (``poisonbench.fitting.base_model``, which fits a network on an image set with a
  recipe and caches it) and cached as an artifact under ``<home>/base_models/``, keyed by
  the poisoned set's content (fingerprint of its images and labels), the model and its
  parameters, the recipe and the seed: the three filters of one trial, and every rerun,
  train it once.

The features themselves are cached too (``poisonbench.fitting.features``, keyed by the
weights and the images). The victim is then trained on what the filter keeps.

The exact poison count is given to the filter (§5.2: "we give the defenses the exact
number of poisons"), never which samples they are. A filter subclasses
``FeatureFilter`` and writes ``suspects``: from features, labels and that count, the
indices it removes. ``suspects`` is plain NumPy on the CPU, so the speed bench times it
on random features without a model.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.defenses.base import Defense
from poisonbench.fitting.base_model import base_model, base_model_config
from poisonbench.fitting.features import extract_features
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier


def scratch_model(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, seed: int,
                  config: Mapping) -> ImageClassifier:
    """The job's model trained from scratch on the poisoned set with the job's recipe and
    ``seed`` (cached: made once per poisoned set, model, recipe and seed)."""
    poisoned = ImageSet(images, labels, [str(c) for c in range(num_classes)], name=str(config["dataset"]),
                        split="train+poisoned")
    params = dict(config.get("model_params") or {})
    recipe = dict(config["train"])
    if config.get("fast_dev_run"):  # a smoke model, cached apart from the real one
        recipe["fast_dev_run"] = True
    settings = base_model_config({"seed": int(seed)}, "a filter's model")  # undefended, trained here
    model, _, _ = base_model(lambda: build_model(config["model"], num_classes, **params), poisoned,
                             config["model"], params, recipe, settings)
    return model


def penultimate_features(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, seed: int,
                         device: torch.device, config: Mapping,
                         base_model: Callable[[], ImageClassifier] | None = None) -> torch.Tensor:
    """Float32 [N, D] features of the un-augmented ``images``: from ``base_model()`` when
    given, else from ``scratch_model``."""
    if base_model is not None:
        model = base_model()
    else:
        model = scratch_model(images, labels, num_classes=num_classes, seed=seed, config=config)
    return extract_features(model, images, device).values


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """The indices of each class's samples, in order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


class FeatureFilter(Defense):
    """A defense that removes the training samples ``suspects`` flags from their features."""

    def filter_training_set(self, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                            seed: int, device: torch.device, config: Mapping, poison_count: int = 0,
                            base_model: Callable[[], ImageClassifier] | None = None) -> torch.Tensor:
        features = penultimate_features(images, labels, num_classes=num_classes, seed=seed, device=device,
                                        config=config, base_model=base_model)
        flagged = self.suspects(features.numpy(), labels.numpy(), num_classes=num_classes,
                                poison_count=int(poison_count), seed=int(seed))
        keep = np.ones(len(labels), dtype=bool)
        keep[flagged] = False
        return torch.from_numpy(np.flatnonzero(keep)).to(torch.int64)

    def suspects(self, features: np.ndarray, labels: np.ndarray, *, num_classes: int, poison_count: int,
                 seed: int) -> np.ndarray:
        """Indices (int64) of the samples to remove, from float32 ``features`` [N, D] and
        int64 ``labels`` [N]."""
        raise NotImplementedError
