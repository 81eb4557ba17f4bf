"""Input is checked before work starts: every number against its declared range, every
row of a plan against the registries, the command line over the profile, every output
folder for writability; a stop signal ends a command with 128 + its number."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from poisonbench.attacks import ATTACKS
from poisonbench.cli import main
from poisonbench.defenses import DEFENSES
from poisonbench.errors import ConfigError
from poisonbench.params import unranged_numbers

from test_cli import one_line_error, run_cli

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ ranges (item 8)

@pytest.mark.parametrize("kind, name", [("attack", n) for n in ATTACKS] + [("defense", n) for n in DEFENSES])
def test_every_numeric_param_declares_a_range(kind, name):
    entry = ATTACKS.get(name) if kind == "attack" else DEFENSES.get(name)
    assert unranged_numbers(entry.params_type) == []


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--set", "train.epochs=0"], ["train.epochs", "[1, inf)", "got 0"]),
    (["train", "--set", "train.epochs=-1"], ["train.epochs", "got -1"]),
    (["train", "--set", "train.lr=.nan"], ["train.lr", "(0, inf)", "got nan"]),
    (["train", "--set", "train.lr=-1"], ["train.lr", "got -1"]),
    (["train", "--set", "train.lr=.inf"], ["train.lr", "got inf"]),
    (["train", "--set", "train.batch_size=0"], ["train.batch_size", "got 0"]),
    (["train", "--set", "train.momentum=1.5"], ["train.momentum", "[0, 1)"]),
    (["train", "--set", "train.milestones=[5,-1]"], ["train.milestones", "got -1"]),
    (["train", "--set", "ratio=1.5"], ["ratio", "[0, 1]", "got 1.5"]),
    (["train", "--set", "attack=error_minimizing", "attack_params.lr=-1"],
     ["attack_params.lr", "error_minimizing", "(0, inf)", "got -1"]),
    (["train", "--set", "defense=adversarial_training", "defense_params.eps=2"],
     ["defense_params.eps", "adversarial_training", "(0, 1]", "got 2"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "eps=abc"],
     ["attack_params.eps", "must be a number", "'abc'"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "eps=.nan"], ["attack_params.eps", "got nan"]),
    (["craft", "deepconfuse", "--dataset", "digits", "--set", "epochs=0"], ["attack_params.epochs", "got 0"]),
    (["craft", "synthetic", "--dataset", "digits", "--set", "patch=1.5"], ["attack_params.patch", "an integer"]),
])
def test_out_of_range_values_are_one_sentence(capsys, argv, fragments):
    if argv[0] == "train":
        argv = argv[:1] + ["--dataset", "digits", "--model", "small_cnn"] + argv[1:]
    one_line_error(*run_cli(capsys, *argv)[::2], *fragments)


def test_attacks_and_defenses_share_one_checker():
    with pytest.raises(ConfigError, match=r"^attack_params.eps of attack 'random_noise' must lie in \[0, 1\]; got 2$"):
        ATTACKS.get("random_noise").params({"eps": 2})
    with pytest.raises(ConfigError, match=r"^defense_params.eps of defense 'adversarial_training' must lie in"):
        DEFENSES.get("adversarial_training").parse_params({"eps": 2})
    with pytest.raises(ConfigError, match="unknown parameter 'radius' for attack 'synthetic'"):
        ATTACKS.get("synthetic").params({"radius": 1})
    with pytest.raises(ConfigError, match="needs parameter 'weights'"):
        DEFENSES.get("pretrained").parse_params({})
    assert ATTACKS.get("synthetic").params({"eps": 1}).eps == 1  # an int is a number; defaults unchanged
    assert ATTACKS.get("synthetic").params({}) == ATTACKS.get("synthetic").params_type()


# ------------------------------------------------------------ plan time (item 9)

def _spec(tmp_path: Path, row_set: dict) -> Path:
    spec = {"id": "demo/broken", "paper": "demo", "title": "t", "profile": "cpu", "trials": 1,
            "defaults": {"dataset": "digits", "model": "small_cnn"},
            "rows": [{"id": "fine", "set": {"attack": "none"}}, {"id": "bad", "set": row_set}]}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("row_set, fragments", [
    ({"attack": "nope"}, ["row 'bad'", "unknown attack 'nope'"]),
    ({"attack": "synthetic", "attack_params": {"eps": 3}}, ["row 'bad'", "attack_params.eps", "got 3"]),
    ({"attack": "synthetic", "attack_params": {"radius": 3}}, ["row 'bad'", "unknown parameter 'radius'"]),
    ({"defense": "nope"}, ["row 'bad'", "unknown defense 'nope'"]),
    ({"defense": "adversarial_training", "defense_params": {"steps": 0}}, ["row 'bad'", "defense_params.steps"]),
    ({"model": "small_cnn", "model_params": {"depth": 3}}, ["row 'bad'", "no parameter 'depth'"]),
    ({"task": "separability", "task_params": {"probes": "linear"}}, ["row 'bad'", "unknown task_params 'probes'"]),
    ({"task": "separability", "task_params": {"steps": "many"}}, ["row 'bad'", "task_params.steps", "an integer"]),
])
def test_dry_run_resolves_every_row(capsys, tmp_path, row_set, fragments):
    path = _spec(tmp_path, row_set)
    one_line_error(*run_cli(capsys, "run", "--table", str(path), "--dry-run")[::2], *fragments)
    one_line_error(*run_cli(capsys, "run", "--table", str(path), "--fast-dev-run")[::2], *fragments)


def test_every_shipped_table_resolves(capsys):
    code, _, err = run_cli(capsys, "run", "--suite", "all", "--dry-run")
    assert code == 0, err


# ------------------------------------------------- the command line wins (item 10)

def test_command_line_beats_the_profile(capsys):
    code, out, err = run_cli(capsys, "train", "--dataset", "digits", "--model", "small_cnn", "--attack",
                             "error_minimizing", "--set", "attack_params.steps=2", "defense=pretrained",
                             "defense_params.weights=mine.safetensors", "train.lr=0.5", "--dry-run")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["attack_params"]["steps"] == 2  # the cpu profile's attack_override says 10
    assert config["attack_params"]["model"] == "small_cnn"  # what the command line does not say stays
    assert config["defense_params"]["weights"] == "mine.safetensors"  # defense_override replaced it whole
    assert config["train"]["lr"] == 0.5


# --------------------------------------------------- outputs writable (item 11)

def test_unwritable_home_is_refused_before_work(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("POISONBENCH_HOME", str(blocker / "home"))
    one_line_error(*run_cli(capsys, "craft", "synthetic", "--dataset", "digits")[::2], "POISONBENCH_HOME", "is a file")
    one_line_error(*run_cli(capsys, "train", "--dataset", "digits", "--model", "small_cnn")[::2], "POISONBENCH_HOME")
    one_line_error(*run_cli(capsys, "run", "--table", "demo/digits", "--fast-dev-run")[::2], "POISONBENCH_HOME")
    assert not (blocker.parent / "home").exists()


def test_output_paths_are_checked_first(capsys, tmp_path):
    one_line_error(*run_cli(capsys, "craft", "synthetic", "--dataset", "digits", "--out", str(tmp_path))[::2],
                   "--out", "is a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(*run_cli(capsys, "inspect", "missing.safetensors", "--png", str(blocker / "grid.png"))[::2],
                   "--png", "is a file")
    one_line_error(*run_cli(capsys, "inspect", "missing.safetensors", "--png", str(tmp_path))[::2],
                   "--png", "is a folder")


def test_job_config_with_a_bad_type(capsys, tmp_path):
    from poisonbench.bench.jobs import expand
    from poisonbench.bench.tables import load_table

    config = expand(load_table("demo/digits"), trials=1, fast_dev_run=True)[0].config
    config["train"]["epochs"] = "many"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    one_line_error(*run_cli(capsys, "job", str(tmp_path))[::2], "train.epochs", "must be an integer", "'many'")
    config["train"]["epochs"], config["attack_params"] = 1, {"eps": -1}
    config["attack"] = "random_noise"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    one_line_error(*run_cli(capsys, "job", str(tmp_path))[::2], "attack_params.eps", "got -1")


# ------------------------------------------------------------------------ smaller

@pytest.mark.parametrize("argv, fragments", [
    (["run", "--table", "demo/digits", "--gpus", "abc"], ["--gpus", "'abc'"]),
    (["run", "--table", "demo/digits", "--trials", "0"], ["--trials", "at least 1, got 0"]),
    (["pretrain", "simclr", "--dataset", "digits", "--epochs", "-1"], ["--epochs", "at least 1, got -1"]),
    (["run", "--table", "demo/digits", "--slurm", "foo"], ["--slurm", "--executor slurm"]),
    (["run", "--table", "demo/digits", "--executor", "slurm", "--slurm", "foo"], ["--slurm expects key=value"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--store", "x.safetensors", "--attack", "synthetic"],
     ["give --store or an attack", "not both"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--store", "x.safetensors", "--set",
      "attack_params.eps=0.1"], ["give --store or an attack", "not both"]),
])
def test_option_conflicts_and_values(capsys, argv, fragments):
    one_line_error(*run_cli(capsys, *argv)[::2], *fragments)


def test_debug_after_the_verb(capsys):
    from poisonbench.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        main(["craft", "nope", "--dataset", "digits", "--debug"])
    code, _, err = run_cli(capsys, "--debug", "list", "attacks")  # before the verb, not reset by it
    assert code == 0, err


def test_data_check_reports_every_dataset(capsys, tmp_path):
    code, out, err = run_cli(capsys, "data", "check", "--data-root", str(tmp_path))
    for name in ("cifar10", "cifar100", "svhn"):
        assert f"{name}: " in out
        assert name in err
    one_line_error(code, err, "failed their check")


def test_wandb_under_fast_dev_run_says_it_logs_nothing(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--dataset", "digits", "--model", "small_cnn", "--fast-dev-run",
                             "--wandb", "--out", str(tmp_path / "job"))
    assert code == 0, err
    assert "--wandb logs nothing under --fast-dev-run" in err
    assert not (tmp_path / "job" / "wandb").exists()


# ------------------------------------------------------------- signals (item 3)

def test_sigterm_stops_train_with_143_and_resumable_state(tmp_path):
    env = {**os.environ, "POISONBENCH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)  # the CLI itself must keep wandb and Lightning quiet
    job = tmp_path / "job"
    child = subprocess.Popen([sys.executable, "-m", "poisonbench", "train", "--dataset", "digits", "--model",
                              "small_cnn", "--set", "train.epochs=200", "--out", str(job)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (job / "metrics.csv").exists():  # written once training has logged
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "train stopped by SIGTERM" in err and "Traceback" not in err
    for noise in NOISE:
        assert noise not in err + out, noise
    assert (job / "config.yaml").is_file() and not (job / "result.json").exists()


NOISE = ("exists and is not empty", "LeafSpec", "litlogger", "anonymous", "wandb:")


def test_train_console_shows_progress_and_result_only(tmp_path):
    env = {**os.environ, "POISONBENCH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_SILENT", None)  # the CLI itself must keep wandb and Lightning quiet
    done = subprocess.run([sys.executable, "-m", "poisonbench", "train", "--dataset", "digits", "--model",
                           "small_cnn", "--set", "train.epochs=1", "--wandb"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "clean test accuracy" in done.stdout
    for noise in NOISE:
        assert noise not in done.stdout + done.stderr, noise
