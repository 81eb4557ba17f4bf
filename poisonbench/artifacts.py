"""Content-addressed artifacts: one helper for every cache poisonbench keeps.

A poison store, a crafting surrogate, a base model, a pre-trained backbone and a block
of extracted features are all the same kind of thing: a file determined by a key (the
canonical JSON of everything that makes it), made once, written atomically, read many
times. ``get_or_make`` is that life cycle in one place:

- the path is ``$POISONBENCH_HOME/<kind>/<sha256 of the key>.<suffix>``;
- a hit is loaded through the caller's ``load``, which verifies it; an entry that fails
  to load (truncated, flipped bits, a file copied over another key's path) is removed
  and made again, with one line saying so, so a damaged cache never stops a run;
- a miss is made by ``make(path)`` (the path lets resumable work keep its checkpoints
  beside the entry, in ``partial_dir(path)``, which is removed once the entry is
  written), saved through ``save(value, tmp)`` into a temporary file that is renamed
  onto the path, and its cost (seconds, what made it) recorded beside it in
  ``<stem>.cost.json``;
- a miss is made under an ``flock`` on ``<path>.lock``: two processes (workers, jobs)
  that ask for one entry at once make it once, the second loading what the first
  wrote. The kernel releases the lock when its holder dies, so a killed maker leaves
  no stale claim (the lock file stays: removing it would race a waiting process).
  A make that the processes of one group carry out together is not serialised: inside
  a ``torch.distributed`` group of several (crafting ranks, DDP ranks), or with
  ``exclusive=False`` (a fit on several devices), each rank makes the entry at once, as
  their collectives (a fit's metric syncs, sharded crafting) need.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from safetensors import SafetensorError

from poisonbench.files import atomic_path, canonical_json, home, write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

COST_SUFFIX = ".cost.json"
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"


class CorruptArtifact(Exception):
    """Raised by a ``load`` function when a cache entry is not what its key says."""


@dataclass(frozen=True)
class Artifact:
    """The address of one cache entry: ``<home>/<kind>/<digest><suffix>``."""

    kind: str  # a folder under the home, e.g. "surrogates" or "stores/synthetic"
    key: Mapping[str, Any]  # everything that determines the entry, JSON-serialisable
    suffix: str = ".safetensors"
    digest_chars: int = 24

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(dict(self.key)).encode()).hexdigest()[: self.digest_chars]

    @property
    def path(self) -> Path:
        return home() / self.kind / f"{self.digest}{self.suffix}"


@dataclass
class Made(Generic[T]):
    """What ``get_or_make`` returns: the value, where it lives, and what making it cost
    in this call (0 seconds on a hit)."""

    value: T
    path: Path
    seconds: float
    cached: bool


def cost_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + COST_SUFFIX)


def read_cost(path: str | Path | None) -> dict | None:
    """The cost record beside a cache entry, or ``None`` when it is missing or damaged
    (a damaged record is only bookkeeping: it never stops the work it describes)."""
    if path is None:
        return None
    record = cost_path(path)
    try:
        cost = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    seconds = cost.get("seconds") if isinstance(cost, dict) else None
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        return None
    return cost


def partial_dir(path: str | Path) -> Path:
    """Where a resumable ``make`` keeps the state of an unfinished entry:
    ``<entry>.partial/`` beside it (``get_or_make`` removes it once the entry is written)."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (waiting for another holder to let
    go or die) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + LOCK_SUFFIX), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock


def in_process_group() -> bool:
    """Whether this process is one rank of an initialised ``torch.distributed`` group of
    several: its makes are collective, so no rank may wait for another's lock. (A
    process that never imported ``torch.distributed`` is in no group.)"""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def write_cost(path: str | Path, seconds: float, **details: Any) -> None:
    write_json(cost_path(path), {"seconds": round(float(seconds), 3), **details})


def remove(path: str | Path) -> None:
    """Remove a cache entry and its cost record."""
    Path(path).unlink(missing_ok=True)
    cost_path(path).unlink(missing_ok=True)


def get_or_make(artifact: Artifact | Path, *, load: Callable[[Path], T], make: Callable[[Path], T],
                save: Callable[[T, Path], None], describe: Callable[[], dict] | None = None,
                earlier_s: float | Callable[[], float] = 0.0, exclusive: bool = True) -> Made[T]:
    """Load the entry at ``artifact``'s path, or make, save and record it.

    ``load`` raises ``CorruptArtifact`` (or an ``OSError``, ``ValueError`` or safetensors
    error) for an entry that is not what the key says; that entry is removed and made
    again. A miss is made under the entry's lock, after a second look (another process
    may have made it meanwhile). ``describe`` adds fields to the cost record (hardware,
    ranks), called after the entry is saved. ``earlier_s``: seconds that interrupted
    attempts already spent on a resumable ``make``, counted in the cost; a function
    for them is called once ``make`` returns (a make that resumes learns them from its
    checkpoint). ``exclusive=False``: make without the lock, as inside a process group
    of several (each rank must take part in the make).
    """
    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    hit = _load(path, load, damaged=False)
    if hit is not None:
        return hit
    with lock(path) if exclusive and not in_process_group() else contextlib.nullcontext():
        hit = _load(path, load, damaged=True)
        if hit is not None:
            return hit
        start = time.perf_counter()
        value = make(path)
        elapsed = time.perf_counter() - start
        seconds = (earlier_s() if callable(earlier_s) else earlier_s) + elapsed
        with atomic_path(path) as tmp:
            save(value, tmp)
        write_cost(path, seconds, **(describe() if describe else {}))
        shutil.rmtree(partial_dir(path), ignore_errors=True)
    return Made(value, path, seconds, False)


def _load(path: Path, load: Callable[[Path], T], damaged: bool) -> Made[T] | None:
    """The entry at ``path`` as a hit, or None when there is none or it is damaged.
    With ``damaged`` (under the lock), a damaged entry is named and removed."""
    if not path.is_file():
        return None
    try:
        return Made(load(path), path, 0.0, True)
    except (CorruptArtifact, SafetensorError, OSError, ValueError) as e:
        if not damaged:
            return None
        log.warning("cache entry %s is damaged (%s); making it again", path, e)
        remove(path)
        return None
