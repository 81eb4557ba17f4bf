"""Flat feature matrices for the shortcuts paper's analyses (Yu et al. 2022,
"Indiscriminate Poisoning Attacks Are Shortcuts", Sections 2.2-2.3 and Appendix E).

The paper studies the perturbations δ = poisoned − clean of an attack, labelled with
the labels of the samples they were added to, "flattened into 1-dimensional vectors
and normalized to unit norm" (Appendix E); the "Clean Data" row of Table 1 and the
clean panel of Figure 2 use the clean images the same way. This module builds those
matrices; ``probe`` fits them and ``tsne`` draws them.
"""
from __future__ import annotations

import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.errors import ConfigError, PoisonStoreError

# Rows converted per chunk: bounds the int16/float temporaries to a few hundred MB
# even for the 50,000 × 3,072 perturbations of a whole CIFAR-10 store.
CHUNK = 4096


def perturbations(store: PoisonStore, base: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's perturbations, float32 [M, C·H·W] in pixel units (1.0 = 255 levels),
    and their labels int64 [M] (the store's labels, i.e. those of the targets)."""
    if store.base_fingerprint != base.fingerprint:
        raise PoisonStoreError(
            f"the store was made for {store.dataset} (fingerprint {store.base_fingerprint[:12]}) "
            f"but the base given is {base.name or 'a dataset'} (fingerprint {base.fingerprint[:12]})"
        )
    m = int(store.index.numel())
    d = int(base.images[0].numel())
    if tuple(store.images.shape) != (m, *base.images.shape[1:]):
        raise PoisonStoreError(
            f"store images must be [{m}, {', '.join(map(str, base.images.shape[1:]))}] to match the base, "
            f"got {list(store.images.shape)}"
        )
    out = torch.empty(m, d, dtype=torch.float32)
    for rows in torch.split(torch.arange(m), CHUNK):
        # int16 difference first: exact for uint8, so the float rows hold whole levels / 255.
        delta = store.images[rows].to(torch.int16) - base.images[store.index[rows]].to(torch.int16)
        out[rows] = delta.flatten(1).to(torch.float32) / 255
    return out, store.labels.clone()


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, D] with every row scaled to unit ℓ2 norm; all-zero rows stay zero
    (an unmodified sample has no direction, and NaN would poison the fit)."""
    if x.ndim != 2:
        x = x.flatten(1)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def clean_features(base: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean images as float32 [N, C·H·W] in [0, 1] and their labels: the "Clean
    Data" baseline of Table 1 and Figure 2."""
    out = torch.empty(len(base), int(base.images[0].numel()), dtype=torch.float32)
    for rows in torch.split(torch.arange(len(base)), CHUNK):
        out[rows] = base.images[rows].flatten(1).to(torch.float32) / 255
    return out, base.labels.clone()


# The paper's ratio of samples to dimensions: CIFAR-10's 50,000 training images of
# 3,072 dimensions. With fewer samples than dimensions every labelling is linearly
# separable (900 digits in 3,072 dimensions: clean images and noise with shuffled labels
# both fit 100 %), so the probe would measure nothing; projecting to N·3,072/50,000
# dimensions gives a small set the paper's headroom. CIFAR-10 itself keeps all 3,072.
PAPER_SAMPLES, PAPER_DIMS = 50_000, 3_072
PROJECTIONS = ("none", "random", "pca")


def ratio_dims(n: int, d: int) -> int:
    """Dimensions that give ``n`` samples the paper's samples-per-dimension ratio, at most ``d``."""
    return max(1, min(d, round(n * PAPER_DIMS / PAPER_SAMPLES)))


def project(x: torch.Tensor, method: str, dims: int | None = None, seed: int = 0) -> torch.Tensor:
    """``x`` [N, D] projected to ``dims`` columns (default ``ratio_dims(N, D)``).

    ``random``: a Gaussian matrix drawn from ``seed`` on the CPU, scaled by 1/√dims
    (Johnson–Lindenstrauss: lengths and angles kept in expectation), the same for every
    row of a table, so rows differ only in their features. ``pca``: the top principal
    directions of ``x`` itself. ``none`` or ``dims >= D`` returns ``x`` unchanged.
    """
    if method not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}; got {method!r}")
    n, d = x.shape
    dims = ratio_dims(n, d) if dims is None else dims
    if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
        raise ConfigError(f"projection dims must be a positive integer; got {dims!r}")
    if method == "none" or dims >= d:
        return x
    if method == "random":
        gen = torch.Generator().manual_seed(int(seed))
        matrix = torch.randn(d, dims, generator=gen, dtype=torch.float32) / dims ** 0.5
        return x.to(torch.float32) @ matrix
    centred = x.to(torch.float64) - x.to(torch.float64).mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:dims].T).to(torch.float32)
