"""Signed Adam with projection: stays in the budget and the image box, descends."""
from __future__ import annotations

import torch

from poisonbench.attacks.gradients import matching_loss
from poisonbench.attacks.steps import SignedAdam


def test_signed_adam_descends_inside_the_ball_and_the_box():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 8, 8, generator=g)
    goal = (clean + 0.5).clamp(0, 1)  # pulls δ to the ball's edge and the box's
    eps = 8 / 255
    opt = SignedAdam(clean, eps, lr=0.01, init="randn", milestones=(20,), generator=g)
    losses = []
    for _ in range(40):
        loss = (opt.poisoned() - goal).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, opt.delta)
        opt.step(grad)
        losses.append(float(loss))
        d = opt.delta.detach()
        assert d.abs().max() <= eps + 1e-6 and (clean + d).min() >= 0 and (clean + d).max() <= 1
    assert losses[-1] < losses[0]
    assert opt.optimizer.param_groups[0]["lr"] < 0.01  # the milestone divided it


def test_scale_gives_the_per_channel_step_of_normalised_space():
    clean = torch.full((1, 3, 2, 2), 0.5)
    std = torch.tensor([0.1, 0.2, 0.4])
    opt = SignedAdam(clean, 1.0, lr=0.1, init="zero", scale=std)
    opt.step(torch.ones_like(clean))  # Adam's first signed step moves u by lr
    moved = -opt.delta.detach()[0, :, 0, 0]
    assert torch.allclose(moved, 0.1 * std, atol=1e-6)


def test_matching_losses():
    a = (torch.tensor([1.0, 0.0]), torch.tensor([0.0]))
    assert float(matching_loss(a, a)) == 0.0
    b = (torch.tensor([0.0, 1.0]), torch.tensor([0.0]))
    assert abs(float(matching_loss(a, b)) - 1.0) < 1e-6  # orthogonal: cosine 0
    assert abs(float(matching_loss(a, b, "se")) - 1.0) < 1e-6  # ½·2 / 1
