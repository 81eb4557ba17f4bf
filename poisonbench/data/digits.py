"""The embedded ``digits`` dataset: scikit-learn's bundled 8×8 handwritten digits as 32×32 RGB.

It needs no download and no GPU, so it is the default of the ``cpu`` profile and of
smoke runs. The 1,797 images (values 0..16) are scaled to uint8 0..255, upscaled to
32×32 with bilinear interpolation (in float64, no antialiasing, then rounded, so the
result is the same on every machine), and repeated to three channels.

The splits are fixed and stratified, each chosen by ``train_test_split``:

- ``test``: a quarter of each class (450 images, ``random_state=0``);
- ``aux``: a third of what remains (447 images, ``random_state=0``), the auxiliary
  data that the pre-trained-feature-extractor defense (Yu et al., 2022, Section 4)
  pre-trains its backbone on (``poisonbench pretrain``), so that the backbone never
  sees the poisoned training set; CIFAR-10 and CIFAR-100 serve each other instead;
- ``train``: the other 900 images, the set that attacks poison.

The test set is the one the two-way split of earlier versions chose (the same 450
images in the same order); ``train`` and ``aux`` together are its old training set.
Each split keeps the original order of the images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from poisonbench.data.datasets import DATASETS, EXTRA_SPLITS, check_split
from poisonbench.data.imageset import ImageSet

TEST_FRACTION = 0.25
SPLIT_SEED = 0
AUX_SIZE = 447  # a third of the 1,347 images left after the test split
AUX_SEED = 0
SIZE = 32
CLASSES = [str(d) for d in range(10)]


def split_indices(y: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted indices of each split of the labels ``y``; fixed by ``SPLIT_SEED`` and ``AUX_SEED``."""
    rest, test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    # The aux split is carved out of the old training split, so the test split is
    # exactly what it was before aux existed.
    train, aux = train_test_split(rest, test_size=AUX_SIZE, stratify=y[rest], random_state=AUX_SEED)
    return {"train": np.sort(train), "aux": np.sort(aux), "test": np.sort(test)}


def upscale(images: np.ndarray) -> torch.Tensor:
    """uint8 N×3×32×32 from the 8×8 images with values 0..16."""
    scaled = np.rint(images.astype(np.float64) * (255.0 / 16.0))
    x = torch.from_numpy(scaled)[:, None]  # N×1×8×8
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous()


EXTRA_SPLITS["digits"] = ("aux",)


@DATASETS.register("digits")
def digits(root: Path, split: str, download: bool) -> ImageSet:
    # root and download are ignored: the data ships inside scikit-learn.
    check_split(split, "digits")
    bunch = load_digits()
    index = split_indices(bunch.target)[split]
    return ImageSet(
        images=upscale(bunch.images[index]),
        labels=torch.from_numpy(bunch.target[index].astype(np.int64)),
        classes=list(CLASSES),
        name="digits",
        split=split,
    )
