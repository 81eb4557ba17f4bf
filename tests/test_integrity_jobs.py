"""Integrity jobs: paired trials, the binomial error computed from result files, the
target recorded, planned cells skipped with one line, and success measured on digits."""
from __future__ import annotations

import math

import pytest

from poisonbench.attacks import ATTACKS
from poisonbench.bench.aggregate import aggregate
from poisonbench.bench.jobs import expand
from poisonbench.bench.runner import not_implemented, plan
from poisonbench.bench.tables import load_table


def test_trials_are_paired_across_rows_and_columns(digits):
    train, test = digits
    spec = load_table("demo/digits-integrity")
    jobs = expand(spec, rows=["backdoor_patch", "gradient_matching"])  # the from-scratch rows
    assert len(jobs) == 2 * 2 * spec.trials == 80
    by_trial: dict[int, set] = {}
    for job in jobs:
        by_trial.setdefault(job.trial, set()).add((job.config["poison_seed"], job.config["seed"]))
    assert all(len(seeds) == 1 for seeds in by_trial.values())  # no column or row enters a seed
    assert len({next(iter(s)) for s in by_trial.values()}) == spec.trials
    # The same trial of both rows attacks the same target class for the same adversarial class.
    for trial in range(3):
        targets = []
        for job in (j for j in jobs if j.trial == trial and j.column == "undefended"):
            attack = ATTACKS.get(job.config["attack"])
            targets.append(attack.draw_target(train, test, job.config["poison_seed"],
                                              attack.params(job.config["attack_params"])))
        assert len({(t.target_class, t.adversarial_class) for t in targets}) == 1
        single, backdoor = sorted(targets, key=lambda t: len(t.target_index))
        assert set(single.target_index) <= set(backdoor.target_index)


def _result(job, metrics):
    return {"job": job.hash, "config": job.config, "metrics": metrics}


def test_binomial_errors_from_result_files():
    spec = load_table("demo/digits-integrity")
    jobs = expand(spec, rows=["backdoor_patch", "gradient_matching"])
    results = {}
    for job in jobs:
        if job.row == "gradient_matching":
            hit = 100.0 if (job.column == "undefended" and job.trial < 18) else 0.0
            results[job.hash] = _result(job, {"poison_success": hit, "val_acc": 90.0})
        else:
            results[job.hash] = _result(job, {"backdoor_success": 40.0 + job.trial % 3, "val_acc": 88.0})
    cells = {(c.row, c.column): c for c in aggregate(spec, jobs, results)}
    gm = cells[("gradient_matching", "undefended")]
    assert gm.mean == 90.0 and gm.n == 20 and gm.sem == pytest.approx(100 * math.sqrt(0.9 * 0.1 / 20))
    assert cells[("gradient_matching", "defended")].sem == pytest.approx(100 * 0.25 / math.sqrt(20))  # all agree
    backdoor = cells[("backdoor_patch", "undefended")]
    assert backdoor.metric == "backdoor_success" and 40 < backdoor.mean < 43 and backdoor.sem > 0
    assert dict((m, (mean, n)) for m, mean, _, n, _ in gm.extra) == {"val_acc": (90.0, 20)}


def test_cells_naming_planned_attacks_are_skipped_and_shown_as_not_implemented(monkeypatch):
    # Every attack of the papers is registered now: plan one as if it were still to come.
    from poisonbench.bench import aggregate as aggregate_module, catalogue, runner as runner_module

    planned = catalogue.Catalogue(papers={}, tables=(), planned={"attacks": frozenset({"convex_polytope"})})
    for module in (runner_module, aggregate_module):
        monkeypatch.setattr(module, "planned_catalogue", lambda: planned)
    spec = load_table("robuster/table1")
    plans = plan([spec], profile=None, trials=1, rows=None, fast_dev_run=True)
    blocked = not_implemented(plans)
    assert ("robuster/table1", "convex_polytope_transfer_star", "undefended") in blocked
    assert ("robuster/table1", "gradient_matching_scratch", "undefended") not in blocked
    cells = {(c.row, c.column): c for c in aggregate(spec, plans[0].jobs, {})}
    assert cells[("convex_polytope_transfer_star", "defended")].missing == "attack 'convex_polytope'"
    assert cells[("gradient_matching_scratch", "defended")].missing is None


@pytest.mark.slow
def test_backdoor_succeeds_on_digits_and_adversarial_poisoning_lowers_it(tmp_path, monkeypatch):
    """Three paired trials of demo/digits-integrity's backdoor row (measured: see the
    leaderboard); the defended column's mean success is lower than the undefended one's."""
    from poisonbench.cli import main

    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("POISONBENCH_LEADERBOARDS", str(tmp_path / "lb"))
    assert main(["run", "--table", "demo/digits-integrity", "--rows", "backdoor_patch", "--trials", "3"]) == 0
    from poisonbench.bench.jobs import read_results, runs_root

    spec = load_table("demo/digits-integrity")
    jobs = expand(spec, trials=3, rows=["backdoor_patch"])
    cells = {c.column: c for c in aggregate(spec, jobs, read_results(jobs, runs_root()))}
    assert cells["undefended"].mean > 10 and cells["defended"].mean < cells["undefended"].mean
