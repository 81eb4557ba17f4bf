"""Table specs: rows, optional columns and the paper's reference value per cell
(``configs/tables/<paper>/<table>.yaml``; formats: ``docs/architecture.md``).

A cell's config is built from layers, later ones winning:

    built-in DEFAULTS ⊕ profile family ``train`` ⊕ table ``defaults`` ⊕ column ``set``
    ⊕ row ``set`` ⊕ row ``cells.<column>`` ⊕ profile ``override``; then the profile's
    ``attack_override``, ``defense_override`` and ``lr_by_model``.

Mappings merge key by key, except that a layer which changes ``model``, ``attack`` or
``defense`` starts the matching ``*_params`` afresh: parameters belong to the name
they were written for (``poisonbench.schema.job_config.merge_layer``). Every key is
checked against the job-config schema. This module only reads YAML.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from poisonbench.bench.catalogue import configs_dir, lookup, table_files
from poisonbench.bench.profiles import load_profile
from poisonbench.config import (check_keys, check_value, checked_name, describe, load_yaml, mapping,
                                number_or_none, required, unique_ids)
from poisonbench.errors import ConfigError
from poisonbench.schema.job_config import DEFAULTS, check_set, merge_layer

KINDS = ("table", "curves", "figure")
FIGURE_KINDS = ("scatter",)
POISON_SEEDS = ("fixed", "per_trial")
NO_COLUMN = "value"  # the one column of a table without ``columns``

_TABLE_KEYS = (
    "id", "paper", "title", "notes", "metric", "metrics", "metric_name", "higher_is_better", "kind",
    "profile", "trials", "poison_seed", "defaults", "columns", "rows", "figure",
)
_ROW_KEYS = ("id", "name", "notes", "set", "reference", "cells", "metric")
_COLUMN_KEYS = ("id", "name", "notes", "set", "best_of")


@dataclass(frozen=True)
class ColumnSpec:
    id: str
    name: str
    set: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    # A derived column without jobs of its own: the best (by the table's direction) of
    # these columns' means, naming which (shortcuts Table 4: best of three FGSM budgets).
    best_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    id: str
    name: str
    set: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, float | None] = field(default_factory=dict)  # column id -> paper value
    # column id -> the paper's printed error and trial count of that value, where given
    reference_error: Mapping[str, float | None] = field(default_factory=dict)
    reference_n: Mapping[str, int | None] = field(default_factory=dict)
    # column id -> {metric: paper value} for the table's other metrics (robuster Table 2's
    # validation accuracy beside poison success)
    reference_extra: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    notes: str = ""
    # column id -> a set applied after the row's own, for what only one cell needs
    # (shortcuts Table 7: synthetic's ε' is 12 and 24 where the others' ε is 16 and 32).
    cells: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # this row's headline metric where it is not the table's (robuster Table 1: backdoor
    # rows report backdoor success among targeted rows' poison success)
    metric: str | None = None


@dataclass(frozen=True)
class FigureSpec:
    """A plot of a table's aggregates drawn beside its leaderboard (``figure:`` of a spec).

    ``scatter``: one point per cell at (mean of metric ``x``, mean of metric ``y``) with
    both errors as bars; ``baseline`` rows blue, ``highlight`` rows red, others grey
    (robuster Figure 3: undefended blue, adversarial poisoning red)."""

    kind: str
    x: str
    y: str
    highlight: tuple[str, ...] = ()  # row ids
    baseline: tuple[str, ...] = ()  # row ids


@dataclass(frozen=True)
class Cell:
    """One (row, column) of a table with its resolved config (no per-job fields)."""

    table: str
    row: str
    column: str
    row_name: str
    column_name: str
    reference: float | None
    config: dict[str, Any]


@dataclass(frozen=True)
class TableSpec:
    id: str  # "<paper>/<table>"
    paper: str  # profile family
    title: str
    metric: str  # key of result.json "metrics" (and of "curves" for kind curves)
    metric_name: str
    higher_is_better: bool
    kind: str  # table | curves
    profile: str
    trials: int
    poison_seed: str  # fixed | per_trial
    defaults: Mapping[str, Any]
    columns: tuple[ColumnSpec, ...]
    rows: tuple[RowSpec, ...]
    notes: str = ""
    path: Path | None = None
    extra_metrics: tuple[str, ...] = ()  # shown beside the primary metric (``metrics:`` after the first)
    figure: FigureSpec | None = None

    @property
    def name(self) -> str:
        """The table part of the id: ``table3`` of ``shortcuts/table3``."""
        return self.id.split("/", 1)[1]

    @property
    def row_ids(self) -> list[str]:
        return [r.id for r in self.rows]

    @property
    def column_ids(self) -> list[str]:
        return [c.id for c in self.columns]

    def cells(self, profile: str | None = None) -> list[Cell]:
        """Every (row, column) in spec order, configs resolved under ``profile``
        (default: the spec's own)."""
        family = load_profile(profile or self.profile).family(self.paper)
        base = merge_layer(DEFAULTS, {"train": family.train})
        base = merge_layer(base, self.defaults)
        cells = []
        for row in self.rows:
            for column in self.columns:
                if column.best_of:
                    continue
                cell_set = row.cells.get(column.id, {})
                config = merge_layer(merge_layer(merge_layer(merge_layer(base, column.set), row.set), cell_set), family.override)
                explicit_lr = any("lr" in (layer.get("train") or {})
                                  for layer in (self.defaults, column.set, row.set, cell_set))
                config = family.finish(config, explicit_lr)
                cells.append(Cell(
                    table=self.id, row=row.id, column=column.id, row_name=row.name,
                    column_name=column.name, reference=row.reference.get(column.id), config=config,
                ))
        return cells


def load_table(id_or_path: str | os.PathLike) -> TableSpec:
    """A table spec by id (``shortcuts/table3``) or by the path of a ``.yaml`` file."""
    text = os.fspath(id_or_path)
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        expected = _id_from_location(path)
    else:
        path = lookup("table", text, table_files())
        expected = text
    return _parse_table(load_yaml(path), path, expected)


def _id_from_location(path: Path) -> str | None:
    """``paper/table`` when ``path`` lies in the configs' tables folder, else None."""
    tables = (configs_dir() / "tables").resolve()
    full = path.resolve()
    if full.parent.parent == tables:
        return f"{full.parent.name}/{full.stem}"
    return None


def _parse_table(data: dict[str, Any], path: Path, expected: str | None) -> TableSpec:
    where = f"table spec {path}"
    check_keys(data, _TABLE_KEYS, where)
    table_id = required(data, "id", where)
    if not isinstance(table_id, str) or table_id.count("/") != 1:
        raise ConfigError(f"id in {where} must look like '<paper>/<table>'; got {describe(table_id)}")
    if expected is not None and table_id != expected:
        raise ConfigError(f"{where} declares id {table_id!r}; expected {expected!r} from its path")
    paper = checked_name(required(data, "paper", where), "paper", where)
    checked_name(table_id.split("/")[1], "table name", where)
    if table_id.split("/")[0] != paper:
        raise ConfigError(f"id {table_id!r} in {where} must start with its paper {paper + '/'!r}")
    where = f"table {table_id}"

    title = check_value(required(data, "title", where), str, f"title in {where}")
    if "metric" in data and "metrics" in data:
        raise ConfigError(f"{where} sets both metric and metrics; write the primary metric first in metrics")
    metrics = data.get("metrics", [data.get("metric", "test_acc")])
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"metrics in {where} must be a non-empty list of metric names; got {describe(metrics)}")
    unique_ids(metrics, "metric", where)
    metric = check_value(metrics[0], str, f"metric in {where}")
    kind = data.get("kind", "table")
    if kind not in KINDS:
        raise ConfigError(f"kind in {where} must be one of {', '.join(KINDS)}; got {describe(kind)}")
    poison_seed = data.get("poison_seed", "fixed")
    if poison_seed not in POISON_SEEDS:
        raise ConfigError(
            f"poison_seed in {where} must be one of {', '.join(POISON_SEEDS)}; got {describe(poison_seed)}"
        )
    trials = check_value(data.get("trials", 20), int, f"trials in {where}")
    if trials < 1:
        raise ConfigError(f"trials in {where} must be at least 1; got {trials}")

    columns = _parse_columns(data.get("columns"), where)
    column_ids = [c.id for c in columns]
    rows_data = required(data, "rows", where)
    if not isinstance(rows_data, list) or not rows_data:
        raise ConfigError(f"rows in {where} must be a non-empty list; got {describe(rows_data)}")
    rows = []
    for i, row in enumerate(rows_data):
        rows.append(_parse_row(row, i, where, column_ids, has_columns=data.get("columns") is not None,
                               metrics=metrics))
    unique_ids([r.id for r in rows], "row", where)

    return TableSpec(
        id=table_id, paper=paper, title=title, metric=metric,
        metric_name=check_value(data.get("metric_name", metric), str, f"metric_name in {where}"),
        higher_is_better=check_value(data.get("higher_is_better", True), bool, f"higher_is_better in {where}"),
        kind=kind,
        profile=checked_name(data.get("profile", "paper"), "profile", where),
        trials=trials, poison_seed=poison_seed,
        defaults=check_set(data.get("defaults") or {}, f"{where} defaults"),
        columns=tuple(columns), rows=tuple(rows),
        notes=check_value(data.get("notes", ""), str, f"notes in {where}"),
        path=path, extra_metrics=tuple(metrics[1:]),
        figure=_parse_figure(data.get("figure"), where, kind, metrics, [r.id for r in rows]),
    )


