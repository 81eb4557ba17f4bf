"""A job directory on disk: ``config.yaml`` first, ``result.json`` last, a marker that
says poisonbench made it, and a claim that says which process runs it.

- Only a directory holding the marker is ever cleared, and then only of the files
  poisonbench writes: ``--out`` pointing at someone's folder is refused, never emptied.
- A job runs only while its process holds an ``flock`` on the directory's lock file;
  the kernel releases it when that process dies, so a killed run leaves no stale claim
  and two runs on one home never run a job twice.
- A finished ``result.json`` is never removed: a rerun replaces it by a rename.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import yaml

from poisonbench import files
from poisonbench.errors import JobError
from poisonbench.schema.job_config import CONFIG_FILE
from poisonbench.schema.result import RESULT_FILE

# Written when poisonbench creates a job directory: only a directory holding it is ever
# cleared, and then only of the names in WRITTEN.
MARKER_FILE = ".poisonbench-job"
# The claim of the process running the job: an flock on this file, which the kernel
# releases when that process dies, so a killed run leaves no stale claim behind.
LOCK_FILE = ".job.lock"
# A child started by an executor that claimed the job for it finds the claim's file
# descriptor here (inherited), instead of claiming the job against its own parent.
LOCK_FD_ENV = "POISONBENCH_JOB_LOCK_FD"
# What poisonbench writes into a job directory (CSVLogger: metrics.csv, hparams.yaml;
# the local executor: job.log; analysis jobs: tsne.png; --wandb: wandb/; the training
# state a killed job resumes from: checkpoints/, fitting/trainer.py's CHECKPOINT_DIR,
# which training/run.py keeps while the job has no result).
WRITTEN = frozenset({CONFIG_FILE, RESULT_FILE, "metrics.csv", "hparams.yaml", "job.log", "tsne.png",
                     "wandb", "lightning_logs", "checkpoints"})
# files.atomic_path's temporary files: ".<name>.<random>.tmp".
TEMPORARY = re.compile(r"\.(.+)\.[^.]+\.tmp")


def result_stamp(job_dir: Path) -> tuple[int, int] | None:
    """Which result.json the directory holds now (inode, mtime): a result written since
    differs, because results are replaced by a rename."""
    try:
        st = (Path(job_dir) / RESULT_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class JobBusyError(JobError):
    """Another process holds the job's claim."""


class Claim:
    """An exclusive claim of a job directory: an flock held through ``fd`` until
    ``release`` (or this process's death)."""

    def __init__(self, job_dir: Path, fd: int | None) -> None:
        self.job_dir, self.fd = Path(job_dir), fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def claim(job_dir: str | os.PathLike, *, wait: bool = False) -> Claim:
    """Claim the job in ``job_dir`` for this process; raises ``JobBusyError`` when
    another holds it (or, with ``wait``, blocks until it lets go or dies)."""
    job_dir = Path(job_dir)
    path = job_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)  # flock needs no write access
    except OSError as e:
        raise JobError(f"cannot claim job {job_dir}: {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise JobBusyError(f"job {job_dir} is being run by another process (it holds {path})") from None
    except BaseException:
        os.close(fd)
        raise
    return Claim(job_dir, fd)


def inherited_claim(job_dir: str | os.PathLike) -> Claim | None:
    """The claim an executor handed to this process (``LOCK_FD_ENV``), if it is one of
    ``job_dir``'s lock file; ``None`` otherwise."""
    raw = os.environ.get(LOCK_FD_ENV, "")
    if not raw.isdigit():
        return None
    fd = int(raw)
    try:
        held, ours = os.fstat(fd), (Path(job_dir) / LOCK_FILE).stat()
        if (held.st_dev, held.st_ino) != (ours.st_dev, ours.st_ino):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same open file: succeeds when it is ours
    except OSError:
        return None
    os.environ.pop(LOCK_FD_ENV)
    return Claim(job_dir, fd)


def make_job_dir(job_dir: str | os.PathLike, config: dict[str, Any], *, write_config: bool = True) -> None:
    """Create ``job_dir`` as a job directory (or adopt an empty one) and write its
    config (unless not ``write_config``); nothing is removed. A directory that is not provably a poisonbench job
    directory is refused, so that no one's files are ever cleared away."""
    job_dir = Path(job_dir)
    if job_dir.exists() and not job_dir.is_dir():
        raise JobError(f"{job_dir} is a file, not a job directory; choose a new or empty directory")
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create job directory {job_dir}: {e.strerror}") from None
    marker = job_dir / MARKER_FILE
    if not marker.is_file():
        entries = [e.name for e in job_dir.iterdir() if e.name != LOCK_FILE]
        if entries and not _legacy_job_dir(job_dir, config, entries):
            shown = ", ".join(sorted(entries)[:3]) + (", …" if len(entries) > 3 else "")
            raise JobError(f"{job_dir} is not empty ({shown}) and is not a poisonbench job directory; "
                           f"choose a new or empty directory (nothing was changed)")
        files.write_text(marker, "a poisonbench job directory: poisonbench may clear the files it writes here\n")
    if write_config:
        files.write_text(job_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=True))


def _legacy_job_dir(job_dir: Path, config: dict[str, Any], entries: list[str]) -> bool:
    """A job directory of a poisonbench that wrote no marker: only names poisonbench
    writes, and the config.yaml of this very job."""
    if not set(entries) <= WRITTEN or CONFIG_FILE not in entries:
        return False
    try:
        old = yaml.safe_load((job_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(old, dict) and files.canonical_json(old) == files.canonical_json(config)


def clear_job_dir(job_dir: str | os.PathLike, keep: Iterable[str] = ()) -> None:
    """Remove what an earlier attempt of the job left: only the names poisonbench
    writes (``WRITTEN`` and its temporary files), never result.json (a finished result
    stays until its new one replaces it), the config, the marker or the lock. The
    caller holds the job's claim."""
    job_dir = Path(job_dir)
    if not (job_dir / MARKER_FILE).is_file():
        raise JobError(f"{job_dir} is not a poisonbench job directory (no {MARKER_FILE}); nothing was removed")
    spared = {RESULT_FILE, CONFIG_FILE, MARKER_FILE, LOCK_FILE, *keep}
    for entry in job_dir.iterdir():
        if entry.name in spared or not _written(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _written(name: str) -> bool:
    """A name in WRITTEN, or a temporary file of ``files.atomic_path`` for one."""
    temporary = TEMPORARY.fullmatch(name)
    return name in WRITTEN or bool(temporary and temporary.group(1) in WRITTEN)
