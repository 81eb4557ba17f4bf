"""Trial targets: drawn from the seed alone, test-split targets, prefix poison subsets."""
from __future__ import annotations

import pytest

from poisonbench.data.targets import draw_target, poison_count
from poisonbench.errors import ConfigError


def test_a_trial_draws_its_target_from_the_test_split_and_poisons_from_the_adversarial_class(digits):
    train, test = digits
    t = draw_target(train, test, seed=7, budget=0.05)
    assert t.adversarial_class != t.target_class
    assert len(t.target_index) == 1 and int(test.labels[t.target_index[0]]) == t.target_class
    assert len(t.poison_index) == poison_count(0.05, len(train)) == len(set(t.poison_index))
    assert all(int(train.labels[i]) == t.adversarial_class for i in t.poison_index)
    assert t.test_fingerprint == test.fingerprint
    assert draw_target(train, test, seed=7, budget=0.05) == t  # the seed alone decides


def test_budgets_and_target_counts_share_one_draw(digits):
    train, test = digits
    small, large = draw_target(train, test, 3, 0.01), draw_target(train, test, 3, 0.05, targets=None)
    assert (small.target_class, small.adversarial_class) == (large.target_class, large.adversarial_class)
    assert set(small.poison_index) < set(large.poison_index)  # 1 % is a prefix of 5 %
    assert set(small.target_index) <= set(large.target_index)
    assert len(large.target_index) == int((test.labels == large.target_class).sum())
    seeds = {draw_target(train, test, s, 0.01).target_class for s in range(30)}
    assert len(seeds) > 3  # the seed moves the target


def test_impossible_budgets_are_one_sentence(digits):
    train, test = digits
    for budget in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="budget"):
            draw_target(train, test, 0, budget)
    with pytest.raises(ConfigError, match="needs"):
        draw_target(train, test, 0, 0.5)  # half the set from one class of ten
    assert poison_count(0.01, 50000) == 500 and poison_count(0.01, 900) == 9
