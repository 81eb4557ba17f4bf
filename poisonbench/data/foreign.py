"""Poisons made elsewhere, read into a verified ``PoisonStore`` (``poisonbench import``),
so that the train and run paths evaluate them like poisons crafted here (robuster §5:
"we use the premade poisons of the MetaPoison authors"; ROBUSTER.md, "MetaPoison").

Formats:

- ``jht``: the benchmark of *Just How Toxic is Data Poisoning?* (Schwarzschild et al.
  2021; github aks2203/poisoning-benchmark, whose ``poison_test.py`` reads it). A folder
  of three pickles: ``poisons.pickle``, a list of ``(PIL image, label)`` pairs, the i-th
  made from training image ``base_indices[i]``; ``base_indices.pickle``, those indices
  into the training split (a list or array of ints); ``target.pickle``, the clean target
  as ``(PIL image, true class)``, or ``(image, class, patch, [x, y])`` for backdoors: the
  patch (float [3,p,p] in [0, 1], a tensor or array) is pasted at column x, row y of the
  target at test time, truncated to 8 bits as ``poison_test.py``'s ``ToPILImage`` does.
  The adversarial class is the first poison's label, as ``poison_test.py`` takes it.
  Other files of the folder (``perturbation_norms.pickle``) are not read. The benchmark
  trains on a class-balanced subset of the training set (2,500 images for transfer);
  poisonbench applies the poisons to the whole training split of ``--dataset``.
- ``dp_external``: the external package of the authors' framework (JonasGeiping/
  data-poisoning, ``forest/data/kettle_external.py``), as MetaPoison's ``victim.py
  -savepoisondataset`` writes it (github wronnyhuang/metapoison): one pickle of a dict of
  arrays: ``xtrain`` [N,H,W,C] pixels in [0, 255] (float; the training set, sorted by
  label, with the poisons in place), ``ytrain`` [N], ``xtarget`` [T,H,W,C], ``ytarget``
  [T] (the targets' true classes), ``ytargetadv`` [T] (their adversarial class), and
  ``xvalid``/``yvalid`` (the test set; not read: the test split of ``--dataset`` is used).
  The package does not say where its images sit in the dataset, nor which are poisons,
  so each training image is matched to the training split: exactly (after rounding to
  8 bits) for the unpoisoned ones, and for the rest (the poisons) the nearest training
  image left unmatched (an ℓ2 shortlist, then the smallest ℓ∞ distance). A package
  holding part of the training set (MetaPoison's quick start uses 10 %) is applied to
  the whole split: the images it lacks stay clean.

Targets are matched to the test split of ``--dataset`` among the images of their true
class, within ``TARGET_TOLERANCE`` pixel levels in ℓ∞ (float round trips in the authors'
code, normalise then un-normalise, may move a pixel by one level). The store records
``target_index`` (into the test split), ``target_label`` (the adversarial class), the
test split's fingerprint, a patch as ``trigger``/``trigger_mask``, the attack
``import:<format>`` and, in its params, the sha256 of each source file. Its budget is
the one the user gives (ℓ∞ ε, default 16/255; or ℓ0, a pixel count, default the patch's
area), and it is verified like every store: fingerprints, indices, shapes, budget. Every
file that does not fit (unknown layout, indices out of range, a poison over budget, a
target not in the test split) is one ``PoisonStoreError`` sentence naming the file.

Pickles are read without running their code: a restricted unpickler resolves only the
classes and functions these files hold (numpy arrays and scalars, torch tensors, whose
storage is read by ``torch.load(weights_only=True)``, and PIL images, whose pickled state
is decoded here without PIL) and refuses every other global.
"""
from __future__ import annotations

import codecs
import collections
import hashlib
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import BUDGET_RTOL, PoisonStore, store_key
from poisonbench.errors import ConfigError, PoisonStoreError
from poisonbench.files import home

FORMATS = {
    "jht": "Just How Toxic benchmark folder (poisons.pickle, base_indices.pickle, target.pickle)",
    "dp_external": "data-poisoning external package (one pickle: xtrain, ytrain, xtarget, ytarget, ytargetadv, ...)",
}
JHT_FILES = ("poisons.pickle", "base_indices.pickle", "target.pickle")
DP_KEYS = ("xtrain", "ytrain", "xtarget", "ytarget", "ytargetadv")
DEFAULT_EPS = 16 / 255  # robuster's targeted budget (ℓ∞, pixel units)
TARGET_TOLERANCE = 1  # pixel levels (of 255) between a foreign target and its test image
SHORTLIST = 8  # nearest candidates by ℓ2 whose ℓ∞ distance is measured exactly
MATCH_BLOCK = 4096  # candidate images per distance block (bounded memory)


