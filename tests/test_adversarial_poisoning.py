"""Adversarial poisoning (robuster paper, Algorithm 1) and its per-batch attacks:
the split and labels of the returned batch, budgets, the model left as it was,
determinism per seed and rank, bf16 autocast, and one defended epoch on digits."""
from __future__ import annotations

import pytest
import torch

from poisonbench.attacks.batch import BATCH_ATTACKS, class_patches, random_derangement
from poisonbench.attacks.gradients import matching_loss, parameter_gradient
from poisonbench.data.module import PoisonedDataModule
from poisonbench.defenses import DEFENSES, build_defense
from poisonbench.defenses import adversarial_poisoning as ap
from poisonbench.defenses import randomness
from poisonbench.errors import ConfigError
from poisonbench.fitting.trainer import build_trainer, quiet_lightning
from poisonbench.fitting.victim import VictimModule
from poisonbench.models import build_model

EPS = 16 / 255


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 10, width=8, pool=1).train()


def _batch(digits, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = digits
    return train.images[:n].float() / 255, train.labels[:n].clone()


def _positions(defense, labels: torch.Tensor, call: int = 0, rank: int = 0):
    """The split the defense draws for one call (the split is the generator's first draw)."""
    generator = ap.batch_generator(defense.params.seed, rank, call, labels.device)
    return ap.split(labels, defense.params.p, generator)


# ------------------------------------------------------------------ parameters
def test_defaults_are_the_papers_and_bad_values_are_refused():
    assert "adversarial_poisoning" in DEFENSES.names()
    params = build_defense("adversarial_poisoning").params
    assert (params.p, params.attack, params.steps, params.eps, params.lr, params.max_area) == \
        (0.75, "gradient_matching", 5, 16 / 255, 0.1, 45)
    assert {"gradient_matching", "se", "patch"} <= set(BATCH_ATTACKS.names())
    for bad, match in [({"p": 1.0}, "p of defense .* must lie"), ({"p": 0}, "p of defense .* must lie"), ({"attack": "fc"}, "attack 'fc'"),
                       ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"eps": 2}, "eps"),
                       ({"lr": -1}, "lr"), ({"max_area": 5}, "max_area"), ({"max_area": True}, "max_area")]:
        with pytest.raises(ConfigError, match=match):
            build_defense("adversarial_poisoning", bad)
    assert build_defense("adversarial_poisoning", {"max_area": None}).params.max_area is None


# ------------------------------------------------------------------ the returned batch
@pytest.mark.parametrize("attack", ["gradient_matching", "se", "patch", "feature_collision"])
def test_batch_split_labels_budget_and_untouched_model(digits, attack):
    images, labels = _batch(digits)
    model = _model()
    model.backbone.layers[1].eval()  # a mixed mode (as a partly frozen model has) must come back as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and BatchNorm statistics
    marker = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = marker.clone()
    defense = build_defense("adversarial_poisoning", {"attack": attack, "steps": 2})
    out, out_labels = defense.on_train_batch(model, images, labels)

    poisons, targets = _positions(defense, labels)
    k = len(poisons)
    assert k == 24 and out.shape == images.shape and out.dtype == images.dtype and not out.requires_grad
    assert torch.equal(out_labels, torch.cat((labels[poisons], labels[targets])))  # true labels, both parts
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    changed = (out - torch.cat((images[poisons], images[targets]))).abs()
    if attack == "patch":
        area = changed.amax(dim=1).gt(0).flatten(1).sum(dim=1)  # changed (h, w) positions per image
        assert bool((area < 45).all()) and bool((area[:k] > 0).all())
        assert bool((area[k:] > 0).any())  # the targets are patched too
        inside = changed.amax(dim=1, keepdim=True).gt(0).expand_as(out)
        assert set(out[inside].unique().tolist()) <= {0.0, 1.0}
    else:
        assert float(changed[:k].max()) <= EPS + 1e-6 and float(changed[:k].max()) > EPS / 2
        assert torch.equal(out[k:], images[targets])  # targets unchanged
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model.head.weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")


