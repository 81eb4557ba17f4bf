"""The slurm executor against a real SLURM cluster (marker ``slurm``, skipped by default).

Start a single-node cluster first (root, Debian's slurm-wlm and munge):
``scripts/slurm-cluster.sh start``, then ``pytest -m slurm``; ``.ci/run`` does both.
Every run goes through the CLI in a child, as a user's would: the array tasks are
separate processes that sbatch starts with the child's environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

RUN_TIMEOUT_S = 900


def _cluster_state() -> str | None:
    """The node's state as sinfo reports it, or None when no cluster answers."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # .ci/run sets POISONBENCH_REQUIRE_SLURM=1: there a missing cluster is a failure, not a skip.
    missing = pytest.fail if os.environ.get("POISONBENCH_REQUIRE_SLURM") == "1" else pytest.skip
    state = _cluster_state()
    if state is None:
        missing("no SLURM cluster answers sinfo (start one: sudo scripts/slurm-cluster.sh start)")
    if state.rstrip("*~#") not in ("idle", "mixed", "allocated", "completing"):
        missing(f"the SLURM node is {state}, not usable (scripts/slurm-cluster.sh start resumes it)")
    try:
        import submitit  # noqa: F401
    except ImportError:
        missing("the slurm executor needs submitit: pip install -e '.[slurm]'")


def _home(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    return {**os.environ, "POISONBENCH_HOME": str(home), "POISONBENCH_LEADERBOARDS": str(home / "leaderboards"),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "poisonbench", "run", "--executor", "slurm",
            "--slurm", "timeout_min=15", "cpus_per_task=1", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _results(env: dict) -> list[dict]:
    runs = Path(env["POISONBENCH_HOME"]) / "runs"
    return [json.loads(p.read_text()) for p in sorted(runs.rglob("result.json"))]


def _array_tasks(env: dict) -> list[Path]:
    """The result files submitit's array tasks left: one per task that ran to its end."""
    return sorted((Path(env["POISONBENCH_HOME"]) / "runs").rglob("_slurm/*_result.pkl"))


def test_fast_dev_run_table_on_fixtures_runs_each_job_once(tmp_path, fixture_root):
    env = _home(tmp_path)
    rows = ("none", "synthetic", "error_minimizing")
    argv = ("--table", "shortcuts/table2", "--rows", *rows, "--fast-dev-run", "--data-root", str(fixture_root))
    _run(env, *argv)
    results = _results(env)
    assert sorted(r["row"] for r in results) == sorted(rows)
    assert all(r["config"]["fast_dev_run"] and 0 <= r["metrics"]["test_acc"] <= 100 for r in results)
    assert len(_array_tasks(env)) == len(rows)  # one array task per job, none ran twice
    stamps = {r["job"]: r["finished_at"] for r in results}

    again = _run(env, *argv)  # nothing left to do: nothing is submitted
    assert f"{len(rows)} jobs already done" in again.stdout + again.stderr
    assert len(_array_tasks(env)) == len(rows)
    assert {r["job"]: r["finished_at"] for r in _results(env)} == stamps


def test_real_cpu_table_renders_its_leaderboard(tmp_path):
    """A short real table (the cpu profile's recipe, no fast-dev-run): the leaderboard is
    rendered from the results the array tasks wrote."""
    env = _home(tmp_path)
    rows = ("none", "random_noise")
    _run(env, "--table", "demo/digits", "--rows", *rows, "--trials", "1")
    results = _results(env)
    assert sorted(r["row"] for r in results) == sorted(rows)
    assert all(not r["config"]["fast_dev_run"] and r["curves"]["epoch"] for r in results)
    assert len(_array_tasks(env)) == len(rows)
    board = Path(env["POISONBENCH_LEADERBOARDS"]) / "demo" / "digits.md"
    text = board.read_text()
    for r in results:
        assert f"{r['metrics']['test_acc']:.1f}" in text  # each job's accuracy made it into the table


def _squeue(*args: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-r", *args], capture_output=True, text=True, timeout=60).stdout.split()


# How a running task is made to stop and come back: requeued by hand, or sent the
# signal SLURM sends before the time limit (sbatch --signal=USR2@90 from submitit), on
# which submitit calls ResumableJob.checkpoint and requeues the task itself.
INTERRUPTIONS = {"scontrol-requeue": ["scontrol", "requeue"], "time-limit-signal": ["scancel", "--signal=USR2"]}
REQUEUED = ["--table", "demo/digits", "--rows", "random_noise", "--trials", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The requeued job's result, run here without interruption."""
    env = _home(tmp_path_factory.mktemp("uninterrupted"))
    proc = subprocess.run([sys.executable, "-m", "poisonbench", "run", *REQUEUED], capture_output=True,
                          text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = _results(env)
    return result


@pytest.mark.parametrize("how", list(INTERRUPTIONS))
def test_a_requeued_running_job_resumes_from_its_checkpoint(tmp_path, how, uninterrupted):
    """A task stopped mid-training and requeued starts again on its job directory and
    continues from the job's checkpoint, to the result an uninterrupted run of the same
    job gives."""
    env = _home(tmp_path)
    run = subprocess.Popen([sys.executable, "-m", "poisonbench", "run", "--executor", "slurm",
                            "--slurm", "timeout_min=15", "cpus_per_task=1", *REQUEUED],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        runs = Path(env["POISONBENCH_HOME"]) / "runs"
        deadline = time.monotonic() + 600
        while not list(runs.rglob("checkpoints/last.ckpt")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        tasks = _squeue("-o", "%i")
        assert len(tasks) == 1 and not list(runs.rglob("result.json")), run.poll()
        subprocess.run([*INTERRUPTIONS[how], tasks[0]], check=True, timeout=60)
        # A requeued job waits about two minutes before it may start again; not here.
        while _squeue("-j", tasks[0], "-o", "%T") != ["PENDING"] and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={tasks[0]}", "StartTime=now"], check=True, timeout=60)
        out = run.communicate(timeout=600)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    logs = list(runs.rglob("_slurm/*_log.err"))
    assert len(logs) == 1 and logs[0].read_text().count("resuming") == 1, out  # the second attempt resumed
    [resumed] = _results(env)

    assert resumed["metrics"] == uninterrupted["metrics"] and resumed["curves"] == uninterrupted["curves"]
