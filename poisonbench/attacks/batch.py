"""Per-batch attacks: poison part of one training batch against the current model.

The inner attacks of adversarial poisoning (Geiping et al. 2021, "What Doesn't Kill
You Makes You Robust(er)", Algorithm 1; the authors' ``victims/batched_attacks.py``).
Each entry of ``BATCH_ATTACKS`` has one signature::

    attack(model, x_p, y_p, x_t, y_t, *, steps, eps, lr, generator, y_true, max_area) -> (x_p', x_t')

``x_p`` (labels ``y_p``) are the poisons, ``x_t`` the targets that the poisons should
make the model read as ``y_t`` (the malicious label); ``y_true`` are the targets' true
labels (the patch attack pastes by them). Images are float in [0, 1], already
augmented; the caller puts the model in eval mode and restores its modes. Gradients
are taken only with ``torch.autograd.grad``: the parameters' ``.grad`` is never
written (safe inside a Lightning training step and under DDP). δ, Adam's state and
the cosine's sums are float32, so the forward passes may run under bf16 autocast.
All randomness comes from ``generator``. An attack ignores the keywords it does not use.

- ``gradient_matching``: 1 − cos(g_t, g_p) over all trainable parameters
  concatenated, g_t = ∇θ CE(f(x_t), y_t) (a constant), g_p = ∇θ CE(f(x_p + δ), y_p)
  (differentiated again through ``create_graph``); ``steps`` signed-Adam steps from
  randn·ε, fresh Adam, no schedule (the authors' ``adversarial-wb``). The targets
  are returned unchanged.
- ``se``: ½‖g_t − g_p‖² / ‖g_t‖ instead of the cosine (``adversarial-se``).
- ``patch``: no optimisation (``adversarial-patch``). One random patch per class,
  sides drawn from 10–40 % of the image side (3..12 px at 32×32), redrawn until its
  area is below ``max_area`` (the paper's ℓ0 < 45, App. C.3; ``None`` = the authors'
  code, up to 12×12); pixels Bernoulli(q_c) per pixel and channel with q_c ~ U(0, 1)
  per class (the paper's "checkerboard" is this random pattern in the code); a random
  derangement π of the classes; poisons of class c get patch c, targets of true class
  c get patch π(c), each image at its own random location. Pixel values are 0 and 1:
  the authors' code divides the 0/1 pattern by the normalisation std without adding
  the mean, so its patches sit at about {0.49, 1.49} in pixels, outside the image range.

Registered beside their attacks: ``feature_collision`` (attacks/feature_collision.py),
``hidden_trigger`` and ``metapoison`` (their attack files).

Units: the step is taken in the model's normalised units when the model has a
``normalize.std`` (the authors' code optimises normalised tensors, so lr 0.1 moves
about 0.1·std ≈ 6/255 pixels per step); ε is always in pixels.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.attacks.gradients import gradient_norm, matching_loss, parameter_gradient
from poisonbench.attacks.steps import SignedAdam
from poisonbench.registry import Registry

BatchAttack = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BATCH_ATTACKS: Registry[BatchAttack] = Registry("per-batch attack")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards every module's own mode is back
    as it was (not ``model.train()``: a frozen backbone stays in eval mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def step_scale(model: nn.Module) -> torch.Tensor | None:
    """The model's normalisation std (signed Adam's lr in its normalised units), or None."""
    normalize = getattr(model, "normalize", None)
    std = getattr(normalize, "std", None)
    return std.flatten() if isinstance(std, torch.Tensor) else None


def _matching(kind: str, model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
              y_t: torch.Tensor, *, steps: int, eps: float, lr: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        target = tuple(g.detach() for g in parameter_gradient(model, x_t.detach(), y_t))
        target_norm = gradient_norm(target)
        delta = SignedAdam(x_p, eps, lr=lr, init="randn", scale=step_scale(model), generator=generator)
        for _ in range(steps):
            poison = parameter_gradient(model, delta.poisoned(), y_p, create_graph=True)
            loss = matching_loss(poison, target, kind, target_norm)
            # d loss/du, not d loss/dδ: the same signs (the scale is positive), and only signs are used
            (grad,) = torch.autograd.grad(loss, delta.u)
            delta.step(grad)
    # clamp: clean + (projected δ) can round a hair outside [0, 1]
    return delta.poisoned().detach().clamp_(0, 1).to(x_p.dtype), x_t


@BATCH_ATTACKS.register("gradient_matching")
def gradient_matching(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
                      y_t: torch.Tensor, *, steps: int, eps: float, lr: float = 0.1,
                      generator: torch.Generator, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisons whose gradient points where the targets' (with the malicious label) does."""
    return _matching("cosine", model, x_p, y_p, x_t, y_t, steps=steps, eps=eps, lr=lr, generator=generator)


