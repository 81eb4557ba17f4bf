"""Several jobs per device (``--jobs-per-device K``): long-lived worker processes give the
same results as jobs run one after another in one process, survive a failing job, stop
on Ctrl-C, and share a GPU through CUDA MPS where it is installed."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from poisonbench.bench import runner, workers
from poisonbench.bench.catalogue import configs_dir
from poisonbench.bench.jobs import runs_root
from poisonbench.bench.workers import CraftTask, worker_devices, worker_main
from poisonbench.errors import UnknownNameError
from poisonbench.schema.job_dir import make_job_dir

REPO = Path(__file__).resolve().parent.parent


# Seconds per job, with real (if short) training: a fast-dev-run job's accuracy on 8
# images does not tell one thread count from another, two epochs over digits does.
PROFILE = """\
name: tiny
description: a few seconds per job
families:
  demo:
    train: {epochs: 2, batch_size: 64, lr: 0.05, milestones: [1]}
    override: {dataset: digits, model: small_cnn, model_params: {pool: 1, width: 8}}
    attack_override:
      error_minimizing: {model: small_cnn, model_params: {pool: 1, width: 4}, steps: 2, train_steps: 2,
                         max_rounds: 2, batch_size: 64}
      adversarial: {model: small_cnn, model_params: {pool: 1, width: 4}, steps: 2, restarts: 1,
                    surrogate_epochs: 1}
"""


def run_cli_in(home: Path, *argv: str, configs: Path | None = None, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(POISONBENCH_HOME=str(home), POISONBENCH_LEADERBOARDS=str(home / "leaderboards"),
               PYTHONPATH=str(REPO))
    if configs is not None:
        env["POISONBENCH_CONFIGS"] = str(configs)
    return subprocess.Popen([sys.executable, "-m", "poisonbench", "run", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def results(home: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in home.glob("runs/demo/digits/*/result.json")}


def test_two_jobs_per_device_give_the_results_of_one(tmp_path):
    """Every row of demo/digits (four poison stores, crafted by the jobs themselves with
    K = 1 and by the workers beforehand with K = 2), two trials each: bit-identical
    metrics and curves, whatever thread count the machine would give by default (with
    the intra-op threads following K, as cores // K, the accuracies differ)."""
    configs = tmp_path / "configs"
    shutil.copytree(configs_dir(), configs)
    (configs / "profiles" / "tiny.yaml").write_text(PROFILE)
    argv = ("--table", "demo/digits", "--profile", "tiny", "--trials", "2")
    found = {}
    for k in (1, 2):
        home = tmp_path / f"k{k}"
        done = run_cli_in(home, *argv, "--jobs-per-device", str(k), configs=configs)
        out, _ = done.communicate(timeout=900)
        assert done.returncode == 0, out[-3000:]
        found[k] = results(home)
    assert len(found[1]) == 10 and found[1].keys() == found[2].keys()
    for job, one in found[1].items():
        two = found[2][job]
        assert two["metrics"] == one["metrics"], job
        assert two["curves"] == one["curves"], job
        assert one["hardware"]["threads"] == two["hardware"]["threads"] == workers.CPU_JOB_THREADS
        assert two["store"]["path"] == one["store"]["path"].replace(str(tmp_path / "k1"), str(tmp_path / "k2"))
    # K = 2 ran in two worker processes, each job's output in its job.log.
    assert sorted(p.name for p in (tmp_path / "k2" / "runs" / "_workers").iterdir()) == ["worker-0.log",
                                                                                       "worker-1.log"]
    assert all((tmp_path / "k2" / "runs" / "demo" / "digits" / job / "job.log").is_file() for job in found[2])


def fast_jobs(rows: list[str], trials: int = 1):
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=trials, rows=rows,
                       fast_dev_run=True)[0]
    for job in plan.jobs:
        make_job_dir(job.dir(runs_root()), job.config)
    return plan.jobs


def test_a_failing_job_is_reported_and_the_worker_runs_the_next(tmp_path):
    bad, good = fast_jobs(["none"], trials=2)
    bad_dir, good_dir = bad.dir(runs_root()), good.dir(runs_root())
    config = yaml.safe_load((bad_dir / "config.yaml").read_text())
    (bad_dir / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": "nodigits"}))

    ctx = mp.get_context("spawn")
    tasks, replies = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=worker_main, args=(0, tasks, replies, 1, None, False, str(tmp_path / "w.log")))
    worker.start()
    try:
        assert replies.get(timeout=120)[0] == "ready"
        seen = []
        for job_dir in (bad_dir, good_dir):
            tasks.put(("job", (str(job_dir), False)))
            assert replies.get(timeout=120)[:3] == ("claimed", 0, str(job_dir))
            tasks.put(True)
            seen.append(replies.get(timeout=300))
        (failed, _, where, (pickled, text)), (done, *_) = seen
        assert (failed, where, done) == ("failed", str(bad_dir), "done")
        assert "nodigits" in text and "nodigits" in (bad_dir / "job.log").read_text()  # the traceback
        assert isinstance(runner_error(pickled), UnknownNameError)  # the CLI's one-line error, as in-process
        assert (good_dir / "result.json").is_file() and worker.is_alive()
        tasks.put(None)
        worker.join(60)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def runner_error(pickled):
    import pickle

    return pickle.loads(pickled)


