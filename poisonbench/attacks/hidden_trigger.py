"""``hidden_trigger``: the hidden-trigger backdoor (Saha et al., AAAI 2020) as the robuster
paper runs it in transfer (its authors' ``witchcoven/witch_htbd.py``; ROBUSTER.md, "Attacks").

1. Trigger: an ``patch_size`` × ``patch_size`` patch (8 × 8), read from ``trigger_file``
   (the original is an 80 × 80 image, resized) or, without one, a seeded random pattern
   (Bernoulli(0.5) per pixel and channel, pixels {0, 255}); pasted into the lower-right
   corner, in the patched feature targets while crafting and in the test targets.
2. Crafting model: the victim's base model (the attacker knows it, App. C), in eval
   mode; features φ = the penultimate layer (``model.features``). Without a base model
   (a from-scratch victim, a smoke run) the victim's recipe is trained on the clean set
   (``surrogate`` overrides it, as in ``gradient_matching``).
3. Feature targets t̃: every training image of the target class with the trigger
   pasted; their features are fixed (the model is) and computed once.
4. Poisons: the trial's poison images (training images of the adversarial class,
   ``budget`` of the set, 5 %), labels unchanged; δ starts at randn·ε clipped.
5. Each step, for each batch of ``batch_size`` poisons: as many feature targets drawn
   at random, the differentiable augmentation of x_p + δ (re-drawn every step), greedy
   nearest pairs in feature space (the closest remaining pair first, each poison and
   each target in one pair), loss Σ ‖φ(aug(x_p + δ)) − φ(t̃)‖² over the pairs; the
   gradients of all batches summed, then one signed-Adam step (lr 0.1 in the model's
   normalised units, ×0.1 at 3/8, 5/8, 7/8 of ``steps``), projected onto the ℓ∞ ball of
   ε = 16/255 and the image box.
6. Evaluation: every test image of the target class (up to 1,000) with the trigger
   pasted; success = the share classified as the adversarial class (``backdoor_success``).

The store declares ℓ∞ ε for its poisons and carries the trigger (uint8 [C,H,W], zero
outside the corner) and its mask, so that the job pastes it into the targets; the
poisons themselves carry no patch (the trigger is hidden).

Per-batch form: ``BATCH_ATTACKS["hidden_trigger"]``, the inner attack of adversarial
poisoning against this attack (App. C.3; ``defense_params: {attack: hidden_trigger}``).

Resumable like ``gradient_matching``: every step is a unit whose randomness (the drawn
targets, the augmentation) comes from ``unit_generator(seed, unit)``; the checkpoint
holds δ and Adam's moments.

Where this differs from the authors' code, and why:
- pairs are one-to-one, as the paper describes: the authors' ``_index_mapping`` (and
  Saha et al.'s own code) marks only the chosen entry of the distance matrix, so one
  poison can be paired with several targets and another with none;
- the loss sums squared distances (the paper's); the authors' code averages over the
  feature dimension, a constant factor that the sign of signed Adam ignores;
- the patch is {0, 255} in pixels: the authors' divide it by the std without the mean,
  which puts its pixels at {mean, 1 + mean}, outside the image range;
- the patch sits in the lower-right corner of train and test images, as in the authors'
  code (Saha et al. paste it at a random location); a store's trigger has one place;
- the feature targets are computed once (the base model is fixed), where the authors'
  code recomputes them every step; the draws come from the unit's generator, not
  Python's global ``random``;
- the gradient goes through ``torch.autograd.grad``: the authors' ``zero_grad()`` drops
  ``.grad`` on torch ≥ 2 and the next step fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from poisonbench.attacks import crafting
from poisonbench.attacks.base import AttackInput, params_dict, register_attack
from poisonbench.attacks.batch import BATCH_ATTACKS, step_scale
from poisonbench.attacks.batch import patch as batch_patch
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.steps import INITS, SignedAdam
from poisonbench.attacks.surrogate import check_surrogate_keys, surrogate_spec, trained_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.params import ranged

SCALES = ("std", "pixel")
EVAL_BATCH = 256


@dataclass(frozen=True)
class HiddenTriggerParams:
    eps: float = ranged(16 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (ROBUSTER.md)
    budget: float = ranged(0.05, 0, 1, low_open=True)  # fraction of the training set poisoned (App. C.2)
    patch_size: int = ranged(8, 1, None)  # the authors' --patch_size: the 80×80 trigger resized to 8×8
    trigger_file: str | None = None  # an image file (PNG, JPEG); None: a seeded random pattern
    steps: int = ranged(240, 1, None)  # the general attack settings (App. C.2)
    lr: float = ranged(0.1, 0, None, low_open=True)  # signed Adam (the authors' --tau 0.1)
    init: str = "randn"  # randn·ε clipped (the authors' --init randn)
    augment: bool = True  # differentiable augmentation re-drawn every step (--paugment)
    max_shift: int = ranged(4, 0, 16)
    batch_size: int = ranged(512, 1, None)  # poisons per batch, and targets drawn per batch (--pbatch)
    scale: str = "std"  # std: lr in the model's normalised units (the authors'); pixel
    # The crafting model when the victim has no base model (model, model_params, epochs,
    # batch_size, lr of the victim's recipe trained on the clean set); needed in full
    # (model and epochs) when the input names no victim.
    surrogate: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        check_surrogate_keys(self.surrogate)
        if self.trigger_file is not None and not self.trigger_file.strip():
            raise ValueError("trigger_file must name an image file, or be null for a random trigger")

    @property
    def milestones(self) -> list[int]:
        return [int(self.steps * 3 / 8), int(self.steps * 5 / 8), int(self.steps * 7 / 8)]


# ----------------------------------------------------------------------------- trigger


def read_trigger(path: str | Path, size: int) -> torch.Tensor:
    """The image at ``path`` as a uint8 [3, size, size] patch (RGB, bilinear resize, as the
    authors' torchvision ``Resize``); ``ConfigError`` when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except FileNotFoundError:
        raise ConfigError(f"hidden_trigger's trigger_file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ConfigError(f"hidden_trigger's trigger_file {path} is not a readable image ({err})") from None
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1).clone()


def make_trigger(shape: tuple[int, int, int], params: HiddenTriggerParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(trigger uint8 [C,H,W] zero outside the lower-right corner, mask uint8 [H,W])."""
    c, h, w = shape
    s = params.patch_size
    if s > h or s > w:
        raise ConfigError(f"a {s}×{s} trigger does not fit images of {h}×{w} pixels")
    if params.trigger_file is not None:
        patch = read_trigger(params.trigger_file, s)
        if patch.shape[0] != c:
            raise ConfigError(f"hidden_trigger's trigger_file has 3 channels; the images have {c}")
    else:
        patch = (torch.rand(c, s, s, generator=crafting.unit_generator(seed, 0)) < 0.5).to(torch.uint8) * 255
    trigger = torch.zeros(c, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    trigger[:, h - s:, w - s:] = patch
    mask[h - s:, w - s:] = 1
    return trigger, mask


# ------------------------------------------------------------------------- crafting model


def crafting_model(inp: AttackInput, params: HiddenTriggerParams, device: torch.device) -> torch.nn.Module:
    """The victim's base model (fine-tuning, transfer) or, without one, the victim's
    recipe trained on the clean set; in eval mode, nothing trainable."""
    victim, num_classes = inp.victim, inp.train.num_classes
    if victim is not None and victim.scenario != "scratch":
        if inp.base_weights is None:
            raise ConfigError(f"hidden_trigger against a {victim.scenario} victim needs its base model's weights")
        model = build_model(victim.model, num_classes, **dict(victim.model_params))
        model.load_state_dict(load_file(str(inp.base_weights)))
        model = model.to(device)
    else:
        name, model_params, recipe = surrogate_spec(inp.victim, params.surrogate, "hidden_trigger")
        model, _ = trained_model(inp.train, name, model_params, "relu", recipe, inp.seed, device,
                                 progress=crafting.context().progress)
    model.requires_grad_(False)  # gradients flow to δ only
    return model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """φ of uint8 images, in batches."""
    return torch.cat([model.features(batch.to(device).float().div_(255)) for batch in torch.split(images, EVAL_BATCH)])


def patched(images: torch.Tensor, trigger: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), trigger, images)


# ---------------------------------------------------------------------------- objective


def greedy_pairs(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one pairs (rows, cols) of a [P, T] distance matrix, closest first: the
    smallest remaining distance whose row and column are both still free, until one
    side is used up (ties: the first in row-major order)."""
    p, t = distances.shape
    order = torch.argsort(distances.flatten(), stable=True).tolist()
    free_rows, free_cols = [True] * p, [True] * t
    rows, cols = [], []
    for flat in order:
        r, c = divmod(flat, t)
        if free_rows[r] and free_cols[c]:
            free_rows[r] = free_cols[c] = False
            rows.append(r)
            cols.append(c)
            if len(rows) == min(p, t):
                break
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)


def paired_loss(poison_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Σ ‖φ(x_p) − φ(t̃)‖² over the greedy nearest pairs (the pairing itself is not
    differentiated, as in the authors' code)."""
    rows, cols = greedy_pairs(torch.cdist(poison_features.detach().float(), target_features.float()))
    rows, cols = rows.to(poison_features.device), cols.to(poison_features.device)
    return (poison_features[rows].float() - target_features[cols].float()).pow(2).sum()


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def step_loss(model, clean: torch.Tensor, delta: torch.Tensor, source: torch.Tensor, params: HiddenTriggerParams,
              generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(d loss / d δ summed over the poison batches, mean squared distance per pair) for one
    step; ``source``: the features of every patched target-class training image."""
    delta = delta.detach().requires_grad_(True)
    total, loss_sum, pairs = torch.zeros_like(delta), 0.0, 0
    for part in _batches(clean.shape[0], params.batch_size):
        inputs = clean[part] + delta[part]
        drawn = torch.randperm(source.shape[0], generator=generator)[: inputs.shape[0]].to(source.device)
        if params.augment:
            inputs = translate_flip(inputs, params.max_shift, generator)
        loss = paired_loss(model.features(inputs), source[drawn])
        (grad,) = torch.autograd.grad(loss, delta)
        total += grad
        loss_sum += float(loss.detach())
        pairs += min(inputs.shape[0], int(drawn.numel()))
    return total, loss_sum / max(pairs, 1)


def objective(model, poisons: torch.Tensor, source: torch.Tensor) -> float:
    """The mean squared feature distance of ``poisons`` (float pixels, no augmentation) to
    their greedy nearest partners among ``source`` features: what crafting lowers."""
    with torch.no_grad():
        mine = model.features(poisons)
        return float(paired_loss(mine, source)) / min(mine.shape[0], source.shape[0])


def target_source(train: ImageSet, target_class: int) -> torch.Tensor:
    """Indices of the training images of the target class (the feature targets)."""
    return torch.nonzero(train.labels == target_class).flatten()


# ------------------------------------------------------------------------------- craft


SMOKE = {"steps": 2, "batch_size": 64,
         "surrogate": {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 1}}


@register_attack("hidden_trigger", HiddenTriggerParams, smoke=SMOKE, integrity=True, victim="recipe", targets=None)
def craft(inp: AttackInput, params: HiddenTriggerParams) -> PoisonStore:
    train, target, device = inp.train, inp.target, torch.device(inp.device)
    count = poison_count(params.budget, len(train))
    if len(target.poison_index) != count:
        raise ConfigError(f"the trial's target has {len(target.poison_index)} poison images; hidden_trigger "
                          f"with budget {params.budget:g} needs {count}")
    trigger, mask = make_trigger(tuple(train.images.shape[1:]), params, inp.seed)
    source_index = target_source(train, target.target_class)
    if source_index.numel() == 0:
        raise ConfigError(f"{train.name} has no training images of the target class {target.target_class}")
    ctx = crafting.context()
    model = crafting_model(inp, params, device)
    source = features(model, patched(train.images[source_index], trigger, mask), device)

    index = torch.tensor(target.poison_index, dtype=torch.int64)
    clean = train.images[index].to(device).float().div_(255)
    normalize = getattr(model, "normalize", None)
    scale = normalize.std.flatten() if params.scale == "std" and normalize is not None else None
    opt = SignedAdam(clean, params.eps, lr=params.lr, init=params.init, milestones=params.milestones, scale=scale,
                     generator=crafting.unit_generator(inp.seed, 10**6, device))
    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    first = 0
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, _ = resumed
        first = unit + 1
        opt.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, first)
    with crafting.progress("hidden trigger steps", params.steps) as advance:
        advance(first)
        for step in range(first, params.steps):
            grad, loss = step_loss(model, clean, opt.delta, source, params, crafting.unit_generator(inp.seed, step))
            opt.step(grad)
            advance(1, loss)
            if checkpoint.due():
                checkpoint.save(step, {f"opt.{k}": v for k, v in opt.state_tensors().items()})
            crafting.finish_unit(step)

    levels = round_linf(opt.delta.detach().cpu(), params.eps)
    targets = torch.tensor(target.target_index, dtype=torch.int64)
    store = PoisonStore(
        index=index, images=add_levels(train.images[index], levels), labels=train.labels[index].clone(),
        attack="hidden_trigger", params=params_dict(params), dataset=train.name,
        base_fingerprint=train.fingerprint, norm="linf", eps=params.eps, seed=inp.seed,
        test_fingerprint=target.test_fingerprint,
        extras={"trigger": trigger, "trigger_mask": mask, "target_index": targets,
                "target_label": torch.full_like(targets, target.adversarial_class)},
    )
    checkpoint.remove()
    return store


# ------------------------------------------------------------------- per-batch form


@BATCH_ATTACKS.register("hidden_trigger")
def batch_hidden_trigger(model: torch.nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
                         y_t: torch.Tensor, *, steps: int, eps: float, lr: float = 0.1, generator: torch.Generator,
                         y_true: torch.Tensor | None = None, max_area: int | None = 45,
                         **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner attack of adversarial poisoning against hidden-trigger backdoors (App. C.3:
    patches drawn as for backdoor triggers, perturbations optimised for ``steps`` steps):
    the targets get the random patch of a deranged class at a random place (the ``patch``
    attack's draw), and the poisons' δ descends Σ ‖φ(x_p + δ) − φ(t̃)‖² over greedy nearest
    pairs with the patched targets, re-paired every step (the authors' ``HTBD``)."""
    _, patched_t = batch_patch(model, x_p, y_p, x_t, y_t, generator=generator, y_true=y_true, max_area=max_area)
    if x_p.shape[0] == 0 or patched_t.shape[0] == 0:
        return x_p, patched_t
    with torch.enable_grad():
        with torch.no_grad():
            goal = model.features(patched_t).float()
        delta = SignedAdam(x_p, eps, lr=lr, init="randn", scale=step_scale(model), generator=generator)
        for _ in range(steps):
            loss = paired_loss(model.features(delta.poisoned()), goal)
            (grad,) = torch.autograd.grad(loss, delta.u)  # the signs of d/dδ (the scale is positive)
            delta.step(grad)
    return delta.poisoned().detach().clamp_(0, 1).to(x_p.dtype), patched_t
