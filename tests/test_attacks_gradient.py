"""The parameter-gradient attacks, ``tensorclog`` and ``alignment``: clean-label stores
within budget, deterministic in the seed, resumable to the very store an uninterrupted
run makes, and objectives that move the way their papers intend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import poisonbench.attacks.alignment as alignment
import poisonbench.attacks.chunked_pgd as chunked_pgd
import poisonbench.attacks.tensorclog as tensorclog
from poisonbench.attacks import ATTACKS
from poisonbench.attacks.surrogate import build_crafting_model
from poisonbench.errors import ConfigError

from crafting_checks import interrupt_then_resume, random_imageset

NAMES = ("tensorclog", "alignment")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return random_imageset(8)


def _params(name: str) -> dict:
    # The smoke run, smaller still: 2 restarts × 2 chunks of 12 images, 2 steps each.
    return {**ATTACKS.get(name).smoke, "batch_size": 12, "steps": 2}


@pytest.fixture(scope="module")
def stores(tiny):
    """One uninterrupted store per attack (seed 3), shared by the tests below."""
    return {name: ATTACKS.get(name).craft(tiny, _params(name), seed=3) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_clean_label_and_within_budget(tiny, stores, name):
    store = stores[name]
    assert store.attack == name and store.norm == "linf"
    assert torch.equal(store.labels, tiny.labels) and torch.equal(store.index, torch.arange(len(tiny)))
    delta = store.images.int() - tiny.images.int()
    assert delta.abs().max() <= 8 and delta.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_interrupted_crafting_resumes_to_the_same_store(tiny, stores, tmp_path, name):
    """Also the determinism check: every unit is computed twice, in two runs, and must agree."""
    resumed, units = interrupt_then_resume(ATTACKS.get(name), tiny, _params(name), 3,
                                           tmp_path / "partial.safetensors")
    assert units == [2, 3]  # units 0 and 1 came from the checkpoint
    assert torch.equal(resumed.images, stores[name].images)


def _model_and_batch():
    with torch.random.fork_rng(devices=[]):  # a fixed model, without touching the global stream
        torch.manual_seed(0)
        model = build_crafting_model("small_cnn", 3, {"width": 4, "pool": 1}).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 32, 32, generator=g)
    y = torch.arange(3).repeat(4)
    return model, x, y


def _descend(objective, x, params):
    delta, final = chunked_pgd.pgd_chunk(objective, x, params, torch.Generator().manual_seed(0))
    assert delta.abs().max() <= params.eps + 1e-6
    return delta, final


def test_tensorclog_lowers_the_parameter_gradient_norm():
    model, x, y = _model_and_batch()
    objective = tensorclog.tensorclog_objective(model, x, y, 3)
    clean = float(objective(x, False))
    params = tensorclog.TensorClogParams(steps=10, tau=0.1, augment=False)
    _, poisoned = _descend(objective, x, params)
    assert poisoned < 0.8 * clean
    assert all(p.grad is None for p in model.parameters())  # autograd.grad only, nothing accumulates


@pytest.mark.parametrize("target", alignment.TARGETS)
def test_alignment_raises_the_cosine_to_the_target(target):
    model, x, y = _model_and_batch()
    objective = alignment.alignment_objective(target)(model, x, y, 3)
    # Per sample, ∇_logits of −log(1 − p_y) is −p_y/(1 − p_y) times that of CE: the target
    # reweights the reversed clean gradient towards confident samples, so on an untrained
    # model the two batch gradients need not be opposed (−1 only for negative_ce).
    clean_cos = 1 - float(objective(x, False))
    params = alignment.AlignmentParams(steps=10, tau=0.1, augment=False, target=target)
    _, poisoned = _descend(objective, x, params)
    assert 1 - poisoned > clean_cos + 0.1
    assert all(p.grad is None for p in model.parameters())


def test_reverse_cross_entropy_is_minus_log_one_minus_p():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 30.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = F.softmax(logits, dim=1)[torch.arange(2), labels]
    expected = (-torch.log(1 - p)).mean()
    assert torch.allclose(alignment.reverse_cross_entropy(logits, labels), expected, atol=1e-6)
    # Stable where 1 − p_y rounds to 0 in float32.
    huge = alignment.reverse_cross_entropy(torch.tensor([[200.0, 0.0, 0.0]]), torch.tensor([0]))
    assert torch.isfinite(huge) and float(huge) == pytest.approx(200.0 - torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="target"):
        ATTACKS.get("alignment").params({"target": "reverse"})
    with pytest.raises(ConfigError, match="steps"):
        ATTACKS.get("tensorclog").params({"steps": 0})
