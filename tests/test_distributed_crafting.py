"""Crafting on several ranks, for real: two CPU ranks (gloo over loopback) started by
``distributed.run_ranks``. Sharded error-minimizing noise equals the one-process
store bit for bit; chunked PGD on two ranks is a valid, deterministic store; a rank's
error reaches the caller as one error; checkpoints resume per rank (and, shared,
across rank counts); ``craft_cached`` writes one store and one cost record; the CLI
rejects bad ``--devices`` in one line."""
from __future__ import annotations

import json

import pytest
import torch

from poisonbench.attacks import ATTACKS, craft_cached, crafting
from poisonbench.attacks.base import craft_cost_path
from poisonbench.attacks.distributed import parse_devices, run_ranks
from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError, PoisonbenchError

from crafting_checks import random_imageset

TWO = ["cpu", "cpu"]


@pytest.fixture(scope="module")
def digits96(digits):
    """96 digits: three batches of the smoke runs' 32, so rank 0 crafts two and rank 1 one."""
    train, _ = digits
    return ImageSet(train.images[:96].clone(), train.labels[:96].clone(), train.classes, name="digits96", split="train")


@pytest.fixture(scope="module")
def tiny():
    return random_imageset(16)


@pytest.fixture(scope="module")
def sharded_adversarial():
    """``adversarial``: its chunked-PGD driver shards whole chunks over the ranks."""
    attack = ATTACKS.get("adversarial")
    assert attack.ranks == "invariant"
    return attack


# ------------------------------------------------------------ run in the ranks


class Interrupted(PoisonbenchError):
    """What the unit hook raises inside a rank, to stop a run as a kill would."""


def stop_after_unit_1(unit: int) -> None:
    if unit == 1:
        raise Interrupted("stopped after unit 1")


def stop_after_unit_0(unit: int) -> None:
    if unit == 0:
        raise Interrupted("stopped after unit 0")


def gather_checks(n: int, device: torch.device) -> list[bool]:
    g = torch.Generator().manual_seed(2)
    full = {"float": torch.rand(n, 3, 4, 4, generator=g),
            "int16": torch.randint(-8, 9, (n, 3, 2, 2), generator=g).to(torch.int16)}
    out = []
    for block in (1, 4, 32):
        mine = crafting.shard(n, block)
        for tensor in full.values():
            out.append(torch.equal(crafting.gather(tensor[mine], n, block), tensor))
    return out


def failing(kind: str, device: torch.device) -> None:
    rank, _ = crafting.rank_world()
    if rank == 1:
        if kind == "user":
            raise ConfigError("rank 1 found a bad parameter")
        raise ZeroDivisionError("a bug on rank 1")
    torch.distributed.barrier()  # rank 0 waits for a peer that never comes


# ------------------------------------------------------------------ tests


def test_shards_cover_every_sample_once_and_gather_reassembles_them(one_thread):
    assert all(run_ranks(gather_checks, TWO, 77))
    assert torch.equal(crafting.shard(10, 4), torch.arange(10))  # one rank: everything


def test_a_rank_error_is_one_error_in_the_caller(one_thread):
    with pytest.raises(ConfigError, match="rank 1 found a bad parameter"):
        run_ranks(failing, TWO, "user")
    with pytest.raises(RuntimeError, match="crafting rank 1 .* ZeroDivisionError: a bug on rank 1"):
        run_ranks(failing, TWO, "bug")


@pytest.mark.parametrize("variant", [{}, {"kind": "classwise"}, {"augment": True},
                                     {"max_rounds": 3, "stop_accuracy": 101.0, "batch_size": 40}])
def test_error_minimizing_on_two_ranks_is_the_one_process_store(digits96, one_thread, variant):
    attack = ATTACKS.get("error_minimizing")
    params = {**attack.smoke, **variant}
    single = attack.craft(digits96, params, seed=4)
    two = attack.craft(digits96, params, seed=4, device=TWO)
    assert torch.equal(two.images, single.images)  # bit for bit: same batches, same model
    assert torch.equal(two.labels, digits96.labels) and torch.equal(two.index, torch.arange(96))
    assert two.budget["linf"] <= 8.0


def test_error_minimizing_resumes_on_another_number_of_ranks(digits96, one_thread, tmp_path):
    attack = ATTACKS.get("error_minimizing")
    params = {**attack.smoke, "max_rounds": 3, "stop_accuracy": 101.0}
    reference = attack.craft(digits96, params, seed=6)
    for first, second in ((TWO, "cpu"), ("cpu", TWO)):
        path = tmp_path / f"{len(parse_devices(first))}.partial.safetensors"
        with crafting.crafting(crafting.CraftContext(checkpoint=path, every_s=0.0, on_unit=stop_after_unit_1)):
            with pytest.raises(Interrupted):
                attack.craft(digits96, params, seed=6, device=first)
        assert path.is_file() and not list(tmp_path.glob("*.rank*"))  # shared: one file, the one-rank name
        ctx = crafting.CraftContext(checkpoint=path, every_s=0.0)
        with crafting.crafting(ctx):
            resumed = attack.craft(digits96, params, seed=6, device=second)
        assert ctx.units_done == [2]  # rounds 0 and 1 came from the checkpoint
        assert torch.equal(resumed.images, reference.images)
        assert not path.exists()


