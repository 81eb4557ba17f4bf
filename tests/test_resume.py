"""A job checkpoints its training state in its directory and resumes from it: killed
with SIGKILL mid-training and started again, it ends with the result.json metrics and
curve of an uninterrupted run (bit-identical on the CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poisonbench.bench import runner
from poisonbench.fitting.trainer import CHECKPOINT_DIR, checkpoint_path
from poisonbench.schema.job_dir import WRITTEN, clear_job_dir
from poisonbench.training.run import prepare_dir

EPOCHS = 5


def _config(row: str = "random_noise") -> dict:
    """A demo/digits job of the cpu profile, shortened to a few epochs."""
    plan = runner.plan(runner.resolve_tables(None, "demo/digits"), profile=None, trials=1, rows=[row],
                       fast_dev_run=False)[0]
    config = json.loads(json.dumps(plan.jobs[0].config))
    config["train"].update(epochs=EPOCHS, milestones=[3])
    return config


def _job(job_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "poisonbench", "job", str(job_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(job_dir: Path) -> dict:
    return json.loads((job_dir / "result.json").read_text())


def test_checkpoint_dir_is_cleared_as_poisonbench_writes_it():
    assert CHECKPOINT_DIR in WRITTEN


def test_sigkilled_job_resumes_to_the_uninterrupted_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    config = _config()
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        prepare_dir(d, config).release()

    child = _job(killed, env)
    ckpt = checkpoint_path(killed)
    deadline = time.monotonic() + 300
    while not ckpt.is_file() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.is_file(), child.communicate()[0][-3000:]
    os.kill(child.pid, signal.SIGKILL)  # after an epoch's checkpoint, before the last epoch
    child.wait()
    assert not (killed / "result.json").exists()
    state = torch.load(ckpt, weights_only=True)  # nothing in it needs unpickling arbitrary objects
    assert 1 <= state["epoch"] + 1 < EPOCHS and "optimizer_states" in state and "lr_schedulers" in state

    resumed = _job(killed, env)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming" in out  # it continued from the checkpoint, not from scratch
    uninterrupted = _job(whole, env)
    out = uninterrupted.communicate(timeout=300)[0]
    assert uninterrupted.returncode == 0, out[-3000:]
    assert "resuming" not in out

    a, b = _result(whole), _result(killed)
    assert a["metrics"] == b["metrics"]
    assert a["curves"] == b["curves"] and b["curves"]["epoch"] == list(range(1, EPOCHS + 1))
    assert not (killed / CHECKPOINT_DIR).exists()  # a finished job keeps no checkpoint


def test_a_checkpoint_survives_preparing_an_unfinished_job_only(tmp_path):
    """Preparing the directory again (a restart, a requeue) keeps the checkpoint of an
    unfinished attempt; once a result exists, a new run (--rerun) starts afresh."""
    job_dir = tmp_path / "job"
    config = _config("none")
    prepare_dir(job_dir, config).release()
    ckpt = checkpoint_path(job_dir)
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"state")
    (job_dir / "metrics.csv").write_text("debris")
    prepare_dir(job_dir, config).release()
    assert ckpt.read_bytes() == b"state" and not (job_dir / "metrics.csv").exists()

    (job_dir / "result.json").write_text("{}")
    prepare_dir(job_dir, config).release()
    assert not ckpt.exists() and (job_dir / "result.json").exists()

    ckpt.parent.mkdir()
    ckpt.write_bytes(b"state")
    clear_job_dir(job_dir)  # clearing by itself removes it: it is one of the names poisonbench writes
    assert not ckpt.parent.exists()


def test_lightning_does_not_requeue_a_slurm_job_itself(monkeypatch):
    """Under SLURM the slurm executor's requeue (submitit) is the one mechanism:
    Lightning's SIGUSR1 auto-requeue stays off."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from poisonbench.fitting.trainer import build_trainer

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "submitit", "SLURM_JOB_ID": "7",
                       "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    train = {"epochs": 1, "batch_size": 8, "accelerator": "cpu"}
    env = build_trainer(train, None)._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