def _parse_figure(data: Any, where: str, kind: str, metrics: list[str], row_ids: list[str]) -> FigureSpec | None:
    if data is None:
        return None
    fwhere = f"figure in {where}"
    check_keys(data, ("kind", "x", "y", "highlight", "baseline"), fwhere)
    if kind != "table":
        raise ConfigError(f"{fwhere} needs kind table (a {kind} table draws its own figure)")
    fig_kind = required(data, "kind", fwhere)
    if fig_kind not in FIGURE_KINDS:
        raise ConfigError(f"kind of {fwhere} must be one of {', '.join(FIGURE_KINDS)}; got {describe(fig_kind)}")
    axes = {}
    for axis in ("x", "y"):
        name = required(data, axis, fwhere)
        if name not in metrics:
            raise ConfigError(f"{axis} of {fwhere} must be one of the table's metrics "
                              f"({', '.join(metrics)}); got {describe(name)}")
        axes[axis] = name
    if axes["x"] == axes["y"]:
        raise ConfigError(f"x and y of {fwhere} are both {axes['x']!r}; a scatter needs two metrics")
    roles = {}
    for role in ("highlight", "baseline"):
        value = data.get(role, [])
        ids = [value] if isinstance(value, str) else value
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ConfigError(f"{role} of {fwhere} must be a row id or a list of them; got {describe(value)}")
        unknown = [i for i in ids if i not in row_ids]
        if unknown:
            raise ConfigError(f"{role} of {fwhere} names row {unknown[0]!r}; rows: {', '.join(row_ids)}")
        roles[role] = tuple(ids)
    both = sorted(set(roles["highlight"]) & set(roles["baseline"]))
    if both:
        raise ConfigError(f"{fwhere} names row {both[0]!r} as both highlight and baseline")
    return FigureSpec(kind=fig_kind, x=axes["x"], y=axes["y"], **roles)


