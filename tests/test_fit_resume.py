"""Fits that make cache entries resume: a base model, a crafting surrogate and a SimCLR
pre-training stopped after an epoch's checkpoint continue from ``<entry>.partial/`` to
the weights an uninterrupted fit gives (bit-identical on the CPU) and record the seconds
of the stopped attempt; two processes asking for one entry at once make it once."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from poisonbench.artifacts import partial_dir, read_cost
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model
from poisonbench.defenses import build_defense
from poisonbench.fitting.base_model import base_model, base_model_config
from poisonbench.fitting.fit import fit_clean
from poisonbench.fitting.trainer import CHECKPOINT_FILE, EpochCheckpoint
from poisonbench.models import build_model
from poisonbench.pretrain import pretrain

from crafting_checks import random_imageset

RECIPE = {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
          "weight_decay": 5e-4, "milestones": [2], "gamma": 0.1, "accelerator": "cpu", "devices": 1}
WIDTH = {"width": 8}  # a narrow small_cnn: three epochs on digits in a few seconds


class Stopped(Exception):
    """The crash a test injects after an epoch's checkpoint is written."""


@contextlib.contextmanager
def stop_after_epoch(epoch: int):
    """Fits in the block raise ``Stopped`` once epoch ``epoch``'s checkpoint is on disk."""
    original = EpochCheckpoint.on_train_epoch_end

    def write_then_stop(self, trainer, module):
        original(self, trainer, module)
        if trainer.current_epoch + 1 == epoch:
            assert self.path.is_file()
            raise Stopped(f"stopped after epoch {epoch}")

    EpochCheckpoint.on_train_epoch_end = write_then_stop
    try:
        yield
    finally:
        EpochCheckpoint.on_train_epoch_end = original


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_epoch(work: Path) -> int:
    state = torch.load(work / CHECKPOINT_FILE, weights_only=True)  # no pickled object in it
    return int(state["epoch"])


def test_a_stopped_base_model_fit_resumes_to_the_uninterrupted_weights(digits, one_thread, tmp_path,
                                                                       monkeypatch, caplog):
    train, _ = digits
    settings = base_model_config({}, "the test")
    build = lambda: build_model("small_cnn", 10, **WIDTH)  # noqa: E731

    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "whole"))
    whole, seconds, whole_path = base_model(build, train, "small_cnn", WIDTH, RECIPE, settings)
    assert seconds > 0 and read_cost(whole_path)["resumed_s"] == 0
    assert not partial_dir(whole_path).exists()
    # Checkpointing changes nothing: the entry is what a fit without a work folder makes,
    # so entries made before fits resumed stay what a fresh make gives.
    with torch.random.fork_rng(devices=[]):
        L.seed_everything(int(settings["seed"]), verbose=False)
        plain = build()
        fit_clean(plain, train, dict(RECIPE), seed=int(settings["seed"]))
    assert same_weights(plain.state_dict(), whole.state_dict())

    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "stopped"))
    with stop_after_epoch(1), pytest.raises(Stopped):
        base_model(build, train, "small_cnn", WIDTH, RECIPE, settings)
    path = tmp_path / "stopped" / whole_path.relative_to(tmp_path / "whole")  # the same key, another home
    assert not path.exists() and checkpoint_epoch(partial_dir(path)) == 0
    with caplog.at_level(logging.WARNING, logger="poisonbench.fitting.fit"):
        resumed, resumed_seconds, same = base_model(build, train, "small_cnn", WIDTH, RECIPE, settings)
    assert same == path and any("resuming" in r.getMessage() for r in caplog.records)
    assert same_weights(whole.state_dict(), resumed.state_dict())
    assert same_weights(load_file(str(whole_path)), load_file(str(path)))
    assert not partial_dir(path).exists()  # the entry is written: its partial state goes
    cost = read_cost(path)
    assert 0 < cost["resumed_s"] <= cost["seconds"] and resumed_seconds == pytest.approx(cost["seconds"], abs=1e-3)


def test_a_stopped_surrogate_fit_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, one_thread):
    imageset = random_imageset(16, name="fit-resume")
    recipe = SurrogateRecipe(epochs=3, batch_size=16, lr=0.01)
    args = (imageset, "small_cnn", {"width": 4}, "relu", recipe, 0, torch.device("cpu"))
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "whole"))
    whole, _ = trained_model(*args)
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "stopped"))
    with stop_after_epoch(2), pytest.raises(Stopped):
        trained_model(*args)
    resumed, _ = trained_model(*args)
    assert same_weights(whole.state_dict(), resumed.state_dict())
    entries = list((tmp_path / "stopped" / "surrogates").glob("*.safetensors"))
    assert len(entries) == 1 and not partial_dir(entries[0]).exists() and read_cost(entries[0])["resumed_s"] > 0


