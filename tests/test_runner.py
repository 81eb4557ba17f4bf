"""The runner: fast-dev-run over tables, skip done jobs, and exactly-once completion
after a run is killed; W&B offline logging; DDP with two CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poisonbench.bench import runner
from poisonbench.bench.jobs import job_state, runs_root
from poisonbench.bench.tables import load_table
from poisonbench.cli import main


# Slow (about a minute): .ci/run runs it after make test.
@pytest.mark.slow
def test_fast_dev_run_demo_renders_nothing(tmp_path):
    plans = runner.plan(runner.resolve_tables("demo", None), profile=None, trials=None, rows=None, fast_dev_run=True)
    assert [len(p.jobs) for p in plans] == [len(p.spec.cells()) for p in plans]  # one trial per cell by default
    assert main(["run", "--suite", "demo", "--fast-dev-run"]) == 0
    assert all(job_state(j, runs_root()) == "done" for j in plans[0].jobs)
    assert not (runner.leaderboards_dir() / "demo" / "digits.md").exists()
    result = json.loads((plans[0].jobs[0].dir(runs_root()) / "result.json").read_text())
    assert result["config"]["fast_dev_run"] is True and 0 <= result["metrics"]["test_acc"] <= 100


def test_job_verb_runs_an_analysis_job(capsys):
    """`poisonbench job DIR` (what the executors launch) on a separability job: its
    metric is probe_acc, not test_acc, and the verb must not trip over that."""
    from poisonbench.training.run import prepare_dir

    plan = runner.plan(runner.resolve_tables(None, "demo/digits-separability"), profile=None, trials=None,
                       rows=["clean"], fast_dev_run=True)[0]
    job_dir = plan.jobs[0].dir(runs_root())
    prepare_dir(job_dir, plan.jobs[0].config)
    assert main(["job", str(job_dir)]) == 0
    assert "probe_acc" in capsys.readouterr().out and job_state(plan.jobs[0], runs_root()) == "done"


def test_killed_run_finishes_every_job_exactly_once(monkeypatch, tmp_path):
    import poisonbench.training.run as job_module

    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path))  # no job done yet

    real = job_module.run_job
    completed: list[str] = []
    calls = {"n": 0}

    def flaky(config, job_dir, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            (Path(job_dir) / "metrics.csv").write_text("half")  # a killed job leaves debris
            raise KeyboardInterrupt
        result = real(config, job_dir, **kw)
        completed.append(Path(job_dir).name)
        return result

    monkeypatch.setattr(job_module, "run_job", flaky)
    argv = ["run", "--table", "demo/digits", "--fast-dev-run", "--trials", "1"]
    assert main(argv) == 130  # interrupted
    assert len(completed) == 1
    assert main(argv) == 0
    jobs = len(load_table("demo/digits").cells())
    assert len(completed) == jobs and len(set(completed)) == jobs
    assert main(argv) == 0 and len(completed) == jobs  # nothing left to do


# Slow (3–4 minutes with every robuster row): `make smoke` and .ci/run run it after make test.
@pytest.mark.slow
def test_smoke_every_row_of_every_table(fixture_root):
    """`make smoke` inside `make test`: every row of every table, one batch each, on
    fixture files in the real formats, on a fresh home (no backbone files: a smoke run
    keeps the fresh backbone where a pretrained defense's file is missing)."""
    assert main(["run", "--suite", "all", "--fast-dev-run", "--data-root", str(fixture_root)]) == 0
    plans = runner.plan(runner.resolve_tables("all", None), profile=None, trials=None, rows=None, fast_dev_run=True)
    planned = runner.not_implemented(plans)  # cells naming an attack or defense still to come
    for p in plans:
        assert all(job_state(j, runs_root()) == "done" for j in p.jobs
                   if (p.spec.id, j.row, j.column) not in planned), p.spec.id
    assert {table for table, _, _ in planned} <= {"robuster/table1", "robuster/table2", "robuster/table3",
                                                  "robuster/fig3", "robuster/sec5_4", "demo/digits-integrity",
                                                  "demo/digits-integrity-defenses"}


def test_wandb_offline_run_directory(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "job"
    # Not --fast-dev-run: Lightning switches loggers off for it.
    assert main(["train", "--dataset", "digits", "--model", "small_cnn", "--set", "train.epochs=1",
                 "--wandb", "--out", str(out)]) == 0
    assert list((out / "wandb").glob("offline-run-*")), list(out.rglob("*"))[:20]


def test_ddp_two_cpu_processes_one_result(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "poisonbench", "train", "--dataset", "digits", "--model", "small_cnn",
         "--set", "train.devices=2", "train.strategy=ddp", "train.accelerator=cpu", "train.epochs=1",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(out.rglob("result.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["hardware"]["processes"] == 2 and 0 <= result["metrics"]["test_acc"] <= 100


def test_synthetic_attack_lowers_digits_accuracy():
    """The demo's claim on one trial: synthetic shortcuts take most of the clean test
    accuracy away; random noise of a larger ℓ∞ budget does not."""
    from poisonbench.bench.jobs import read_results

    rows = ["none", "random_noise", "synthetic"]  # the optimising attacks craft for minutes
    assert main(["run", "--table", "demo/digits", "--trials", "1", "--rows", *rows]) == 0
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=1, rows=rows,
                       fast_dev_run=False)[0]
    results = read_results(plan.jobs, runs_root())
    acc = {j.row: results[j.hash]["metrics"]["test_acc"] for j in plan.jobs}
    assert acc["none"] > 80, acc  # 900 training images since the aux split: 85-88 % measured
    assert acc["synthetic"] < acc["none"] - 30, acc
    assert abs(acc["random_noise"] - acc["none"]) < 8, acc
    assert (runner.leaderboards_dir() / "demo" / "digits.json").is_file()


@pytest.mark.slow
def test_optimising_attacks_lower_digits_accuracy_by_30_points():
    """The shortcuts attacks issue's check, as the demo leaderboard measures it: on digits
    (cpu profile, mean over the demo's trials) error-minimizing noise and targeted
    adversarial poisons each leave clean test accuracy at least 30 points below none.
    Minutes: error-minimizing crafting dominates (`pytest -m slow`)."""
    import statistics

    from poisonbench.bench.jobs import read_results

    rows = ["none", "error_minimizing", "adversarial_targeted"]
    assert main(["run", "--table", "demo/digits", "--rows", *rows]) == 0
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=None, rows=rows,
                       fast_dev_run=False)[0]
    results = read_results(plan.jobs, runs_root())
    acc = {row: statistics.fmean(results[j.hash]["metrics"]["test_acc"] for j in plan.jobs if j.row == row)
           for row in rows}
    print("mean clean test accuracy:", acc)
    assert acc["error_minimizing"] < acc["none"] - 30, acc
    assert acc["adversarial_targeted"] < acc["none"] - 30, acc


@pytest.mark.slow
def test_pretrained_linear_eval_defends_digits_against_synthetic_shortcuts():
    """The defenses issue's check on demo/digits-defenses (cpu profile, mean over the
    demo's trials; the first pretrained job pre-trains the backbone on the aux split):
    under synthetic shortcuts, linear eval scores 30+ points above undefended training
    and within 10 of linear eval on clean data; fine-tuning stays below linear eval;
    FGSM adversarial training beats no defense. Minutes (`pytest -m slow`)."""
    import statistics

    from poisonbench.bench.jobs import read_results

    rows = ["none", "synthetic"]
    assert main(["run", "--table", "demo/digits-defenses", "--rows", *rows]) == 0
    plan = runner.plan(runner.resolve_tables(None, "demo/digits-defenses"), profile=None, trials=None,
                       rows=rows, fast_dev_run=False)[0]
    results = read_results(plan.jobs, runs_root())
    acc = {(j.row, j.column): [] for j in plan.jobs}
    for j in plan.jobs:
        acc[j.row, j.column].append(results[j.hash]["metrics"]["test_acc"])
    acc = {cell: statistics.fmean(values) for cell, values in acc.items()}
    print("mean clean test accuracy:", acc)
    assert acc["synthetic", "linear_eval"] > acc["synthetic", "undefended"] + 30, acc
    assert abs(acc["synthetic", "linear_eval"] - acc["none", "linear_eval"]) < 10, acc
    assert acc["synthetic", "finetune"] < acc["synthetic", "linear_eval"] - 10, acc
    assert acc["synthetic", "adversarial_training"] > acc["synthetic", "undefended"] + 20, acc


def test_wandb_craft_and_aggregate_runs(isolated_home, tmp_path):
    pytest.importorskip("wandb")
    spec = tmp_path / "mini.yaml"
    spec.write_text((Path(runner.REPO) / "configs/tables/demo/digits.yaml").read_text()
                    .replace("id: demo/digits", "id: demo/wandbmini").replace("attack_params: {eps: 0.03137254901960784, kind: samplewise}", "attack_params: {eps: 0.0313, kind: classwise}"))
    assert main(["run", "--table", str(spec), "--rows", "random_noise", "--trials", "1", "--wandb"]) == 0
    runs = list(runs_root().glob("demo/wandbmini/*/wandb/offline-run-*"))
    assert len(runs) >= 2  # the craft run and the train run of the job
    assert list((isolated_home / "wandb" / "wandb").glob("offline-run-*"))  # the aggregate run


# Slow (about 45 s); tests/test_jobs_per_device.py covers worker placement by default; .ci/run runs it.
@pytest.mark.slow
def test_local_executor_one_job_per_listed_gpu():
    """``--gpus`` runs each job as ``poisonbench job DIR`` with its own
    CUDA_VISIBLE_DEVICES; on a CPU machine the children simply train on the CPU."""
    assert main(["run", "--table", "demo/digits", "--fast-dev-run", "--trials", "2", "--rerun",
                 "--gpus", "0,1"]) == 0
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=2, rows=None,
                       fast_dev_run=True)[0]
    logs = [(j.dir(runs_root()) / "job.log") for j in plan.jobs]
    assert all(job_state(j, runs_root()) == "done" for j in plan.jobs) and all(p.is_file() for p in logs)


def test_slurm_executor_submits_one_array_task_per_job(monkeypatch, tmp_path):
    """With a stand-in for submitit: every job directory becomes one task of one array,
    and each task runs the job by its directory alone."""
    import types

    from poisonbench.bench.executors import EXECUTORS

    submitted = {}

    class FakeExecutor:
        def __init__(self, folder):
            submitted["folder"] = folder

        def update_parameters(self, **kw):
            submitted["params"] = kw

        def map_array(self, fn, *arglists):
            submitted["tasks"] = list(zip(*arglists))
            return [types.SimpleNamespace(result=lambda: None, done=lambda: True) for _ in submitted["tasks"]]

    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=FakeExecutor))
    dirs = [tmp_path / "runs" / "t" / name for name in ("a", "b")]
    done = []
    EXECUTORS.get("slurm")(dirs, data_root="/data", slurm={"slurm_partition": "gpu"}, on_done=done.append)
    assert [t[0] for t in submitted["tasks"]] == [str(d) for d in dirs] and done == dirs
    assert submitted["params"] == {"slurm_partition": "gpu"}
