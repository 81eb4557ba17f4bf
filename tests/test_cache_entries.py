"""Cache entries besides stores are verified when read: a corrupt crafting-cost record
(``<store>.cost.json``) is named with the command that removes it and never fails a finished
job; a corrupt cached crafting model is trained again. A crafting run that was
interrupted and resumed records the seconds of every segment."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from poisonbench.attacks import ATTACKS, craft_cached, crafting
from poisonbench.attacks.base import craft_cost, craft_cost_path
from poisonbench.attacks.surrogate import SurrogateRecipe, trained_model

from crafting_checks import Stop, random_imageset


@pytest.fixture(scope="module")
def tiny():
    return random_imageset(16, name="cache-entries")


@pytest.fixture(scope="module")
def noise_store(tiny):
    store, _ = craft_cached("random_noise", tiny, {"eps": 4 / 255}, seed=1)
    return store


def warned(caplog, *fragments) -> bool:
    return any(all(f in r.getMessage() for f in fragments) for r in caplog.records)


# ------------------------------------------------------------ crafting cost


def test_cost_record_is_written_for_its_store(noise_store):
    cost = craft_cost(noise_store.path)
    assert cost is not None and cost["seconds"] >= 0 and cost["ranks"] == 1 and cost["resumed_s"] == 0


@pytest.mark.parametrize("text, problem", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "is a JSON list"),
    ('{"seconds": "abc", "hardware": "cpu"}', "has seconds 'abc'"),
    ('{"seconds": NaN, "hardware": "cpu"}', "has seconds nan"),
    ('{"seconds": 1.0}', "has hardware None"),
    ('{"seconds": 1.0, "hardware": "cpu", "store_sha256": "0000"}', "another store"),
])
def test_corrupt_cost_record_is_named_and_ignored(noise_store, caplog, text, problem):
    record = craft_cost_path(noise_store.path)
    saved = record.read_text()
    try:
        record.write_text(text)
        assert craft_cost(noise_store.path) is None
        assert warned(caplog, str(record), problem, f"rm {record}")
    finally:
        record.write_text(saved)
    assert craft_cost(noise_store.path) == json.loads(saved)


def test_corrupt_cost_record_does_not_fail_a_finished_job(tmp_path, caplog):
    from poisonbench.cli import main

    argv = ["train", "--dataset", "digits", "--model", "small_cnn", "--attack", "random_noise", "--fast-dev-run"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    store = json.loads((tmp_path / "first" / "result.json").read_text())["store"]["path"]
    record = craft_cost_path(Path(store))
    record.write_text("{half a record")
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0
    result = json.loads((tmp_path / "second" / "result.json").read_text())
    assert result["store"]["path"] == store and result["store"]["craft_cost"] is None
    assert warned(caplog, str(record), f"rm {record}")


# ----------------------------------------------------------- crafting models


RECIPE = SurrogateRecipe(epochs=1, batch_size=16)
MODEL = ("small_cnn", {"width": 4, "pool": 1}, "relu")


def surrogate(imageset):
    return trained_model(imageset, *MODEL, RECIPE, 0, torch.device("cpu"))


def surrogate_path(imageset):
    from poisonbench.attacks.surrogate import surrogate_artifact

    return surrogate_artifact(imageset, MODEL[0], MODEL[1], MODEL[2], RECIPE, 0).path


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_model", "garbage"])
def test_corrupt_crafting_model_is_trained_again(tiny, caplog, damage):
    from safetensors.torch import save_file

    from poisonbench.attacks.surrogate import build_crafting_model

    net, _ = surrogate(tiny)
    path = surrogate_path(tiny)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-3] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "other_model":
        other = build_crafting_model("small_cnn", 3, {"width": 8, "pool": 1})
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3, 4, 5, 6]")
    again, seconds = surrogate(tiny)
    assert seconds > 0 and warned(caplog, str(path), "making it again")
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)  # trained again from the same seed: the same model
    _, cached = surrogate(tiny)
    assert cached == 0.0  # the rebuilt entry is whole again


# ---------------------------------------------------------------- resumed cost


def test_resumed_craft_records_every_segments_seconds(tiny, monkeypatch):
    attack = ATTACKS.get("adversarial")
    params = {**attack.smoke, "mode": "untargeted"}
    finish = crafting.finish_unit

    def slow_then_stop(unit: int) -> None:
        if unit == 0:
            time.sleep(1.5)  # spent in the first segment, before unit 1's checkpoint
        if unit == 1:
            raise Stop
        finish(unit)

    monkeypatch.setattr(crafting, "finish_unit", slow_then_stop)
    with pytest.raises(Stop):
        craft_cached("adversarial", tiny, params, seed=7, checkpoint_every_s=0.0)
    monkeypatch.setattr(crafting, "finish_unit", finish)

    start = time.perf_counter()
    store, seconds = craft_cached("adversarial", tiny, params, seed=7, checkpoint_every_s=0.0)
    second_segment = time.perf_counter() - start
    assert seconds >= second_segment + 1.4  # the first segment's seconds are counted too
    cost = craft_cost(store.path)
    assert cost["seconds"] == round(seconds, 3) and cost["resumed_s"] >= 1.4


def test_corrupt_checkpoint_is_started_over(tiny, tmp_path):
    attack = ATTACKS.get("adversarial")
    params = {**attack.smoke, "mode": "untargeted"}
    reference = attack.craft(tiny, params, seed=3)
    path = tmp_path / "partial.safetensors"

    def stop(unit: int) -> None:
        if unit == 1:
            raise Stop

    with crafting.crafting(crafting.CraftContext(checkpoint=path, every_s=0.0, on_unit=stop)):
        with pytest.raises(Stop):
            attack.craft(tiny, params, seed=3)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # inside the last tensor: still a readable safetensors file
    path.write_bytes(bytes(data))
    ctx = crafting.CraftContext(checkpoint=path, every_s=0.0)
    with crafting.crafting(ctx):
        resumed = attack.craft(tiny, params, seed=3)
    assert ctx.units_done[0] == 0  # nothing was taken from the damaged checkpoint
    assert torch.equal(resumed.images, reference.images)


def test_seconds_of_a_several_rank_run_come_from_rank_0s_checkpoint(tmp_path):
    from safetensors.torch import save_file

    partial = tmp_path / "s.partial.safetensors"
    assert crafting.crafting_seconds(partial) == 0.0  # nothing to resume
    save_file({"x": torch.zeros(1)}, str(tmp_path / "s.partial.rank0.safetensors"), metadata={"unit": "3", "craft_s": "12.5"})
    assert crafting.crafting_seconds(partial) == 12.5
    save_file({"x": torch.zeros(1)}, str(partial), metadata={"unit": "3", "craft_s": "nan"})
    assert crafting.crafting_seconds(partial) == 12.5  # an unusable record is skipped