def test_a_failed_job_stops_the_pool_with_its_error(tmp_path):
    """As in one process: the run raises the job's own error (one line, exit 2)."""
    jobs = fast_jobs(["none", "random_noise"])
    bad_dir = jobs[0].dir(runs_root())
    config = yaml.safe_load((bad_dir / "config.yaml").read_text())
    (bad_dir / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": "nodigits"}))
    done = []
    with pytest.raises(UnknownNameError, match="nodigits"):
        workers.run_pool([j.dir(runs_root()) for j in jobs], [None, None], data_root=None, wandb=False,
                         crafts={j.dir(runs_root()): runner.craft_task(j.config) for j in jobs},
                         pending=lambda d: True, on_done=done.append, on_skip=done.append,
                         on_busy=done.append, on_note=print, log_dir=tmp_path)


def child_pids(pid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc")
def test_ctrl_c_stops_the_workers_and_leaves_the_jobs_to_run_again(tmp_path):
    home = tmp_path / "home"
    run = run_cli_in(home, "--table", "demo/digits", "--rows", "none", "--trials", "2", "--jobs-per-device", "2",
                     start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(home.glob("runs/demo/digits/*/job.log"))) < 2:  # both workers are training
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.5)
        pids = child_pids(run.pid)
        assert len(pids) >= 2
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    time.sleep(1)
    assert not [p for p in pids if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not list(home.glob("runs/demo/digits/*/result.json"))


def test_workers_spread_over_the_gpus_each_gpu_once():
    assert worker_devices(["0", "1"], 2, 10) == ["0", "1", "0", "1"]
    assert worker_devices(["0", "1", "0"], 1, 10) == ["0", "1"]
    assert worker_devices(None, 3, 2) == [None, None]  # never more workers than jobs
    assert workers.auto_jobs_per_device(["0"]) == 1
    assert 1 <= workers.auto_jobs_per_device(None) <= workers.MAX_AUTO_CPU_WORKERS


def test_precraft_crafts_each_store_once_on_each_gpu_once(monkeypatch):
    import torch

    import poisonbench.attacks as attacks

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attacks, "craft_cached", lambda name, data, params, seed, devices: calls.append((name, devices)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    jobs = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=2,
                       rows=["none", "error_minimizing", "synthetic"], fast_dev_run=True)[0].jobs
    runner.precraft(jobs, None, runner.Console(quiet=True), ["0", "0", "1"])
    assert calls == [("synthetic", ["cuda:0"]), ("error_minimizing", ["cuda:0", "cuda:1"])]


def test_integrity_stores_are_left_to_their_jobs(monkeypatch):
    """Their store depends on the trial's target, which only the job draws: pre-crafting
    it from the plain training set failed ("needs a trial's target")."""
    import poisonbench.attacks as attacks

    calls = []
    monkeypatch.setattr(attacks, "craft_cached", lambda *a, **kw: calls.append(a))
    jobs = runner.plan(runner.resolve_tables(None, "demo/digits-integrity"), profile=None, trials=1,
                       rows=["backdoor_patch"], fast_dev_run=True)[0].jobs
    assert [runner.craft_task(j.config) for j in jobs] == [None, None]
    runner.precraft(jobs, None, runner.Console(quiet=True), ["0"])
    assert calls == []
    task = runner.craft_task(fast_jobs(["error_minimizing"])[0].config)
    assert isinstance(task, CraftTask) and task.attack == "error_minimizing"


def fake_mps(tmp_path, monkeypatch, code: int = 0) -> Path:
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / workers.MPS_CONTROL
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$* $(cat -) $CUDA_MPS_PIPE_DIRECTORY" >> {calls}\nexit {code}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-daemon"))
    return calls


def test_mps_daemon_is_started_for_a_shared_gpu_and_stopped_after(tmp_path, monkeypatch):
    calls = fake_mps(tmp_path, monkeypatch)
    notes = []
    with workers.mps(["0", "0"], notes.append) as env:
        pipe = env["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert calls.read_text().split() == ["-d", pipe]
    assert calls.read_text().splitlines()[1].split() == ["quit", pipe]
    assert not Path(pipe).exists() and "started the CUDA MPS daemon" in notes[0]


def test_no_mps_on_the_cpu_nor_for_one_job_per_gpu(tmp_path, monkeypatch):
    calls = fake_mps(tmp_path, monkeypatch)
    for devices in ([None, None], ["0", "1"]):
        with workers.mps(devices, print) as env:
            assert env == {}
    assert not calls.exists()


def test_a_running_mps_daemon_is_used_and_a_failed_start_is_said(tmp_path, monkeypatch):
    calls = fake_mps(tmp_path, monkeypatch, code=1)
    notes = []
    with workers.mps(["0", "0"], notes.append) as env:  # the daemon does not start
        assert env == {}
    assert "could not start" in notes[-1]
    running = tmp_path / "running"
    running.mkdir()
    (running / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(running))
    with workers.mps(["0", "0"], notes.append) as env:
        assert env == {}
    assert "already running" in notes[-1] and len(calls.read_text().splitlines()) == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--jobs-per-device", "0"], "--jobs-per-device expects a positive integer or auto"),
    (["--jobs-per-device", "2", "--executor", "slurm"], "--jobs-per-device"),
])
def test_bad_jobs_per_device_is_one_line(capsys, argv, fragment):
    from test_cli import one_line_error, run_cli

    code, _, err = run_cli(capsys, "run", "--table", "demo/digits", "--fast-dev-run", *argv)
    one_line_error(code, err, fragment)
