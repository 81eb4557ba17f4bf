"""Jobs: a table's cells times its trials, each with derived seeds, a content hash and
a directory ``<runs root>/<table>/<hash>/`` whose ``result.json`` means done.

As in DomainBed's sweep, state lives on disk and every job can be recomputed from its
config: the hash is taken of the full resolved config (no paths in it), and seeds are
hashed from ids, never counted, so filtering rows or adding trials changes no other
job's seed or directory (STYLE.md conventions 7–8).
"""
from __future__ import annotations

import copy
import difflib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from poisonbench import files
from poisonbench.bench.tables import TableSpec
from poisonbench.errors import ConfigError, JobError

RESULT_FORMAT_VERSION = 1
RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
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
# the local executor: job.log; analysis jobs: tsne.png; --wandb: wandb/).
WRITTEN = frozenset({CONFIG_FILE, RESULT_FILE, "metrics.csv", "hparams.yaml", "job.log", "tsne.png",
                     "wandb", "lightning_logs", "checkpoints"})
# Percentages; any other metric must be finite and non-negative.
# files.atomic_path's temporary files: ".<name>.<random>.tmp".
TEMPORARY = re.compile(r"\.(.+)\.[^.]+\.tmp")
PERCENT_METRICS = re.compile(r".*(_acc|_success|_rate)$")