@BATCH_ATTACKS.register("se")
def squared_error_matching(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
                           y_t: torch.Tensor, *, steps: int, eps: float, lr: float = 0.1,
                           generator: torch.Generator, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient matching with the squared-error loss."""
    return _matching("se", model, x_p, y_p, x_t, y_t, steps=steps, eps=eps, lr=lr, generator=generator)


def evasion(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int, eps: float,
            lr: float = 0.1, init: str = "randn", generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples by signed Adam ascending the cross-entropy, from randn·ε (the
    authors' ``adversarial-evasion`` attack and their adversarial-training preset)."""
    with torch.enable_grad():
        delta = SignedAdam(images, eps, lr=lr, init=init, scale=step_scale(model), generator=generator)
        for _ in range(steps):
            loss = F.cross_entropy(model(delta.poisoned()), labels)
            (grad,) = torch.autograd.grad(loss, delta.u)
            delta.step(-grad)  # SignedAdam descends: ascend the loss
    return delta.poisoned().detach().clamp_(0, 1).to(images.dtype)


def random_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n ≥ 2), by rejection
    (about e ≈ 2.7 draws on average)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 classes, got {n}")
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        if not bool((perm == torch.arange(n, device=perm.device)).any()):
            return perm


def class_patches(classes: int, size: int, max_area: int | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [classes, 3, hi, hi] in {0, 1}, sides [classes, 2] as (h, w)): one patch per
    class in the top-left h×w corner of a hi×hi canvas, hi = 40 % of ``size``."""
    lo, hi = max(1, int(0.1 * size)), max(1, int(0.4 * size))
    if max_area is not None and lo * lo >= max_area:
        raise ValueError(f"max_area {max_area} admits no patch with sides in {lo}..{hi}")
    device = generator.device
    sides = torch.empty(classes, 2, dtype=torch.int64, device=device)
    for c in range(classes):
        while True:
            hw = torch.randint(lo, hi + 1, (2,), generator=generator, device=device)
            if max_area is None or int(hw[0] * hw[1]) < max_area:
                break
        sides[c] = hw
    q = torch.rand(classes, 1, 1, 1, generator=generator, device=device)
    pixels = (torch.rand(classes, 3, hi, hi, generator=generator, device=device) < q).float()
    return pixels, sides


def paste(images: torch.Tensor, which: torch.Tensor, pixels: torch.Tensor, sides: torch.Tensor,
          generator: torch.Generator) -> torch.Tensor:
    """``images`` with patch ``which[i]`` pasted at a random location of image i."""
    n, _, height, width = images.shape
    if n == 0:
        return images
    device = images.device
    h, w = sides[which, 0].to(device), sides[which, 1].to(device)
    top = (torch.rand(n, generator=generator, device=generator.device).to(device) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator, device=generator.device).to(device) * (width - w + 1)).long()
    rows = torch.arange(height, device=device).view(1, -1) - top.view(-1, 1)  # [n, H]: row inside the patch
    cols = torch.arange(width, device=device).view(1, -1) - left.view(-1, 1)
    inside = ((rows >= 0) & (rows < h.view(-1, 1))).unsqueeze(2) & ((cols >= 0) & (cols < w.view(-1, 1))).unsqueeze(1)
    canvas = pixels.to(device)
    side = canvas.shape[-1]
    r, c = rows.clamp(0, side - 1), cols.clamp(0, side - 1)
    content = canvas[which.to(device).view(-1, 1, 1, 1), torch.arange(3, device=device).view(1, 3, 1, 1),
                     r.view(n, 1, height, 1), c.view(n, 1, 1, width)]
    return torch.where(inside.unsqueeze(1), content.to(images.dtype), images)


@BATCH_ATTACKS.register("patch")
def patch(model: nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor, y_t: torch.Tensor, *,
          generator: torch.Generator, y_true: torch.Tensor | None = None, max_area: int | None = 45,
          **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Backdoor-style patches: class c's patch on its poisons, π(c)'s on targets of class c."""
    if y_true is None:
        raise ValueError("the patch attack needs the targets' true labels (y_true)")
    head = getattr(model, "num_classes", None)
    classes = int(head) if isinstance(head, int) else int(torch.cat((y_p, y_true)).max()) + 1
    classes = max(classes, 2)
    pixels, sides = class_patches(classes, min(x_p.shape[-2:]), max_area, generator)
    perm = random_derangement(classes, generator).to(y_true.device)
    return (paste(x_p.detach(), y_p, pixels, sides, generator),
            paste(x_t.detach(), perm[y_true], pixels, sides, generator))

