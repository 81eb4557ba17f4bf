"""Attacks that must bite on digits at the cpu profile's recipe (issue 14, item 5).

The slow checks run the shortcuts Table 2 rows on digits with the cpu profile, as the
leaderboard does, and assert each attack's drop in clean test accuracy against the
unpoisoned row (mean over 3 trials). Measured at the recipe of
``configs/profiles/cpu.yaml`` (2 CPU cores; `poisonbench run --table shortcuts/table2
--profile cpu --rows none deepconfuse tensorclog alignment --trials 3`): none 88.7 %
(90.2, 89.3, 86.4); DeepConfuse 52.0 % (25.8, 63.6, 66.7; 162 s crafting); TensorClog
37.5 % (42.0, 43.1, 27.3; 231 s); Alignment 53.6 % (56.9, 52.2, 51.6; 190 s). At the
previous recipe they were 90.2, 79.9 and 84.8 % against 86.9 %.

NTGA does not bite on digits at ε = 8/255 (nor at 0.3, the authors' MNIST budget):
its perturbations defeat the kernel predictor they are crafted against but do not
transfer to the trained CNN. The fast test below holds the part that works, the
attack's own objective, so that a broken gradient would show.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from poisonbench.attacks import deepconfuse, ntga
from poisonbench.attacks.base import ATTACKS
from poisonbench.bench import runner
from poisonbench.bench.jobs import read_results, runs_root
from poisonbench.bench.profiles import load_profile
from poisonbench.cli import main
from poisonbench.data.datasets import load_imageset


def cpu_recipe(attack: str):
    overrides = load_profile("cpu").family("shortcuts").attack_override[attack]
    return ATTACKS.get(attack).params(overrides)


def table2_accuracy(rows: list[str], trials: int) -> dict[str, float]:
    """Mean clean test accuracy per row of shortcuts/table2 on the cpu profile."""
    assert main(["run", "--table", "shortcuts/table2", "--profile", "cpu", "--trials", str(trials),
                 "--rows", *rows]) == 0
    plan = runner.plan(runner.resolve_tables(None, "shortcuts/table2"), profile="cpu", trials=trials, rows=rows,
                       fast_dev_run=False)[0]
    results = read_results(plan.jobs, runs_root())
    return {row: statistics.fmean(results[j.hash]["metrics"]["test_acc"] for j in plan.jobs if j.row == row)
            for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("attack, drop", [
    ("deepconfuse", 30.0),  # the target; measured 36.7 (trials vary by 40 points)
    ("tensorclog", 30.0),   # measured 51.2
    ("alignment", 20.0),    # measured 35.1
])
def test_attack_lowers_digits_accuracy_at_the_cpu_recipe(attack, drop):
    """Minutes each (`pytest -m slow`): crafting dominates; the none row is shared."""
    acc = table2_accuracy(["none", attack], trials=3)
    print("mean clean test accuracy:", acc)
    assert acc[attack] < acc["none"] - drop, acc


@pytest.mark.slow
def test_deepconfuse_round_classifier_learns_at_the_cpu_recipe():
    """The look-ahead can only confuse a classifier that learns: one round at the cpu
    recipe brings the round classifier's loss on the poison clearly below chance
    (ln 10), which the authors' lr 0.01 and batch 128 did not on 900 images."""
    params = cpu_recipe("deepconfuse")
    train = load_imageset("digits", split="train")
    images, labels = train.images.float().div(255), train.labels
    generator = deepconfuse.build_generator(params.width, 0)
    optimizer = torch.optim.Adam(generator.parameters(), lr=params.lr_atk)
    loss = deepconfuse.train_round(generator, optimizer, images, labels, params, 10, 0, 0, torch.device("cpu"))
    assert loss < math.log(10) - 0.2, loss


def test_ntga_defeats_its_own_kernel_predictor_on_digits():
    """Ten sign steps at ε = 8/255 turn the t = ∞ kernel predictor trained on a block of
    digits from far above chance to near chance on held-out digits: the attack's
    objective and its gradient work."""
    params = ntga.NTGAParams(t=None, width=8, dense1=32, dense2=16, block_size=100, val_size=100)
    train = load_imageset("digits", split="train")
    x, y = train.images[:100].float().div(255), train.labels[:100]
    xv, yv = train.images[100:200].float().div(255), train.labels[100:200]
    net = ntga.build_surrogate(tuple(x.shape[1:]), params, seed=0)

    def kernel_accuracy(block: torch.Tensor) -> float:
        k_block = ntga.empirical_ntk(net, block)
        logits = ntga.kernel_predict(k_block, ntga.empirical_ntk(net, xv, block), F.one_hot(y, 10), None,
                                     params.diag_reg)
        return float((logits.argmax(1) == yv).double().mean() * 100)

    clean_loss = float(ntga.validation_loss(net, x, y, xv, yv, 10, params))
    delta, poisoned_loss = ntga.attack_block(net, x, y, xv, yv, 10, params)
    assert delta.abs().max() <= params.eps + 1e-6
    assert poisoned_loss > clean_loss + 0.3, (clean_loss, poisoned_loss)
    clean_acc, poisoned_acc = kernel_accuracy(x), kernel_accuracy((x + delta).clamp(0, 1))
    assert poisoned_acc < clean_acc - 30, (clean_acc, poisoned_acc)
