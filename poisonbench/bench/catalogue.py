"""What exists: the config folders (tables, profiles, suites) and the catalogue of every
table of the papers, implemented or not (``configs/tables/catalogue.yaml``).

Names are looked up among the files on disk; an unknown one raises
``UnknownNameError`` listing the known ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import poisonbench
from poisonbench.config import check_keys, check_value, describe, load_yaml, mapping, required, unique_ids
from poisonbench.errors import ConfigError
from poisonbench.registry import Registry

_SUITE_KEYS = ("name", "description", "tables")


# --------------------------------------------------------------------------- folders


def configs_dir() -> Path:
    """``$POISONBENCH_CONFIGS``, else ``configs/`` beside the package (the repo root)."""
    env = os.environ.get("POISONBENCH_CONFIGS")
    if env:
        return Path(env)
    return Path(poisonbench.__file__).resolve().parent.parent / "configs"


def config_files(sub: str, pattern: str) -> dict[str, Path]:
    folder = configs_dir() / sub
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob(pattern)):
        if path.is_file():
            found[path.relative_to(folder).with_suffix("").as_posix()] = path
    return found


def table_files() -> dict[str, Path]:
    # Exactly <paper>/<table>.yaml: catalogue.yaml sits one level up and is no table.
    return config_files("tables", "*/*.yaml")


def lookup(kind: str, name: str, files: dict[str, Path]) -> Path:
    """The file of ``name``, or the registry's unknown-name error built from the files."""
    known: Registry[Path] = Registry(kind)
    for key, path in files.items():
        known.register(key)(path)
    return known.get(str(name))


def table_ids() -> list[str]:
    """Every table spec present under ``configs/tables/<paper>/``, sorted."""
    return sorted(table_files())


def profile_names() -> list[str]:
    return sorted(config_files("profiles", "*.yaml"))


def suite_names() -> list[str]:
    return sorted(config_files("suites", "*.yaml"))


# --------------------------------------------------------------------------- suites


def load_suite(name: str) -> list[str]:
    """The table ids of ``configs/suites/<name>.yaml``; ``tables: all`` means every table."""
    path = lookup("suite", name, config_files("suites", "*.yaml"))
    data = load_yaml(path)
    where = f"suite {path}"
    check_keys(data, _SUITE_KEYS, where)
    tables = required(data, "tables", where)
    if tables == "all":
        return table_ids()
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise ConfigError(f"tables in {where} must be a list of table ids or 'all'; got {describe(tables)}")
    files = table_files()
    seen: list[str] = []
    for table in tables:
        lookup("table", table, files)
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
    # kind ("attacks", "defenses") -> names that specs may use before they are registered
    planned: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def missing(self, config: Mapping) -> str | None:
        """The planned attack or defense a job config names (why its cell cannot run
        yet), or None."""
        for kind, key in (("attacks", "attack"), ("defenses", "defense")):
            if config.get(key) in self.planned.get(kind, ()):
                return f"{key} {config[key]!r}"
        return None


def planned_catalogue() -> Catalogue:
    """The catalogue for its ``planned`` names; an empty one where a configs folder has
    no catalogue (a test's own specs)."""
    path = configs_dir() / "tables" / "catalogue.yaml"
    return load_catalogue(path) if path.is_file() else Catalogue(papers={}, tables=())


def load_catalogue(path: str | os.PathLike | None = None) -> Catalogue:
    path = Path(path) if path is not None else configs_dir() / "tables" / "catalogue.yaml"
    data = load_yaml(path)
    where = f"catalogue {path}"
    check_keys(data, ("papers", "tables", "planned"), where)
    planned = mapping(data.get("planned"), f"planned in {where}")
    check_keys(planned, ("attacks", "defenses"), f"planned in {where}")
    papers = mapping(data.get("papers"), f"papers in {where}")
    entries = []
    for i, entry in enumerate(required(data, "tables", where) or []):
        ewhere = f"{where} entry {i + 1}"
        check_keys(entry, ("id", "paper", "what"), ewhere)
        table_id = check_value(required(entry, "id", ewhere), str, f"id in {ewhere}")
        entries.append(CatalogueEntry(
            id=table_id,
            paper=check_value(entry.get("paper", table_id.split("/")[0]), str, f"paper in {ewhere}"),
            what=check_value(entry.get("what", ""), str, f"what in {ewhere}"),
        ))
    unique_ids([e.id for e in entries], "table", where)
    return Catalogue(papers={str(k): str(v) for k, v in papers.items()}, tables=tuple(entries),
                     planned={kind: frozenset(check_value(names, list, f"planned.{kind} in {where}"))
                              for kind, names in planned.items()})
