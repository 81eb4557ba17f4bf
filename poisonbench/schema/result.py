"""The result format: what a finished job leaves in ``result.json``, and the checks a
result must pass before anything reads it as done.

A result is accepted only as the result of its own job: it names the job's hash, holds
exactly the job's config, and every metric value is a possible value of that metric
(``poisonbench.metrics``: percentages in [0, 100], 0/1 trials as 0 or 100). A result
copied from another job's directory, or a file with a bare NaN, is refused with one
sentence. This module reads JSON only: no torch, no training code.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from poisonbench import files
from poisonbench.errors import JobError
from poisonbench.metrics import METRICS

RESULT_FORMAT_VERSION = 1
RESULT_FILE = "result.json"
# Metrics outside the registry: these suffixes are percentages; any other metric must be
# finite and non-negative (seconds, counts).
PERCENT_METRICS = re.compile(r".*(_acc|_success|_rate)$")
# How a victim trained (result.json's optional ``training``, with its ``precision``):
# torch.compile on or off, the data resident on the device or not.
TRAINING_FLAGS = ("compile", "resident_data")


def metric_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is no value of metric ``name`` (``None`` when it is one); ``None``
    stands for a metric that was not measured."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"{name} is {value}, not a finite number"
    if name in METRICS:
        if not METRICS.get(name).valid(value):
            return f"{name} is {value}, not a possible value of {METRICS.get(name).label}"
    elif PERCENT_METRICS.fullmatch(name):
        if not 0 <= value <= 100:
            return f"{name} is {value}, outside [0, 100] %"
    elif value < 0:
        return f"{name} is {value}, below 0"
    return None


def result_problem(job_hash: str, config: dict[str, Any], result: Any) -> str | None:
    """Why ``result`` is not a result of the job ``job_hash`` with ``config`` (``None``
    when it is): it must name the job's hash, hold exactly the job's config and metric
    values within their range, so that a result copied from another job's directory is
    never taken for this one."""
    if not isinstance(result, dict):
        return f"it must hold a JSON object, got {type(result).__name__}"
    version = result.get("format_version")
    if version != RESULT_FORMAT_VERSION:
        return f"it has result format_version {version!r} but this poisonbench reads version {RESULT_FORMAT_VERSION}"
    if result.get("job") != job_hash:
        return f"it belongs to job {result.get('job')!r}, not to {job_hash!r} whose directory holds it"
    recorded = result.get("config")
    if not isinstance(recorded, dict) or files.canonical_json(recorded) != files.canonical_json(config):
        return f"its config is not the config of job {job_hash}"
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return "it has no metrics"
    training = result.get("training")  # absent from results written before it was recorded
    if training is not None:
        if not isinstance(training, dict) or not isinstance(training.get("precision"), str) \
                or not all(isinstance(training.get(k), bool) for k in TRAINING_FLAGS):
            return ("its training record must map precision to a string and "
                    f"{' and '.join(TRAINING_FLAGS)} to true or false")
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


def load_result(job_dir: str | os.PathLike, job_hash: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The result.json in ``job_dir``, or None when the job has not finished.

    Raises ``JobError`` when the file is unreadable, of another format version, made
    for another job or config, or holds a metric outside its range (``result_problem``).
    """
    path = Path(job_dir) / RESULT_FILE
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
    problem = result_problem(job_hash, config, result)
    if problem:
        raise JobError(f"result {path} is not a result of job {job_hash}: {problem}; "
                       f"run the job again (--rerun) to replace it")
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