# ------------------------------------------------------------- safe unpickling
class PickledImage:
    """A pickled PIL image's state (info, mode, size, palette, raw bytes), kept as data:
    no PIL code runs while a foreign file is read."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Refused(Exception):
    pass


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocols 0-2 write bytes as ``_codecs.encode(text, "latin1")``; no other codec runs.
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with codec {encoding!r}")
    return codecs.encode(text, encoding)


def _reconstructor(cls, base, state):
    # Protocols 0-1 build objects with copyreg._reconstructor; only images are built so.
    if cls is not PickledImage:
        raise _Refused(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    return PickledImage()


def _storage_from_bytes(data: bytes):
    # torch pickles a tensor's storage as torch.save bytes; read them the safe way.
    return torch.load(io.BytesIO(data), weights_only=True)


def _allowed() -> dict[tuple[str, str], Any]:
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("PIL.Image", "Image"): PickledImage,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("copy_reg", "_reconstructor"): _reconstructor,  # protocols 0-2 keep python 2's module names
        ("builtins", "object"): object,
        ("__builtin__", "object"): object,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 name the module differently
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _Unpickler(pickle.Unpickler):
    allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent reference (a torch.save file, not a plain pickle)")


def load_pickle(path: Path) -> Any:
    """The object pickled in ``path``, read by the restricted unpickler: any global besides
    arrays, tensors and images is refused (PoisonStoreError), nothing of the file runs."""
    try:
        with open(path, "rb") as f:
            return _Unpickler(f).load()
    except _Refused as err:
        raise PoisonStoreError(f"{path} holds {err}, which poisonbench does not unpickle (a foreign poison file "
                               f"may hold only arrays, tensors, images and plain containers)") from None
    except OSError as err:
        raise PoisonStoreError(f"{path} cannot be read ({err.strerror or err})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, ArithmeticError, struct.error) as err:
        raise PoisonStoreError(f"{path} is not a readable pickle ({type(err).__name__}: {err})") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------ decoding values
def _array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple, int, float, np.generic)) and not isinstance(value, bool):
        try:
            out = np.asarray(value)
        except (ValueError, TypeError):
            return None
        return out if out.dtype.kind in "biuf" else None
    return None


def _integers(value: Any, what: str, where: str, length: int | None = None) -> torch.Tensor:
    """A 1-D array of integers (integral floats allowed) as int64."""
    arr = _array(value)
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 1:  # keras keeps labels as [N, 1]
        arr = arr[:, 0]
    ok = arr is not None and arr.ndim == 1 and arr.dtype.kind in "iuf" and arr.size > 0
    if ok and arr.dtype.kind == "f":
        ok = bool(np.isfinite(arr).all() and (arr == np.round(arr)).all())
    if not ok:
        got = f"{arr.dtype} {tuple(arr.shape)}" if arr is not None else type(value).__name__
        raise PoisonStoreError(f"{where}: {what} must be a non-empty list or 1-D array of integers, got {got}")
    if length is not None and arr.shape[0] != length:
        raise PoisonStoreError(f"{where}: {what} holds {arr.shape[0]} entries, expected {length}")
    return torch.from_numpy(arr.astype(np.int64))


def _in_classes(labels: torch.Tensor, classes: int, what: str, where: str) -> None:
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise PoisonStoreError(f"{where}: {what} must lie in [0, {classes}), got values from "
                               f"{int(labels.min())} to {int(labels.max())}")


def _shape(base: ImageSet) -> tuple[int, int, int]:
    _, c, h, w = base.images.shape
    return int(c), int(h), int(w)


def _image(value: Any, what: str, where: str, base: ImageSet) -> torch.Tensor:
    """A pickled PIL image (mode RGB, or L spread to the channels) as uint8 [C,H,W]."""
    c, h, w = _shape(base)
    state = value.state if isinstance(value, PickledImage) else None
    if not (isinstance(state, (list, tuple)) and len(state) >= 5):
        raise PoisonStoreError(f"{where}: {what} must be a PIL image, got {type(value).__name__}")
    _, mode, size, _, data = state[:5]
    if mode not in ("RGB", "L"):
        raise PoisonStoreError(f"{where}: {what} is a PIL image of mode {mode!r}; poisonbench reads RGB and L images")
    channels = 3 if mode == "RGB" else 1
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and isinstance(data, (bytes, bytearray))
            and len(data) == int(size[0]) * int(size[1]) * channels):
        raise PoisonStoreError(f"{where}: {what} is a PIL image whose size and pixel data disagree")
    width, height = int(size[0]), int(size[1])
    if (height, width) != (h, w):
        raise PoisonStoreError(f"{where}: {what} is a {width}×{height} image; {base.name} images are {w}×{h}")
    pixels = torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).reshape(height, width, channels).copy())
    return pixels.permute(2, 0, 1).expand(c, h, w).contiguous()


def _pixels(value: Any, what: str, where: str, base: ImageSet) -> torch.Tensor:
    """Images [N,H,W,C] with pixels in [0, 255] (any numeric dtype) as uint8 [N,C,H,W],
    rounded: a float poison within ε of an integer clean pixel rounds to within ε."""
    c, h, w = _shape(base)
    arr = _array(value)
    if arr is None or arr.ndim != 4 or tuple(arr.shape[1:]) != (h, w, c) or arr.shape[0] == 0:
        got = f"{arr.dtype} {tuple(arr.shape)}" if arr is not None else type(value).__name__
        raise PoisonStoreError(f"{where}: {what} must be images N×{h}×{w}×{c} (height, width, channels) "
                               f"as {base.name} has them, got {got}")
    if not np.isfinite(arr).all() or arr.min() < -0.5 or arr.max() >= 255.5:
        raise PoisonStoreError(f"{where}: {what} must hold pixels in [0, 255], got values from "
                               f"{float(np.nanmin(arr)):g} to {float(np.nanmax(arr)):g}")
    if arr.dtype.kind == "f" and arr.max() <= 1.0:
        raise PoisonStoreError(f"{where}: {what} holds pixels in [0, 1]; this format stores them in [0, 255]")
    out = np.rint(arr).astype(np.uint8) if arr.dtype.kind == "f" else arr.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------- matching
def _digests(images: torch.Tensor) -> list[bytes]:
    flat = images.reshape(images.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image max |a − b| in pixel levels (int)."""
    return (a.to(torch.int16) - b.to(torch.int16)).abs().flatten(1).amax(dim=1)


