"""Numbers come back: the same job run from two fresh homes (its poison store crafted
anew each time) gives bit-identical metrics and curves on the CPU.

On a CPU the floats also depend on the intra-op thread count and the CPU model, which
is why provenance records them; both runs here share the machine and one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from poisonbench.bench.catalogue import configs_dir

# A profile of a few seconds: error-minimizing noise crafted by a tiny model (so the
# store's crafting is covered, not only training), and two epochs of the small CNN.
PROFILE = """\
name: tiny
description: a few seconds per job, for the determinism test
families:
  demo:
    train: {epochs: 2, batch_size: 64, lr: 0.05, milestones: [1]}
    override: {dataset: digits, model: small_cnn, model_params: {pool: 1, width: 8}}
    attack_override:
      error_minimizing: {model: small_cnn, model_params: {pool: 1, width: 4}, steps: 2, train_steps: 2,
                         max_rounds: 2, batch_size: 64}
"""


def run_in_fresh_home(configs: Path, home: Path) -> dict:
    env = {**os.environ, "POISONBENCH_CONFIGS": str(configs), "POISONBENCH_HOME": str(home),
           "POISONBENCH_LEADERBOARDS": str(home / "leaderboards"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "poisonbench", "run", "--table", "demo/digits", "--profile", "tiny",
         "--rows", "error_minimizing", "--trials", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = home.glob("runs/demo/digits/*/result.json")
    return json.loads(result.read_text())


def test_two_fresh_homes_give_identical_metrics(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(configs_dir(), configs)
    (configs / "profiles" / "tiny.yaml").write_text(PROFILE)
    first = run_in_fresh_home(configs, tmp_path / "home1")
    second = run_in_fresh_home(configs, tmp_path / "home2")
    assert first["job"] == second["job"]
    assert first["store"]["path"] != second["store"]["path"]  # crafted twice, not shared
    assert first["metrics"] == second["metrics"]
    assert first["curves"] == second["curves"]
    assert first["hardware"]["threads"] == 1


def test_a_cpu_job_runs_with_the_fixed_thread_count_wherever_it_runs(tmp_path, monkeypatch):
    """``train`` (not only ``run``'s workers) trains on the CPU with CPU_JOB_THREADS threads,
    so the same job gives the same floats from every verb; the caller's count comes back."""
    import torch

    from poisonbench.cli import main
    from poisonbench.threads import CPU_JOB_THREADS

    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "home"))
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_JOB_THREADS + 1)
    try:
        out = tmp_path / "job"
        assert main(["train", "--dataset", "digits", "--model", "small_cnn", "--fast-dev-run",
                     "--out", str(out)]) == 0
        assert torch.get_num_threads() == CPU_JOB_THREADS + 1
    finally:
        torch.set_num_threads(before)
    result = json.loads((out / "result.json").read_text())
    assert result["hardware"]["threads"] == CPU_JOB_THREADS
