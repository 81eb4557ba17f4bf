"""Nothing lost, nothing forged: job directories that are never someone else's,
claims that die with their process, results replaced only by their successors and
accepted only for their own job."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from poisonbench import files
from poisonbench.bench import runner
from poisonbench.bench.jobs import job_state, read_result, read_results, runs_root
from poisonbench.schema.job_dir import (
    MARKER_FILE, JobBusyError, claim, clear_job_dir, make_job_dir, result_stamp,
)
from poisonbench.cli import main
from poisonbench.errors import JobError

ROWS = ["none", "random_noise"]  # cheap fast-dev-run jobs on the embedded digits


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home of its own: these tests count, replace and forge results."""
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fast_plan(rows=ROWS):
    return runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=1, rows=rows,
                       fast_dev_run=True)[0]


def run_argv(rows=ROWS):
    return ["run", "--table", "demo/digits", "--fast-dev-run", "--trials", "1", "--rows", *rows]


# ------------------------------------------------------------------ 1. train --out


def test_train_out_refuses_a_foreign_directory_and_keeps_its_files(tmp_path, capsys):
    out = tmp_path / "x"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("hi")
    code = main(["train", "--dataset", "digits", "--model", "small_cnn", "--fast-dev-run", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not a poisonbench job directory" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.tex"] and (out / "thesis.tex").read_text() == "hi"

    (tmp_path / "file").write_text("keep")
    assert main(["train", "--dataset", "digits", "--model", "small_cnn", "--fast-dev-run",
                 "--out", str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "keep"


def test_a_job_directory_is_cleared_only_of_what_poisonbench_writes(tmp_path):
    config = {"seed": 1}
    job_dir = tmp_path / "job"
    make_job_dir(job_dir, config)  # created: marked as poisonbench's
    assert (job_dir / MARKER_FILE).is_file()
    (job_dir / "notes.txt").write_text("mine")
    (job_dir / "metrics.csv").write_text("half")
    (job_dir / ".metrics.csv.abc123.tmp").write_text("half")
    (job_dir / "wandb").mkdir()
    (job_dir / "result.json").write_text("{}")
    clear_job_dir(job_dir)
    assert sorted(p.name for p in job_dir.iterdir()) == [MARKER_FILE, "config.yaml", "notes.txt", "result.json"]

    empty = tmp_path / "empty"
    empty.mkdir()
    make_job_dir(empty, config)  # an empty directory is adopted
    assert (empty / MARKER_FILE).is_file()

    unmarked = tmp_path / "unmarked"
    unmarked.mkdir()
    (unmarked / "metrics.csv").write_text("someone's")
    with pytest.raises(JobError, match="not a poisonbench job directory"):
        make_job_dir(unmarked, config)
    with pytest.raises(JobError, match="not a poisonbench job directory"):
        clear_job_dir(unmarked)
    assert [p.name for p in unmarked.iterdir()] == ["metrics.csv"]


# ------------------------------------------------------------------ 2. claims


def test_a_claim_is_exclusive_and_dies_with_its_process(tmp_path, capsys):
    job_dir = tmp_path / "job"
    make_job_dir(job_dir, fast_plan().jobs[0].config)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from poisonbench.schema.job_dir import claim
            held = claim({str(job_dir)!r})
            print("held", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobBusyError, match="being run by another process"):
            claim(job_dir)
        # `poisonbench job DIR` on a claimed job: one sentence, nothing touched
        (job_dir / "metrics.csv").write_text("the holder's")
        assert main(["job", str(job_dir)]) == 2
        assert "being run by another process" in capsys.readouterr().err
        assert (job_dir / "metrics.csv").read_text() == "the holder's"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claim(job_dir):  # a killed holder leaves no stale claim
        pass


PROBE = textwrap.dedent("""
    # A poisonbench that records every start of a job in runs.txt of its directory (a
    # name poisonbench never clears), also in the workers of --gpus.
    import os, sys, time
    from pathlib import Path

    import poisonbench.bench.executors as executors
    import poisonbench.training.run as job

    real_run_job = job.run_job

    def counted(config, job_dir, **kw):
        with open(Path(job_dir) / "runs.txt", "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # widen the window in which the other run could pick the job too
        return real_run_job(config, job_dir, **kw)

    job.run_job = counted
    executors.job_command = lambda job_dir, data_root, wandb: [sys.executable, __file__, "job", str(job_dir)]
    if __name__ == "__main__":  # the workers of --gpus import this file too (spawn), for run_job
        from poisonbench.cli import main

        sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("gpus", [None, "0,1"], ids=["in-process", "two-workers"])
def test_two_concurrent_runs_run_every_job_exactly_once(home, tmp_path, gpus):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    rows = ["none", "random_noise", "synthetic"]
    argv = [sys.executable, str(probe), *run_argv(rows)] + (["--gpus", gpus] if gpus else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    plan = fast_plan(rows)
    for j in plan.jobs:
        starts = (j.dir(runs_root()) / "runs.txt").read_text().split()
        assert len(starts) == 1, (j.label, starts, outputs)
        assert job_state(j, runs_root()) == "done"
    assert len(read_results(plan.jobs, runs_root())) == len(rows)


# ------------------------------------------------------------------ 4. destructive ordering


@pytest.fixture
def finished(home):
    """Two finished jobs in a home of their own: (plan, {job dir: result stamp})."""
    assert main(run_argv()) == 0
    plan = fast_plan()
    return plan, {j.dir(runs_root()): result_stamp(j.dir(runs_root())) for j in plan.jobs}


def test_rerun_replaces_results_only_when_new_ones_are_written(finished, monkeypatch):
    plan, stamps = finished
    import poisonbench.training.run as job_module

    def killed(config, job_dir, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(job_module, "run_job", killed)
        assert main([*run_argv(), "--rerun"]) == 130
    assert {d: result_stamp(d) for d in stamps} == stamps  # every result is still there
    assert all(job_state(j, runs_root()) == "done" for j in plan.jobs)

    assert main([*run_argv(), "--rerun"]) == 0
    assert all(result_stamp(d) not in (None, stamps[d]) for d in stamps)  # each replaced by a new one


def test_job_verb_keeps_a_finished_result_until_its_new_one(finished, monkeypatch):
    plan, stamps = finished
    job_dir = plan.jobs[0].dir(runs_root())
    import poisonbench.training.run as job_module

    seen = {}

    def killed(config, job_dir, **kw):
        seen["result"] = result_stamp(job_dir)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(job_module, "run_job", killed)
        assert main(["job", str(job_dir)]) == 130
    assert seen["result"] == stamps[job_dir] == result_stamp(job_dir)
    assert main(["job", str(job_dir)]) == 0 and result_stamp(job_dir) != stamps[job_dir]
    assert read_result(plan.jobs[0], runs_root())["job"] == plan.jobs[0].hash


def test_rerun_on_slurm_without_submitit_touches_nothing(finished, monkeypatch, capsys):
    plan, stamps = finished
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    pending = fast_plan(["synthetic"]).jobs[0].dir(runs_root())
    assert main(["run", "--table", "demo/digits", "--fast-dev-run", "--trials", "1", "--rows", *ROWS, "synthetic",
                 "--rerun", "--executor", "slurm"]) == 2
    assert "needs submitit" in capsys.readouterr().err
    assert {d: result_stamp(d) for d in stamps} == stamps and not pending.exists()


# ------------------------------------------------------------------ 7. results tied to their job


def test_a_result_copied_from_another_job_is_not_done(finished):
    plan, _ = finished
    none, noise = plan.jobs
    original = json.loads((none.dir(runs_root()) / "result.json").read_text())
    forged = noise.dir(runs_root()) / "result.json"
    for copy in (original, {k: v for k, v in original.items() if k != "job"},
                 {**original, "job": noise.hash}):  # claims the hash, but holds another config
        files.write_json(forged, copy)
        assert job_state(noise, runs_root()) == "invalid"
        with pytest.raises(JobError, match=f"not a result of job {noise.hash}"):
            read_result(noise, runs_root())
        assert set(read_results(plan.jobs, runs_root())) == {none.hash}  # left out, not rendered

    assert main(run_argv()) == 0  # the forged job is run again and gets its own result
    assert read_result(noise, runs_root())["config"] == noise.config


def test_a_result_with_a_metric_out_of_range_is_refused(finished, tmp_path, monkeypatch):
    plan, _ = finished
    job = plan.jobs[0]
    path = job.dir(runs_root()) / "result.json"
    result = json.loads(path.read_text())
    for value in (math.nan, math.inf, -1.0, 100.5, "80", True):
        result["metrics"]["test_acc"] = value
        path.write_text(json.dumps(result))  # json writes NaN and Infinity bare, as the old write_json did
        assert job_state(job, runs_root()) == "invalid", value
        with pytest.raises(JobError, match="test_acc|NaN is not JSON|Infinity is not JSON"):
            read_result(job, runs_root())

    # the leaderboard leaves the refused result out and stays valid JSON
    monkeypatch.setenv("POISONBENCH_LEADERBOARDS", str(tmp_path / "boards"))
    result["metrics"]["test_acc"] = math.nan
    path.write_text(json.dumps(result))
    board = runner.write_leaderboard(plan).with_suffix(".json").read_text()
    assert "NaN" not in board and json.loads(board)
    result["metrics"]["test_acc"] = 100.0  # the range's end is a value
    path.write_text(json.dumps(result))
    assert job_state(job, runs_root()) == "done"


def test_write_json_writes_valid_json_and_run_job_writes_no_out_of_range_result(tmp_path):
    from poisonbench.training.run import write_result

    files.write_json(tmp_path / "board.json", {"mean": math.nan, "cells": [1.5, math.inf, (2.0, -math.inf)]})

    def bare(name):
        raise ValueError(name)

    assert json.loads((tmp_path / "board.json").read_text(), parse_constant=bare) == {
        "mean": None, "cells": [1.5, None, [2.0, None]]}
    with pytest.raises(JobError, match=r"test_acc is nan.*no result was written"):
        write_result(tmp_path, {"metrics": {"test_acc": math.nan, "train_acc": None}})
    assert not (tmp_path / "result.json").exists()
