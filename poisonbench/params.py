"""The one checker of hyperparameter dataclasses (attacks, defenses) and numeric config values.

A numeric field declares its range beside it, in the field's metadata::

    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # (0, 1], pixel units

``parse_params`` applies a mapping of overrides to such a dataclass: unknown and
missing keys, a value of the wrong type (from the field's annotation) and a number
outside its range are each one ``ConfigError`` sentence that names the key, the value
and what was expected. Non-finite numbers (nan, inf) lie outside every range. Rules
that tie several fields together stay in the dataclass's ``__post_init__``; its
``ValueError`` becomes a ``ConfigError`` here too.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from poisonbench.config import describe
from poisonbench.errors import ConfigError

RANGE = "range"  # the metadata key of a field's Range


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; ``None`` is an unbounded side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{_num(self.low)}"
        high = "inf)" if self.high is None else f"{_num(self.high)}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def ranged(default: Any = dataclasses.MISSING, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field with ``default`` whose value must lie in the given range."""
    return dataclasses.field(default=default,
                             metadata={RANGE: Range(low, high, low_open, high_open)})


# Ranges that several configs share.
POSITIVE = Range(0, None, low_open=True)
AT_LEAST_1 = Range(1, None)
NON_NEGATIVE = Range(0, None)


def check_number(value: Any, kind: type, bounds: Range | None, where: str) -> Any:
    """``value`` if it is a ``kind`` (int, or float which also takes an int) inside ``bounds``,
    else ``ConfigError`` naming ``where`` (e.g. "train.lr in the command-line options")."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{where} must be an integer; got {describe(value)}")
    if kind is float and not number:
        raise ConfigError(f"{where} must be a number; got {describe(value)}")
    if bounds is not None and value not in bounds:
        raise ConfigError(f"{where} must lie in {bounds}; got {value}")
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping", list: "a list", tuple: "a list"}


def _accepts(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint`` (None: a hint this checker does not know)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        answers = [_accepts(value, h) for h in typing.get_args(hint)]
        return True if any(answers) else (None if None in answers else False)
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    base = origin or hint
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is bool:
        return isinstance(value, bool)
    if base in (str, dict):
        return isinstance(value, base)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    return None


def _expected(hint: Any) -> str:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    names = [("null" if a is type(None) else _TYPE_NAMES.get(typing.get_origin(a) or a, str(a))) for a in args]
    return " or ".join(names)


def parse_params(params_type: type, overrides: Mapping | None, owner: str, key: str = "params") -> Any:
    """``params_type`` with ``overrides`` applied, every field checked.

    ``owner`` names whose parameters they are ("attack 'synthetic'"), ``key`` where they
    were written ("attack_params"); both go into the error sentence.
    """
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"{key} of {owner} must be a mapping; got {describe(overrides)}")
    overrides = dict(overrides or {})
    fields = dataclasses.fields(params_type)
    allowed = [f.name for f in fields]
    unknown = sorted(set(overrides) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r} for {owner}; allowed: {', '.join(allowed) or 'none'}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in overrides]
    if missing:
        raise ConfigError(f"{owner} needs parameter {missing[0]!r} in {key}")
    hints = typing.get_type_hints(params_type)
    for f in fields:
        if f.name not in overrides:
            continue
        value, where = overrides[f.name], f"{key}.{f.name} of {owner}"
        if _accepts(value, hints.get(f.name, Any)) is False:
            raise ConfigError(f"{where} must be {_expected(hints[f.name])}; got {describe(value)}")
        bounds = f.metadata.get(RANGE)
        if bounds is not None and value is not None and value not in bounds:
            raise ConfigError(f"{where} must lie in {bounds}; got {value}")
    try:
        return params_type(**overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad parameters for {owner}: {err}") from None


def unranged_numbers(params_type: type) -> list[str]:
    """The int and float fields of ``params_type`` that declare no range (tests use it:
    every numeric field has one)."""
    hints = typing.get_type_hints(params_type)
    out = []
    for f in dataclasses.fields(params_type):
        args = set(typing.get_args(hints[f.name])) | {hints[f.name]}
        if args & {int, float} and RANGE not in f.metadata:
            out.append(f.name)
    return out