def _parse_columns(data: Any, where: str) -> list[ColumnSpec]:
    if data is None:
        return [ColumnSpec(id=NO_COLUMN, name=NO_COLUMN)]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"columns in {where} must be a non-empty list; got {describe(data)}")
    columns = []
    for i, col in enumerate(data):
        cwhere = f"{where} column {i + 1}"
        check_keys(col, _COLUMN_KEYS, cwhere)
        cid = checked_name(required(col, "id", cwhere), "id", cwhere)
        cwhere = f"{where} column {cid!r}"
        columns.append(ColumnSpec(
            id=cid,
            name=check_value(col.get("name", cid), str, f"name in {cwhere}"),
            set=check_set(col.get("set") or {}, f"{cwhere} set"),
            notes=check_value(col.get("notes", ""), str, f"notes in {cwhere}"),
            best_of=tuple(check_value(col.get("best_of", []), list, f"best_of in {cwhere}")),
        ))
    ids = [c.id for c in columns]
    unique_ids(ids, "column", where)
    for col in columns:
        for member in col.best_of:
            if member not in ids or dict((c.id, c) for c in columns)[member].best_of:
                raise ConfigError(f"best_of of column {col.id!r} in {where} names {member!r}, "
                                  f"which is not a column with jobs; columns: {', '.join(ids)}")
    return columns