def test_gradient_matching_lowers_the_matching_loss(digits):
    images, labels = _batch(digits, 64)
    model = _model()
    defense = build_defense("adversarial_poisoning", {"steps": 5})
    out, _ = defense.on_train_batch(model, images, labels)
    poisons, targets = _positions(defense, labels)
    k = len(poisons)
    y_p = labels[poisons]
    y_t = torch.full_like(labels[targets], int(torch.bincount(y_p).argmax()))
    model.eval()
    target = parameter_gradient(model, images[targets], y_t)

    def loss(x):
        return float(matching_loss(parameter_gradient(model, x, y_p), target, "cosine"))

    assert loss(out[:k]) < loss(images[poisons]) - 0.01


def test_feature_collision_pulls_the_poisons_mean_feature_to_the_targets(digits):
    images, labels = _batch(digits, 64)
    model = _model()
    defense = build_defense("adversarial_poisoning", {"steps": 5, "attack": "feature_collision"})
    out, _ = defense.on_train_batch(model, images, labels)
    poisons, targets = _positions(defense, labels)
    k = len(poisons)
    model.eval()
    with torch.no_grad():
        goal = model.features(images[targets]).mean(dim=0)

        def distance(x):
            return float((model.features(x).mean(dim=0) - goal).pow(2).mean())

        assert distance(out[:k]) < 0.9 * distance(images[poisons])


def test_malicious_label_is_the_mode_with_the_smallest_label_on_ties():
    assert int(ap.malicious_label(torch.tensor([3, 1, 3, 1, 2]))) == 1
    assert int(ap.malicious_label(torch.tensor([4, 4, 0]))) == 4


def test_patches_per_class_and_the_derangement(digits):
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 10):
        perm = random_derangement(n, generator)
        assert sorted(perm.tolist()) == list(range(n)) and not bool((perm == torch.arange(n)).any())
    _, sides = class_patches(200, 32, 45, generator)
    assert int(sides.min()) >= 3 and int(sides.max()) <= 12 and int(sides.prod(dim=1).max()) < 45
    _, sides = class_patches(200, 32, None, generator)
    assert int(sides.prod(dim=1).max()) >= 45  # the authors' unbounded patches reach past the paper's ℓ0

    # On flat grey images every patch pixel differs, so each image's patch can be read back.
    labels = torch.arange(128) % 10
    images = torch.full((128, 3, 32, 32), 0.5)
    defense = build_defense("adversarial_poisoning", {"attack": "patch"})
    out, out_labels = defense.on_train_batch(_model(), images, labels)
    k = len(_positions(defense, labels)[0])

    def patch_of(i):
        where = (out[i] != 0.5).any(dim=0).nonzero()
        (top, left), (bottom, right) = where.min(dim=0).values, where.max(dim=0).values
        return out[i, :, top:bottom + 1, left:right + 1]

    by_class = {}
    for i in range(k):
        by_class.setdefault(int(out_labels[i]), []).append(patch_of(i))
    assert len(by_class) == 10
    for patches in by_class.values():  # one patch per class
        assert all(torch.equal(p, patches[0]) for p in patches)
    for i in range(k, 128):  # a target of class c carries the patch of another class
        own = int(out_labels[i])
        match = [c for c, patches in by_class.items() if patches[0].shape == patch_of(i).shape
                 and torch.equal(patches[0], patch_of(i))]
        assert match and own not in match


# ------------------------------------------------------------------ edge cases
def test_batches_too_small_to_split_are_unchanged_and_one_class_works(digits):
    images, labels = _batch(digits, 8)
    model = _model()
    defense = build_defense("adversarial_poisoning", {"steps": 1})
    x, y = defense.on_train_batch(model, images[:1], labels[:1])  # ⌊0.75⌋ = 0 poisons
    assert x is images[:1] or torch.equal(x, images[:1])
    assert torch.equal(y, labels[:1])
    x, y = defense.on_train_batch(model, images[:2], labels[:2])  # one poison, one target
    assert x.shape == (2, 3, 32, 32) and sorted(y.tolist()) == sorted(labels[:2].tolist())
    same = torch.full((8,), 3)
    x, y = defense.on_train_batch(model, images, same)  # every poison of one class
    assert torch.equal(y, same) and float(x.min()) >= 0
    with pytest.raises(ConfigError, match="soft labels"):
        defense.on_train_batch(model, images, torch.eye(10)[labels])


