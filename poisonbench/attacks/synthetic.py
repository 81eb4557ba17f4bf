"""``synthetic``: linearly separable synthetic perturbations, Algorithms 1 and 2 of
*Indiscriminate Poisoning Attacks Are Shortcuts* (Yu et al., shortcuts paper, §3.1,
Appendix A).

Algorithm 2 (Guyon 2003, scikit-learn's ``make_classification``) draws one Gaussian
cluster per class around a vertex of a hypercube with a random covariance per class,
in d = 3·(s/p)² dimensions. Algorithm 1 duplicates each dimension into a p×p patch, so
the perturbation keeps local correlation and survives crops and flips (Appendix F).
Each perturbation is scaled onto the ℓ2 sphere of radius sqrt(3·s·s)·ε' (§3.2) and
added to the image of its class. ``patch: 1`` is Algorithm 2 alone (Figure 7's
"initial"). ``class_sep`` 10 is the value of the authors' code; the paper only asks for
a "reasonably large" hypercube (measured while planning: class_sep 1 has no effect).

Speed: the ℓ2 scaling and rounding happen in the d-dimensional space (an image norm is
p times the sample norm), and the p×p duplication is a broadcast view added in int16,
so no float image-sized tensor is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import make_classification

from poisonbench.attacks.base import params_dict, register_attack
from poisonbench.attacks.quantize import add_levels, round_l2
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError
from poisonbench.params import ranged


@dataclass(frozen=True)
class SyntheticParams:
    eps: float = ranged(6 / 255, 0, 1, low_open=True)  # ε' in pixel units; ℓ2 radius = sqrt(3·H·W)·ε' (§3.2)
    patch: int = ranged(8, 1, None)  # p of Algorithm 1 (§3.2: "The patch size ... is set as 8"); 1 = Algorithm 2 alone
    class_sep: float = ranged(10.0, 0, None, low_open=True)  # hypercube half side; the authors' code uses 10

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units), got {self.eps}")
        if self.patch < 1:
            raise ValueError(f"patch must be a positive integer, got {self.patch}")
        if self.class_sep <= 0:
            raise ValueError(f"class_sep must be positive, got {self.class_sep}")


def sample_points(counts: list[int], dim: int, class_sep: float, seed: int) -> list[np.ndarray]:
    """Algorithm 2: for each class i, at least counts[i] points in R^dim labelled i.

    make_classification splits n_samples evenly over classes, so it is asked for
    k·max(counts) points: enough for every class even when sizes are uneven (SVHN).
    """
    k = len(counts)
    points, labels = make_classification(
        n_samples=k * max(counts), n_features=dim, n_informative=dim, n_redundant=0,
        n_repeated=0, n_classes=k, n_clusters_per_class=1, class_sep=class_sep,
        flip_y=0.0, hypercube=True, shuffle=True, random_state=seed,
    )
    points = points.astype(np.float32)
    return [points[labels == i][:n] for i, n in enumerate(counts)]


@register_attack("synthetic", SyntheticParams, norm="l2")
def craft(imageset: ImageSet, params: SyntheticParams, seed: int, device: torch.device) -> PoisonStore:
    """Synthetic shortcut perturbations for every training image (Algorithms 1 + 2)."""
    n, c, h, w = imageset.images.shape
    p = params.patch
    if h % p or w % p:
        raise ConfigError(f"synthetic patch {p} must divide the image size {h}×{w}")
    gh, gw = h // p, w // p
    labels = imageset.labels
    counts = torch.bincount(labels, minlength=imageset.num_classes).tolist()
    present = [i for i, cnt in enumerate(counts) if cnt]
    if len(present) > 2 ** (c * gh * gw):  # one hypercube vertex per class
        raise ConfigError(f"synthetic patch {p} leaves {c * gh * gw} dimensions, too few for {len(present)} classes")
    per_class = sample_points([counts[i] for i in present], c * gh * gw, params.class_sep, seed)

    # Rows in the order of the images; the authors' layout is (row, col, channel).
    points = torch.empty(n, gh, gw, c)
    for cls, block in zip(present, per_class):
        points[labels == cls] = torch.from_numpy(block).view(-1, gh, gw, c)
    points = points.permute(0, 3, 1, 2).contiguous()  # n × c × gh × gw

    radius = math.sqrt(c * h * w) * params.eps
    norms = points.flatten(1).norm(dim=1).clamp_min(1e-12) * p  # image norm after duplication
    delta = points * (radius / norms).view(n, 1, 1, 1)
    levels = round_l2(delta, radius, weight=p * p)

    # Algorithm 1 as a broadcast: one image row of a patch band (c, gh, 1, w) holds
    # each value p times; it is added to the p rows of its band.
    rows = levels.view(n, c, gh, 1, gw, 1).expand(n, c, gh, 1, gw, p).reshape(n, c, gh, 1, w)
    images = add_levels(imageset.images.view(n, c, gh, p, w), rows).view(n, c, h, w)
    return PoisonStore(
        index=torch.arange(n, dtype=torch.int64), images=images, labels=labels.clone(),
        attack="synthetic", params=params_dict(params), dataset=imageset.name,
        base_fingerprint=imageset.fingerprint, norm="l2", eps=radius, seed=seed,
    )
