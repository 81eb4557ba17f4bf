"""YAML loading, deep merge, strict key checks and typed values: the tools every config reader uses.

Table specs, profiles, suites and job configs are plain YAML mappings. A typo in a key
must fail loudly rather than silently fall back to a default, so every reader checks
its keys with ``check_keys``, which names the unknown key, where it was, what is
allowed and the closest match.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from poisonbench.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the
    last silently, which hides the same kind of typo as an unknown key)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key_node.value)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML file whose top level is a mapping (an empty file reads as ``{}``).

    Every failure (missing file, syntax error, a key written twice, a list at the top)
    is a ``ConfigError`` that names the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)  # safe: SafeLoader's constructors
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {e.strerror}") from None
    except yaml.YAMLError as e:
        # The mark says line and column; YAML counts from 0, people from 1.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {os.fspath(path)} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {os.fspath(path)} must hold a mapping at the top level; "
            f"got a {type(data).__name__}"
        )
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: mappings merge recursively, anything
    else (lists included) is replaced. Neither argument is modified; the result shares
    no mutable value with them."""
    merged = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_keys(mapping: Any, allowed: Iterable[str], where: str) -> None:
    """Raise ``ConfigError`` unless ``mapping`` is a mapping whose keys are all allowed.

    ``where`` completes "unknown key 'x' in ...", e.g. "table shortcuts/table3 row 'vgg11'".
    ``allowed`` is listed in its own order (sorted when it is a set).
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where} must be a mapping; got {describe(mapping)}")
    names = sorted(allowed) if isinstance(allowed, (set, frozenset)) else list(allowed)
    for key in mapping:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {where}{hint}; allowed: {', '.join(names)}")


def describe(value: Any) -> str:
    """A short description of a received value, for '...; got <this>' in error messages."""
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def check_value(value: Any, expected: Any, where: str) -> Any:
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

def mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` (null reads as empty) if it is a mapping, else ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping; got {describe(value)}")
    return value

def checked_name(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(
            f"{what} in {where} must be a name of letters, digits, '_', '.', '+' or '-'; "
            f"got {describe(value)}"
        )
    return value

def required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where} has no {key!r}; it is required")
    return data[key]

def number_or_none(value: Any, where: str) -> float | None:
    if value is None:
        return None
    return check_value(value, float, where)


def unique_ids(ids: list[str], what: str, where: str) -> None:
    seen = set()
    for i in ids:
        if i in seen:
            raise ConfigError(f"{what} id {i!r} appears twice in {where}; {what} ids must be unique")
        seen.add(i)
