"""Tables as data: table specs, profiles, suites and the catalogue of the papers' tables.

A table spec (``configs/tables/<paper>/<table>.yaml``) lists rows, optional columns and
the paper's reference value per cell (formats: ``docs/architecture.md``). A cell's
config is built from layers, later ones winning:

    built-in DEFAULTS ⊕ profile family ``train`` ⊕ table ``defaults`` ⊕ column ``set``
    ⊕ row ``set`` ⊕ profile ``override``; then profile ``lr_by_model`` sets ``train.lr``.

Mappings merge key by key, except that a layer which changes ``model``, ``attack`` or
``defense`` starts the matching ``*_params`` afresh: parameters belong to the name
they were written for (an ``override`` to ``small_cnn`` must not inherit VGG's).

Every key is checked against ``DEFAULTS`` (the keys of the resolved job config), so a
typo fails with ``ConfigError`` instead of silently running the default. Names are
looked up among the files on disk; an unknown one raises ``UnknownNameError`` listing
the known ones. This module only reads YAML: no torch, no training code.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import poisonbench
from poisonbench.config import check_keys, deep_merge, describe, load_yaml
from poisonbench.errors import ConfigError
from poisonbench.params import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range, check_number
from poisonbench.registry import Registry

# The resolved job config without its per-job fields (table, row, column, trial, seeds,
# profile, fast_dev_run), with the values used when no layer sets them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0005,
    "milestones": [50, 75],  # epochs at which lr is multiplied by gamma
    "gamma": 0.1,
    "accelerator": "auto",
    "devices": 1,
    "strategy": "auto",
    "precision": "auto",  # bf16-mixed on CUDA, 32 on CPU (decided by the trainer factory)
    "eval_every": 1,  # epochs between clean test evaluations (curves)
}
DEFAULTS: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "resnet18",
    "model_params": {},
    "attack": "none",
    "attack_params": {},
    "ratio": 1.0,  # fraction of the training set that is poisoned
    # Train on the clean remainder only: the ratio·N samples the attack would poison are
    # removed instead (the shortcuts paper's Table 6 baseline, "Clean Data Only").
    "drop_poisoned": False,
    "scenario": "scratch",
    "defense": "none",
    "defense_params": {},
    # What the job does with the (poisoned) training set: train a victim, or analyse
    # the perturbations (the shortcuts paper's Table 1 probes, Figures 2 and 6).
    "task": "train",
    "task_params": {},
    "train": TRAIN_DEFAULTS,
}
SCENARIOS = ("scratch", "finetune", "transfer", "linear_eval")
TASKS = ("train", "separability", "tsne")
KINDS = ("table", "curves", "figure")
POISON_SEEDS = ("fixed", "per_trial")
NO_COLUMN = "value"  # the one column of a table without ``columns``

# Expected types: float accepts an int (and stores it as a float, so `lr: 1` and
# `lr: 1.0` hash alike); "ints" is a list of ints.
_TYPES: dict[str, Any] = {
    "dataset": str, "model": str, "model_params": dict, "attack": str,
    "attack_params": dict, "ratio": float, "drop_poisoned": bool, "scenario": str, "defense": str,
    "defense_params": dict, "task": str, "task_params": dict, "train": dict,
}
_TRAIN_TYPES: dict[str, Any] = {
    "epochs": int, "batch_size": int, "optimizer": str, "lr": float, "momentum": float,
    "nesterov": bool, "weight_decay": float, "milestones": "ints", "gamma": float,
    "accelerator": str, "devices": (int, str, list), "strategy": str,
    "precision": (str, int), "eval_every": int,
}
# The range of every numeric train value (of milestones: each element); devices may also
# be a string ("auto") or a list of GPU ids, which are left to Lightning.
_TRAIN_RANGES: dict[str, Range] = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "momentum": Range(0, 1, high_open=True),
    "weight_decay": NON_NEGATIVE, "milestones": NON_NEGATIVE, "gamma": POSITIVE, "devices": AT_LEAST_1,
    "eval_every": AT_LEAST_1,
}
_PARAMS_OF = {"model": "model_params", "attack": "attack_params", "defense": "defense_params",
              "task": "task_params"}
_TABLE_KEYS = (
    "id", "paper", "title", "notes", "metric", "metric_name", "higher_is_better", "kind",
    "profile", "trials", "poison_seed", "defaults", "columns", "rows",
)
_ROW_KEYS = ("id", "name", "notes", "set", "reference", "cells")
_COLUMN_KEYS = ("id", "name", "notes", "set", "best_of")
_PROFILE_KEYS = ("name", "description", "families")
_FAMILY_KEYS = ("train", "lr_by_model", "override", "attack_override", "defense_override")
_SUITE_KEYS = ("name", "description", "tables")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


# --------------------------------------------------------------------------- folders


def configs_dir() -> Path:
    """``$POISONBENCH_CONFIGS``, else ``configs/`` beside the package (the repo root)."""
    env = os.environ.get("POISONBENCH_CONFIGS")
    if env:
        return Path(env)
    return Path(poisonbench.__file__).resolve().parent.parent / "configs"


def _files(sub: str, pattern: str) -> dict[str, Path]:
    folder = configs_dir() / sub
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob(pattern)):
        if path.is_file():
            found[path.relative_to(folder).with_suffix("").as_posix()] = path
    return found


def _table_files() -> dict[str, Path]:
    # Exactly <paper>/<table>.yaml: catalogue.yaml sits one level up and is no table.
    return _files("tables", "*/*.yaml")


def _lookup(kind: str, name: str, files: dict[str, Path]) -> Path:
    """The file of ``name``, or the registry's unknown-name error built from the files."""
    known: Registry[Path] = Registry(kind)
    for key, path in files.items():
        known.register(key)(path)
    return known.get(str(name))


