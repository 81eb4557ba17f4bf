"""``activation_clustering``: the activation-clustering filter (Chen et al., SafeAI 2019).

On the penultimate features of the poisoned training set
(``poisonbench.defenses.filtering``), per class: reduce the features to ``dims`` = 10
dimensions, split them into two clusters with k-means, and remove the smaller cluster
(robuster §5.2, Table 2; ROBUSTER.md, "Defenses"). Every class loses its smaller
cluster, whether or not it holds poisons: the filter is not told which class is
attacked, and as in the authors' code it does not use Chen et al.'s relative-size or
silhouette test to spare a clean class.

``reduce`` picks the reduction:

- ``ica`` (default): independent component analysis to 10 components, as Chen et al.
  (and IBM ART's ``ActivationDefence``, written by them: scikit-learn's ``FastICA``
  with ``max_iter`` 1000 and ``tol`` 0.005). FastICA stopping at ``max_iter`` without
  converging (features with no independent structure) is not an error: its components
  still go to k-means.
- ``pca``: principal components instead (scikit-learn's ``PCA``).
- ``none``: k-means on the full features, as the robuster authors' code runs it
  (``forest/filtering_defenses.py::_ActivationClustering`` skips the reduction).

k-means: scikit-learn's ``KMeans``, 2 clusters, 10 initialisations (``n_init``, the
default when the authors wrote their code). The job's seed seeds the reduction and
k-means. A class with fewer samples than ``dims`` + 1 is clustered unreduced; of two
equal clusters, the one k-means numbers 0 is removed (as the authors' code does); a
class of one sample is kept.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning

from poisonbench.defenses.base import register_defense
from poisonbench.defenses.filtering import FeatureFilter, class_members
from poisonbench.params import ranged

REDUCTIONS = ("ica", "pca", "none")


@dataclass(frozen=True)
class ActivationClusteringParams:
    reduce: str = "ica"  # ica (Chen et al.), pca, or none (the robuster authors' code)
    dims: int = ranged(10, 1, None)  # dimensions after the reduction (Chen et al.: 10)

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")


def reduced(x: np.ndarray, reduce: str, dims: int, seed: int) -> np.ndarray:
    """``x`` [n, D] reduced to ``dims`` columns (unchanged with ``none`` or when it has no
    more than ``dims`` samples or columns)."""
    if reduce == "none" or dims >= min(x.shape):
        return x
    if reduce == "pca":
        return PCA(n_components=dims, random_state=seed).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # Features of a barely trained network (a fast-dev-run) are near rank-deficient:
        # scikit-learn then suggests SVD whitening on every call; the result stands as is.
        warnings.filterwarnings("ignore", message="There are some small singular values")
        # eigh whitening: the same components as the default SVD's, several times faster
        # when the samples outnumber the features (5,000 × 512: ~4×).
        return FastICA(n_components=dims, whiten="unit-variance", whiten_solver="eigh", max_iter=1000, tol=0.005,
                       random_state=seed).fit_transform(x)


def smaller_cluster(x: np.ndarray, seed: int) -> np.ndarray:
    """Row positions of the smaller of two k-means clusters of ``x`` (ties: cluster 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters
        assignment = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(x)
    sizes = np.bincount(assignment, minlength=2)
    return np.flatnonzero(assignment == (0 if sizes[0] <= sizes[1] else 1))


@register_defense("activation_clustering", ActivationClusteringParams)
class ActivationClustering(FeatureFilter):
    """Per class, remove the smaller of two k-means clusters of the reduced features."""

    def suspects(self, features: np.ndarray, labels: np.ndarray, *, num_classes: int, poison_count: int,
                 seed: int) -> np.ndarray:
        flagged = []
        for members in class_members(labels, num_classes):
            if len(members) < 2:
                continue
            x = reduced(features[members], self.params.reduce, self.params.dims, seed)
            flagged.append(members[smaller_cluster(x, seed)])
        return np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