def test_adversarial_on_two_ranks_is_the_one_process_store(tiny, one_thread, sharded_adversarial):
    attack = sharded_adversarial
    first = attack.craft(tiny, attack.smoke, seed=5, device=TWO)
    single = attack.craft(tiny, attack.smoke, seed=5, device="cpu")
    assert torch.equal(first.images, single.images)
    assert torch.equal(first.labels, tiny.labels) and torch.equal(first.index, torch.arange(48))
    assert first.budget["linf"] <= 8.0 and first.budget["modified"] == 48
    assert not torch.equal(first.images, tiny.images)


def test_adversarial_resumes_per_rank(tiny, one_thread, sharded_adversarial, tmp_path):
    attack = sharded_adversarial
    reference = attack.craft(tiny, attack.smoke, seed=8, device=TWO)
    path = tmp_path / "adv.partial.safetensors"
    with crafting.crafting(crafting.CraftContext(checkpoint=path, every_s=0.0, on_unit=stop_after_unit_0)):
        with pytest.raises(Interrupted):
            attack.craft(tiny, attack.smoke, seed=8, device=TWO)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adv.partial.rank0.safetensors", "adv.partial.rank1.safetensors"]
    ctx = crafting.CraftContext(checkpoint=path, every_s=0.0)
    with crafting.crafting(ctx):
        resumed = attack.craft(tiny, attack.smoke, seed=8, device=TWO)
    assert ctx.units_done == [1]  # rank 0's unit 0 came from its checkpoint
    assert torch.equal(resumed.images, reference.images)
    assert not list(tmp_path.iterdir())


def test_craft_cached_on_two_ranks_writes_one_store_and_its_cost(digits96, one_thread):
    smoke = ATTACKS.get("error_minimizing").smoke
    store, seconds = craft_cached("error_minimizing", digits96, smoke, 11, TWO)
    assert seconds > 0
    folder = store.path.parent
    assert sorted(p.name for p in folder.glob(store.path.stem + "*")) == [  # no rank's partial state is left
        store.path.stem + ".cost.json", store.path.name, store.path.name + ".lock"]
    cost = json.loads(craft_cost_path(store.path).read_text())
    assert cost["ranks"] == 2 and cost["hardware"].startswith("cpu ×2 ranks")
    again, cached = craft_cached("error_minimizing", digits96, smoke, 11, TWO)
    assert cached == 0.0 and again.path == store.path
    # Rank-invariant: one process is served the same file.
    single, cached = craft_cached("error_minimizing", digits96, smoke, 11, "cpu")
    assert cached == 0.0 and single.path == store.path


def test_a_store_crafted_on_two_ranks_serves_one_process(tiny, one_thread, sharded_adversarial):
    smoke = sharded_adversarial.smoke
    two, _ = craft_cached("adversarial", tiny, smoke, 12, TWO)
    one, seconds = craft_cached("adversarial", tiny, smoke, 12, "cpu")
    assert seconds == 0.0 and one.path == two.path  # rank-invariant: one cache entry
    assert json.loads(craft_cost_path(two.path).read_text())["ranks"] == 2


@pytest.mark.parametrize("spec, fragment", [
    ("gpu:0", "unknown device 'gpu:0'"),
    ("cpu,,cpu", "comma-separated"),
    ("cpu,meta", "must all be CPUs or all be GPUs"),
])
def test_bad_devices_are_config_errors(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_devices(spec)


def test_precraft_maps_gpu_ids_to_visible_devices(monkeypatch):
    from poisonbench.bench.runner import gpu_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_devices(["0", "1"]) == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_devices(["3"]) == ["cuda:1"]
    with pytest.raises(ConfigError, match="cannot see"):
        gpu_devices(["0"])


@pytest.mark.parametrize("spec, fragment", [
    ("gpu:0", "unknown device 'gpu:0'"),
    ("cuda:99", "cuda:99"),  # no GPU here, or no 100th one
])
def test_cli_craft_rejects_a_bad_device_in_one_line(capsys, spec, fragment):
    from test_cli import one_line_error, run_cli

    code, _, err = run_cli(capsys, "craft", "error_minimizing", "--dataset", "digits", "--devices", spec)
    one_line_error(code, err, fragment)