def table_ids() -> list[str]:
    """Every table spec present under ``configs/tables/<paper>/``, sorted."""
    return sorted(_table_files())


def profile_names() -> list[str]:
    return sorted(_files("profiles", "*.yaml"))


def suite_names() -> list[str]:
    return sorted(_files("suites", "*.yaml"))


# --------------------------------------------------------------------------- values


def _check_value(value: Any, expected: Any, where: str) -> Any:
    """``value`` if it has the expected type (ints widened to floats), else ConfigError."""
    if expected == "ints":
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of integers; got {describe(value)}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            # PyYAML reads 5e-4 as text; 5.0e-4 is a number.
            hint = " (YAML reads a number like 5e-4 as text: write 5.0e-4 or 0.0005)"
        raise ConfigError(f"{where} must be a number; got {describe(value)}{hint}")
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join({"str": "a string", "int": "an integer", "dict": "a mapping",
                             "bool": "true or false", "list": "a list"}[t.__name__] for t in types)
        raise ConfigError(f"{where} must be {names}; got {describe(value)}")
    return value


def _check_set(mapping: Any, where: str) -> dict[str, Any]:
    """Validate a partial config (``defaults``, a ``set``, an ``override``)."""
    check_keys(mapping, DEFAULTS, where)
    checked: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == "train":
            checked[key] = _check_train(value, where)
            continue
        checked[key] = _check_value(value, _TYPES[key], f"{key} in {where}")
    if "scenario" in checked and checked["scenario"] not in SCENARIOS:
        raise ConfigError(
            f"scenario in {where} must be one of {', '.join(SCENARIOS)}; got {checked['scenario']!r}"
        )
    if "task" in checked and checked["task"] not in TASKS:
        raise ConfigError(f"task in {where} must be one of {', '.join(TASKS)}; got {checked['task']!r}")
    if "ratio" in checked:
        check_number(checked["ratio"], float, Range(0, 1), f"ratio in {where}")
    return checked


