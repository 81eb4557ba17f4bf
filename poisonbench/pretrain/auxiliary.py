"""Auxiliary data for pre-training: images that are never the poisoned training set.

A pre-trained feature extractor defends against indiscriminate poisoning only if its
pre-training did not see the poisons (Yu et al., 2022, Section 4: their ResNet-152
was pre-trained on ImageNet). poisonbench pre-trains on a set disjoint from the
defended dataset's training split:

- CIFAR-10 ↔ CIFAR-100: each one's training split serves the other (Krizhevsky, 2009,
  labelled them for disjoint sets of classes, so they are different images);
- digits: its ``aux`` split, carved out of the old training split (poisonbench.data.digits);
- SVHN: no natural partner, so the auxiliary set must be named explicitly.

(The module is not called ``aux.py``: ``AUX`` is a reserved file name on Windows.)
"""
from __future__ import annotations

import os

from poisonbench.data import DATASETS, load_imageset
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError

AUXILIARY: dict[str, tuple[str, str]] = {
    "cifar10": ("cifar100", "train"),
    "cifar100": ("cifar10", "train"),
    "digits": ("digits", "aux"),
}


def auxiliary_dataset(name: str, explicit: tuple[str, str] | None = None) -> tuple[str, str]:
    """``(aux_name, split)`` to pre-train on when defending dataset ``name``.

    ``explicit`` overrides the table above; it may not be the defended dataset's own
    training split, the one that attacks poison.
    """
    DATASETS.get(name)  # an unknown dataset is an UnknownNameError listing the known ones
    if explicit is not None:
        aux_name, split = explicit
        DATASETS.get(aux_name)
        if (aux_name, split) == (name, "train"):
            raise ConfigError(f"the auxiliary data for {name} must not be {name}'s own training split, the one attacks poison")
        return aux_name, split
    if name not in AUXILIARY:
        known = ", ".join(sorted(AUXILIARY))
        raise ConfigError(f"dataset {name!r} has no default auxiliary data for pre-training "
                          f"(defaults exist for {known}); name one explicitly (--aux DATASET:SPLIT)")
    return AUXILIARY[name]


def load_auxiliary(name: str, root: str | os.PathLike | None = None,
                   explicit: tuple[str, str] | None = None, download: bool = False) -> ImageSet:
    """The auxiliary ImageSet for defending dataset ``name`` (see ``auxiliary_dataset``)."""
    aux_name, split = auxiliary_dataset(name, explicit)
    return load_imageset(aux_name, root, split, download)
