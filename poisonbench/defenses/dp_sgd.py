"""``dp_sgd``: clip the batch gradient and add Gaussian noise, per optimiser step.

The robuster paper's differentially-private-SGD baseline as it ran it (Geiping et al.
2021, App. C.3 "a variant of differentially private SGD with gradient clipping to a
value of 1 on a mini-batch level (as suggested in Hong et al. (2020)), and varying
levels of Gaussian noise applied to the mini-batch gradient"; the authors'
``victims/training.py``): after the backward pass,

1. the gradient of the whole batch, all trainable parameters together, is clipped to
   ℓ2 norm ``clip`` (``torch.nn.utils.clip_grad_norm_``);
2. Gaussian noise of standard deviation ``clip · noise`` is added to every element
   (the authors scale the noise by the clip, like σ·C in Abadi et al.; at the paper's
   clip 1 it is ``noise``). Table 2 and Figure 3 run noise ∈ {1e-4, 1e-3, 1e-2}.

**This is batch-level, not per-sample DP**: no per-example clipping, no privacy
accountant, no ε is claimed. It is the paper's defense (Hong et al. find the gradient
noise, not the clipping, to be what resists poisoning), not DP-SGD of Abadi et al.
Weight decay and momentum act afterwards, inside the optimiser, as in the authors' code.

DDP: the hook runs on every rank after the gradient all-reduce, so every rank holds
the same gradient; the noise comes from a generator seeded by (``seed``, the number
of optimiser steps this defense has seen) only, the same on every rank, so the
replicas stay identical. Parameters are visited in the optimiser's order. The count
travels in a training checkpoint (``state_dict``): a resumed run draws the noise the
uninterrupted run would.

Cost: one pass over the gradients for the norm and one ``randn`` of the model's size
per step (``make bench``, section ``training_defenses``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.defenses.base import Defense, register_defense
from poisonbench.defenses.randomness import torch_stream
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

NAME = "dp_sgd"


@dataclass(frozen=True)
class DPSGDParams:
    clip: float = ranged(1.0, 0, None, low_open=True)  # ℓ2 bound of the batch gradient (App. C.3: 1)
    noise: float = ranged(0.001, 0, None)  # noise std relative to clip (Table 2: 1e-4, 1e-3, 1e-2)
    seed: int = ranged(0, 0, None)  # of the noise; the same on every rank


def stepped_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimiser will step (those with a gradient), in its order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def step_noise(shape_like: list[torch.Tensor], std: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Gaussian noise of ``std`` shaped like each tensor, from one draw over them all."""
    total = sum(t.numel() for t in shape_like)
    flat = torch.randn(total, generator=generator, device=generator.device, dtype=torch.float32).mul_(std)
    out, start = [], 0
    for t in shape_like:
        out.append(flat[start:start + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


@register_defense(NAME, DPSGDParams)
class DPSGD(Defense):
    """The batch gradient clipped to ``clip``, plus N(0, (clip·noise)²) per element."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.steps = int(state.get("steps", 0))

    def on_before_optimizer_step(self, model: ImageClassifier, optimizer: torch.optim.Optimizer) -> None:
        stepped = stepped_parameters(optimizer)
        step, self.steps = self.steps, self.steps + 1
        if not stepped:
            return
        params = self.params
        with torch.no_grad():
            torch.nn.utils.clip_grad_norm_(stepped, params.clip)
            std = params.clip * params.noise
            if std > 0:
                grads = [p.grad for p in stepped]
                generator = torch_stream(grads[0].device, NAME, params.seed, step)
                for grad, noise in zip(grads, step_noise(grads, std, generator)):
                    grad.add_(noise)

