"""Regenerate the golden leaderboard of tests/test_bench_render.py.

    .venv/bin/python tests/golden/regenerate.py

Writes fake results for the frozen demo/digits spec (tests/golden/configs, 2 trials)
into tests/golden/runs/demo/digits/<hash>/result.json, renders them and copies the
.md, .csv and .json into tests/golden/leaderboards/demo/. Run it only when a change
of the leaderboard format is intended, and review the diff of the golden files.

The results cover every case a leaderboard shows: a full cell (2 of 2 trials), a
cell with one trial (no error bar) and a cell that was not run; time stamps with
different UTC offsets, where the lexicographically largest one is not the latest.
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
TABLE = "demo/digits"
TRIALS = 2
SUFFIXES = (".md", ".csv", ".json")  # the PNG is checked for existence only

# (row, trial) -> (test_acc, finished_at); other jobs have no result.
FAKE = {
    ("none", 0): (93.5, "2026-11-21T12:00:00+00:00"),
    ("none", 1): (92.0, "2026-11-21T13:00:00+02:00"),  # 11:00 UTC: largest text, not latest
    ("random_noise", 0): (41.25, "2026-11-21T12:10:00+00:00"),  # the latest
}


def fake_result(job, test_acc: float, finished_at: str) -> dict:
    """A result.json as the runner writes it (docs/architecture.md), with fixed values."""
    return {
        "format_version": 1,
        "job": job.hash,
        "table": job.table,
        "row": job.row,
        "column": job.column,
        "trial": job.trial,
        "seed": job.config["seed"],
        "poison_seed": job.config["poison_seed"],
        "config": job.config,
        "metrics": {"test_acc": test_acc, "train_acc": 99.0},
        "curves": {"epoch": [1, 2], "test_acc": [test_acc / 2, test_acc]},
        "timings": {"craft_s": 0.5, "train_s": 10.0},
        "hardware": {"device": "cpu", "name": "golden-cpu", "count": 1},
        "versions": {"poisonbench": "0.1.0", "commit": "0123abc", "torch": "2.5.0", "lightning": "2.4.0"},
        "finished_at": finished_at,
    }


def render(out_dir: Path) -> Path:
    """Render the golden results into ``out_dir`` exactly as the golden test does."""
    from poisonbench.bench.aggregate import aggregate
    from poisonbench.bench.jobs import expand, read_results
    from poisonbench.bench.render import render_table
    from poisonbench.bench.tables import load_table

    spec = load_table(TABLE)
    jobs = expand(spec, trials=TRIALS)
    results = read_results(jobs, RUNS)
    return render_table(spec, aggregate(spec, jobs, results), results, out_dir, spec.profile)


def main() -> None:
    os.environ["POISONBENCH_CONFIGS"] = str(CONFIGS)
    from poisonbench import files
    from poisonbench.bench.jobs import expand
    from poisonbench.bench.tables import load_table

    shutil.rmtree(RUNS / TABLE, ignore_errors=True)
    for job in expand(load_table(TABLE), trials=TRIALS):
        if (job.row, job.trial) in FAKE:
            files.write_json(job.dir(RUNS) / "result.json", fake_result(job, *FAKE[job.row, job.trial]))
    with tempfile.TemporaryDirectory() as tmp:
        md = render(Path(tmp))
        target = LEADERBOARDS / Path(TABLE).parent
        target.mkdir(parents=True, exist_ok=True)
        for suffix in SUFFIXES:
            shutil.copyfile(md.with_suffix(suffix), target / (Path(TABLE).name + suffix))
    print(f"wrote {RUNS / TABLE} and {LEADERBOARDS / TABLE}.{{md,csv,json}}", file=sys.stderr)


if __name__ == "__main__":
    main()
