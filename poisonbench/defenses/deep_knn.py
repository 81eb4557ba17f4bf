"""``deep_knn``: the Deep k-NN filter (Peri et al., ECCV workshops 2020).

On the penultimate features of the poisoned training set
(``poisonbench.defenses.filtering``): find each sample's k nearest neighbours (itself
excluded; Euclidean), and remove it when its label is not the plurality of theirs, i.e.
when another label occurs more often among them than its own (a tie with its own label
keeps it). k = ⌊``overestimation`` · P⌋, P the poison count (given, robuster §5.2), and
``overestimation`` = 2 (Peri et al.: k about twice the number of poisons; the robuster
authors' ``forest/filtering_defenses.py::_DeepKNN``). With k = 0 (no poisons) nothing
is removed.

The neighbours come from a scikit-learn ``NearestNeighbors`` index, queried a block of
rows at a time within a bounded working memory, so memory grows with N · D and one
block × N, never with N × N (the authors' code builds the full distance matrix).
Deviation: the authors keep a point when at least half of its neighbours share its
label (a majority), which removes more than the plurality rule of the paper; this is
the paper's rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.neighbors import NearestNeighbors

from poisonbench.defenses.base import register_defense
from poisonbench.defenses.filtering import FeatureFilter
from poisonbench.params import ranged

QUERY_ROWS = 2048  # rows per neighbour query: the index array of one block is QUERY_ROWS × (k + 1)
WORKING_MEMORY_MB = 256  # scikit-learn's bound on one block of the distance computation


@dataclass(frozen=True)
class DeepKnnParams:
    overestimation: float = ranged(2.0, 0, None, low_open=True)  # k = ⌊2 · poison count⌋ (Peri et al.)


def neighbours_of(index: NearestNeighbors, features: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The k nearest neighbours [len(rows), k] of ``rows``, each row's own index left out
    (an exact duplicate can take its place among the k + 1 found: then the farthest goes)."""
    with sklearn.config_context(working_memory=WORKING_MEMORY_MB):
        found = index.kneighbors(features[rows], n_neighbors=k + 1, return_distance=False)
    drop = found == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    return found[~drop].reshape(len(rows), k)


def outvoted(neighbour_labels: np.ndarray, own: np.ndarray, num_classes: int) -> np.ndarray:
    """Whether another label occurs more often than ``own`` in each row of ``neighbour_labels``."""
    n = len(own)
    counts = np.bincount((neighbour_labels + num_classes * np.arange(n)[:, None]).ravel(),
                         minlength=n * num_classes).reshape(n, num_classes)
    return counts[np.arange(n), own] < counts.max(axis=1)


@register_defense("deep_knn", DeepKnnParams)
class DeepKnn(FeatureFilter):
    """Remove the samples whose label loses the vote of their k nearest neighbours."""

    def suspects(self, features: np.ndarray, labels: np.ndarray, *, num_classes: int, poison_count: int,
                 seed: int) -> np.ndarray:
        n = len(labels)
        k = min(int(self.params.overestimation * poison_count), n - 1)
        if k < 1:
            return np.zeros(0, dtype=np.int64)
        features = np.ascontiguousarray(features, dtype=np.float32)
        index = NearestNeighbors(n_neighbors=k + 1).fit(features)
        flagged = []
        for start in range(0, n, QUERY_ROWS):
            rows = np.arange(start, min(start + QUERY_ROWS, n))
            near = neighbours_of(index, features, rows, k)
            flagged.append(rows[outvoted(labels[near], labels[rows], num_classes)])
        return np.concatenate(flagged)