# ------------------------------------------------------------------ determinism, ranks, bf16
def test_deterministic_per_seed_call_and_rank(digits, monkeypatch):
    images, labels = _batch(digits)
    model = _model()

    def run(seed=0, calls=1):
        defense = build_defense("adversarial_poisoning", {"steps": 2, "seed": seed})
        return [defense.on_train_batch(model, images, labels) for _ in range(calls)]

    (a,), (b,) = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (_, second), (other,) = run(calls=2), run(seed=1)
    assert not torch.equal(second[1], a[1]) and not torch.equal(other[1], a[1])  # new splits
    monkeypatch.setattr(randomness, "rank_world", lambda: (1, 2))  # where the per-batch draws ask
    (rank1,) = run()
    assert not torch.equal(rank1[1], a[1])  # each DDP rank draws its own split


def _defended_labels(device: torch.device) -> list[list[int]]:
    """Every rank defends the same batch; the labels each rank trains on, as rank 0 sees them."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, width=4, pool=1).train()
    x, y = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    _, labels = build_defense("adversarial_poisoning", {"steps": 1}).on_train_batch(model, x, y)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, labels.tolist())
    return everyone


def test_each_ddp_rank_draws_its_own_split_deterministically():
    from poisonbench.attacks.distributed import run_ranks

    rank0, rank1 = run_ranks(_defended_labels, ["cpu", "cpu"])
    assert rank0 != rank1 and sorted(rank0) == sorted(rank1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, width=4, pool=1).train()
    x, y = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    _, alone = build_defense("adversarial_poisoning", {"steps": 1}).on_train_batch(model, x, y)
    assert alone.tolist() == rank0  # rank 0 of a DDP run draws what a one-process run draws


@pytest.mark.parametrize("attack", ["gradient_matching", "se", "patch"])
def test_runs_under_bf16_autocast(digits, attack):
    images, labels = _batch(digits)
    model = _model()
    defense = build_defense("adversarial_poisoning", {"attack": attack, "steps": 2})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_labels = defense.on_train_batch(model, images, labels)
    poisons, targets = _positions(defense, labels)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    if attack != "patch":
        delta = (out[:len(poisons)] - images[poisons]).abs()
        assert float(delta.max()) <= EPS + 1e-6 and float(delta.max()) > 0
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ inside training
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_victim_trains_an_epoch_on_digits_with_the_defense(digits, precision):
    train, test = digits
    quiet_lightning()
    cfg = {"epochs": 1, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
           "milestones": [], "accelerator": "cpu", "precision": precision}
    defense = build_defense("adversarial_poisoning", {"steps": 1})
    module = VictimModule(_model(), 10, cfg, defense=defense)
    build_trainer(cfg, None).fit(module, datamodule=PoisonedDataModule(train, test, None, batch_size=128))
    assert defense.calls == -(-len(train.labels) // 128)  # every batch went through the defense
    assert module.curve and 0 <= module.curve[-1][1] <= 100


# ------------------------------------------------------------------ make bench
def test_bench_section_prints_the_cost_ratio(capsys):
    from poisonbench.bench import speed

    assert "adv_poisoning" in speed.SECTIONS
    ratios = speed.bench_adversarial_poisoning([torch.device("cpu")], repeats=1, batch=4,
                                               models={"small_cnn": {"pool": 1, "width": 4}}, params={"steps": 1})
    out = capsys.readouterr().out
    assert ratios["small_cnn cpu"] > 0
    assert "adversarial_poisoning (gradient_matching, 1 step, p 0.75), small_cnn, cpu, batch 4:" in out
    assert "s per defended step" in out and "ratio" in out


# ------------------------------------------------------------------ adversarial training, robuster's variant
def test_signed_adam_adversarial_training_is_the_robuster_preset(digits):
    from poisonbench.defenses.adversarial_training import AdversarialTrainingParams

    params = build_defense("adversarial_training", {"method": "signed_adam", "eps": EPS}).params
    assert (params.steps, params.step_size, params.random_start) == (5, 0.1, True)
    assert AdversarialTrainingParams(method="pgd").steps == 7  # the others keep their defaults
    images, labels = _batch(digits)
    model = _model()
    model.backbone.layers[1].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    defense = build_defense("adversarial_training", {"method": "signed_adam", "eps": EPS})
    adv, out_labels = defense.on_train_batch(model, images, labels)
    assert torch.equal(out_labels, labels) and not adv.requires_grad
    assert float((adv - images).abs().max()) <= EPS + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert [m.training for m in model.modules()] == modes  # crafted in eval mode, modes restored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no BatchNorm update
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(model(adv), labels) > ce(model(images), labels)
