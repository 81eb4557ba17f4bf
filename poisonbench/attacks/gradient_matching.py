"""``gradient_matching``: Witches' Brew (Geiping et al., ICLR 2021), the robuster paper's
from-scratch targeted attack (its authors' ``witchcoven/witch_matching.py``,
``witch_base.py``; ROBUSTER.md, "Attacks").

1. Surrogate: the victim's model trained with the victim's recipe on the clean training
   set (``surrogate.trained_model``, cached), in eval mode for the whole craft. Adaptive
   (``adaptive``, default on: robuster §5.1 "all attacks shown are adaptive", the
   authors' ``adaptive_attack``): when the victim's defense acts inside training
   (``AttackInput.defense``), the surrogate trains with it too, and the store's key adds
   the defense (``attacks.base``, "Adaptive attacks"); undefended, nothing changes.
   Fine-tuning and transfer craft on the victim's base model instead (``base_surrogate``),
   which the job trains with the victim's defense already (``fitting.base_model``).
2. Target gradient once: g_t = ∇θ CE(f(x_t), y_adv) on the clean target(s).
3. Poisons x_p = the trial's poison images (training images of the adversarial class,
   ``budget`` of the set), labels unchanged; δ starts at randn·ε clipped (``init``).
4. Each step, for each batch of ``batch_size`` poisons: g_p = ∇θ CE(f(aug(x_p + δ)), y_p)
   with the differentiable augmentation (``translate_flip``) re-drawn every step, loss
   ``matching_loss(g_p, g_t, loss)`` (cosine: 1 − cos over all parameters together; se:
   ½‖g_t − g_p‖² / ‖g_t‖); the gradients of all batches are summed, then one signed-Adam
   step (lr 0.1, ×0.1 at 3/8, 5/8, 7/8 of ``steps``), projected onto the ℓ∞ ball and
   the image box every step.
5. ``restarts`` runs from fresh starts; the one with the lowest last-step loss (mean
   over batches, before its update) is kept.

Units. The authors optimise normalised tensors, so their lr 0.1 moves about 0.1·std
pixels per step; with ``scale="std"`` (default) δ = std · u and Adam runs on u, which
is that same step here (``steps.SignedAdam``); ``scale="pixel"`` applies lr to pixels.

Resumable: every step is a unit of ``crafting`` whose randomness (the augmentation) is
drawn from ``unit_generator(seed, unit)``; the checkpoint holds δ, Adam's moments and
the best restart so far, so a resumed craft computes what an uninterrupted one does.

Several devices (``ranks="summed"``: a device list such as ``cpu,cpu`` or
``cuda:0,cuda:1`` given to ``Attack.craft`` or ``craft_cached``; a job crafts on its one
device): the caller trains the surrogate once before the ranks start (``prepare``; each
rank then reads the cached model, and rank 0's weights and target gradient are
broadcast). Every rank holds the whole δ and its signed-Adam state; each step, rank r
differentiates the poisons r, r + world, … of every batch (``crafting.shard``), with the
augmentation drawn for the whole batch so each image moves as on one device:
  - its part of the batch's poison gradient, ∇θ Σ_{i in slice} CE_i / (batch size),
    with its graph kept; the parts are summed over the ranks (``reduce_sum``) into the
    batch's g_p, the one-device gradient up to the order of the sums;
  - the matching loss of g_p and its gradient w.r.t. g_p, the same on every rank;
  - that gradient back through its own slice's graph: d loss / dδ_i for its poisons i,
    since the loss depends on δ_i only through its own term of the sum;
  - the slices' rows all-gathered (``gather``), so each rank takes the same Adam step.
Each step's gradient is the one-device gradient up to floating-point summation order
(splitting a batch changes the order in which the per-image gradients add up, in the
convolutions' weight gradients and in the all-reduce; tests/test_distributed_gradient_matching.py).
Not the store bit for bit: signed Adam turns an entry whose gradient is within rounding
of zero into a full step either way, so over a long craft the two trajectories drift
apart pixel by pixel while reaching the same matching loss (as two one-GPU runs do
through non-deterministic kernels); the store's key names its rank count. One device runs
the code it ran before, bit for bit. The checkpoint is shared (rank 0 writes the
one-rank file), so a craft resumes on any number of ranks.

Deviations, written down here and in the tables' notes: the shift of the
differentiable augmentation pads with black (the authors' pads with the mean colour);
milestones at 3/8, 5/8, 7/8 of the steps as the paper says (90, 150, 210 for 240; the
authors' integer divisions give 89, 150, 210).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from poisonbench.attacks import crafting
from poisonbench.attacks.base import AttackInput, params_dict, register_attack
from poisonbench.attacks.gradients import MATCHING_LOSSES, gradient_norm, matching_loss, parameter_gradient
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.steps import INITS, signed_adam_restarts
from poisonbench.attacks.surrogate import check_surrogate_keys, surrogate_spec, trained_model
from poisonbench.data.augment import translate_flip, translate_flip_apply, translate_flip_draws
from poisonbench.data.store import PoisonStore
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.params import ranged

SCALES = ("std", "pixel")


@dataclass(frozen=True)
class GradientMatchingParams:
    eps: float = ranged(16 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (robuster App. C.1)
    budget: float = ranged(0.01, 0, 1, low_open=True)  # fraction of the training set poisoned
    loss: str = "cosine"  # cosine | se (robuster C.2, transfer)
    steps: int = ranged(240, 1, None)  # robuster C.2 (the authors' default is 250)
    lr: float = ranged(0.1, 0, None, low_open=True)  # signed Adam (the authors' --tau 0.1)
    restarts: int = ranged(1, 1, None)  # robuster C.2 (the authors' default is 8)
    init: str = "randn"  # randn·ε clipped (the authors' --init randn)
    augment: bool = True  # differentiable augmentation re-drawn every step (--paugment)
    max_shift: int = ranged(4, 0, 16)  # pixels of the augmentation's shift
    batch_size: int = ranged(512, 1, None)  # poisons per matching batch (--pbatch)
    scale: str = "std"  # std: lr in the surrogate's normalised units (the authors'); pixel
    # Changes to the victim's surrogate (model, model_params, epochs, batch_size, lr): a
    # transfer attack from another model, or the tiny surrogate of a smoke run. Needed in
    # full (model and epochs) when the input names no victim.
    surrogate: dict = field(default_factory=dict)
    surrogate_seed: int | None = ranged(None, 0, 2**32, high_open=True)  # None: the crafting seed (each trial its own surrogate, as the authors)
    # Train the surrogate with the victim's defense (robuster §5.1; the authors'
    # adaptive_attack, default True). Not in the store's params: the key's victim part says it.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.loss not in MATCHING_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(MATCHING_LOSSES)}, got {self.loss!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        check_surrogate_keys(self.surrogate)

    @property
    def milestones(self) -> list[int]:
        """Steps where the lr drops ×0.1: 3/8, 5/8, 7/8 of the steps (robuster C.2)."""
        return [int(self.steps * 3 / 8), int(self.steps * 5 / 8), int(self.steps * 7 / 8)]


def base_surrogate(inp: AttackInput, num_classes: int, device: torch.device) -> torch.nn.Module:
    """Fine-tuning and transfer: the attacker crafts on the victim's base model (it knows
    it, App. C), matching the gradients of what the victim trains: every parameter when
    fine-tuning, the linear layer alone in transfer."""
    victim = inp.victim
    if inp.base_weights is None:
        raise ConfigError(f"gradient_matching against a {victim.scenario} victim needs its base model's weights")
    model = build_model(victim.model, num_classes, **dict(victim.model_params))
    model.load_state_dict(load_file(str(inp.base_weights)))
    if victim.scenario == "transfer":
        model.backbone.requires_grad_(False)
    return model.to(device)


def _scale(model: torch.nn.Module, params: GradientMatchingParams) -> torch.Tensor | None:
    normalize = getattr(model, "normalize", None)
    if params.scale == "pixel" or normalize is None:
        return None
    return normalize.std.flatten()


def _poison_batches(n: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def step_loss(model, clean: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, target_grad,
              target_norm: torch.Tensor, params: GradientMatchingParams,
              generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """(d loss / d δ summed over the poison batches, mean batch loss) for one step."""
    delta = delta.detach().requires_grad_(True)
    total, losses = torch.zeros_like(delta), []
    for part in _poison_batches(clean.shape[0], params.batch_size):
        inputs = clean[part] + delta[part]
        if params.augment:
            inputs = translate_flip(inputs, params.max_shift, generator)
        grads = parameter_gradient(model, inputs, labels[part], create_graph=True)
        loss = matching_loss(grads, target_grad, params.loss, target_norm)
        (grad,) = torch.autograd.grad(loss, delta)
        total += grad
        losses.append(float(loss.detach()))
    return total, sum(losses) / len(losses)


def sharded_step_loss(model, clean: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, target_grad,
                      target_norm: torch.Tensor, params: GradientMatchingParams,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """``step_loss`` on several ranks (module docstring, "Several devices"): this rank
    differentiates its slice of every batch; returns the whole gradient and the mean
    batch loss, the same on every rank."""
    n, device = clean.shape[0], clean.device
    mine = crafting.shard(n).to(device)  # the poisons of this rank, ascending
    local = delta.detach()[mine].requires_grad_(True)
    weights = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in weights]
    total, losses = torch.zeros_like(local), []
    for part in _poison_batches(n, params.batch_size):
        count = part.stop - part.start
        if params.augment:  # the whole batch's draws, on every rank
            shifts, flips = translate_flip_draws(count, params.max_shift, generator, device)
        rows = ((mine >= part.start) & (mine < part.stop)).nonzero().flatten()  # this rank's rows of the batch
        grads = None
        if rows.numel():
            inputs = clean[mine[rows]] + local[rows]
            if params.augment:
                at = mine[rows] - part.start
                inputs = translate_flip_apply(inputs, shifts[at], flips[at])
            # Its part of the batch's mean cross-entropy: the parts sum to the mean.
            part_loss = F.cross_entropy(model(inputs), labels[mine[rows]], reduction="sum") / count
            grads = torch.autograd.grad(part_loss, weights, create_graph=True)
            flat = torch.cat([g.detach().flatten() for g in grads])
        else:  # a last batch smaller than the world: nothing of it here, but the sum is collective
            flat = torch.zeros(sum(sizes), device=device, dtype=clean.dtype)
        summed = crafting.reduce_sum(flat)
        poison_grad = tuple(piece.view_as(w).requires_grad_(True) for piece, w in zip(summed.split(sizes), weights))
        loss = matching_loss(poison_grad, target_grad, params.loss, target_norm)
        outer = torch.autograd.grad(loss, poison_grad)  # d loss / d g_p: the same on every rank
        if grads is not None:
            (grad,) = torch.autograd.grad(grads, local, grad_outputs=outer)
            total += grad
        losses.append(float(loss.detach()))
    return crafting.gather(total, n), sum(losses) / len(losses)


def poison_loss(model, poisons: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, adversarial: torch.Tensor,
                kind: str = "cosine") -> float:
    """The matching loss of ``poisons`` (float pixels, no augmentation) against the target's
    adversarial gradient: what crafting lowers (for tests and reports)."""
    target_grad = [g.detach() for g in parameter_gradient(model, target, adversarial)]
    grads = parameter_gradient(model, poisons, labels)
    return float(matching_loss(grads, target_grad, kind))


def surrogate(inp: AttackInput, params: GradientMatchingParams, device: torch.device) -> torch.nn.Module:
    """The model the poisons are crafted on (module docstring, 1): the victim's base model
    when it fine-tunes or transfers, else the surrogate trained on the clean set (cached)."""
    if inp.victim is not None and inp.victim.scenario != "scratch":
        return base_surrogate(inp, inp.train.num_classes, device)
    model_name, model_params, recipe = surrogate_spec(inp.victim, params.surrogate, "gradient_matching")
    surrogate_seed = inp.seed if params.surrogate_seed is None else int(params.surrogate_seed)
    model, _ = trained_model(inp.train, model_name, model_params, "relu", recipe, surrogate_seed, device,
                             progress=crafting.context().progress,
                             defense=inp.defense if params.adaptive else None)
    return model


def prepare(inp: AttackInput, params: GradientMatchingParams) -> None:
    """Before several ranks start: the surrogate trained (or found) once, in the caller,
    so that each rank reads the cached model instead of training its own."""
    surrogate(inp, params, torch.device(inp.device))


SMOKE = {"steps": 2, "batch_size": 64,
         "surrogate": {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 1}}


@register_attack("gradient_matching", GradientMatchingParams, smoke=SMOKE, integrity=True, victim="adaptive",
                 ranks="summed", prepare=prepare)
def craft(inp: AttackInput, params: GradientMatchingParams) -> PoisonStore:
    train, target, device = inp.train, inp.target, torch.device(inp.device)
    if inp.test is None:
        raise ConfigError("gradient_matching needs the test split its target images come from")
    count = poison_count(params.budget, len(train))
    if len(target.poison_index) != count:
        raise ConfigError(f"the trial's target has {len(target.poison_index)} poison images; gradient_matching "
                          f"with budget {params.budget:g} needs {count}")
    _, world = crafting.rank_world()
    model = surrogate(inp, params, device)
    crafting.broadcast_module(model)  # rank 0's weights on every rank (nothing on one)
    model.eval()  # BatchNorm's running statistics, as the authors' victim.eval()

    targets = torch.tensor(target.target_index, dtype=torch.int64)
    x_t = inp.test.images[targets].to(device).float().div_(255)
    y_t = torch.full((len(targets),), target.adversarial_class, dtype=torch.int64, device=device)
    target_grad = tuple(crafting.broadcast_(g.detach()) for g in parameter_gradient(model, x_t, y_t))
    target_norm = gradient_norm(target_grad)

    index = torch.tensor(target.poison_index, dtype=torch.int64)
    clean = train.images[index].to(device).float().div_(255)
    labels = train.labels[index].to(device)
    scale = _scale(model, params)

    best = signed_adam_restarts(
        "gradient matching steps", clean, params.eps, steps=params.steps, restarts=params.restarts, lr=params.lr,
        init=params.init, milestones=params.milestones, scale=scale, seed=inp.seed,
        step_gradient=lambda delta, generator: (step_loss if world == 1 else sharded_step_loss)(
            model, clean, delta, labels, target_grad, target_norm, params, generator))

    levels = round_linf(best.cpu(), params.eps)
    targets_store = targets.clone()
    store = PoisonStore(
        index=index, images=add_levels(train.images[index], levels), labels=train.labels[index].clone(),
        attack="gradient_matching", params=params_dict(params), dataset=train.name,
        base_fingerprint=train.fingerprint, norm="linf", eps=params.eps, seed=inp.seed,
        test_fingerprint=target.test_fingerprint,
        extras={"target_index": targets_store, "target_label": torch.full_like(targets_store, target.adversarial_class)},
    )
    return store
