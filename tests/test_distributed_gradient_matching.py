"""Gradient matching on two CPU ranks (gloo over loopback, ``distributed.run_ranks``):
each rank differentiates a slice of every poison batch, the parameter gradients are
summed over the ranks, and each rank back-propagates the matching loss through its own
slice. The step's gradient is the one-process gradient up to summation order, the store
the one-process store (here to the pixel level), the budget holds, a craft interrupted
on two ranks resumes to the uninterrupted two-rank store, and an adaptive surrogate is
trained once, in the caller, before the ranks start."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from crafting_checks import Stop
from poisonbench.attacks import ATTACKS, AttackInput, VictimSpec, craft_cached, crafting
from poisonbench.attacks.base import VictimDefense, craft_cost_path
from poisonbench.attacks.distributed import run_ranks
from poisonbench.attacks.gradient_matching import sharded_step_loss, step_loss
from poisonbench.attacks.gradients import gradient_norm, parameter_gradient
from poisonbench.attacks.surrogate import surrogate_spec, trained_model
from poisonbench.errors import ConfigError
from poisonbench.models import build_model

TWO = ["cpu", "cpu"]
TINY = {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 1}
TRAIN = {"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
         "weight_decay": 0.0005, "milestones": [], "gamma": 0.1, "accelerator": "cpu", "devices": 1,
         "strategy": "auto", "precision": "32", "eval_every": 1}


def matching(digits, seed: int = 3, victim=None, defense=None, **params):
    """gradient_matching with 9 poisons (1 % of digits) in batches of 4, 4 and 1: the last
    batch leaves rank 1 without a poison of it."""
    train, test = digits
    attack = ATTACKS.get("gradient_matching")
    p = attack.params({"steps": 4, "batch_size": 4, "surrogate": TINY, **params})
    target = attack.draw_target(train, test, seed, p)
    return attack, p, AttackInput(train, seed, test=test, target=target, victim=victim, defense=defense)


class CountingHooks:
    """Training hooks that change nothing; count how many were made in this process, and
    refuse to be made inside a rank (the surrogate must train before the ranks start)."""

    made = 0

    def __init__(self) -> None:
        if crafting.rank_world()[1] > 1:
            raise ConfigError("a rank trained the surrogate")
        CountingHooks.made += 1

    def on_train_batch(self, model, images, labels):
        return images, labels

    def on_before_optimizer_step(self, model, optimizer) -> None:
        pass

    def on_train_epoch_start(self, epoch: int) -> None:
        pass


def stop_after_unit_1(unit: int) -> None:
    if unit == 1:
        raise Stop("stopped after unit 1")


# ------------------------------------------------------------ run in the ranks


def step_setup(digits, batch_size: int, transfer: bool = False):
    """A random small_cnn, 9 digits with a random δ, a target gradient: one matching step's
    inputs (with ``transfer``, of the linear layer alone, as against a transfer victim)."""
    train, test = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", train.num_classes, width=4, pool=1).eval()
    if transfer:
        model.backbone.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    clean = train.images[:9].float() / 255
    delta = (torch.rand(clean.shape, generator=g) * 2 - 1) * 16 / 255
    target_grad = tuple(g.detach() for g in parameter_gradient(model, test.images[:1].float() / 255,
                                                              torch.tensor([3])))
    params = ATTACKS.get("gradient_matching").params({"batch_size": batch_size})
    return model, clean, delta, train.labels[:9], target_grad, params


def sharded_step(model, clean, delta, labels, target_grad, params, device):
    generator = crafting.unit_generator(5, 0)
    return sharded_step_loss(model, clean, delta, labels, target_grad, gradient_norm(target_grad), params, generator)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("batch_size, loss, transfer", [(4, "cosine", False), (512, "cosine", False),
                                                        (4, "se", False), (4, "se", True)])
def test_a_sharded_step_is_the_one_process_step_up_to_summation_order(digits, one_thread, batch_size, loss,
                                                                      transfer):
    model, clean, delta, labels, target_grad, params = step_setup(digits, batch_size, transfer)
    params = dataclasses.replace(params, loss=loss)
    want, want_loss = step_loss(model, clean, delta, labels, target_grad, gradient_norm(target_grad), params,
                                crafting.unit_generator(5, 0))
    assert want.abs().sum() > 0
    # One process through the sharded code (every poison is rank 0's), then two ranks.
    for grad, value in (sharded_step(model, clean, delta, labels, target_grad, params, "cpu"),
                        run_ranks(sharded_step, TWO, model, clean, delta, labels, target_grad, params)):
        assert grad.shape == want.shape
        # float32 sums in another order: about 5e-7 of the largest entry here, so 1e-5 is room.
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        assert value == pytest.approx(want_loss, rel=1e-5)


def test_gradient_matching_on_two_ranks_is_the_one_process_store(digits, one_thread):
    attack, params, inp = matching(digits, restarts=2)
    single = attack.craft(inp, params)
    two = attack.craft(inp, params, device=TWO)
    assert attack.ranks == "summed" and [str(d) for d in attack.devices(TWO)] == TWO
    assert two.index.tolist() == list(inp.target.poison_index) and two.target.mismatch(inp.target) is None
    assert torch.equal(two.labels, single.labels)
    assert two.norm == "linf" and two.budget["linf"] <= 16 and two.budget["modified"] == 9
    # Up to summation order: signed Adam makes a full step of an entry within rounding of
    # zero, so long crafts drift apart; over these 4 steps no pixel differed where measured.
    assert float((two.images != single.images).float().mean()) <= 0.01
    assert torch.equal(attack.craft(inp, params, device=TWO).images, two.images)  # deterministic


def test_gradient_matching_resumes_on_two_ranks_to_the_uninterrupted_store(digits, one_thread, tmp_path):
    attack, params, inp = matching(digits, seed=4, restarts=2, steps=3)
    reference = attack.craft(inp, params, device=TWO)
    path = tmp_path / "gm.partial.safetensors"
    with crafting.crafting(crafting.CraftContext(checkpoint=path, every_s=0.0, on_unit=stop_after_unit_1)):
        with pytest.raises(RuntimeError, match="stopped after unit 1"):
            attack.craft(inp, params, device=TWO)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # shared: one file, the one-rank name
    ctx = crafting.CraftContext(checkpoint=path, every_s=0.0)
    with crafting.crafting(ctx):
        resumed = attack.craft(inp, params, device=TWO)
    assert ctx.units_done == [2, 3, 4, 5]  # units 0 and 1 came from the checkpoint
    assert torch.equal(resumed.images, reference.images)
    assert not path.exists()


def test_an_adaptive_craft_on_two_ranks_trains_its_surrogate_once_under_a_two_rank_key(digits, one_thread):
    victim = VictimSpec("small_cnn", {"pool": 1}, TRAIN, defense="counting-in-ranks")
    defense = VictimDefense("counting-in-ranks", {}, CountingHooks)
    attack, params, inp = matching(digits, seed=9, victim=victim, defense=defense)
    CountingHooks.made = 0
    two, seconds = craft_cached("gradient_matching", inp, dataclasses.asdict(params), device=TWO)
    assert seconds > 0 and CountingHooks.made == 1  # the surrogate trained with the defense, in the caller
    name, model_params, recipe = surrogate_spec(victim, params.surrogate, "gradient_matching")
    _, trained_s = trained_model(inp.train, name, model_params, "relu", recipe, inp.seed, torch.device("cpu"),
                                 defense=defense)
    assert trained_s == 0.0  # cached under the adaptive key
    cost = json.loads(craft_cost_path(two.path).read_text())
    assert cost["ranks"] == 2 and cost["hardware"].startswith("cpu ×2 ranks")
    one, crafted_s = craft_cached("gradient_matching", inp, dataclasses.asdict(params), device="cpu")
    assert crafted_s > 0 and one.path != two.path  # two ranks are not one device bit for bit: their own key
    undefended, _ = craft_cached("gradient_matching", dataclasses.replace(inp, defense=None),
                                 dataclasses.asdict(params), device=TWO)
    assert undefended.path != two.path  # hooks that change nothing: the same images, under another key
    assert torch.equal(attack.craft(inp, params).images, two.images)  # one process, from the same surrogate