SIMCLR = dict(model="small_cnn", model_params={"width": 8, "pool": 1}, epochs=2, batch_size=256)


@pytest.mark.parametrize("method", ["simclr", "supervised"])
def test_a_stopped_pretraining_resumes_to_the_uninterrupted_backbone(tmp_path, one_thread, method):
    whole = pretrain(method, "digits", out=tmp_path / "whole.safetensors", **SIMCLR)
    out = tmp_path / "stopped.safetensors"
    with stop_after_epoch(1), pytest.raises(Stopped):
        pretrain(method, "digits", out=out, **SIMCLR)
    assert not out.exists() and checkpoint_epoch(partial_dir(out)) == 0
    resumed = pretrain(method, "digits", out=out, **SIMCLR)
    assert same_weights(load_file(str(whole.path)), load_file(str(out)))
    assert resumed.metrics == whole.metrics  # the last epoch's loss too
    assert not partial_dir(out).exists()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert 0 < float(meta["resumed_s"]) <= float(meta["train_s"]) == pytest.approx(resumed.seconds, abs=1e-3)


def test_partial_pretraining_of_other_settings_is_not_resumed(tmp_path, one_thread):
    """A stopped run's state is kept with what it is the state of: a run into the same
    file with another recipe starts afresh (and still writes the file)."""
    out = tmp_path / "bb.safetensors"
    with stop_after_epoch(1), pytest.raises(Stopped):
        pretrain("simclr", "digits", out=out, **SIMCLR)
    other = pretrain("simclr", "digits", out=out, **{**SIMCLR, "epochs": 1})
    assert float(other.seconds) > 0 and not partial_dir(out).exists()
    with safe_open(str(out), "pt") as f:
        assert float(f.metadata()["resumed_s"]) == 0 and json.loads(f.metadata()["params"])["epochs"] == 1


# --------------------------------------------------------------------------- lock

MAKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from poisonbench.artifacts import get_or_make

    entry, marker, go, ready = map(Path, sys.argv[1:5])

    def make(path):
        with marker.open("a") as f:
            f.write("made\\n")
        while not go.exists():  # hold the lock until the test says so
            time.sleep(0.02)
        return "value"

    ready.touch()  # imports done: it asks for the entry now
    made = get_or_make(entry, load=lambda p: p.read_text(), make=make, save=lambda v, tmp: tmp.write_text(v))
    print(json.dumps({"value": made.value, "cached": made.cached}))
""")


def _maker(tmp_path: Path, go: str, ready: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", MAKER, str(tmp_path / "things" / "e.txt"), str(tmp_path / "marker"),
                             str(tmp_path / go), str(tmp_path / ready)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_processes_asking_for_one_entry_make_it_once(tmp_path):
    marker = tmp_path / "marker"
    first = _maker(tmp_path, "go", "ready1")
    _wait_for(lambda: marker.is_file(), "the first process to start making")
    second = _maker(tmp_path, "go", "ready2")
    _wait_for(lambda: (tmp_path / "ready2").is_file(), "the second process to ask for the entry")
    time.sleep(0.5)  # it finds no entry and waits on the lock
    assert second.poll() is None
    (tmp_path / "go").touch()
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in (first, second)]
    assert marker.read_text() == "made\n"
    assert outs == [{"value": "value", "cached": False}, {"value": "value", "cached": True}]


def test_a_killed_maker_lets_the_next_one_make_it(tmp_path):
    marker = tmp_path / "marker"
    first = _maker(tmp_path, "never", "ready1")
    _wait_for(lambda: marker.is_file(), "the first process to start making")
    second = _maker(tmp_path, "go", "ready2")
    _wait_for(lambda: (tmp_path / "ready2").is_file(), "the second process to ask for the entry")
    time.sleep(0.5)
    assert second.poll() is None  # waiting for the first
    (tmp_path / "go").touch()  # (the first waits for "never")
    os.kill(first.pid, signal.SIGKILL)  # its lock dies with it
    first.wait()
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert json.loads(out) == {"value": "value", "cached": False} and marker.read_text() == "made\nmade\n"
    assert (tmp_path / "things" / "e.txt").read_text() == "value"


# ------------------------------------------------------------------- a real kill

FITTER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from poisonbench.data import load_imageset
    from poisonbench.fitting.base_model import base_model, base_model_config
    from poisonbench.models import build_model

    recipe, width = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    base_model(lambda: build_model("small_cnn", 10, **width), load_imageset("digits", split="train"),
               "small_cnn", width, recipe, base_model_config({}, "the test"))
""")