def nearest(queries: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image, the candidate (indices into ``pool``) nearest in ℓ∞ among
    the ``SHORTLIST`` nearest in ℓ2, and that ℓ∞ distance in pixel levels. A poison lies
    within ε of its base in ℓ∞ and so within ε·sqrt(d) in ℓ2, far closer than any other
    natural image: the ℓ2 shortlist (matrix products) holds its base."""
    found, dists = [], []
    for chunk in torch.split(queries, MATCH_BLOCK):
        q = chunk.flatten(1).float()
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = torch.full((len(q), 0), float("inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for block in torch.split(candidates, MATCH_BLOCK):
            c = pool[block].flatten(1).float()
            d = torch.cat([best_d, q_sq - 2 * q @ c.T + (c * c).sum(1)[None, :]], dim=1)
            i = torch.cat([best_i, block[None, :].expand(len(q), -1)], dim=1)
            best_d, pos = d.topk(min(SHORTLIST, d.shape[1]), dim=1, largest=False)
            best_i = i.gather(1, pos)
        dist = torch.stack([_linf(pool[best_i[:, j]], chunk) for j in range(best_i.shape[1])], dim=1)
        pick = dist.argmin(dim=1)
        rows = torch.arange(len(q))
        found.append(best_i[rows, pick])
        dists.append(dist[rows, pick])
    return torch.cat(found), torch.cat(dists)


def match_targets(images: torch.Tensor, classes: torch.Tensor, test: ImageSet, where: str) -> torch.Tensor:
    """The test index of each target image among the test images of its class."""
    out = []
    for t, (image, label) in enumerate(zip(images, classes.tolist())):
        pool = torch.nonzero(test.labels == label).flatten()
        if pool.numel() == 0:
            raise PoisonStoreError(f"{where}: target {t} is of class {label}, which the {test.name} test split lacks")
        index, dist = nearest(image[None], test.images, pool)
        if int(dist[0]) > TARGET_TOLERANCE:
            raise PoisonStoreError(f"{where}: target {t} (class {label}) is not an image of the {test.name} test split "
                                   f"(the nearest image of its class differs by {int(dist[0])}/255 in l-inf)")
        out.append(int(index[0]))
    if len(set(out)) != len(out):
        raise PoisonStoreError(f"{where}: two targets are the same image of the {test.name} test split")
    return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """What the user allows the foreign poisons: ``norm`` linf (``eps`` in pixel units)
    or l0 (``eps`` a pixel count; None: the patch's area)."""

    norm: str = "linf"
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l0"):
            raise ConfigError(f"an imported store's budget is linf or l0, got {self.norm!r}")
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"the budget must be a positive number, got {self.eps!r}")
        if self.norm == "linf" and self.eps is not None and self.eps > 1:
            raise ConfigError(f"an l-inf budget is in pixel units (at most 1, e.g. 16/255), got {self.eps:g}")

    def resolve(self, trigger_mask: torch.Tensor | None) -> tuple[str, float]:
        """(norm, eps) for poisons with this patch mask (or None)."""
        if self.norm == "linf":
            return "linf", DEFAULT_EPS if self.eps is None else float(self.eps)
        if self.eps is not None:
            return "l0", float(self.eps)
        if trigger_mask is None:
            raise ConfigError("an l0 budget of poisons without a patch needs --eps (a pixel count)")
        return "l0", float(int(trigger_mask.sum()))


def _check_linf(images: torch.Tensor, index: torch.Tensor, train: ImageSet, eps: float, where: str) -> None:
    """Name the first poison over an ℓ∞ budget (the store check would say only the maximum)."""
    if not index.numel():
        return
    dist = _linf(images, train.images[index])
    over = torch.nonzero(dist > eps * 255 * (1 + BUDGET_RTOL) + 1e-6).flatten()
    if over.numel():
        i = int(over[0])
        raise PoisonStoreError(f"{where}: the poison made from training image {int(index[i])} differs from it by "
                               f"{int(dist[i])}/255 in l-inf, over the budget {eps * 255:g}/255 (--eps)")


# ----------------------------------------------------------------------- formats
@dataclass
class Foreign:
    """What a foreign file holds, in poisonbench's terms (indices into the named splits)."""

    index: torch.Tensor  # int64 [M] into the training split
    images: torch.Tensor  # uint8 [M,C,H,W]
    labels: torch.Tensor  # int64 [M]
    target_index: torch.Tensor  # int64 [T] into the test split
    adversarial_class: int
    sources: dict[str, str]  # file name -> sha256
    trigger: torch.Tensor | None = None  # uint8 [C,H,W], zero outside the mask
    trigger_mask: torch.Tensor | None = None  # uint8 [H,W]


def _jht_files(path: Path) -> dict[str, Path]:
    folder = path.parent if path.is_file() and path.name in JHT_FILES else path
    if not folder.is_dir():
        raise PoisonStoreError(f"{path} is not a folder; a jht poison set is a folder holding {', '.join(JHT_FILES)}")
    files = {name: folder / name for name in JHT_FILES}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        raise PoisonStoreError(f"{folder} lacks {', '.join(missing)}; a jht poison set holds {', '.join(JHT_FILES)}")
    return files


def read_jht(path: Path, train: ImageSet, test: ImageSet) -> Foreign:
    """A Just How Toxic poison folder (module docstring)."""
    files = _jht_files(Path(path))
    poisons, indices, target = (load_pickle(files[name]) for name in JHT_FILES)
    where = str(files["poisons.pickle"])
    if not (isinstance(poisons, (list, tuple)) and poisons
            and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in poisons)):
        raise PoisonStoreError(f"{where} must hold a non-empty list of (image, label) pairs, got {type(poisons).__name__}")
    labels = _integers([p[1] for p in poisons], "the poison labels", where)
    _in_classes(labels, train.num_classes, "the poison labels", where)
    images = torch.stack([_image(p[0], f"poison {i}", where, train) for i, p in enumerate(poisons)])
    index = _integers(indices, "base indices", str(files["base_indices.pickle"]), length=len(poisons))
    if int(index.min()) < 0 or int(index.max()) >= len(train):
        raise PoisonStoreError(f"{files['base_indices.pickle']}: base indices must lie in [0, {len(train)}) of the "
                               f"{train.name} train split, got [{int(index.min())}, {int(index.max())}]")
    if torch.unique(index).numel() != index.numel():
        raise PoisonStoreError(f"{files['base_indices.pickle']}: base indices must be unique, "
                               f"{index.numel() - torch.unique(index).numel()} repeat")

    where = str(files["target.pickle"])
    if not (isinstance(target, (list, tuple)) and len(target) in (2, 4)):
        raise PoisonStoreError(f"{where} must hold (image, class) or (image, class, patch, [x, y]), "
                               f"got {type(target).__name__} of length {len(target) if isinstance(target, (list, tuple)) else '-'}")
    target_class = _integers([target[1]], "the target class", where)
    _in_classes(target_class, test.num_classes, "the target class", where)
    target_image = _image(target[0], "the target", where, test)
    target_index = match_targets(target_image[None], target_class, test, where)
    trigger = mask = None
    if len(target) == 4:
        trigger, mask = _jht_patch(target[2], target[3], where, test)
    return Foreign(index, images, labels, target_index, int(labels[0]),
                   {name: sha256_file(p) for name, p in files.items()}, trigger, mask)


