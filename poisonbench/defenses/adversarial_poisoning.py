"""``adversarial_poisoning``: train on batches that are poisoned against the current model.

Geiping et al. 2021, "What Doesn't Kill You Makes You Robust(er)", Algorithm 1 (the
authors' ``--optimization defensive --defense_type adversarial-wb-recombine``,
``victims/training.py::run_step``). Per augmented batch of B images:

1. a random ⌊p·B⌋ of them are poisons x_p (labels y_p), the rest targets x_t (true
   labels y_true); with ⌊p·B⌋ = 0 the batch is trained on unchanged;
2. the malicious label y_t is the most frequent label of y_p, for every target (ties:
   the smallest label, the same on every device; the authors' ``labels.mode()`` leaves
   the order unspecified);
3. the model goes to eval mode (BatchNorm uses its running statistics and does not
   update them) and the inner attack (``poisonbench.attacks.batch``) poisons x_p
   against it for ``steps`` signed-Adam steps from randn·ε, a fresh Adam with lr 0.1
   and no schedule, projected every step; then every module's mode is restored
   exactly as it was (``transfer`` keeps its frozen backbone in eval mode);
4. the step trains on cat(x_p', x_t') with the **true** labels of both parts.

The split and the attack's noise come from a generator seeded with (``seed``, the
DDP rank, the number of batches this defense has handled), so each rank draws its own
split and a run is reproducible rank by rank. The count restarts with the process: a
run resumed from a Lightning checkpoint draws other splits than an uninterrupted one.

The paper's values are the defaults: p = 0.75 for targeted attacks (0.5 for the
backdoor rows, Table 1), 5 steps, ε = 16/255 (= the attack's ε), gradient matching.
``max_area`` bounds the ``patch`` attack's ℓ0 (App. C.3: "ℓ0 < 45"; null = the
authors' code, up to 12×12). Cost: each step is a double backward pass on p·B images,
so a defended step costs several plain ones (``make bench``, section ``adv_poisoning``).

Choices: the split is a random subset of fixed size ⌊p·B⌋ (the paper says "with
probability p"; the authors take the first ``int(p·B)`` of a shuffled batch, which is
the same in distribution); the step is taken in the model's normalised units like the
authors' code (see ``attacks/batch.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from poisonbench.attacks.batch import BATCH_ATTACKS, eval_mode
from poisonbench.defenses.base import Defense, check_class_labels, register_defense
from poisonbench.defenses.randomness import BatchDraws, torch_stream
from poisonbench.errors import ConfigError
from poisonbench.models.classifier import ImageClassifier
from poisonbench.params import ranged

NAME = "adversarial_poisoning"


@dataclass(frozen=True)
class AdversarialPoisoningParams:
    p: float = ranged(0.75, 0, 1, low_open=True, high_open=True)  # fraction of each batch poisoned (Table 1: 0.75 targeted, 0.5 backdoor)
    attack: str = "gradient_matching"  # inner attack: gradient_matching | se | patch (attacks/batch.py)
    steps: int = ranged(5, 1, None)  # signed-Adam steps per batch (authors' novel_defense['steps'])
    eps: float = ranged(16 / 255, 0, 1, low_open=True)  # ℓ∞ radius in pixels, = the attack's ε (App. C.1)
    lr: float = ranged(0.1, 0, None, low_open=True)  # signed Adam's lr, in the model's normalised units (authors' --tau)
    max_area: int | None = ranged(45, 10, None)  # patch only: ℓ0 bound, area < max_area (App. C.3); null = up to 12×12
    seed: int = ranged(0, 0, None)  # of the per-batch splits and noise

    def __post_init__(self) -> None:
        if self.attack not in BATCH_ATTACKS:
            raise ConfigError(f"defense {NAME!r}: attack {self.attack!r} is unknown; "
                              f"known: {', '.join(BATCH_ATTACKS.names())}")


def batch_generator(seed: int, rank: int, call: int, device: torch.device) -> torch.Generator:
    """The random stream of one defended batch: a function of (seed, rank, call) only."""
    return torch_stream(device, NAME, seed, rank, call)


def split(labels: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(poison positions, target positions): a random ⌊p·B⌋ of the batch, and the rest."""
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(labels.device)
    k = math.floor(p * n)
    return order[:k], order[k:]


def malicious_label(poison_labels: torch.Tensor) -> torch.Tensor:
    """The most frequent poison label (ties: the smallest)."""
    return torch.bincount(poison_labels).argmax()


@register_defense(NAME, AdversarialPoisoningParams)
class AdversarialPoisoning(BatchDraws, Defense):
    """Each batch is partly poisoned against the model being trained (Algorithm 1)."""

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_class_labels(NAME, labels)
        params = self.params
        _, seed, rank, call = self.batch_keys(NAME, params.seed)
        generator = batch_generator(seed, rank, call, images.device)
        poisons, targets = split(labels, params.p, generator)
        if poisons.numel() == 0:
            return images, labels
        y_p, y_true = labels[poisons], labels[targets]
        y_t = malicious_label(y_p).expand_as(y_true)
        with eval_mode(model):
            x_p, x_t = BATCH_ATTACKS.get(params.attack)(
                model, images[poisons], y_p, images[targets], y_t, steps=params.steps, eps=params.eps,
                lr=params.lr, generator=generator, y_true=y_true, max_area=params.max_area)
        return torch.cat((x_p, x_t)), torch.cat((y_p, y_true))
