"""PoisonStore: the one on-disk form of a poisoned dataset (DESIGN.md, "Invariants").

A store holds, for the modified training indices only, the images a victim would
download: ``index`` int64 [M], ``images`` uint8 [M,3,H,W], ``labels`` int64 [M], and
optional integrity-attack tensors (``trigger``, ``trigger_mask``, ``target_index``,
``target_label``). It is a safetensors file with string metadata; nothing is pickled.

Opening a store verifies everything a victim could be fooled by: the format version,
the content hash (a flipped bit is caught), the base dataset's fingerprint, shapes and
dtypes, unique in-range indices, and the perturbation (store − clean) within the
declared budget (itself finite and not negative), and the optional integrity tensors'
dtypes and shapes (``OPTIONAL_SHAPES``). An integrity store names the test split its
targets come from (``test_fingerprint``, hashed); opened with that split, its target
indices must lie in it. An ``l0`` store (a patch) declares its budget as a pixel count:
no image changes in more (h, w) positions, its trigger is zero outside its mask, the
mask covers no more pixels, and the poisons change only inside the mask. Every failure is a ``PoisonStoreError``
naming the file. What a store claims about its making (attack, params, seed, budget)
is checked against what a job asked for by ``poisonbench.attacks.base.check_store``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poisonbench import __version__
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import PoisonStoreError
from poisonbench.files import atomic_path, canonical_json, home

FORMAT_VERSION = "1"
NORMS = ("linf", "l2", "l0", "none")
OPTIONAL_TENSORS = ("trigger", "trigger_mask", "target_index", "target_label")
# What each optional tensor must be (DESIGN.md, "Integrity threat model"): patch pixels
# uint8 [C,H,W] of the image's shape, placed where it is pasted; a 0/1 mask of [H,W] or [C,H,W];
# target images as int64 indices into the test split [T]; their adversarial labels [T].
OPTIONAL_SHAPES = {
    "trigger": "uint8 [C,H,W], the image's shape (zero outside its mask)",
    "trigger_mask": "bool or uint8 0/1 of the trigger's [H,W] or [C,H,W]",
    "target_index": "int64 [T], T >= 1, not negative",
    "target_label": "int64 [T] (as target_index) within the classes",
}
# Float slack of the budget check: stores are quantised to stay inside their budget,
# so only rounding in the float arithmetic of the check itself needs room.
BUDGET_RTOL = 1e-5


# Metadata the content hash covers besides the tensors: a flipped bit in the declared
# budget or in the base fingerprint is caught like one in the pixels.
HASHED_METADATA = ("format_version", "attack", "params", "dataset", "base_fingerprint", "norm", "eps", "seed")
# Hashed only when present, so that the stores written before they existed keep their hashes.
OPTIONAL_HASHED_METADATA = ("test_fingerprint",)


def _hash_tensors(h, tensors: dict[str, torch.Tensor]):
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: the check
    of every cache entry made of tensors (crafting models, crafting checkpoints)."""
    return _hash_tensors(hashlib.sha256(), tensors).hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """``tensors_sha256``'s bytes followed by the ``HASHED_METADATA`` fields of ``meta``."""
    h = _hash_tensors(hashlib.sha256(), tensors)
    hashed = {k: meta.get(k) for k in HASHED_METADATA}
    hashed.update({k: meta[k] for k in OPTIONAL_HASHED_METADATA if k in meta})
    h.update(canonical_json(hashed).encode())
    return h.hexdigest()


def store_key(attack: str, params: dict, dataset: str, base_fingerprint: str, seed: int,
              attack_version: int = 1, context: dict | None = None) -> str:
    """The content address of a store: hash of what determines its contents.

    ``context``: what else an integrity attack's store depends on (its trial's target,
    the victim its surrogate imitates); absent for availability attacks, whose keys
    stay what they were."""
    ident = {
        "attack": attack,
        "attack_version": int(attack_version),
        "params": params,
        "dataset": dataset,
        "base_fingerprint": base_fingerprint,
        "seed": int(seed),
        "format_version": FORMAT_VERSION,
    }
    if context is not None:
        ident["context"] = context
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:24]


def cache_path(attack: str, params: dict, dataset: str, base_fingerprint: str, seed: int,
               attack_version: int = 1, context: dict | None = None) -> Path:
    """``$POISONBENCH_HOME/stores/<attack>/<key>.safetensors``."""
    key = store_key(attack, params, dataset, base_fingerprint, seed, attack_version, context)
    return home() / "stores" / attack / f"{key}.safetensors"


