"""``cutmix``: CutMix as a defense against poisoning (Borgnia et al. 2020; robuster Figure 3).

CutMix (Yun et al. 2019) as the robuster paper's authors ran it
(``forest/data/mixing_data_augmentations.py``, ``Cutmix``), per augmented batch:

1. with probability ``prob`` (½: "the original cutmix modification, activating the
   augmentation randomly 50% of the time") the batch is mixed, else left as it is;
2. λ ~ Beta(α, α); one box for the whole batch, of sides ⌊H·√(1 − λ)⌋ × ⌊W·√(1 − λ)⌋
   around a uniformly random centre, clipped to the image;
3. inside the box every image takes the pixels of the image at its place in a random
   permutation of the batch;
4. λ is recomputed as 1 − (box area)/(H·W) and the loss is λ·CE(y) + (1 − λ)·CE(y_perm),
   returned as soft labels λ·onehot(y) + (1 − λ)·onehot(y_perm) (cross-entropy is
   linear in its target, so the two are the same loss).

α: the authors' ``--mixing_strength`` defaults to none (their mixer then divides by
zero); the paper does not print it. α = 1 (λ uniform) is CutMix's own CIFAR setting
(Yun et al. 2019, §4.1) and the default of the authors' ``Cutmix`` class.

The draws come from streams seeded by (``seed``, the DDP rank, the number of batches
this defense has handled). Cost: one gather of a box per batch; the loss with soft
labels costs the same as with class indices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from poisonbench.defenses.base import Defense, check_class_labels, register_defense
from poisonbench.defenses.randomness import BatchDraws, numpy_stream
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

NAME = "cutmix"


@dataclass(frozen=True)
class CutMixParams:
    alpha: float = ranged(1.0, 0, None, low_open=True)  # λ ~ Beta(α, α); 1: Yun et al.'s CIFAR value
    prob: float = ranged(0.5, 0, 1)  # share of batches mixed (the authors' code: ½)
    seed: int = ranged(0, 0, None)  # of the per-batch draws


def cut_box(height: int, width: int, lam: float, rng) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of sides ⌊side·√(1 − λ)⌋ around a uniformly
    random centre, clipped to the image (as Yun et al.'s ``rand_bbox``)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


@register_defense(NAME, CutMixParams)
class CutMix(BatchDraws, Defense):
    """Half the batches get one box of another image of the batch, with mixed labels."""

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_class_labels(NAME, labels)
        params = self.params
        rng = numpy_stream(*self.batch_keys(NAME, params.seed))
        if rng.random() >= params.prob:
            return images, labels
        lam = float(rng.beta(params.alpha, params.alpha))
        perm = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
        height, width = images.shape[-2:]
        top, bottom, left, right = cut_box(height, width, lam, rng)
        out = images.clone()
        out[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        classes = model.num_classes
        soft = lam * F.one_hot(labels, classes).float() + (1.0 - lam) * F.one_hot(labels[perm], classes).float()
        return out, soft
