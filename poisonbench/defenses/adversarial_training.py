"""``adversarial_training``: train on ℓ∞-bounded adversarial examples of each batch.

The shortcuts paper's baseline defense (Yu et al., 2022, §4, Table 4 "Adv. Training"):
the Fast Gradient Sign Method (FGSM; Goodfellow et al., 2014) with an ℓ∞ bound,
"We choose ε from a list [2/255, 4/255, 8/255] and report the best test accuracy"; the
choice among those three happens in the table (one row per ε), not here. ``method:
pgd`` is the multi-step projected gradient descent of Madry et al. (2018), the form
of adversarial training that the papers the shortcuts paper cites as its source
(Huang et al., 2021; Tao et al., 2021; Fowl et al., 2021b) use against poisons.

Everything is in pixel space: the perturbation is added to the augmented float batch
in [0, 1], projected onto the ε-ball and clamped to [0, 1]; the model's first layer
normalises. Choices, with their sources:

- Training uses the adversarial batch only, not Goodfellow et al.'s mix of clean and
  adversarial loss (α = 0.5): the min-max objective of Madry et al. (2018) that
  Wong et al. (2020, "Fast is better than free") also train FGSM with.
- The adversarial batch is crafted with the model in its training mode (BatchNorm
  normalises with the batch's statistics, and the crafting forward passes update the
  running statistics), as in Wong et al.'s ``train_fgsm.py``, which puts the model in
  train mode once and crafts and trains in it. Whatever mode the scenario keeps a
  part in (``transfer`` keeps a frozen backbone in eval mode) is left as it is.
- Gradients for crafting are taken with ``torch.autograd.grad`` with respect to the
  images only, so nothing accumulates into the parameters' ``.grad`` (and no DDP
  gradient hook fires).
- FGSM starts at the clean image and steps ε (Goodfellow et al.); with
  ``random_start: true`` it starts uniformly in the ε-ball and steps 1.25·ε, the
  "FGSM with random initialisation" of Wong et al. (2020, α = 10/255 at ε = 8/255).
  PGD starts uniformly in the ε-ball and takes 7 steps of ε/4 (Madry et al., 2018,
  CIFAR-10: 7 steps of 2/255 at ε = 8/255).

- ``method: signed_adam`` is the robuster paper's adversarial-training baseline
  (Geiping et al. 2021, Table 1 "adversarial training"; the authors' ``ADVERSARIAL``
  preset and ``adversarial-evasion`` attack): the whole batch, randn·ε start, 5 steps
  of signed Adam (lr 0.1 in the model's normalised units, ``step_size``) ascending the
  cross-entropy, crafted with the model in eval mode like every defense of theirs; the
  paper runs ε = 8/255 and 16/255. It shares ``attacks.batch.evasion`` and
  ``attacks.steps.SignedAdam`` with adversarial poisoning.

FGSM and PGD take their step and random start from ``attacks.crafting`` (``step``,
``random_start``) but keep their own box clamp: ``crafting.project`` works on δ, and
``x + ((x + δ) − x)`` rounds differently from ``x + δ`` in float32, which would move
PGD's iterates by an ulp, flip signs later and change existing results.

The logged ``train/acc`` is then the accuracy on the adversarial batches (what Wong et
al. log as training accuracy); the table's metric stays the clean test accuracy.
Cost: one extra forward and backward pass per step (FGSM), ``steps`` of them (PGD,
signed Adam).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from poisonbench.attacks.batch import eval_mode, evasion
from poisonbench.attacks.crafting import random_start, step
from poisonbench.defenses.base import Defense, register_defense
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

METHODS = ("fgsm", "pgd", "signed_adam")


@dataclass(frozen=True)
class AdversarialTrainingParams:
    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius in pixel units; the shortcuts paper's largest of {2, 4, 8}/255 (§4)
    # fgsm (Goodfellow et al., 2014; shortcuts §4) | pgd (Madry et al., 2018)
    # | signed_adam (robuster paper's baseline, the authors' ADVERSARIAL preset)
    method: str = "fgsm"
    # None: fgsm 1, pgd 7 (Madry et al., 2018, CIFAR-10), signed_adam 5.
    steps: int | None = ranged(None, 1, None)
    # None: fgsm ε (Goodfellow et al.), or 1.25·ε with a random start (Wong et al., 2020);
    # pgd ε/4 (Madry et al.: 2/255 at 8/255); signed_adam: Adam's lr 0.1 (normalised units).
    step_size: float | None = ranged(None, 0, 1, low_open=True)
    # None: fgsm False (Goodfellow et al.), pgd True (Madry et al.), signed_adam True (randn·ε).
    random_start: bool | None = None

    def __post_init__(self) -> None:
        # Resolve the None defaults here, so result.json records the values used.
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1:
            raise ValueError(f"eps must lie in (0, 1] (pixel units, e.g. 8/255), got {self.eps!r}")
        steps = self.steps if self.steps is not None else {"fgsm": 1, "pgd": 7, "signed_adam": 5}[self.method]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if self.method == "fgsm" and steps != 1:
            raise ValueError(f"method fgsm takes one step; got steps {steps} (use method pgd for more)")
        random_start = self.random_start if self.random_start is not None else self.method != "fgsm"
        if not isinstance(random_start, bool):
            raise ValueError(f"random_start must be true or false, got {random_start!r}")
        if self.step_size is not None:
            step_size = self.step_size
        elif self.method == "pgd":
            step_size = self.eps / 4
        elif self.method == "signed_adam":
            step_size = 0.1
        else:
            step_size = 1.25 * self.eps if random_start else self.eps
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or step_size <= 0:
            raise ValueError(f"step_size must be a positive number (pixel units), got {step_size!r}")
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "step_size", float(step_size))
        object.__setattr__(self, "random_start", random_start)


def adversarial_examples(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         params: AdversarialTrainingParams,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in the ℓ∞ ball of radius ``params.eps`` around ``images`` (and in [0, 1])
    that raise the cross-entropy of ``model``: FGSM, PGD or signed Adam, detached from any graph.

    FGSM and PGD use the model in whatever mode it is in, signed Adam in eval mode (its
    modes restored afterwards); the parameters' gradients are untouched.
    """
    clean = images.detach()
    eps = params.eps
    if params.method == "signed_adam":
        with eval_mode(model):
            return evasion(model, clean, labels, steps=params.steps, eps=eps, lr=params.step_size,
                           init="randn" if params.random_start else "zero", generator=generator)
    low, high = (clean - eps).clamp_(min=0.0), (clean + eps).clamp_(max=1.0)
    if params.random_start:
        start = random_start(tuple(clean.shape), eps, "linf", generator, clean.device).to(clean.dtype)
        adv = torch.max(torch.min(clean + start, high), low)
    else:
        adv = clean.clone()
    for _ in range(params.steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), labels)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = step(adv.detach(), grad, params.step_size)
        adv = torch.max(torch.min(adv, high), low)  # projection onto the ε-ball ∩ [0, 1]
    return adv.detach()


@register_defense("adversarial_training", AdversarialTrainingParams)
class AdversarialTraining(Defense):
    """Each training batch is replaced by its adversarial examples (labels unchanged)."""

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return adversarial_examples(model, images, labels, self.params), labels
