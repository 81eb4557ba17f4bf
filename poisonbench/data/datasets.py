"""The dataset registry and its one entry point, ``load_imageset``.

Each entry of ``DATASETS`` is a loader ``(root: Path, split: str, download: bool)
-> ImageSet``; the loader modules (``cifar``, ``svhn``, ``digits``) register
themselves when ``poisonbench.data`` is imported. The helpers below are shared by
the loaders so that every dataset reports a bad split or missing files alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from poisonbench import files
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError, DataNotFoundError
from poisonbench.registry import Registry

Loader = Callable[[Path, str, bool], ImageSet]

DATASETS: Registry[Loader] = Registry("dataset")

SPLITS = ("train", "test")

# Splits beyond train/test, by dataset: a loader that carves one out declares it here
# (digits' ``aux``, the auxiliary data of pre-trained defenses), so that every other
# dataset still rejects the name with a sentence that says who has it.
EXTRA_SPLITS: dict[str, tuple[str, ...]] = {}


def load_imageset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    download: bool = False,
) -> ImageSet:
    """Load one split of a registered dataset from ``root`` (default: ``files.data_root()``)."""
    loader = DATASETS.get(name)
    check_split(split, name)
    return loader(files.data_root(root), split, download)


def check_split(split: str, name: str | None = None) -> None:
    """ConfigError unless ``split`` is train, test or one of dataset ``name``'s extra splits."""
    allowed = SPLITS + EXTRA_SPLITS.get(name or "", ())
    if split in allowed:
        return
    owners = [owner for owner, extra in sorted(EXTRA_SPLITS.items()) if split in extra]
    where = f" (only {', '.join(owners)} has the split {split!r})" if owners else ""
    raise ConfigError(f"split must be one of {', '.join(allowed)}, got {split!r}{where}")


def download_hint(name: str, root: Path) -> str:
    """The command that fetches a dataset, as error messages show it."""
    return f"poisonbench data download {name} --data-root {root}"


def require_files(
    name: str, root: Path, paths: Sequence[Path], download: bool, alternative: str = ""
) -> None:
    """Return when every path exists; else download the dataset or raise ``DataNotFoundError``.

    ``alternative`` is appended to the error's expected path, for datasets that
    can also be read from a second layout (CIFAR's binary version).
    """
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    if download:
        # Imported here, and looked up at call time, so that tests can replace it.
        from poisonbench.data import download as download_module

        download_module.fetch(name, root)
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise DataNotFoundError(f"downloading {name} did not produce {missing[0]}")
        return
    raise DataNotFoundError(
        f"{name} data not found: expected {missing[0]}{alternative}; "
        f"fetch it with `{download_hint(name, root)}`"
    )
