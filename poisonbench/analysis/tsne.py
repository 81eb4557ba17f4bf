"""Two-dimensional t-SNEs of perturbations and clean data: Figures 2 and 6 of the
shortcuts paper (Yu et al. 2022, "Indiscriminate Poisoning Attacks Are Shortcuts",
Section 2.2, Appendix B).

Figure 2: "T-SNEs of the first three classes of clean CIFAR-10 data and the
perturbations generated via DeepConfuse and error-minimizing noises. The perturbations
are flattened and normalized into unit norms." Each panel here is one such matrix
(``features.perturbations`` or ``features.clean_features``); rows are scaled to unit
ℓ2 norm, restricted to the chosen classes, embedded on their own, and drawn side by
side in one PNG. The paper embeds all 5,000 images per class; ``max_points_per_class``
keeps the first few hundred so that a CPU draws a figure in seconds.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch

from poisonbench.analysis.features import unit_rows
from poisonbench.errors import ConfigError
from poisonbench.files import atomic_path

# t-SNE settings: scikit-learn's defaults (perplexity 30, 1,000 iterations, learning
# rate "auto"); the paper gives none. PCA init makes the layout stable across seeds.
PERPLEXITY = 30.0
MAX_ITER = 1000


def select_classes(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                   max_points_per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose label is in ``classes``, at most the first ``max_points_per_class``
    of each (in dataset order, so the choice needs no seed)."""
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ConfigError(f"a panel needs features [N, D] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    keep = []
    for c in classes:
        rows = torch.nonzero(labels == int(c)).flatten()
        keep.append(rows if max_points_per_class is None else rows[:max_points_per_class])
    rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    return features[rows], labels[rows]


def embed(features: torch.Tensor, seed: int = 0, perplexity: float = PERPLEXITY,
          max_iter: int = MAX_ITER) -> torch.Tensor:
    """2-D t-SNE float32 [N, 2] of the unit-normalised rows of ``features``."""
    from sklearn.manifold import TSNE

    n = features.shape[0]
    if n < 2:
        raise ConfigError(f"t-SNE needs at least 2 points, got {n}")
    # scikit-learn demands perplexity < N; a third of N keeps small panels meaningful.
    perplexity = min(float(perplexity), max(1.0, (n - 1) / 3))
    # scikit-learn < 1.5 (the floor is 1.3) calls the iteration count ``n_iter``.
    iters = {"max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter": int(max_iter)}
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=int(seed), **iters)
    x = unit_rows(features.to(torch.float32)).numpy()
    return torch.from_numpy(tsne.fit_transform(x)).to(torch.float32)


def tsne_figure(panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]], path: str | Path,
                classes: Sequence[int] = (0, 1, 2), seed: int = 0,
                max_points_per_class: int | None = 500,
                class_names: Sequence[str] | None = None,
                max_iter: int = MAX_ITER) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write one PNG with a t-SNE subplot per ``(title, features [N, D], labels [N])``
    panel, coloured by class; return each panel's (embedding [n, 2], labels [n]).

    ``class_names`` names every class by label (e.g. ``ImageSet.classes``) for the legend.
    """
    if not panels:
        raise ConfigError("tsne_figure needs at least one panel, got none")
    if max_points_per_class is not None and max_points_per_class < 1:
        raise ConfigError(f"max_points_per_class must be a positive integer or None, got {max_points_per_class!r}")
    if class_names is not None and any(not 0 <= int(c) < len(class_names) for c in classes):
        raise ConfigError(f"class_names has {len(class_names)} names but classes asks for {list(classes)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for title, features, labels in panels:
        x, y = select_classes(features, labels, classes, max_points_per_class)
        if x.shape[0] < 2:
            raise ConfigError(f"panel {title!r} has {x.shape[0]} points of classes {list(classes)}; t-SNE needs at least 2")
        results.append((embed(x, seed=seed, max_iter=max_iter), y))

    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (title, _, _), (points, y) in zip(axes[0], panels, results):
        for k, c in enumerate(classes):
            mask = (y == int(c)).numpy()
            name = class_names[int(c)] if class_names is not None else f"class {int(c)}"
            ax.scatter(points[mask, 0].numpy(), points[mask, 1].numpy(), s=4, color=colours(k % 10),
                       label=name, alpha=0.8, linewidths=0)
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][0].legend(loc="best", markerscale=3, fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return results
