"""Parameter gradients and the losses that compare them (TensorClog, Alignment, gradient
matching and its per-batch form in adversarial poisoning).

Gradients are taken with ``torch.autograd.grad``, which returns them instead of
accumulating into ``.grad``: the model's parameters stay untouched, which keeps these
functions safe inside a Lightning training step and under DDP (no gradient hook fires).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MATCHING_LOSSES = ("cosine", "se")


def parameter_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                       create_graph: bool = False) -> tuple[torch.Tensor, ...]:
    """∇_θ loss_fn(model(inputs), labels) over the parameters that require gradients;
    with ``create_graph`` the result can be differentiated again (double backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(inputs), labels)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def gradient_norm(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The ℓ2 norm of all parameter gradients together (summed in float32: under bf16
    autocast the squares of many small entries would underflow)."""
    return torch.sqrt(sum(g.float().pow(2).sum() for g in grads))


def cosine(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Cosine similarity of two parameter gradients, each flattened over all parameters."""
    dot = sum((u.float() * v.float()).sum() for u, v in zip(a, b))
    return dot / (gradient_norm(a) * gradient_norm(b)).clamp_min(1e-12)


def matching_loss(poison: tuple[torch.Tensor, ...], target: tuple[torch.Tensor, ...], kind: str = "cosine",
                  target_norm: torch.Tensor | None = None) -> torch.Tensor:
    """How far the poisons' gradient is from the target's (Geiping et al. 2021, Witches' Brew).

    ``cosine``: 1 − cos over all parameters concatenated (the authors' ``similarity``
    loss). ``se``: ½‖g_t − g_p‖² / ‖g_t‖ (their ``SE`` loss, used in the robuster paper's
    transfer setting because cosine similarity "does not scale well to small models").
    """
    if kind == "cosine":
        return 1 - cosine(poison, target)
    if kind == "se":
        norm = gradient_norm(target) if target_norm is None else target_norm
        return 0.5 * sum((t.float() - p.float()).pow(2).sum() for p, t in zip(poison, target)) / norm.clamp_min(1e-12)
    raise ValueError(f"matching loss must be one of {', '.join(MATCHING_LOSSES)}, got {kind!r}")