JobState = Literal["done", "invalid", "partial", "pending"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One trial of one cell. ``config`` is the full resolved job config (see
    docs/architecture.md); ``hash`` names its directory."""

    table: str
    row: str
    column: str
    trial: int
    config: dict[str, Any]
    hash: str

    def dir(self, runs_root: str | os.PathLike) -> Path:
        return Path(runs_root) / self.table / self.hash

    @property
    def label(self) -> str:
        """``table/row/column#trial``, for logs and progress lines."""
        return f"{self.table}/{self.row}/{self.column}#{self.trial}"


def derive_seed(*parts: Any) -> int:
    """A seed in [0, 2**31 - 1] from the sha256 of the parts (as a JSON list, so that
    ("ab", "c") and ("a", "bc") differ)."""
    digest = hashlib.sha256(files.canonical_json(list(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def job_hash(config: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of the config."""
    return hashlib.sha256(files.canonical_json(config).encode()).hexdigest()[:16]


def expand(
    spec: TableSpec,
    *,
    profile: str | None = None,
    trials: int | None = None,
    rows: Iterable[str] | None = None,
    fast_dev_run: bool = False,
) -> list[Job]:
    """The jobs of a table in spec order (rows, then columns, then trials).

    ``profile`` defaults to the spec's, ``trials`` to ``spec.trials``; ``rows`` keeps
    only those row ids (in spec order).
    """
    profile = profile or spec.profile
    trials = spec.trials if trials is None else trials
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive integer; got {trials!r}")
    wanted = None
    if rows is not None:
        wanted = set(rows)
        unknown = sorted(wanted - set(spec.row_ids))
        if unknown:
            close = difflib.get_close_matches(unknown[0], spec.row_ids, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"table {spec.id} has no row {unknown[0]!r}{hint}; rows: {', '.join(spec.row_ids)}"
            )
    jobs = []
    for cell in spec.cells(profile):
        if wanted is not None and cell.row not in wanted:
            continue
        for trial in range(trials):
            if spec.poison_seed == "fixed":
                # One store per attack config for the whole paper: rows, trials and
                # tables with equal attack settings share it (the shortcuts paper crafts
                # each attack once and analyses, trains on and defends the same data).
                poison_seed = derive_seed(spec.paper, "poison")
            else:
                poison_seed = derive_seed(spec.id, cell.row, cell.column, trial, "poison")
            config = {
                "table": spec.id,
                "row": cell.row,
                "column": cell.column,
                "trial": trial,
                "seed": derive_seed(spec.id, cell.row, cell.column, trial),
                "poison_seed": poison_seed,
                "profile": profile,
                # Own copies: jobs of one cell must not share nested dicts.
                **copy.deepcopy(cell.config),
                "fast_dev_run": bool(fast_dev_run),
            }
            jobs.append(Job(
                table=spec.id, row=cell.row, column=cell.column, trial=trial,
                config=config, hash=job_hash(config),
            ))
    return jobs


def runs_root() -> Path:
    """``<POISONBENCH_HOME>/runs``: where job directories live."""
    return files.home() / "runs"


def job_state(job: Job, runs_root: str | os.PathLike) -> JobState:
    """``done`` (a valid result.json of this job), ``invalid`` (a result.json that
    ``read_result`` refuses: the job is run again), ``partial`` (a directory without a
    result) or ``pending``."""
    folder = job.dir(runs_root)
    try:
        if read_result(job, runs_root) is not None:
            return "done"
    except JobError:
        return "invalid"
    if folder.exists():
        return "partial"
    return "pending"


def result_stamp(job_dir: Path) -> tuple[int, int] | None:
    """Which result.json the directory holds now (inode, mtime): a result written since
    differs, because results are replaced by a rename."""
    try:
        st = (Path(job_dir) / RESULT_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def metric_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is no value of metric ``name`` (``None`` when it is one); ``None``
    stands for a metric that was not measured."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"{name} is {value}, not a finite number"
    if PERCENT_METRICS.fullmatch(name):
        if not 0 <= value <= 100:
            return f"{name} is {value}, outside [0, 100] %"
    elif value < 0:
        return f"{name} is {value}, below 0"
    return None


def result_problem(job: Job, result: Any) -> str | None:
    """Why ``result`` is not a result of ``job`` (``None`` when it is): it must name the
    job's hash, hold exactly the job's config and metric values within their range, so
    that a result copied from another job's directory is never taken for this one."""
    if not isinstance(result, dict):
        return f"it must hold a JSON object, got {type(result).__name__}"
    version = result.get("format_version")
    if version != RESULT_FORMAT_VERSION:
        return f"it has result format_version {version!r} but this poisonbench reads version {RESULT_FORMAT_VERSION}"
    if result.get("job") != job.hash:
        return f"it belongs to job {result.get('job')!r}, not to {job.hash!r} whose directory holds it"
    config = result.get("config")
    if not isinstance(config, dict) or files.canonical_json(config) != files.canonical_json(job.config):
        return f"its config is not the config of job {job.hash}"
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return "it has no metrics"
    curves = result.get("curves") or {}
    if not isinstance(curves, dict):
        return "its curves must be a mapping"
    checks = list(metrics.items())
    for name, values in curves.items():
        if name != "epoch":
            if not isinstance(values, list):
                return f"its curve {name!r} must be a list"
            checks += [(name, v) for v in values]
    for name, value in checks:
        problem = metric_problem(str(name), value)
        if problem:
            return problem
    return None


def read_result(job: Job, runs_root: str | os.PathLike) -> dict[str, Any] | None:
    """The job's result.json, or None when it has not finished.

    Raises ``JobError`` when the file is unreadable, of another format version, made
    for another job or config, or holds a metric outside its range (``result_problem``).
    """
    folder = job.dir(runs_root)
    path = folder / RESULT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise JobError(f"cannot read {path}: {e.strerror}") from None
    try:
        result = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as e:
        msg = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise JobError(f"result {path} is not valid JSON ({msg}); run the job again (--rerun) to replace it") from None
    problem = result_problem(job, result)
    if problem:
        raise JobError(f"result {path} is not a result of job {job.hash}: {problem}; "
                       f"run the job again (--rerun) to replace it")
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_results(jobs: Iterable[Job], runs_root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{job hash: result}`` for the jobs that are done. A result that ``read_result``
    refuses is left out with a warning, as a job that has not run: one forged or
    broken file must not take a table's other results with it."""
    results = {}
    for job in jobs:
        try:
            result = read_result(job, runs_root)
        except JobError as err:
            log.warning("poisonbench: ignoring %s", err)
            continue
        if result is not None:
            results[job.hash] = result
    return results


# ------------------------------------------------------------------ job directories


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
