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
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from poisonbench import files
from poisonbench.bench.tables import TableSpec
from poisonbench.errors import ConfigError, JobError
from poisonbench.schema.result import load_result

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
                seed = derive_seed(spec.id, cell.row, cell.column, trial)
            else:
                # Paired trials (the robuster paper's 20 fixed seeds): the k-th trial of
                # every row, column and table of the paper draws the same target and model
                # init; the attack config (in the store's key) decides the poisons, and
                # the column or defense never enters a seed.
                poison_seed = derive_seed(spec.paper, "trial", trial)
                seed = derive_seed(spec.paper, "init", trial)
            config = {
                "table": spec.id,
                "row": cell.row,
                "column": cell.column,
                "trial": trial,
                "seed": seed,
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


def read_result(job: Job, runs_root: str | os.PathLike) -> dict[str, Any] | None:
    """The job's result.json, or None when it has not finished; ``JobError`` when the
    file is not a valid result of this job (``schema.result.load_result``)."""
    return load_result(job.dir(runs_root), job.hash, job.config)


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


