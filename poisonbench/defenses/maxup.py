"""``maxup``: train each sample on the worst of several Cutout copies (robuster Figure 3).

MaxUp (Gong et al. 2020) with Cutout (DeVries & Taylor 2017) as the base augmentation,
the robuster paper's setting (App. C.3: "We use Cutout as a base augmentation for
maxup, and select the worst-case augmentation from four examples"). Per augmented
batch of B images:

1. ``copies`` (4) Cutout copies of the batch; each copy has one box for the whole batch
   (as the authors' ``Cutout``), of side ⌊``cutout``·side⌋ around a uniformly random
   centre, clipped to the image, filled with the model's normalisation mean (zero in
   normalised units, as DeVries & Taylor and the authors' code fill it);
2. per sample, the cross-entropy of each copy under the current model, in the
   model's own mode and without gradients; BatchNorm's running statistics are put
   back afterwards, so only the training forward moves them, as in an undefended step;
3. the step trains on each sample's worst copy: min over θ of the mean over samples of
   the max over copies, Gong et al.'s objective, whose gradient is that of the chosen
   copies.

Not the authors' ``Maxup``: theirs averages the loss over all copies (its worst-case
branch only runs for mixing augmentations with a λ, and its reshape pairs a sample with
the wrong copies), and its Cutout writes into the batch in place, so the four copies
accumulate boxes. As theirs, the first ``warmup_epochs`` (5 of the paper's 40) train
undefended.

``cutout`` = 0.5: 16×16 boxes at 32×32, DeVries & Taylor's CIFAR-10 size and what the
authors' 0.66 area factor aims at ("sqrt(1 − 0.66) · 28 ≈ 16"). The box centres come
from a stream seeded by (``seed``, the DDP rank, the number of batches this defense has
handled). Cost: ``copies`` extra forward passes without gradients per step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from poisonbench.defenses.base import Defense, check_class_labels, register_defense
from poisonbench.defenses.randomness import BatchDraws, numpy_stream
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

NAME = "maxup"


@dataclass(frozen=True)
class MaxupParams:
    copies: int = ranged(4, 1, None)  # augmented copies per sample (App. C.3: four)
    cutout: float = ranged(0.5, 0, 1, low_open=True)  # Cutout box side / image side (16 px at 32)
    seed: int = ranged(0, 0, None)  # of the box centres
    warmup_epochs: int = ranged(5, 0, None)  # undefended epochs first (the authors' warmup_epochs)


def cutout_copies(images: torch.Tensor, copies: int, side: float, fill: torch.Tensor, rng) -> torch.Tensor:
    """[copies, B, C, H, W]: each a Cutout of ``images`` (never modified) with one box per copy."""
    height, width = images.shape[-2:]
    cut_h, cut_w = int(height * side), int(width * side)
    out = images.unsqueeze(0).repeat(copies, *([1] * images.dim()))
    for k in range(copies):
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, width)
        out[k, :, :, top:bottom, left:right] = fill
    return out


@contextlib.contextmanager
def running_statistics_kept(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block forward passes may update buffers (BatchNorm's running mean,
    variance and count); afterwards every buffer holds its old value again."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def worst_copies(model: torch.nn.Module, copies: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: per sample, the index of the copy with the highest cross-entropy (ties: the first)."""
    with torch.no_grad(), running_statistics_kept(model):
        losses = torch.stack([F.cross_entropy(model(copy), labels, reduction="none").float() for copy in copies])
    return losses.argmax(dim=0)


def fill_value(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pixel that is zero after the model's normalisation (its mean), else black."""
    mean = getattr(getattr(model, "normalize", None), "mean", None)
    if isinstance(mean, torch.Tensor):
        return mean.detach().view(-1, 1, 1).to(device=images.device, dtype=images.dtype)
    return torch.zeros((), device=images.device, dtype=images.dtype)


@register_defense(NAME, MaxupParams)
class Maxup(BatchDraws, Defense):
    """Each sample trains on the worst of ``copies`` Cutout copies, after the warm-up."""

    epoch = 0

    def on_train_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_class_labels(NAME, labels)
        params = self.params
        if self.epoch < params.warmup_epochs:
            return images, labels
        rng = numpy_stream(*self.batch_keys(NAME, params.seed))
        copies = cutout_copies(images, params.copies, params.cutout, fill_value(model, images), rng)
        worst = worst_copies(model, copies, labels)
        chosen = copies[worst, torch.arange(images.shape[0], device=images.device)]
        if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            chosen = chosen.contiguous(memory_format=torch.channels_last)
        return chosen, labels
