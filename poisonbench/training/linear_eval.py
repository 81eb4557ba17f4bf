"""The ``linear_eval`` scenario: a linear classifier fitted on frozen features.

The shortcuts paper's "Pre-train (Linear eval.)" (Yu et al., 2022, §4, Table 4;
Appendix E: "we first extract the features of all samples and train linear
classifiers on the extracted features. The linear classifiers are trained with the
L-BFGS optimizer for 50 steps"). The features are the backbone's penultimate
outputs (``model.features``) of the (poisoned) training set and the clean test set,
computed once, batched on the device, in eval mode and without gradients; images go
in as floats in [0, 1], so the model's ``Normalize`` layer does any resize (bicubic to
224×224 for the ImageNet extractors of Appendix E). The classifier is the L-BFGS
probe of ``poisonbench.analysis.probe`` with ``kind: linear, steps: 50``.

Features are cached by content under ``<home>/features/<sha256>.safetensors``; the key
hashes the backbone's architecture (its ``repr``, which names every layer and the
normalisation) and weights and buffers, the normalisation statistics and image size,
and the images' bytes. Labels are not part of the key: features do not depend on them.
The classifier ``head`` is not either, so a re-initialised head still hits the cache.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poisonbench.analysis.probe import ProbeParams, fit_lbfgs
from poisonbench.data.augment import to_float
from poisonbench.data.imageset import ImageSet
from poisonbench.files import atomic_path, home
from poisonbench.models.classifier import ImageClassifier

CACHE_FORMAT = "1"  # bump when what a cached file holds changes
EXTRACT_BATCH = 256  # images per forward pass: bounded memory at 224×224 on one GPU
# Appendix E: "The linear classifiers are trained with the L-BFGS optimizer for 50 steps."
LINEAR_EVAL_PROBE = ProbeParams(kind="linear", steps=50)


@dataclass
class Features:
    """Feature vectors float32 [N, D] on the CPU, where they are cached, and whether
    they came from the cache."""

    values: torch.Tensor
    path: Path
    cached: bool


@dataclass
class LinearEvalResult:
    test_acc: float  # percent, clean test set
    train_acc: float  # percent, the (poisoned) training set the classifier was fitted on
    extract_s: float
    fit_s: float
    cache_hits: int  # of the two feature sets (train, test)


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def feature_key(model: ImageClassifier, images: torch.Tensor) -> str:
    """sha256 of what the features of ``images`` under ``model`` depend on."""
    h = hashlib.sha256()
    h.update(f"poisonbench-features|{CACHE_FORMAT}|".encode())
    h.update(repr(model.normalize).encode())
    h.update(repr(model.backbone).encode())
    h.update(f"image_size={model.normalize.size}|".encode())
    # mean/std are non-persistent buffers (not in state_dict), hashed in full precision here.
    _update_tensor(h, "normalize.mean", model.normalize.mean)
    _update_tensor(h, "normalize.std", model.normalize.std)
    for name, tensor in sorted(model.backbone.state_dict().items()):
        _update_tensor(h, "backbone." + name, tensor)
    _update_tensor(h, "images", images)
    return h.hexdigest()


def cache_path(key: str) -> Path:
    return home() / "features" / f"{key}.safetensors"


@torch.no_grad()
def _extract(model: ImageClassifier, images: torch.Tensor, device: torch.device,
             batch_size: int) -> torch.Tensor:
    out = []
    for batch in torch.split(images, batch_size):
        out.append(model.features(to_float(batch.to(device))).float().cpu())
    if not out:
        return torch.zeros(0, model.feature_dim)
    return torch.cat(out)


def extract_features(model: ImageClassifier, images: torch.Tensor, device: str | torch.device = "cpu",
                     batch_size: int = EXTRACT_BATCH, cache: bool = True) -> Features:
    """``model.features`` of uint8 ``images`` N×3×H×W, from the cache or computed and cached.

    The model is moved to ``device`` and put in eval mode for the extraction; its
    previous training mode is restored afterwards.
    """
    device = torch.device(device)
    path = cache_path(feature_key(model, images))
    if cache and path.is_file():
        try:
            values = load_file(str(path))["features"]
            if values.shape[0] == images.shape[0]:
                return Features(values, path, cached=True)
        except (SafetensorError, KeyError, OSError):
            pass  # a damaged cache file is recomputed and replaced below
    was_training = model.training
    model.to(device).eval()
    try:
        values = _extract(model, images, device, batch_size)
    finally:
        model.train(was_training)
    if cache:
        with atomic_path(path) as tmp:
            save_file({"features": values.contiguous()}, str(tmp), metadata={"format": CACHE_FORMAT})
    return Features(values, path, cached=False)


def linear_eval(model: ImageClassifier, train: ImageSet, test: ImageSet, *, seed: int,
                device: str | torch.device = "cpu", probe: ProbeParams = LINEAR_EVAL_PROBE,
                cache: bool = True) -> LinearEvalResult:
    """Fit a linear classifier on ``model``'s features of ``train``; measure it on ``test``."""
    start = time.perf_counter()
    train_features = extract_features(model, train.images, device, cache=cache)
    test_features = extract_features(model, test.images, device, cache=cache)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    classifier = fit_lbfgs(train_features.values, train.labels, train.num_classes, probe, seed, device)
    test_acc = classifier.accuracy(test_features.values, test.labels)
    fit_s = time.perf_counter() - start
    return LinearEvalResult(test_acc=float(test_acc), train_acc=float(classifier.train_acc),
                            extract_s=extract_s, fit_s=fit_s,
                            cache_hits=int(train_features.cached) + int(test_features.cached))
