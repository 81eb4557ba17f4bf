"""``random_noise``: ±ε noise on a random part of each batch (the robuster paper's sanity check).

Geiping et al. 2021, Table 2 "Random noise" and App. C.3 "Input Noise": "We draw
random noise from the boundary of the set of allowed perturbations by independently
sampling from a Bernoulli distribution for each value, and assigning either −ε or ε to
each value." In the authors' code this is adversarial poisoning with a non-optimising
inner attack (``--defense_type adversarial-bernoulli``, ``RandomAttack``): the batch is
split as in Algorithm 1 and only the poison part is perturbed. So, per augmented
batch of B images:

1. a random ⌊p·B⌋ of them are the poison part (``adversarial_poisoning.split``, the
   same split as that defense);
2. each value of those images moves by +ε or −ε with probability ½ each, and is
   clamped to [0, 1] (the authors' code leaves the box unclamped: its pixel values
   can leave the image range; here the noise stays within ±ε and inside the box);
3. the step trains on the whole batch in its order, labels unchanged.

Defaults: ε = 16/255 (= the attack's ε, as for adversarial poisoning) and p = 0.75
(adversarial poisoning's value against targeted attacks; Table 2's attack is targeted).
The draws come from a stream seeded by (``seed``, the DDP rank, the number of batches
this defense has handled), like adversarial poisoning's: each rank draws its own, a
run is reproducible rank by rank. Cost: one Bernoulli draw per value of p·B images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from poisonbench.defenses.adversarial_poisoning import split
from poisonbench.defenses.base import Defense, register_defense
from poisonbench.defenses.randomness import BatchDraws, torch_stream
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

NAME = "random_noise"


@dataclass(frozen=True)
class RandomNoiseParams:
    eps: float = ranged(16 / 255, 0, 1, low_open=True)  # ℓ∞ radius in pixels (the attack's ε)
    p: float = ranged(0.75, 0, 1, low_open=True)  # fraction of each batch that gets noise
    seed: int = ranged(0, 0, None)  # of the per-batch split and noise


@register_defense(NAME, RandomNoiseParams)
class RandomNoise(BatchDraws, Defense):
    """A random ⌊p·B⌋ of each batch moved by ±ε per value (Bernoulli signs)."""

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.params
        generator = torch_stream(images.device, *self.batch_keys(NAME, params.seed))
        poisons, _ = split(labels, params.p, generator)
        if poisons.numel() == 0:
            return images, labels
        chosen = images[poisons]
        signs = torch.randint(0, 2, chosen.shape, generator=generator, device=generator.device)
        noise = (signs.to(chosen.dtype) * 2 - 1).mul_(params.eps).to(chosen.device)
        out = images.clone()
        out[poisons] = (chosen + noise).clamp_(0, 1)
        return out, labels
