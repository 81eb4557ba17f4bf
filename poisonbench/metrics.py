"""Metrics as a registry: what a number in ``result.json`` means and how its trials
are summarised (DESIGN.md, "Metrics"; torchmetrics' lesson: a metric declares whether
higher is better).

Every metric is in percent. Its error model says how a cell's trials become
"mean ± error":

- ``sem``: mean ± the standard error of the mean (sample standard deviation, ddof 1,
  over sqrt(n)); no error with one trial. Accuracies, and backdoor success (the
  per-trial fraction of patched targets that read as the adversarial class).
- ``binomial``: each trial is a success (100) or not (0); the error is
  sqrt(p(1−p)/n), and where every trial agrees (p = 0 or 1) the robuster paper prints
  the worst case it chose, 0.25/sqrt(n) (5.59 % for n = 20), which is reproduced here.

This module reads numbers only: no torch, no training code.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

from poisonbench.registry import Registry

ERROR_MODELS = ("sem", "binomial")


@dataclass(frozen=True)
class Metric:
    name: str  # the key in result.json's ``metrics``
    label: str  # what a leaderboard calls it
    higher_is_better: bool  # for the model's owner (poison success: lower is better)
    error: str  # one of ERROR_MODELS
    unit: str = "%"

    def describe_error(self) -> str:
        """One sentence for a leaderboard: what the ± means."""
        if self.error == "binomial":
            return (f"{self.label}: ± sqrt(p(1-p)/n) over 0/1 trials; where every trial agrees, "
                    "0.25/sqrt(n) as the robuster paper prints")
        return f"{self.label}: mean ± standard error of the mean (ddof 1)"

    def valid(self, value: float) -> bool:
        """Whether one trial's value is possible: finite, within [0, 100], and 0 or 100
        for a 0/1 metric."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.error == "binomial":
            return value in (0, 100)
        return 0 <= value <= 100


METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric) -> Metric:
    if metric.error not in ERROR_MODELS:
        raise ValueError(f"metric {metric.name!r}: error model must be one of {ERROR_MODELS}, got {metric.error!r}")
    return METRICS.register(metric.name)(metric)


for _metric in (
    Metric("test_acc", "clean test accuracy", True, "sem"),
    Metric("train_acc", "training accuracy", True, "sem"),
    Metric("poison_success", "avg. poison success", False, "binomial"),
    Metric("backdoor_success", "backdoor success", False, "sem"),
    Metric("val_acc", "validation accuracy", True, "sem"),
):
    register_metric(_metric)


def mean_sem(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, standard error of the mean with ddof 1, n); mean None for n = 0, the error
    None for n < 2."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(n) if n >= 2 else None), n


def summarize(metric: Metric, values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, error, n) of the trials' values: mean None for n = 0, error None where the
    model gives none (one trial under ``sem``)."""
    mean, sem, n = mean_sem(values)
    if metric.error != "binomial" or mean is None:
        return mean, sem, n
    p = mean / 100
    error = 0.25 / math.sqrt(n) if p in (0.0, 1.0) else math.sqrt(p * (1 - p) / n)
    return mean, 100 * error, n
