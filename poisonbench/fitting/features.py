"""Penultimate features of a backbone (``model.features``), extracted once and cached.

Features are computed batched on the device, in eval mode and without gradients; images
go in as floats in [0, 1], so the model's ``Normalize`` layer does any resize (bicubic to
224×224 for the ImageNet extractors of the shortcuts paper's Appendix E). They are
cached as an artifact (``poisonbench.artifacts``) under ``<home>/features/``; the key is
a digest of the backbone's architecture (its ``repr``, which names every layer and the
normalisation), weights and buffers, the normalisation statistics and image size, and
the images' bytes. Labels are not part of the key (features do not depend on them), nor
is the classifier head, so a re-initialised head still hits the cache.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poisonbench.artifacts import Artifact, CorruptArtifact, get_or_make
from poisonbench.data.augment import to_float
from poisonbench.models.classifier import ImageClassifier

CACHE_FORMAT = "1"  # bump when what a cached file holds changes
EXTRACT_BATCH = 256  # images per forward pass: bounded memory at 224×224 on one GPU


@dataclass
class Features:
    """Feature vectors float32 [N, D] on the CPU, where they are cached, and whether
    they came from the cache."""

    values: torch.Tensor
    path: Path | None
    cached: bool


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


def feature_artifact(model: ImageClassifier, images: torch.Tensor) -> Artifact:
    return Artifact("features", {"format": CACHE_FORMAT, "digest": feature_key(model, images)})


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

    def make(_path: Path | None = None) -> torch.Tensor:
        was_training = model.training
        model.to(device).eval()
        try:
            return _extract(model, images, device, batch_size)
        finally:
            model.train(was_training)

    if not cache:
        return Features(make(), None, cached=False)

    def load(path: Path) -> torch.Tensor:
        values = load_file(str(path)).get("features")
        if values is None or values.ndim != 2 or values.shape[0] != images.shape[0]:
            raise CorruptArtifact("it does not hold one feature vector per image")
        return values

    made = get_or_make(feature_artifact(model, images), load=load, make=make,
                       save=lambda values, tmp: save_file({"features": values.contiguous()}, str(tmp),
                                                          metadata={"format": CACHE_FORMAT}))
    return Features(made.value, made.path, made.cached)