def _check_train(mapping: Any, owner: str) -> dict[str, Any]:
    """Validate the ``train`` mapping of ``owner`` (e.g. "table x row 'y' set")."""
    check_keys(mapping, TRAIN_DEFAULTS, f"{owner} train")
    checked = {k: _check_value(v, _TRAIN_TYPES[k], f"train.{k} in {owner}") for k, v in mapping.items()}
    for key, value in checked.items():
        bounds = _TRAIN_RANGES.get(key)
        for item in value if key == "milestones" else [value]:  # devices: [0, 1] are GPU ids
            if bounds is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
                check_number(item, float, bounds, f"train.{key} in {owner}")
    return checked


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` (null reads as empty) if it is a mapping, else ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping; got {describe(value)}")
    return value


def _lay(config: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """One merge step of a cell's config (see the module docstring for the params rule)."""
    base = dict(config)
    for name, params in _PARAMS_OF.items():
        if name in layer and layer[name] != base.get(name):
            base[params] = {}
    return deep_merge(base, layer)


def _name(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{what} in {where} must be a name of letters, digits, '_', '.', '+' or '-'; "
            f"got {describe(value)}"
        )
    return value


def _required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where} has no {key!r}; it is required")
    return data[key]


def _number_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    return _check_value(value, float, where)


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Family:
    """A profile's settings for one paper (table family)."""

    train: Mapping[str, Any]
    lr_by_model: Mapping[str, float]
    override: Mapping[str, Any]
    # attack name -> attack_params merged into every cell of that attack (last, so the
    # profile wins): how a profile shrinks crafting models and steps (profile cpu).
    attack_override: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # defense name -> the whole defense_params of that defense under this profile
    defense_override: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def finish(self, config: dict[str, Any], explicit_lr: bool) -> dict[str, Any]:
        """The profile's last word on a merged cell config: attack_override,
        defense_override, lr_by_model."""
        extra = self.attack_override.get(config["attack"])
        if extra:  # merged: the table's budget stays, the crafting cost shrinks
            config["attack_params"] = deep_merge(config.get("attack_params") or {}, extra)
        if config["defense"] in self.defense_override:  # replaced: a backbone is stated whole
            config["defense_params"] = dict(self.defense_override[config["defense"]])
        lr = self.lr_by_model.get(config["model"])
        if lr is not None and not explicit_lr:  # what a table or the command line says wins
            config["train"]["lr"] = lr
        return config


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    families: Mapping[str, Family]
    path: Path | None = None

    def family(self, paper: str) -> Family:
        if paper not in self.families:
            raise ConfigError(
                f"profile {self.name!r} has no family {paper!r}; "
                f"families: {', '.join(sorted(self.families)) or 'none'}"
            )
        return self.families[paper]


def load_profile(name: str) -> Profile:
    """The profile ``configs/profiles/<name>.yaml``, validated."""
    path = _lookup("profile", name, _files("profiles", "*.yaml"))
    data = load_yaml(path)
    where = f"profile {path}"
    check_keys(data, _PROFILE_KEYS, where)
    if data.get("name", name) != name:
        raise ConfigError(f"{where} declares name {data['name']!r}; expected {name!r} from its file name")
    families = {}
    for paper, fam in _mapping(_required(data, "families", where), f"families in {where}").items():
        fwhere = f"profile {name!r} family {paper!r}"
        fam = _mapping(fam, fwhere)
        check_keys(fam, _FAMILY_KEYS, fwhere)
        lr_by_model = _mapping(fam.get("lr_by_model"), f"lr_by_model in {fwhere}")
        attack_override = _mapping(fam.get("attack_override"), f"attack_override in {fwhere}")
        defense_override = _mapping(fam.get("defense_override"), f"defense_override in {fwhere}")
        families[paper] = Family(
            train=_check_train(fam.get("train") or {}, fwhere),
            lr_by_model={m: check_number(_check_value(lr, float, f"lr_by_model.{m} in {fwhere}"), float,
                                         POSITIVE, f"lr_by_model.{m} in {fwhere}")
                         for m, lr in lr_by_model.items()},
            override=_check_set(fam.get("override") or {}, f"{fwhere} override"),
            attack_override={a: dict(_mapping(p, f"attack_override.{a} in {fwhere}"))
                             for a, p in attack_override.items()},
            defense_override={d: dict(_mapping(p, f"defense_override.{d} in {fwhere}"))
                              for d, p in defense_override.items()},
        )
    return Profile(name=name, description=str(data.get("description", "")), families=families, path=path)


# --------------------------------------------------------------------------- tables


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
    notes: str = ""
    # column id -> a set applied after the row's own, for what only one cell needs
    # (shortcuts Table 7: synthetic's ε' is 12 and 24 where the others' ε is 16 and 32).
    cells: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
        base = _lay(DEFAULTS, {"train": family.train})
        base = _lay(base, self.defaults)
        cells = []
        for row in self.rows:
            for column in self.columns:
                if column.best_of:
                    continue
                cell_set = row.cells.get(column.id, {})
                config = _lay(_lay(_lay(_lay(base, column.set), row.set), cell_set), family.override)
                explicit_lr = any("lr" in (layer.get("train") or {})
                                  for layer in (self.defaults, column.set, row.set, cell_set))
                config = family.finish(config, explicit_lr)
                cells.append(Cell(
                    table=self.id, row=row.id, column=column.id, row_name=row.name,
                    column_name=column.name, reference=row.reference.get(column.id), config=config,
                ))
        return cells


def adhoc_config(profile: str, family: str, layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A config outside any table (``poisonbench train``), without per-job fields.

    built-in DEFAULTS ⊕ family ``train`` ⊕ family ``override`` ⊕ ``layers`` in order,
    then the profile's last word (``attack_override``, ``defense_override``,
    ``lr_by_model``) except where a layer said otherwise: what the command line says
    explicitly wins, always (in a table the profile's overrides come last instead).
    """
    fam = load_profile(profile).family(family)
    config = _lay(_lay(DEFAULTS, {"train": fam.train}), fam.override)
    explicit: dict[str, Any] = {}
    for layer in layers:
        layer = _check_set(layer, "the command-line options")
        config = _lay(config, layer)
        explicit = _lay(explicit, layer)
    config = fam.finish(config, explicit_lr="lr" in explicit.get("train", {}))
    for key in ("attack_params", "defense_params"):
        if explicit.get(key):
            config[key] = deep_merge(config.get(key) or {}, explicit[key])
    return config


# The per-job fields of a job config (bench/jobs.py, cli.py train), beside DEFAULTS' keys.
_JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "table": (str,), "row": (str,), "column": (str,), "trial": (int,), "seed": (int,),
    "poison_seed": (int,), "profile": (str, type(None)), "fast_dev_run": (bool,),
    "store_sha256": (str, type(None)),
}


def check_job_config(config: Any, where: str) -> None:
    """Raise ``ConfigError`` unless ``config`` is a whole job config (``where`` names it, e.g.
    its config.yaml): every key known, every value of its type and in its range."""
    check_keys(config, [*DEFAULTS, *_JOB_FIELDS], where)
    missing = [k for k in ("dataset", "model", "attack", "train", "seed") if k not in config]
    if missing:
        raise ConfigError(f"{where} has no {missing[0]!r}; it is required")
    _check_set({k: v for k, v in config.items() if k in DEFAULTS}, where)
    for key, kinds in _JOB_FIELDS.items():
        if key not in config:
            continue
        value = config[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"{key} in {where} must be {' or '.join(_KIND_NAMES[k] for k in kinds)}; "
                              f"got {describe(value)}")
        if key in ("seed", "poison_seed", "trial"):
            check_number(value, int, Range(0, 2**32, high_open=True), f"{key} in {where}")


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", type(None): "null"}


def load_table(id_or_path: str | os.PathLike) -> TableSpec:
    """A table spec by id (``shortcuts/table3``) or by the path of a ``.yaml`` file."""
    text = os.fspath(id_or_path)
    if text.endswith((".yaml", ".yml")):
        path = Path(text)
        expected = _id_from_location(path)
    else:
        path = _lookup("table", text, _table_files())
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
    table_id = _required(data, "id", where)
    if not isinstance(table_id, str) or table_id.count("/") != 1:
        raise ConfigError(f"id in {where} must look like '<paper>/<table>'; got {describe(table_id)}")
    if expected is not None and table_id != expected:
        raise ConfigError(f"{where} declares id {table_id!r}; expected {expected!r} from its path")
    paper = _name(_required(data, "paper", where), "paper", where)
    _name(table_id.split("/")[1], "table name", where)
    if table_id.split("/")[0] != paper:
        raise ConfigError(f"id {table_id!r} in {where} must start with its paper {paper + '/'!r}")
    where = f"table {table_id}"

    title = _check_value(_required(data, "title", where), str, f"title in {where}")
    metric = _check_value(data.get("metric", "test_acc"), str, f"metric in {where}")
    kind = data.get("kind", "table")
    if kind not in KINDS:
        raise ConfigError(f"kind in {where} must be one of {', '.join(KINDS)}; got {describe(kind)}")
    poison_seed = data.get("poison_seed", "fixed")
    if poison_seed not in POISON_SEEDS:
        raise ConfigError(
            f"poison_seed in {where} must be one of {', '.join(POISON_SEEDS)}; got {describe(poison_seed)}"
        )
    trials = _check_value(data.get("trials", 20), int, f"trials in {where}")
    if trials < 1:
        raise ConfigError(f"trials in {where} must be at least 1; got {trials}")

    columns = _parse_columns(data.get("columns"), where)
    column_ids = [c.id for c in columns]
    rows_data = _required(data, "rows", where)
    if not isinstance(rows_data, list) or not rows_data:
        raise ConfigError(f"rows in {where} must be a non-empty list; got {describe(rows_data)}")
    rows = []
    for i, row in enumerate(rows_data):
        rows.append(_parse_row(row, i, where, column_ids, has_columns=data.get("columns") is not None))
    _unique([r.id for r in rows], "row", where)

    return TableSpec(
        id=table_id, paper=paper, title=title, metric=metric,
        metric_name=_check_value(data.get("metric_name", metric), str, f"metric_name in {where}"),
        higher_is_better=_check_value(data.get("higher_is_better", True), bool, f"higher_is_better in {where}"),
        kind=kind,
        profile=_name(data.get("profile", "paper"), "profile", where),
        trials=trials, poison_seed=poison_seed,
        defaults=_check_set(data.get("defaults") or {}, f"{where} defaults"),
        columns=tuple(columns), rows=tuple(rows),
        notes=_check_value(data.get("notes", ""), str, f"notes in {where}"),
        path=path,
    )


def _parse_columns(data: Any, where: str) -> list[ColumnSpec]:
    if data is None:
        return [ColumnSpec(id=NO_COLUMN, name=NO_COLUMN)]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"columns in {where} must be a non-empty list; got {describe(data)}")
    columns = []
    for i, col in enumerate(data):
        cwhere = f"{where} column {i + 1}"
        check_keys(col, _COLUMN_KEYS, cwhere)
        cid = _name(_required(col, "id", cwhere), "id", cwhere)
        cwhere = f"{where} column {cid!r}"
        columns.append(ColumnSpec(
            id=cid,
            name=_check_value(col.get("name", cid), str, f"name in {cwhere}"),
            set=_check_set(col.get("set") or {}, f"{cwhere} set"),
            notes=_check_value(col.get("notes", ""), str, f"notes in {cwhere}"),
            best_of=tuple(_check_value(col.get("best_of", []), list, f"best_of in {cwhere}")),
        ))
    ids = [c.id for c in columns]
    _unique(ids, "column", where)
    for col in columns:
        for member in col.best_of:
            if member not in ids or dict((c.id, c) for c in columns)[member].best_of:
                raise ConfigError(f"best_of of column {col.id!r} in {where} names {member!r}, "
                                  f"which is not a column with jobs; columns: {', '.join(ids)}")
    return columns


def _parse_row(row: Any, index: int, where: str, column_ids: list[str], has_columns: bool) -> RowSpec:
    rwhere = f"{where} row {index + 1}"
    check_keys(row, _ROW_KEYS, rwhere)
    rid = _name(_required(row, "id", rwhere), "id", rwhere)
    rwhere = f"{where} row {rid!r}"
    ref = row.get("reference")
    if ref is None:
        reference = {}
    elif isinstance(ref, dict):
        unknown = [k for k in ref if k not in column_ids]
        if unknown:
            raise ConfigError(
                f"reference in {rwhere} names column {unknown[0]!r}; columns: {', '.join(column_ids)}"
            )
        reference = {k: _number_or_none(v, f"reference.{k} in {rwhere}") for k, v in ref.items()}
    elif not has_columns:
        reference = {NO_COLUMN: _number_or_none(ref, f"reference in {rwhere}")}
    else:
        raise ConfigError(
            f"reference in {rwhere} must map column ids to numbers (the table has columns); "
            f"got {describe(ref)}"
        )
    cells = _mapping(row.get("cells"), f"cells in {rwhere}")
    unknown = [k for k in cells if k not in column_ids]
    if unknown:
        raise ConfigError(f"cells in {rwhere} names column {unknown[0]!r}; columns: {', '.join(column_ids)}")
    return RowSpec(
        id=rid,
        name=_check_value(row.get("name", rid), str, f"name in {rwhere}"),
        set=_check_set(row.get("set") or {}, f"{rwhere} set"),
        reference=reference,
        notes=_check_value(row.get("notes", ""), str, f"notes in {rwhere}"),
        cells={k: _check_set(v or {}, f"{rwhere} cells.{k}") for k, v in cells.items()},
    )


def _unique(ids: list[str], what: str, where: str) -> None:
    seen = set()
    for i in ids:
        if i in seen:
            raise ConfigError(f"{what} id {i!r} appears twice in {where}; {what} ids must be unique")
        seen.add(i)


# --------------------------------------------------------------------------- suites


def load_suite(name: str) -> list[str]:
    """The table ids of ``configs/suites/<name>.yaml``; ``tables: all`` means every table."""
    path = _lookup("suite", name, _files("suites", "*.yaml"))
    data = load_yaml(path)
    where = f"suite {path}"
    check_keys(data, _SUITE_KEYS, where)
    tables = _required(data, "tables", where)
    if tables == "all":
        return table_ids()
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise ConfigError(f"tables in {where} must be a list of table ids or 'all'; got {describe(tables)}")
    files = _table_files()
    seen: list[str] = []
    for table in tables:
        _lookup("table", table, files)
        if table in seen:
            raise ConfigError(f"table {table!r} is listed twice in {where}")
        seen.append(table)
    return seen


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class CatalogueEntry:
    id: str  # table id, as in TABLES.md
    paper: str
    what: str


@dataclass(frozen=True)
class Catalogue:
    """Every table of the papers, implemented or not (``configs/tables/catalogue.yaml``)."""

    papers: Mapping[str, str]  # paper key -> title
    tables: tuple[CatalogueEntry, ...]


def load_catalogue(path: str | os.PathLike | None = None) -> Catalogue:
    path = Path(path) if path is not None else configs_dir() / "tables" / "catalogue.yaml"
    data = load_yaml(path)
    where = f"catalogue {path}"
    check_keys(data, ("papers", "tables"), where)
    papers = _mapping(data.get("papers"), f"papers in {where}")
    entries = []
    for i, entry in enumerate(_required(data, "tables", where) or []):
        ewhere = f"{where} entry {i + 1}"
        check_keys(entry, ("id", "paper", "what"), ewhere)
        table_id = _check_value(_required(entry, "id", ewhere), str, f"id in {ewhere}")
        entries.append(CatalogueEntry(
            id=table_id,
            paper=_check_value(entry.get("paper", table_id.split("/")[0]), str, f"paper in {ewhere}"),
            what=_check_value(entry.get("what", ""), str, f"what in {ewhere}"),
        ))
    _unique([e.id for e in entries], "table", where)
    return Catalogue(papers={str(k): str(v) for k, v in papers.items()}, tables=tuple(entries))