@dataclass(frozen=True)
class StoreTarget:
    """What an integrity store says about its trial's target: the test images it attacks
    (``target_index``, with their adversarial labels), the training images it changed
    (``poison_index``) and the test split the indices point into (``test_fingerprint``;
    None for a store that does not name it)."""

    target_index: tuple[int, ...]
    target_label: tuple[int, ...]
    poison_index: tuple[int, ...]
    test_fingerprint: str | None

    @property
    def adversarial_class(self) -> int | None:
        """The one adversarial class of every target, or None when they differ."""
        labels = set(self.target_label)
        return labels.pop() if len(labels) == 1 else None

    def mismatch(self, target) -> str | None:
        """What differs from ``target`` (a ``poisonbench.data.targets.Target``), or None."""
        if tuple(target.target_index) != self.target_index:
            return "target images"
        if self.adversarial_class != target.adversarial_class:
            return "adversarial class"
        if self.test_fingerprint != target.test_fingerprint:
            return "test split"
        if not set(self.poison_index) <= set(target.poison_index):
            return "poisoned training images"
        return None


@dataclass
class PoisonStore:
    """The modified part of a training set, with what made it and its budget."""

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    attack: str
    params: dict
    dataset: str
    base_fingerprint: str
    norm: str
    eps: float
    seed: int
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    budget: dict | None = None  # measured by verify(), which every open and craft runs
    # ImageSet.fingerprint of the test split an integrity store's target_index points into.
    test_fingerprint: str | None = None

    # ----------------------------------------------------------------- build
    @classmethod
    def empty(cls, base: ImageSet, attack: str, params: dict, seed: int) -> "PoisonStore":
        """A store that changes nothing (the clean baseline)."""
        _, c, h, w = base.images.shape
        return cls(
            index=torch.zeros(0, dtype=torch.int64),
            images=torch.zeros(0, c, h, w, dtype=torch.uint8),
            labels=torch.zeros(0, dtype=torch.int64),
            attack=attack, params=params, dataset=base.name,
            base_fingerprint=base.fingerprint, norm="none", eps=0.0, seed=seed,
        )

    # ------------------------------------------------------------------ disk
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"index": self.index, "images": self.images, "labels": self.labels}
        out.update(self.extras)
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        meta = {
            "format_version": FORMAT_VERSION,
            "attack": self.attack,
            "params": canonical_json(self.params),
            "dataset": self.dataset,
            "base_fingerprint": self.base_fingerprint,
            "norm": self.norm,
            "eps": repr(float(self.eps)),
            "seed": str(int(self.seed)),
            "poisonbench_version": __version__,
        }
        if self.test_fingerprint is not None:
            meta["test_fingerprint"] = self.test_fingerprint
        meta["content_sha256"] = content_sha256(self.tensors(), meta)
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a killed process leaves the whole file or none."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=self.metadata())
        self.path = path
        return path

    @classmethod
    def read_metadata(cls, path: str | os.PathLike) -> dict[str, str]:
        """The string metadata of a store file, without loading or verifying tensors."""
        path = Path(path)
        if not path.is_file():
            raise PoisonStoreError(f"poison store {path} does not exist")
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n > path.stat().st_size - 8:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as err:
            raise PoisonStoreError(f"poison store {path} is truncated or not a safetensors file ({err})") from None
        if not isinstance(header, dict):
            raise PoisonStoreError(f"poison store {path} has a header that is a JSON {type(header).__name__}, not an object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise PoisonStoreError(f"poison store {path} has metadata that is not a mapping of strings to strings")
        return dict(meta)

    @classmethod
    def open(cls, path: str | os.PathLike, base: ImageSet, test: ImageSet | None = None) -> "PoisonStore":
        """Load and verify a store against the clean base it will be applied to, and
        (``test``) the test split its targets must come from."""
        path = Path(path)
        meta = cls.read_metadata(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise PoisonStoreError(f"poison store {path} is truncated or corrupted ({err})") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise PoisonStoreError(f"poison store {path} has format version {version!r}; this poisonbench reads {FORMAT_VERSION!r}")
        required = ("attack", "params", "dataset", "base_fingerprint", "norm", "eps", "seed", "content_sha256")
        missing = [k for k in required if k not in meta]
        if missing:
            raise PoisonStoreError(f"poison store {path} lacks metadata {', '.join(missing)}")
        if content_sha256(tensors, meta) != meta["content_sha256"]:
            raise PoisonStoreError(f"poison store {path} is corrupted: its content hash does not match its metadata")
        try:
            params = json.loads(meta["params"])
            eps, seed = float(meta["eps"]), int(meta["seed"])
        except ValueError:
            raise PoisonStoreError(f"poison store {path} has unreadable params, eps or seed metadata") from None
        if not isinstance(params, dict):
            raise PoisonStoreError(f"poison store {path} has params metadata that is a JSON {type(params).__name__}, not an object")
        extras = {k: v for k, v in tensors.items() if k in OPTIONAL_TENSORS}
        unknown = set(tensors) - {"index", "images", "labels", *OPTIONAL_TENSORS}
        if unknown or not {"index", "images", "labels"} <= set(tensors):
            raise PoisonStoreError(f"poison store {path} has tensors {sorted(tensors)}; expected index, images, labels and optionally {', '.join(OPTIONAL_TENSORS)}")
        store = cls(
            index=tensors["index"], images=tensors["images"], labels=tensors["labels"],
            attack=meta["attack"], params=params, dataset=meta["dataset"],
            base_fingerprint=meta["base_fingerprint"], norm=meta["norm"], eps=eps, seed=seed,
            extras=extras, path=path, test_fingerprint=meta.get("test_fingerprint"),
        )
        store.verify(base, test)
        return store

    # ---------------------------------------------------------------- checks
    def _where(self) -> str:
        return f"poison store {self.path}" if self.path else "poison store"

    def verify(self, base: ImageSet, test: ImageSet | None = None) -> dict:
        """Raise PoisonStoreError unless this store fits ``base`` (and its targets ``test``)
        and its budget; keep and return the measured budget."""
        where = self._where()
        if self.base_fingerprint != base.fingerprint:
            raise PoisonStoreError(
                f"{where} was made for {self.dataset} (fingerprint {self.base_fingerprint[:12]}) "
                f"but is applied to {base.name or 'a dataset'} {base.split} (fingerprint {base.fingerprint[:12]})"
            )
        m = self.index.shape[0] if self.index.ndim == 1 else -1
        _, c, h, w = base.images.shape
        checks = [
            (self.index.dtype == torch.int64 and self.index.ndim == 1, f"index must be int64 [M], got {self.index.dtype} {tuple(self.index.shape)}"),
            (self.images.dtype == torch.uint8 and tuple(self.images.shape) == (m, c, h, w), f"images must be uint8 [{m},{c},{h},{w}], got {self.images.dtype} {tuple(self.images.shape)}"),
            (self.labels.dtype == torch.int64 and tuple(self.labels.shape) == (m,), f"labels must be int64 [{m}], got {self.labels.dtype} {tuple(self.labels.shape)}"),
            (self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PoisonStoreError(f"{where}: {msg}")
        # nan passes every "perturbation > eps" comparison and inf allows any; zero is a
        # real budget (random_noise at eps 0 changes nothing), a negative one is not.
        if not math.isfinite(self.eps) or self.eps < 0:
            raise PoisonStoreError(f"{where} declares budget eps {self.eps!r}; it must be finite and not negative")
        self._verify_extras(base)
        if test is not None:
            self.verify_test(test)
        if m:
            if int(self.index.min()) < 0 or int(self.index.max()) >= len(base):
                raise PoisonStoreError(f"{where}: indices must lie in [0, {len(base)}), got [{int(self.index.min())}, {int(self.index.max())}]")
            if torch.unique(self.index).numel() != m:
                raise PoisonStoreError(f"{where}: indices must be unique, {m - torch.unique(self.index).numel()} repeat")
            if int(self.labels.min()) < 0 or int(self.labels.max()) >= base.num_classes:
                raise PoisonStoreError(f"{where}: labels must lie in [0, {base.num_classes})")
        budget = self.measured_budget(base)
        if self.norm == "none" and (budget["linf"] > 0 or not torch.equal(self.labels, base.labels[self.index])):
            raise PoisonStoreError(f"{where} declares no budget (norm 'none') but modifies {budget['modified']} samples")
        if self.norm == "linf" and budget["linf"] > self.eps * 255 * (1 + BUDGET_RTOL) + 1e-6:
            raise PoisonStoreError(f"{where} is over budget: max l-inf perturbation {budget['linf']:.3f}/255 > declared {self.eps * 255:.3f}/255")
        if self.norm == "l2" and budget["l2_max"] > self.eps * 255 * (1 + BUDGET_RTOL) + 1e-6:
            raise PoisonStoreError(f"{where} is over budget: max l2 perturbation {budget['l2_max']:.3f}/255 > declared {self.eps * 255:.3f}/255")
        if self.norm == "l0":
            self._verify_patch(base)  # first: "outside the mask" says more than a count
            if budget["l0_max"] > self.eps:
                raise PoisonStoreError(f"{where} is over budget: {budget['l0_max']} changed pixels in one image > declared l0 {self.eps:g}")
        self.budget = budget
        return budget

    def verify_test(self, test: ImageSet) -> None:
        """Raise PoisonStoreError unless this store's targets come from ``test``: the test
        fingerprint it declares is ``test``'s and every target index lies in it."""
        where, target = self._where(), self.extras.get("target_index")
        if target is None:
            return
        if self.test_fingerprint is None:
            raise PoisonStoreError(f"{where} has targets but does not name the test split they come from (no test_fingerprint)")
        if self.test_fingerprint != test.fingerprint:
            raise PoisonStoreError(f"{where} has targets from a test split with fingerprint {self.test_fingerprint[:12]}, "
                                   f"not {test.name or 'the'} {test.split} split (fingerprint {test.fingerprint[:12]})")
        if int(target.max()) >= len(test):
            raise PoisonStoreError(f"{where}: target indices must lie in [0, {len(test)}) of the test split, got up to {int(target.max())}")

    def _mask(self, base: ImageSet) -> torch.Tensor | None:
        """The trigger's mask as bool [C,H,W] (broadcast over channels), or None."""
        mask = self.extras.get("trigger_mask")
        if mask is None:
            return None
        mask = mask.bool()
        return (mask.unsqueeze(0) if mask.ndim == 2 else mask).expand(base.images.shape[1:])

    def _verify_patch(self, base: ImageSet) -> None:
        """An ℓ0 (patch) store's trigger: no larger than its budget, zero outside its mask,
        and the poisons changed only inside the mask."""
        where, trigger = self._where(), self.extras.get("trigger")
        mask = self._mask(base)
        if trigger is None or mask is None:
            return
        if bool(trigger.masked_select(~mask).any()):
            raise PoisonStoreError(f"{where}: the trigger is not zero outside its trigger_mask")
        pixels = int(mask.any(dim=0).sum())
        if pixels > self.eps:
            raise PoisonStoreError(f"{where}: the trigger_mask covers {pixels} pixels, more than the declared l0 budget {self.eps:g}")
        outside = 0
        for chunk in torch.split(torch.arange(self.index.numel()), 4096):
            changed = self.images[chunk] != base.images[self.index[chunk]]
            outside += int((changed & ~mask).flatten(1).any(dim=1).sum())
        if outside:
            raise PoisonStoreError(f"{where}: {outside} poisons differ from the clean images outside the trigger_mask")

    @property
    def target(self) -> StoreTarget | None:
        """The target this store attacks (None for an availability store)."""
        index = self.extras.get("target_index")
        if index is None:
            return None
        label = self.extras.get("target_label")
        return StoreTarget(tuple(int(i) for i in index), tuple(int(i) for i in label) if label is not None else (),
                           tuple(int(i) for i in self.index), self.test_fingerprint)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (uint8 [N,C,H,W], e.g. the test targets) with the trigger pasted in
        its mask: what a backdoor's success is measured on."""
        trigger = self.extras.get("trigger")
        if trigger is None or "trigger_mask" not in self.extras:
            raise PoisonStoreError(f"{self._where()} has no trigger to paste")
        mask = self.extras["trigger_mask"].bool()
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        return torch.where(mask.unsqueeze(0), trigger.unsqueeze(0), images)

    def patched_targets(self, test: ImageSet) -> ImageSet:
        """The test targets with the trigger pasted, labelled with their true classes."""
        index = self.extras.get("target_index")
        if index is None:
            raise PoisonStoreError(f"{self._where()} has no targets")
        self.verify_test(test)
        return ImageSet(self.apply_trigger(test.images[index]), test.labels[index].clone(), list(test.classes),
                        name=test.name, split=f"{test.split}+trigger")

    def _verify_extras(self, base: ImageSet) -> None:
        """The optional integrity tensors: known names, dtypes and shapes (``OPTIONAL_SHAPES``)."""
        where, x = self._where(), self.extras
        unknown = sorted(set(x) - set(OPTIONAL_TENSORS))
        if unknown:
            raise PoisonStoreError(f"{where} has unknown tensors {', '.join(unknown)}; the optional ones are {', '.join(OPTIONAL_TENSORS)}")
        _, c, h, w = base.images.shape

        def bad(name: str) -> PoisonStoreError:
            t = x[name]
            return PoisonStoreError(f"{where}: {name} must be {OPTIONAL_SHAPES[name]}, got {t.dtype} {tuple(t.shape)}")

        trigger = x.get("trigger")
        if trigger is not None and not (trigger.dtype == torch.uint8 and tuple(trigger.shape) == (c, h, w)):
            raise bad("trigger")
        mask = x.get("trigger_mask")
        if mask is not None:
            if trigger is None:
                raise PoisonStoreError(f"{where} has a trigger_mask but no trigger")
            if mask.dtype not in (torch.bool, torch.uint8) or tuple(mask.shape) not in (tuple(trigger.shape), tuple(trigger.shape[1:])):
                raise bad("trigger_mask")
            if mask.dtype == torch.uint8 and mask.numel() and int(mask.max()) > 1:
                raise PoisonStoreError(f"{where}: trigger_mask must hold only 0 and 1, got values up to {int(mask.max())}")
        target = x.get("target_index")
        if target is not None and not (target.dtype == torch.int64 and target.ndim == 1 and target.numel() >= 1
                                       and int(target.min()) >= 0):
            raise bad("target_index")
        label = x.get("target_label")
        if label is not None:
            length = target.shape[0] if target is not None else (label.shape[0] if label.ndim == 1 else -1)
            if not (label.dtype == torch.int64 and label.ndim == 1 and label.shape[0] == length >= 1):
                raise bad("target_label")
            if int(label.min()) < 0 or int(label.max()) >= base.num_classes:
                raise PoisonStoreError(f"{where}: target_label must lie in [0, {base.num_classes})")

    def measured_budget(self, base: ImageSet) -> dict[str, float]:
        """Max ℓ∞, mean and max per-sample ℓ2 of (store − clean), in 1/255 units; for an
        ℓ0 store also ``l0_max``, the most (h, w) positions changed in one image (in any
        channel)."""
        if self.index.numel() == 0:
            empty = {"linf": 0.0, "l2_mean": 0.0, "l2_max": 0.0, "modified": 0}
            return {**empty, "l0_max": 0} if self.norm == "l0" else empty
        linf, l2, l0 = 0.0, [], 0
        for chunk in torch.split(torch.arange(self.index.numel()), 4096):
            delta = self.images[chunk].to(torch.int16) - base.images[self.index[chunk]].to(torch.int16)
            linf = max(linf, float(delta.abs().amax()))
            if self.norm == "l0":
                l0 = max(l0, int((delta != 0).any(dim=1).flatten(1).sum(dim=1).max()))
            delta = delta.flatten(1).to(torch.int32)
            l2.append((delta * delta).sum(dim=1).to(torch.float64).sqrt())
        norms = torch.cat(l2)
        out = {"linf": linf, "l2_mean": float(norms.mean()), "l2_max": float(norms.max()), "modified": int(self.index.numel())}
        # Only ℓ0 stores carry it: the budgets recorded for the other stores stay as they were.
        return {**out, "l0_max": l0} if self.norm == "l0" else out

    # ----------------------------------------------------------------- apply
    def apply(self, base: ImageSet, subset: torch.Tensor | None = None) -> ImageSet:
        """The training set a victim downloads: base with this store's images swapped in.

        ``subset`` (positions into this store) applies only part of it, for partial
        poisoning (``ratio`` < 1).
        """
        index, images, labels = self.index, self.images, self.labels
        if subset is not None:
            index, images, labels = index[subset], images[subset], labels[subset]
        out_images, out_labels = base.images.clone(), base.labels.clone()
        out_images[index] = images
        out_labels[index] = labels
        return ImageSet(out_images, out_labels, list(base.classes), name=base.name, split=f"{base.split}+{self.attack}")