@pytest.mark.slow  # about 30 s: a second process imports torch and Lightning
def test_a_sigkilled_base_model_fit_resumes_to_the_uninterrupted_weights(digits, one_thread, tmp_path, monkeypatch):
    """Killed for real (SIGKILL, after its first epoch's checkpoint) in another process,
    and asked for again: the entry has the weights of a fit never interrupted."""
    train, _ = digits
    recipe = {**RECIPE, "epochs": 6, "milestones": [4]}
    settings = base_model_config({}, "the test")
    build = lambda: build_model("small_cnn", 10, **WIDTH)  # noqa: E731
    monkeypatch.setenv("POISONBENCH_HOME", str(tmp_path / "whole"))
    whole, _, whole_path = base_model(build, train, "small_cnn", WIDTH, recipe, settings)

    home = tmp_path / "killed"
    path = home / whole_path.relative_to(tmp_path / "whole")
    env = {**os.environ, "POISONBENCH_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", FITTER, json.dumps(recipe), json.dumps(WIDTH)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = partial_dir(path) / CHECKPOINT_FILE
    _wait_for(lambda: ckpt.is_file() or child.poll() is not None, "the first epoch's checkpoint", 300)
    os.kill(child.pid, signal.SIGKILL)
    out = child.communicate()[0]
    assert ckpt.is_file() and not path.exists(), out[-3000:]  # killed after a checkpoint, before the entry
    assert checkpoint_epoch(partial_dir(path)) < recipe["epochs"] - 1

    monkeypatch.setenv("POISONBENCH_HOME", str(home))
    resumed, _, same = base_model(build, train, "small_cnn", WIDTH, recipe, settings)
    assert same == path and same_weights(whole.state_dict(), resumed.state_dict())
    assert not partial_dir(path).exists() and read_cost(path)["resumed_s"] > 0


def test_cache_keys_of_base_models_and_surrogates_are_where_they_were(digits):
    """Resuming and locking changed no content address: these are the digests the
    entries had before (an existing home's base models and surrogates are still hits)."""
    from poisonbench.attacks.surrogate import surrogate_artifact
    from poisonbench.fitting.base_model import base_model_artifact

    train, _ = digits
    recipe = {**RECIPE, "milestones": []}
    plain, other = base_model_config({}, "t"), base_model_config({"seed": 3, "defense": "none"}, "t")
    assert base_model_artifact(train, "small_cnn", {}, recipe, plain).digest == "10312122dbdf6d6dc62fcb58"
    assert base_model_artifact(train, "small_cnn", {"width": 8}, recipe, other).digest == "be9aa3f65e020345042da5b4"
    assert surrogate_artifact(train, "small_cnn", {}, "relu", SurrogateRecipe(), 0).digest == "9e275df1c4fbb959f0ce6dfb"
    assert surrogate_artifact(train, "small_cnn", {"width": 4}, "tanh", recipe, 7).digest == "f0c27d33167a6d893bb2caae"


def test_only_a_one_device_fit_is_resumable_and_locked():
    """A fit on several devices is made by every rank at once (their collectives pair
    up), so it neither waits for the entry's lock nor keeps a checkpoint beside it."""
    from poisonbench.fitting.trainer import fits_alone

    assert fits_alone({"devices": 1}) and fits_alone({"devices": [0]}) and fits_alone({})
    assert fits_alone({"devices": "auto", "accelerator": "cpu"})
    for several in ({"devices": 2}, {"devices": "0,1"}, {"devices": [0, 1]}, {"devices": 1, "strategy": "ddp"},
                    {"devices": "2"}):
        assert not fits_alone(several), several


@pytest.mark.parametrize("name, params", [("random_noise", {}), ("cutmix", {"prob": 1.0}), ("dp_sgd", {"noise": 0.01})])
def test_a_stopped_defended_fit_resumes_to_the_uninterrupted_weights(digits, one_thread, tmp_path, name, params):
    """A defense's draws are keyed by its count of batches or steps; the checkpoint keeps
    the count, so the resumed epochs draw what the uninterrupted ones drew."""
    train, _ = digits

    def fitted(work: Path):
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(0, verbose=False)
            model = build_model("small_cnn", 10, **WIDTH)
            fit_clean(model, train, dict(RECIPE), seed=0, hooks=build_defense(name, params), work_dir=work)
        return model.state_dict()

    whole = fitted(tmp_path / "whole")
    with stop_after_epoch(1), pytest.raises(Stopped):
        fitted(tmp_path / "stopped")
    state = torch.load(tmp_path / "stopped" / CHECKPOINT_FILE, weights_only=True)
    assert min(state["defense_state"].values()) > 0  # the count so far travels in the checkpoint
    assert same_weights(whole, fitted(tmp_path / "stopped"))
