"""The crafting machinery of optimising attacks: projections, signed steps, the
differentiable augmentation, crafting models, and interrupted crafting that resumes
to the very store an uninterrupted run makes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonbench.attacks import ATTACKS, crafting
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.surrogate import build_crafting_model
from poisonbench.data.augment import translate_flip

from crafting_checks import interrupt_then_resume, random_imageset


@pytest.fixture(scope="module")
def tiny():
    return random_imageset(16)


def test_projection_keeps_budget_and_pixel_range():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(8, 3, 4, 4, generator=g)
    delta = torch.randn(8, 3, 4, 4, generator=g)
    linf = crafting.project(delta, clean, 8 / 255, "linf")
    assert linf.abs().max() <= 8 / 255 + 1e-7
    assert ((clean + linf) >= 0).all() and ((clean + linf) <= 1 + 1e-7).all()
    l2 = crafting.project(delta, clean, 0.5, "l2")
    assert (l2.flatten(1).norm(dim=1) <= 0.5 + 1e-6).all()


def test_signed_step_direction():
    delta = torch.zeros(2, 3)
    grad = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
    assert torch.equal(crafting.step(delta, grad, 0.1, "linf", descend=True), -0.1 * grad.sign())
    up = crafting.step(delta, grad, 1.0, "l2")
    assert torch.allclose(up.norm(dim=1), torch.ones(2))


def test_negative_perturbations_keep_their_sign():
    # The known pitfall: a negative δ cast to uint8 wraps to a large positive value.
    clean = torch.tensor([0, 100, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 1, 1).contiguous()
    delta = torch.full((3, 3, 1, 1), -8 / 255)
    out = add_levels(clean, round_linf(delta, 8 / 255))
    assert out[:, 0, 0, 0].tolist() == [0, 92, 247]


def test_translate_flip_is_differentiable_and_identity_without_moves():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    assert torch.allclose(translate_flip(x, max_shift=0, flip=False), x, atol=1e-6)
    out = translate_flip(x, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tanh_crafting_model_has_no_relu():
    model = build_crafting_model("small_cnn", 3, {"width": 4}, activation="tanh")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.Tanh) for m in model.modules())


@pytest.mark.parametrize("name,params", [
    ("error_minimizing", {}),
    ("error_minimizing", {"kind": "classwise"}),
    ("adversarial", {"mode": "untargeted"}),
])
def test_interrupted_crafting_resumes_to_the_same_store(tiny, tmp_path, name, params):
    attack = ATTACKS.get(name)
    full = {**attack.smoke, **params, **({"max_rounds": 3} if name == "error_minimizing" else {})}
    full.setdefault("stop_accuracy", 101.0) if name == "error_minimizing" else None
    reference = attack.craft(tiny, full, seed=3)

    resumed, units = interrupt_then_resume(attack, tiny, full, 3, tmp_path / "partial.safetensors")
    assert units and units[0] == 2  # units 0 and 1 came from the checkpoint
    assert torch.equal(resumed.images, reference.images)


def test_craft_cached_resumes_from_its_partial_file(tiny):
    from poisonbench.attacks import craft_cached

    attack = ATTACKS.get("adversarial")
    store, seconds = craft_cached("adversarial", tiny, attack.smoke, seed=5)
    again, cached_seconds = craft_cached("adversarial", tiny, attack.smoke, seed=5)
    assert seconds > 0 and cached_seconds == 0.0
    assert torch.equal(store.images, again.images)
    assert not list(store.path.parent.glob("*.partial.safetensors"))

