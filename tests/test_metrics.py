"""The metric registry's error models, as the robuster paper prints them."""
from __future__ import annotations

import math

import pytest

from poisonbench.errors import UnknownNameError
from poisonbench.metrics import METRICS, summarize


def test_binomial_error_and_the_all_agree_case():
    success = METRICS.get("poison_success")
    assert not success.higher_is_better
    mean, err, n = summarize(success, [100] * 18 + [0] * 2)
    assert (mean, n) == (90.0, 20) and err == pytest.approx(100 * math.sqrt(0.9 * 0.1 / 20))
    assert round(err, 2) == 6.71  # robuster Table 1, gradient matching undefended
    for agree in ([0] * 20, [100] * 20):
        assert round(summarize(success, agree)[1], 2) == 5.59  # 0.25 / sqrt(20)
    assert summarize(success, []) == (None, None, 0)


def test_sem_and_value_ranges():
    acc = METRICS.get("test_acc")
    mean, err, n = summarize(acc, [80.0, 90.0])
    assert (mean, n) == (85.0, 2) and err == pytest.approx(5.0)
    assert summarize(acc, [70.0])[1] is None
    assert acc.valid(99.5) and not acc.valid(float("nan")) and not acc.valid(-1) and not acc.valid(101)
    assert METRICS.get("poison_success").valid(100) and not METRICS.get("poison_success").valid(50)
    with pytest.raises(UnknownNameError, match="poison_success"):
        METRICS.get("poison_sucess")
