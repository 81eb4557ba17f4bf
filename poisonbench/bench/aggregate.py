"""Aggregation over trials: mean, error and n per cell, for every metric a table shows.

Reads result dicts only (STYLE.md convention 8): no torch, no training code. Each
metric's error follows its own model (``poisonbench.metrics``): accuracies are mean ±
the standard error of the mean (ddof = 1, as DomainBed's ``collect_results`` and the
papers' tables report; none with one trial); poison success is binomial, with the
robuster paper's 0.25/sqrt(n) where every trial agrees.

A cell is compared with the paper (Δ) only when its run had the paper's setting: the
dataset and model that the spec itself names for the cell, before any profile
override (the cpu profile moves every shortcuts table to digits and the small CNN,
where the paper's CIFAR-10 value is context, not a target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from poisonbench.bench.catalogue import planned_catalogue
from poisonbench.bench.jobs import Job
from poisonbench.metrics import METRICS, mean_sem, summarize
from poisonbench.bench.tables import TableSpec
from poisonbench.schema.job_config import DEFAULTS
from poisonbench.errors import JobError


@dataclass(frozen=True)
class Curve:
    """A per-epoch mean over the trials that logged that epoch."""

    epochs: tuple[int, ...]
    mean: tuple[float, ...]
    sem: tuple[float | None, ...]
    n: tuple[int, ...]


@dataclass(frozen=True)
class CellResult:
    row: str
    column: str
    row_name: str
    column_name: str
    reference: float | None  # the paper's value
    trials: int  # jobs requested for this cell (0 when its row was filtered out)
    n: int  # trials with a result
    mean: float | None
    sem: float | None
    values: tuple[float, ...]  # per trial, in trial order
    curve: Curve | None = None  # kind: curves only
    chosen: str | None = None  # best_of columns: the name of the column whose mean was best
    files: tuple[str, ...] = ()  # kind: figure: the figure of each trial with a result
    # (dataset, model) the cell ran with and the one the paper's value was measured in;
    # model is None for analysis tasks, which train no model.
    setting: tuple[str, str | None] | None = None
    paper_setting: tuple[str, str | None] | None = None
    derived: bool = False  # a best_of column's cell: no jobs of its own
    reference_error: float | None = None  # the paper's printed error, where given
    missing: str | None = None  # the planned attack or defense the cell needs ("not implemented")
    metric: str | None = None  # the headline metric of the cell's row
    # the table's other metrics: (metric, mean, error, n, paper value)
    extra: tuple[tuple[str, float | None, float | None, int, float | None], ...] = ()

    @property
    def comparable(self) -> bool:
        """Whether the run's setting is the paper's (unknown settings count as the paper's)."""
        return self.setting is None or self.paper_setting is None or self.setting == self.paper_setting

    @property
    def diff(self) -> float | None:
        """Reproduced minus paper, when both exist and the run had the paper's setting."""
        if self.mean is None or self.reference is None or not self.comparable:
            return None
        return self.mean - self.reference


@dataclass(frozen=True)
class TableState:
    """How far a table's runs are, for the leaderboard index."""

    trials: int  # requested per cell
    completed: int  # trials that every cell of the table has
    jobs: int
    done: int
    spec_trials: int = 0  # what the spec asks for; a table is done only when every cell has them

    @property
    def status(self) -> str:
        """``not run``, ``n/N trials`` (N the larger of the run's and the spec's count) or ``done``."""
        if self.done == 0:
            return "not run"
        if self.done >= self.jobs and self.completed >= self.spec_trials:
            return "done"
        return f"{self.completed}/{max(self.trials, self.spec_trials)} trials"


def summary(metric: str, values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, error, n) under the metric's own error model (``poisonbench.metrics``);
    a metric outside the registry is summarised as mean ± standard error of the mean."""
    return summarize(METRICS.get(metric), values) if metric in METRICS else mean_sem(values)


def aggregate(spec: TableSpec, jobs: Iterable[Job], results: Mapping[str, Mapping[str, Any]]) -> list[CellResult]:
    """One ``CellResult`` per (row, column) of the spec, in spec order.

    ``results`` maps a job hash to its result dict (``jobs.read_results``); jobs
    without one are not run. For ``kind: curves`` the cell also gets the mean curve of
    ``curves[spec.metric]`` by epoch.
    """
    planned = planned_catalogue()
    by_cell: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        by_cell.setdefault((job.row, job.column), []).append(job)
    cells = []
    for row in spec.rows:
        for column in spec.columns:
            cell_jobs = sorted(by_cell.get((row.id, column.id), []), key=lambda j: j.trial)
            done = [(job, results[job.hash]) for job in cell_jobs if job.hash in results]
            metric = row.metric or spec.metric
            values = tuple(_metric(metric, job, result) for job, result in done)
            mean, sem, n = summary(metric, values)
            extra = tuple((m, *summary(m, [_metric(m, job, result) for job, result in done]),
                           row.reference_extra.get(column.id, {}).get(m)) for m in spec.extra_metrics)
            settings = {_setting(r.get("config") or {}) for _, r in done} or {_setting(j.config) for j in cell_jobs}
            curve = _curve(spec, done) if spec.kind == "curves" else None
            figures = tuple(str((r.get("files") or {}).get("figure")) for _, r in done
                            if (r.get("files") or {}).get("figure"))
            cells.append(CellResult(
                row=row.id, column=column.id, row_name=row.name, column_name=column.name,
                reference=row.reference.get(column.id), trials=len(cell_jobs), n=n,
                mean=mean, sem=sem, values=values, curve=curve, files=figures,
                setting=_one_setting(settings),
                paper_setting=paper_setting(spec, row.id, column.id), derived=bool(column.best_of),
                reference_error=row.reference_error.get(column.id), extra=extra, metric=metric,
                missing=planned.missing(cell_jobs[0].config if cell_jobs else _spec_names(spec, row.id, column.id)),
            ))
    return [_best_of(spec, cell, cells) for cell in cells]


def _best_of(spec: TableSpec, cell: CellResult, cells: list[CellResult]) -> CellResult:
    """A derived column's cell: the member column with the best mean in the same row."""
    column = next(c for c in spec.columns if c.id == cell.column)
    if not column.best_of:
        return cell
    members = [c for c in cells if c.row == cell.row and c.column in column.best_of and c.mean is not None]
    if not members:
        return cell
    pick = max if spec.higher_is_better else min
    best = pick(members, key=lambda c: c.mean)
    return CellResult(
        row=cell.row, column=cell.column, row_name=cell.row_name, column_name=cell.column_name,
        reference=cell.reference, trials=0, n=best.n, mean=best.mean, sem=best.sem,
        values=best.values, chosen=best.column_name, setting=best.setting,
        paper_setting=cell.paper_setting, derived=True,
    )


def _spec_names(spec: TableSpec, row: str, column: str) -> dict[str, Any]:
    """The attack and defense a cell names in its spec: what a row left out of the run
    (``--rows``) still needs, so that it reads "not implemented" rather than "not run"."""
    names: dict[str, Any] = {}
    row_spec = next(r for r in spec.rows if r.id == row)
    column_spec = next(c for c in spec.columns if c.id == column)
    for layer in (spec.defaults, column_spec.set, row_spec.set, row_spec.cells.get(column, {})):
        names.update({k: layer[k] for k in ("attack", "defense") if k in layer})
    return names


def paper_setting(spec: TableSpec, row: str, column: str) -> tuple[str, str | None]:
    """(dataset, model) of a cell as the spec itself writes it, without a profile: the
    setting of the paper's value."""
    config: dict[str, Any] = {"dataset": DEFAULTS["dataset"], "model": DEFAULTS["model"], "task": DEFAULTS["task"]}
    row_spec = next(r for r in spec.rows if r.id == row)
    column_spec = next(c for c in spec.columns if c.id == column)
    for layer in (spec.defaults, column_spec.set, row_spec.set, row_spec.cells.get(column, {})):
        config.update({k: layer[k] for k in ("dataset", "model", "task") if k in layer})
    return _setting(config)


def _setting(config: Mapping[str, Any]) -> tuple[str, str | None]:
    task = config.get("task", DEFAULTS["task"])
    model = config.get("model", DEFAULTS["model"]) if task == "train" else None
    return str(config.get("dataset", DEFAULTS["dataset"])), None if model is None else str(model)


def _one_setting(settings: set[tuple[str, str | None]]) -> tuple[str, str | None] | None:
    if not settings:
        return None
    # Results of two settings in one cell (two profiles' runs) match no paper setting.
    return next(iter(settings)) if len(settings) == 1 else ("mixed", None)


def describe_setting(setting: tuple[str, str | None]) -> str:
    """``small_cnn on digits``, or ``digits`` for an analysis without a model."""
    dataset, model = setting
    return dataset if model is None else f"{model} on {dataset}"


def table_state(cells: Iterable[CellResult], spec_trials: int = 0) -> TableState:
    """Trials and jobs requested and completed. ``completed`` counts over every cell
    with jobs of its own, asked for or not, so a run of some rows leaves the table
    unfinished; ``spec_trials`` is the spec's count, below which it is not done."""
    cells = [c for c in cells if not c.derived]
    asked = [c for c in cells if c.trials > 0]
    return TableState(
        trials=max((c.trials for c in asked), default=0),
        completed=min((c.n for c in cells), default=0),
        jobs=sum(c.trials for c in asked),
        done=sum(c.n for c in asked),
        spec_trials=spec_trials,
    )


def _metric(metric: str, job: Job, result: Mapping[str, Any]) -> float:
    metrics = result.get("metrics")
    if not isinstance(metrics, Mapping) or metric not in metrics:
        known = ", ".join(sorted(metrics)) if isinstance(metrics, Mapping) else "none"
        raise JobError(
            f"result of job {job.hash} ({job.label}) has no metric {metric!r}; metrics: {known}"
        )
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError(
            f"metric {metric!r} of job {job.hash} ({job.label}) must be a number; got {value!r}"
        )
    return float(value)


def _curve(spec: TableSpec, done: list[tuple[Job, Mapping[str, Any]]]) -> Curve | None:
    per_epoch: dict[int, list[float]] = {}
    for job, result in done:
        curves = result.get("curves") or {}
        epochs, values = curves.get("epoch"), curves.get(spec.metric)
        if epochs is None or values is None:
            continue  # a trial without a curve still counts for the final value
        if len(epochs) != len(values):
            raise JobError(
                f"curves of job {job.hash} ({job.label}) have {len(epochs)} epochs but "
                f"{len(values)} values of {spec.metric!r}"
            )
        for epoch, value in zip(epochs, values):
            per_epoch.setdefault(int(epoch), []).append(float(value))
    if not per_epoch:
        return None
    epochs = sorted(per_epoch)
    stats = [mean_sem(per_epoch[e]) for e in epochs]
    return Curve(
        epochs=tuple(epochs),
        mean=tuple(s[0] for s in stats),
        sem=tuple(s[1] for s in stats),
        n=tuple(s[2] for s in stats),
    )
