"""``spectral_signatures``: the spectral-signatures filter (Tran et al., NeurIPS 2018).

As the robuster paper runs it (§5.2, Table 2; the authors'
``forest/filtering_defenses.py::_SpectralSignaturesDefense``), on the penultimate
features of the poisoned training set (``poisonbench.defenses.filtering``): per class,
centre the features, take the top right singular vector v of the centred matrix, score
each sample by its squared projection ⟨x − μ, v⟩², and remove the
⌊``overestimation`` · P⌋ highest-scoring samples of the class, where P is the total
poison count of the training set (given, §5.2) and ``overestimation`` = 1.5 (Tran et
al.'s "remove 1.5 times the expected number of poisons"). Every class loses that many
(at most all but one of its samples), whichever class the poisons are in: the filter
does not know which class is attacked, so its recall is high and its precision at most
1 / (1.5 · classes).

v is computed as the top eigenvector of the centred Gram matrix (x − μ)ᵀ(x − μ) in
float64, the same vector as the SVD's, D × D instead of n × D. Deviation: the authors'
code drops a class of one sample from the training set altogether; here it is kept
(one sample has no direction to score).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poisonbench.defenses.base import register_defense
from poisonbench.defenses.filtering import FeatureFilter, class_members
from poisonbench.params import ranged


@dataclass(frozen=True)
class SpectralSignaturesParams:
    overestimation: float = ranged(1.5, 0, None, low_open=True)  # removed per class = ⌊1.5 · poison count⌋ (Tran et al.)


def top_direction_scores(x: np.ndarray) -> np.ndarray:
    """⟨x_i − μ, v⟩² for the top right singular vector v of the centred ``x``."""
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: the last is the top
    return (centred @ vectors[:, -1]) ** 2


@register_defense("spectral_signatures", SpectralSignaturesParams)
class SpectralSignatures(FeatureFilter):
    """Per class, remove the samples with the largest spectral-signature scores."""

    def suspects(self, features: np.ndarray, labels: np.ndarray, *, num_classes: int, poison_count: int,
                 seed: int) -> np.ndarray:
        per_class = int(self.params.overestimation * poison_count)
        flagged = []
        for members in class_members(labels, num_classes):
            take = min(per_class, len(members) - 1)
            if take <= 0:
                continue
            scores = top_direction_scores(features[members])
            flagged.append(members[np.argsort(-scores, kind="stable")[:take]])
        return np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