def _jht_patch(patch: Any, position: Any, where: str, test: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch [C,p,q] in [0, 1] at column x, row y as a full-size trigger and its mask;
    its pixels truncated to 8 bits as poison_test.py's ToPILImage does."""
    c, h, w = _shape(test)
    arr = _array(patch)
    if arr is None or arr.ndim != 3 or arr.shape[0] != c or arr.dtype.kind not in "iuf":
        got = f"{arr.dtype} {tuple(arr.shape)}" if arr is not None else type(patch).__name__
        raise PoisonStoreError(f"{where}: the patch must be {c}×p×p pixels in [0, 1], got {got}")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise PoisonStoreError(f"{where}: the patch must hold pixels in [0, 1]")
    xy = _array(position)
    if xy is None or xy.shape != (2,) or xy.dtype.kind not in "iu":
        raise PoisonStoreError(f"{where}: the patch position must be two integers [x, y], got {position!r}")
    x, y = int(xy[0]), int(xy[1])
    ph, pw = arr.shape[1:]
    if x < 0 or y < 0 or y + ph > h or x + pw > w:
        raise PoisonStoreError(f"{where}: a {pw}×{ph} patch at x {x}, y {y} does not fit in a {w}×{h} image")
    pixels = torch.from_numpy((arr.astype(np.float32) * np.float32(255)).astype(np.uint8))
    trigger = torch.zeros(c, h, w, dtype=torch.uint8)
    trigger[:, y:y + ph, x:x + pw] = pixels
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[y:y + ph, x:x + pw] = 1
    return trigger, mask


def read_dp_external(path: Path, train: ImageSet, test: ImageSet) -> Foreign:
    """A data-poisoning external package (module docstring): its training images matched
    to the training split, the poisons being those that match no clean image exactly."""
    path = Path(path)
    if not path.is_file():
        raise PoisonStoreError(f"{path} is not a file; a dp_external package is one pickle file")
    package = load_pickle(path)
    where = str(path)
    if not isinstance(package, dict):
        raise PoisonStoreError(f"{where} must hold a dict with keys {', '.join(DP_KEYS)}, got {type(package).__name__}")
    missing = [k for k in DP_KEYS if k not in package]
    if missing:
        raise PoisonStoreError(f"{where} lacks {', '.join(missing)}; a dp_external package holds {', '.join(DP_KEYS)}, "
                               f"xvalid and yvalid")
    xtrain = _pixels(package["xtrain"], "xtrain", where, train)
    ytrain = _integers(package["ytrain"], "ytrain", where, length=len(xtrain))
    _in_classes(ytrain, train.num_classes, "ytrain", where)
    xtarget = _pixels(package["xtarget"], "xtarget", where, test)
    ytarget = _integers(package["ytarget"], "ytarget", where, length=len(xtarget))
    adversarial = _integers(package["ytargetadv"], "ytargetadv", where, length=len(xtarget))
    _in_classes(ytarget, test.num_classes, "ytarget", where)
    _in_classes(adversarial, test.num_classes, "ytargetadv", where)
    if torch.unique(adversarial).numel() != 1:
        raise PoisonStoreError(f"{where}: ytargetadv names several adversarial classes "
                               f"({', '.join(map(str, sorted(set(adversarial.tolist()))))}); a store measures one")
    if len(xtrain) > len(train):
        raise PoisonStoreError(f"{where}: xtrain holds {len(xtrain)} images, more than the {len(train)} of the "
                               f"{train.name} train split")

    # Exact matches first: each clean image of the package claims one training image.
    free: dict[bytes, list[int]] = {}
    for i, key in enumerate(_digests(train.images)):
        free.setdefault(key, []).append(i)
    index = torch.full((len(xtrain),), -1, dtype=torch.int64)
    for i, key in enumerate(_digests(xtrain)):
        if free.get(key):
            index[i] = free[key].pop(0)
    unmatched = torch.nonzero(index < 0).flatten()
    if unmatched.numel() * 2 > len(xtrain):
        raise PoisonStoreError(f"{where}: only {len(xtrain) - unmatched.numel()} of its {len(xtrain)} training images "
                               f"are images of the {train.name} train split; it was not made from that dataset")
    if unmatched.numel():  # the poisons: their bases are among the training images left over
        claimed = torch.zeros(len(train), dtype=torch.bool)
        claimed[index[index >= 0]] = True
        left = torch.nonzero(~claimed).flatten()
        found, _ = nearest(xtrain[unmatched], train.images, left)
        if torch.unique(found).numel() != found.numel():
            values, counts = torch.unique(found, return_counts=True)
            k = int(values[counts > 1][0])
            raise PoisonStoreError(f"{where}: several poisons are nearest to training image {k}; "
                                   f"their clean images cannot be told apart")
        index[unmatched] = found
    # A store holds the images that differ from the clean split: poisons and changed labels.
    changed = ytrain != train.labels[index]
    changed[unmatched] = True
    keep = torch.nonzero(changed).flatten()
    return Foreign(index[keep], xtrain[keep], ytrain[keep], match_targets(xtarget, ytarget, test, where),
                   int(adversarial[0]), {path.name: sha256_file(path)})


READERS = {"jht": read_jht, "dp_external": read_dp_external}


def import_store(fmt: str, path: str | Path, train: ImageSet, test: ImageSet,
                 budget: Budget = Budget()) -> PoisonStore:
    """The foreign poisons at ``path`` as a verified (unsaved) store on ``train`` with
    targets in ``test``; PoisonStoreError (a sentence naming the file) when they do not fit,
    ConfigError for a bad format name or budget."""
    if fmt not in READERS:
        raise ConfigError(f"unknown foreign format {fmt!r}; known: {', '.join(READERS)}")
    path = Path(path)
    if not path.exists():
        raise PoisonStoreError(f"{path} does not exist")
    foreign = READERS[fmt](path, train, test)
    norm, eps = budget.resolve(foreign.trigger_mask)
    if norm == "linf":
        _check_linf(foreign.images, foreign.index, train, eps, str(path))
    order = torch.argsort(foreign.index)
    extras = {"target_index": foreign.target_index,
              "target_label": torch.full_like(foreign.target_index, foreign.adversarial_class)}
    if foreign.trigger is not None:
        extras.update(trigger=foreign.trigger, trigger_mask=foreign.trigger_mask)
    store = PoisonStore(
        index=foreign.index[order].contiguous(), images=foreign.images[order].contiguous(),
        labels=foreign.labels[order].contiguous(), attack=f"import:{fmt}",
        params={"format": fmt, "source_sha256": foreign.sources}, dataset=train.name,
        base_fingerprint=train.fingerprint, norm=norm, eps=eps, seed=0, extras=extras,
        test_fingerprint=test.fingerprint,
    )
    try:
        store.verify(train, test)
    except PoisonStoreError as err:  # the unsaved store's sentences say "poison store": name the source
        raise PoisonStoreError(str(err).replace("poison store", str(path), 1)) from None
    return store


def default_path(store: PoisonStore) -> Path:
    """``$POISONBENCH_HOME/stores/import/<format>-<key>.safetensors``: the same source
    files, dataset and budget give the same path."""
    key = store_key(store.attack, store.params, store.dataset, store.base_fingerprint, store.seed,
                    context={"norm": store.norm, "eps": store.eps, "test_fingerprint": store.test_fingerprint})
    return home() / "stores" / "import" / f"{store.params['format']}-{key}.safetensors"
