"""Regenerate the golden leaderboard of tests/test_bench_render.py.

    .venv/bin/python tests/golden/regenerate.py

Writes fake results for the frozen specs (tests/golden/configs, 2 trials) into
tests/golden/runs/<table>/<hash>/result.json, renders them and copies the .md, .csv
and .json into tests/golden/leaderboards/<paper>/. Run it only when a change of the
leaderboard format is intended, and review the diff of the golden files.

demo/digits runs in its paper's setting (its spec names digits and the small CNN), so
it has a Δ column; shortcuts/table2 names CIFAR-10 and ResNet-18 but the cpu profile
runs it on digits, so its title names the setting and it has no Δ. The results cover
every case a leaderboard shows: a full cell (2 of 2 trials), a cell with one trial (no
error bar) and a cell that was not run; time stamps with different UTC offsets, where
the lexicographically largest one is not the latest. robuster/fig3 declares a scatter
figure: its results hold poison success and validation accuracy, its .json the plotted
points (the PNG itself is checked for its size, colours and determinism, since its
bytes depend on the matplotlib version).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent
CONFIGS = GOLDEN / "configs"
RUNS = GOLDEN / "runs"
LEADERBOARDS = GOLDEN / "leaderboards"
TRIALS = 2
SUFFIXES = (".md", ".csv", ".json")  # the PNG is checked for existence only

# table -> (row, trial) -> (test_acc or {metric: value}, finished_at); other jobs have no result.
FAKE = {
    "demo/digits": {
        ("none", 0): (93.5, "2026-11-21T12:00:00+00:00"),
        ("none", 1): (92.0, "2026-11-21T13:00:00+02:00"),  # 11:00 UTC: largest text, not latest
        ("random_noise", 0): (41.25, "2026-11-21T12:10:00+00:00"),  # the latest
    },
    "shortcuts/table2": {
        ("none", 0): (86.5, "2026-11-22T09:00:00+00:00"),
        ("none", 1): (88.0, "2026-11-22T09:30:00+00:00"),
        ("random_noise", 0): (85.25, "2026-11-22T10:00:00+00:00"),
        ("random_noise", 1): (87.75, "2026-11-22T10:30:00+00:00"),
    },
    "robuster/fig3": {
        ("none", 0): ({"poison_success": 100.0, "val_acc": 90.5}, "2026-11-23T08:00:00+00:00"),
        ("none", 1): ({"poison_success": 100.0, "val_acc": 91.5}, "2026-11-23T08:10:00+00:00"),
        ("adversarial_training_8", 0): ({"poison_success": 0.0, "val_acc": 80.25}, "2026-11-23T08:20:00+00:00"),
        ("adversarial_poisoning", 0): ({"poison_success": 0.0, "val_acc": 88.0}, "2026-11-23T08:30:00+00:00"),
        ("adversarial_poisoning", 1): ({"poison_success": 100.0, "val_acc": 89.0}, "2026-11-23T08:40:00+00:00"),
    },
}
TABLES = tuple(FAKE)


def fake_result(job, value: float | dict, finished_at: str) -> dict:
    """A result.json as the runner writes it (docs/architecture.md), with fixed values:
    ``value`` is the test accuracy (with a curve) or the metrics themselves."""
    if isinstance(value, dict):
        metrics, curves = {**value, "train_acc": 99.0}, None
    else:
        metrics, curves = {"test_acc": value, "train_acc": 99.0}, {"epoch": [1, 2], "test_acc": [value / 2, value]}
    result = {
        "format_version": 1,
        "job": job.hash,
        "table": job.table,
        "row": job.row,
        "column": job.column,
        "trial": job.trial,
        "seed": job.config["seed"],
        "poison_seed": job.config["poison_seed"],
        "config": job.config,
        "metrics": metrics,
        "curves": curves,
        "timings": {"craft_s": 0.5, "train_s": 10.0},
        "hardware": {"device": "cpu", "name": "golden-cpu", "count": 1, "threads": 2},
        "versions": {"poisonbench": "0.1.0", "commit": "0123abc", "torch": "2.5.0", "lightning": "2.4.0",
                     "numpy": "2.1.0"},
        "finished_at": finished_at,
    }
    if curves is None:
        del result["curves"]
    return result


def render(table: str, out_dir: Path) -> Path:
    """Render the golden results of ``table`` into ``out_dir`` exactly as the golden test does."""
    from poisonbench.bench.aggregate import aggregate
    from poisonbench.bench.jobs import expand, read_results
    from poisonbench.bench.render import render_table
    from poisonbench.bench.tables import load_table

    spec = load_table(table)
    jobs = expand(spec, trials=TRIALS)
    results = read_results(jobs, RUNS)
    return render_table(spec, aggregate(spec, jobs, results), results, out_dir, spec.profile)


def main() -> None:
    os.environ["POISONBENCH_CONFIGS"] = str(CONFIGS)
    from poisonbench import files
    from poisonbench.bench.jobs import expand
    from poisonbench.bench.tables import load_table

    for table, fake in FAKE.items():
        shutil.rmtree(RUNS / table, ignore_errors=True)
        for job in expand(load_table(table), trials=TRIALS):
            if (job.row, job.trial) in fake:
                files.write_json(job.dir(RUNS) / "result.json", fake_result(job, *fake[job.row, job.trial]))
        with tempfile.TemporaryDirectory() as tmp:
            md = render(table, Path(tmp))
            target = LEADERBOARDS / Path(table).parent
            target.mkdir(parents=True, exist_ok=True)
            for suffix in SUFFIXES:
                shutil.copyfile(md.with_suffix(suffix), target / (Path(table).name + suffix))
        print(f"wrote {RUNS / table} and {LEADERBOARDS / table}.{{md,csv,json}}", file=sys.stderr)


if __name__ == "__main__":
    main()