def _reference_value(value: Any, metrics: list[str], where: str) -> tuple[float | None, float | None,
                                                                             int | None, dict[str, float]]:
    """One cell's paper value: a number (or null), or a mapping ``{mean, error, n}`` for
    the primary metric plus the table's other metrics by name (a number each)."""
    if not isinstance(value, dict):
        return number_or_none(value, where), None, None, {}
    check_keys(value, ["mean", "error", "n", *metrics[1:]], where)
    n = value.get("n")
    if n is not None:
        n = check_value(n, int, f"n in {where}")
    extra = {m: check_value(value[m], float, f"{m} in {where}") for m in metrics[1:] if value.get(m) is not None}
    return (number_or_none(value.get("mean"), f"mean in {where}"),
            number_or_none(value.get("error"), f"error in {where}"), n, extra)


def _is_value_mapping(ref: Any, metrics: list[str]) -> bool:
    return isinstance(ref, dict) and bool(ref) and set(ref) <= {"mean", "error", "n", *metrics[1:]}


def _parse_row(row: Any, index: int, where: str, column_ids: list[str], has_columns: bool,
               metrics: list[str] | None = None) -> RowSpec:
    metrics = metrics or ["test_acc"]
    rwhere = f"{where} row {index + 1}"
    check_keys(row, _ROW_KEYS, rwhere)
    rid = checked_name(required(row, "id", rwhere), "id", rwhere)
    rwhere = f"{where} row {rid!r}"
    ref = row.get("reference")
    if ref is None:
        per_column = {}
    elif isinstance(ref, dict) and not (not has_columns and _is_value_mapping(ref, metrics)):
        unknown = [k for k in ref if k not in column_ids]
        if unknown:
            raise ConfigError(
                f"reference in {rwhere} names column {unknown[0]!r}; columns: {', '.join(column_ids)}"
            )
        per_column = dict(ref)
    elif not has_columns:
        per_column = {NO_COLUMN: ref}
    else:
        raise ConfigError(
            f"reference in {rwhere} must map column ids to numbers (the table has columns); "
            f"got {describe(ref)}"
        )
    parsed = {k: _reference_value(v, metrics, f"reference.{k} in {rwhere}") for k, v in per_column.items()}
    cells = mapping(row.get("cells"), f"cells in {rwhere}")
    unknown = [k for k in cells if k not in column_ids]
    if unknown:
        raise ConfigError(f"cells in {rwhere} names column {unknown[0]!r}; columns: {', '.join(column_ids)}")
    return RowSpec(
        id=rid,
        name=check_value(row.get("name", rid), str, f"name in {rwhere}"),
        set=check_set(row.get("set") or {}, f"{rwhere} set"),
        reference={k: v[0] for k, v in parsed.items()},
        reference_error={k: v[1] for k, v in parsed.items() if v[1] is not None},
        reference_n={k: v[2] for k, v in parsed.items() if v[2] is not None},
        reference_extra={k: v[3] for k, v in parsed.items() if v[3]},
        notes=check_value(row.get("notes", ""), str, f"notes in {rwhere}"),
        cells={k: check_set(v or {}, f"{rwhere} cells.{k}") for k, v in cells.items()},
        metric=None if row.get("metric") is None else check_value(row["metric"], str, f"metric in {rwhere}"),
    )
