"""``metapoison``: MetaPoison (Huang et al., NeurIPS 2020), a from-scratch targeted attack
that differentiates through unrolled training (the robuster paper's Table 1 row; its
authors' ``witchcoven/witch_metapoison.py``; ROBUSTER.md, "Attacks").

1. Ensemble: ``ensemble`` models of the victim's architecture at staggered training
   stages: model j is first trained ``j · stagger`` epochs on the clean training set
   (the paper's M = 24 models over epochs 0–23). After every crafting step each model
   trains one more epoch; a model that reaches ``ensemble · stagger`` epochs starts
   again from a fresh initialisation (the authors' ``epoch = (stage + craftstep) mod T``).
   The ensemble trains with plain SGD at ``inner_lr`` (0.1, no momentum, no weight decay,
   batches of ``batch_size`` = 125: the authors' defaults) on the clean set (their
   default ``trajectory: clean``).
2. Each crafting step, for each model and each batch of poisons (``poison_batch``):
   K = ``unroll`` (2) SGD steps at ``inner_lr`` on CE(f(aug(x_p + δ)), y_p), taken
   functionally (``torch.func.functional_call``, differentiable in δ; model in eval
   mode, BatchNorm's running statistics), then the adversarial loss of the target under
   the unrolled weights, CE(f_θ_K(x_t), y_adv) (``loss: cw``: the Carlini–Wagner margin),
   back-propagated to δ through the unroll. The gradients of all models and batches are
   summed, then one signed-Adam step (lr 0.1 in the model's normalised units), ×0.1 at
   1/3 and 2/3 of ``steps`` (the authors' 60 steps with drops at 20 and 40), projected
   onto the ℓ∞ ball of ε = 8/255 and the image box.
3. Poisons: the trial's poison images (training images of the adversarial class,
   ``budget`` 1 %), labels unchanged; the store carries the target like
   ``gradient_matching``'s and is evaluated by training a fresh victim.

Per-batch form: ``BATCH_ATTACKS["metapoison"]``, the inner attack of adversarial
poisoning against this attack (App. C.2: the defense unrolls its own surrogate attack at
the batch level; ``defense_params: {attack: metapoison}``).

Resumable: unit j < ``ensemble`` pre-trains model j to its stage; unit ``ensemble + i``
is crafting step i. Every unit draws from ``unit_generator(seed, unit)`` (epoch order,
augmentation) and every (re-)initialisation from the seed, the model and its cycle, so
the checkpoint (δ, Adam's moments, each model's weights, stage and cycle) resumes to
the store an uninterrupted run makes. One device (``ranks="one"``).

Where this differs from the authors' code, and why:
- the unroll runs on batches of poisons alone (the robuster authors' framework: its
  poison loader); MetaPoison's own code unrolls on the training batches that hold
  poisons, mostly clean images;
- the perturbation is additive ℓ∞ only: MetaPoison also perturbs colour (ReColorAdv,
  4 % in LUV) and its premade poisons carry both;
- signed Adam at lr 0.1 in normalised units (the robuster authors' optimiser) replaces
  MetaPoison's Adam at crafting rate 200 on the 0–255 scale; the ensemble trains without
  MetaPoison's 5-epoch learning-rate warm-up;
- ``higher`` (unmaintained) is replaced by ``torch.func.functional_call``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from poisonbench.attacks import crafting
from poisonbench.attacks.surrogate import check_surrogate_keys
from poisonbench.attacks.base import AttackInput, params_dict, register_attack
from poisonbench.attacks.batch import BATCH_ATTACKS
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.steps import INITS, SignedAdam
from poisonbench.data.augment import translate_flip
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.params import ranged

SCALES = ("std", "pixel")
LOSSES = ("cross_entropy", "cw")
SURROGATE_KEYS = ("model", "model_params")


@dataclass(frozen=True)
class MetaPoisonParams:
    eps: float = ranged(8 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (robuster C.2: ε 8)
    budget: float = ranged(0.01, 0, 1, low_open=True)  # fraction of the training set poisoned
    steps: int = ranged(60, 1, None)  # crafting steps (MetaPoison's 60)
    lr: float = ranged(0.1, 0, None, low_open=True)  # signed Adam (the robuster authors' --tau 0.1)
    unroll: int = ranged(2, 1, None)  # K, unrolled SGD steps (the authors' --nadapt 2)
    inner_lr: float = ranged(0.1, 0, None, low_open=True)  # SGD lr of the unroll and of the ensemble's training
    ensemble: int = ranged(24, 1, None)  # M models at staggered stages (MetaPoison's 24)
    stagger: int = ranged(1, 1, None)  # epochs between successive models' stages (MetaPoison's T/M)
    batch_size: int = ranged(125, 1, None)  # the ensemble's training batches (MetaPoison's)
    poison_batch: int = ranged(512, 1, None)  # poisons per unrolled batch (--pbatch)
    loss: str = "cross_entropy"  # the target's adversarial loss: cross_entropy | cw (Carlini–Wagner margin)
    init: str = "randn"
    augment: bool = True  # differentiable augmentation of the poisons, re-drawn every step (--paugment)
    max_shift: int = ranged(4, 0, 16)
    scale: str = "std"  # std: lr in the model's normalised units (the authors'); pixel
    # The ensemble's architecture (model, model_params) instead of the victim's; needed
    # (model) when the input names no victim.
    surrogate: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value, allowed in (("loss", self.loss, LOSSES), ("init", self.init, INITS),
                                     ("scale", self.scale, SCALES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        check_surrogate_keys(self.surrogate, SURROGATE_KEYS)

    @property
    def milestones(self) -> list[int]:
        """Steps where the lr drops ×0.1: 1/3 and 2/3 of the steps (MetaPoison: 20, 40 of 60)."""
        return [self.steps // 3, 2 * self.steps // 3]

    @property
    def cycle(self) -> int:
        """Epochs a model trains before it starts again from a fresh initialisation."""
        return self.ensemble * self.stagger


# ------------------------------------------------------------------------------ unroll


def unroll(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
           params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The parameters after ``steps`` SGD steps of lr ``lr`` on CE(model(inputs), labels),
    differentiable in ``inputs`` (and the starting ``params``, default the model's own);
    parameters that do not require gradients stay as they are. The model's buffers are
    read, never written (call it in eval mode)."""
    params = dict(model.named_parameters()) if params is None else dict(params)
    buffers = dict(model.named_buffers())
    trained = [name for name, p in params.items() if p.requires_grad]  # transfer: the head alone
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, (params, buffers), (inputs,)), labels)
        grads = torch.autograd.grad(loss, [params[name] for name in trained], create_graph=True)
        params = {**params, **{name: params[name] - lr * g for name, g in zip(trained, grads)}}
    return params


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy towards the adversarial class, or the Carlini–Wagner margin
    (largest logit − the adversarial class's logit, the authors' ``cw_loss``)."""
    if kind == "cw":
        return (logits.max(dim=1).values - logits.gather(1, labels[:, None]).squeeze(1)).clamp_min(-100).mean()
    return F.cross_entropy(logits, labels)


def meta_loss(model, poisons: torch.Tensor, labels: torch.Tensor, x_t: torch.Tensor, y_adv: torch.Tensor,
              params: MetaPoisonParams) -> torch.Tensor:
    """The target's adversarial loss after unrolling ``params.unroll`` steps on ``poisons``."""
    weights = unroll(model, poisons, labels, params.unroll, params.inner_lr)
    logits = functional_call(model, (weights, dict(model.named_buffers())), (x_t,))
    return adversarial_loss(logits, y_adv, params.loss)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def step_loss(models: list[torch.nn.Module], clean: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor,
              x_t: torch.Tensor, y_adv: torch.Tensor, params: MetaPoisonParams,
              generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(d loss / d δ summed over models and poison batches, mean adversarial loss)."""
    delta = delta.detach().requires_grad_(True)
    total, losses = torch.zeros_like(delta), []
    for model in models:
        model.eval()
        for part in _batches(clean.shape[0], params.poison_batch):
            inputs = clean[part] + delta[part]
            if params.augment:
                inputs = translate_flip(inputs, params.max_shift, generator)
            loss = meta_loss(model, inputs, labels[part], x_t, y_adv, params)
            (grad,) = torch.autograd.grad(loss, delta)
            total += grad
            losses.append(float(loss.detach()))
    return total, sum(losses) / len(losses)


# ---------------------------------------------------------------------------- ensemble


def _init_seed(seed: int, model: int, cycle: int) -> int:
    digest = hashlib.sha256(f"metapoison:{int(seed)}:{model}:{cycle}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def fresh_model(name: str, model_params: dict, num_classes: int, seed: int, index: int, cycle: int,
                device: torch.device) -> torch.nn.Module:
    """Model ``index``'s initialisation in its ``cycle``: a function of those and the seed only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_init_seed(seed, index, cycle))
        model = build_model(name, num_classes, **model_params)
    return model.to(device)


def train_epoch(model: torch.nn.Module, train: ImageSet, batch_size: int, lr: float,
                generator: torch.Generator, device: torch.device) -> None:
    """One epoch of plain SGD (no momentum, no weight decay) on the clean set, shuffled by
    ``generator``; the model is left in eval mode."""
    model.train()
    weights = [p for p in model.parameters() if p.requires_grad]
    order = torch.randperm(len(train), generator=generator)
    for batch in torch.split(order, batch_size):
        x = train.images[batch].to(device).float().div_(255)
        loss = F.cross_entropy(model(x), train.labels[batch].to(device))
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for p, g in zip(weights, grads):
                p.sub_(lr * g)
    model.eval()


def ensemble_model(inp: AttackInput, params: MetaPoisonParams) -> tuple[str, dict]:
    """(model, model_params) of the ensemble: the victim's, or the ``surrogate`` param's."""
    over, victim = dict(params.surrogate), inp.victim
    if victim is None and "model" not in over:
        raise ConfigError("metapoison trains an ensemble of the victim's model: give the victim, "
                          "or the surrogate param with at least model")
    return over.get("model", victim.model if victim else None), dict(
        over.get("model_params", victim.model_params if victim else {}))


# ------------------------------------------------------------------------------- craft


SMOKE = {"steps": 2, "ensemble": 2, "stagger": 1, "batch_size": 128,
         "surrogate": {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}}}


@register_attack("metapoison", MetaPoisonParams, smoke=SMOKE, integrity=True, victim="recipe")
def craft(inp: AttackInput, params: MetaPoisonParams) -> PoisonStore:
    train, target, device = inp.train, inp.target, torch.device(inp.device)
    if inp.test is None:
        raise ConfigError("metapoison needs the test split its target images come from")
    if inp.victim is not None and inp.victim.scenario != "scratch":
        raise ConfigError(f"metapoison attacks from-scratch training; the victim trains by {inp.victim.scenario}")
    count = poison_count(params.budget, len(train))
    if len(target.poison_index) != count:
        raise ConfigError(f"the trial's target has {len(target.poison_index)} poison images; metapoison "
                          f"with budget {params.budget:g} needs {count}")
    name, model_params = ensemble_model(inp, params)
    ctx = crafting.context()
    seed, m = inp.seed, params.ensemble
    models = [fresh_model(name, model_params, train.num_classes, seed, j, 0, device) for j in range(m)]
    stage, cycle = [0] * m, [0] * m  # epochs trained since the last initialisation; initialisations so far

    targets = torch.tensor(target.target_index, dtype=torch.int64)
    x_t = inp.test.images[targets].to(device).float().div_(255)
    y_adv = torch.full((len(targets),), target.adversarial_class, dtype=torch.int64, device=device)
    index = torch.tensor(target.poison_index, dtype=torch.int64)
    clean = train.images[index].to(device).float().div_(255)
    labels = train.labels[index].to(device)
    normalize = getattr(models[0], "normalize", None)
    scale = normalize.std.flatten() if params.scale == "std" and normalize is not None else None
    opt = SignedAdam(clean, params.eps, lr=params.lr, init=params.init, milestones=params.milestones, scale=scale,
                     generator=crafting.unit_generator(seed, 10**6, device))

    checkpoint = crafting.Checkpoint(ctx.checkpoint, ctx.every_s)
    first = 0
    resumed = checkpoint.load()
    if resumed is not None:
        unit, tensors, extras = resumed
        first = unit + 1
        stage, cycle = list(extras["stage"]), list(extras["cycle"])
        for j in range(m):  # every weight and buffer: a re-initialised model's too
            crafting.load_module_tensors(models[j], tensors, prefix=f"model{j}")
        if first > m:
            opt.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, first - m)

    def save(unit: int) -> None:
        if not checkpoint.due():
            return
        state = {k: v for j in range(m) for k, v in crafting.module_tensors(models[j], f"model{j}").items()}
        if unit >= m:
            state.update({f"opt.{k}": v for k, v in opt.state_tensors().items()})
        checkpoint.save(unit, state, {"stage": stage, "cycle": cycle})

    pretrain_epochs = sum(j * params.stagger for j in range(m))
    with crafting.progress("metapoison: ensemble pre-training (epochs), then steps",
                           pretrain_epochs + params.steps) as advance:
        advance(sum(j * params.stagger for j in range(min(first, m))) + max(first - m, 0))
        for j in range(first, m):  # stagger: model j trained to epoch j · stagger
            gen = crafting.unit_generator(seed, j)
            for _ in range(j * params.stagger):
                train_epoch(models[j], train, params.batch_size, params.inner_lr, gen, device)
                stage[j] += 1
                advance(1)
            save(j)
            crafting.finish_unit(j)
        for step in range(max(first - m, 0), params.steps):
            unit = m + step
            gen = crafting.unit_generator(seed, unit)
            grad, loss = step_loss(models, clean, opt.delta, labels, x_t, y_adv, params, gen)
            opt.step(grad)
            for j in range(m if step < params.steps - 1 else 0):  # one epoch further; a fresh model after its cycle
                train_epoch(models[j], train, params.batch_size, params.inner_lr, gen, device)
                stage[j] += 1
                if stage[j] >= params.cycle:
                    cycle[j] += 1
                    stage[j] = 0
                    models[j] = fresh_model(name, model_params, train.num_classes, seed, j, cycle[j], device)
            advance(1, loss)
            save(unit)
            crafting.finish_unit(unit)

    levels = round_linf(opt.delta.detach().cpu(), params.eps)
    store = PoisonStore(
        index=index, images=add_levels(train.images[index], levels), labels=train.labels[index].clone(),
        attack="metapoison", params=params_dict(params), dataset=train.name,
        base_fingerprint=train.fingerprint, norm="linf", eps=params.eps, seed=seed,
        test_fingerprint=target.test_fingerprint,
        extras={"target_index": targets.clone(), "target_label": torch.full_like(targets, target.adversarial_class)},
    )
    checkpoint.remove()
    return store


# ------------------------------------------------------------------- per-batch form


@BATCH_ATTACKS.register("metapoison")
def batch_metapoison(model: torch.nn.Module, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
                     y_t: torch.Tensor, *, steps: int, eps: float, lr: float = 0.1, generator: torch.Generator,
                     **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner attack of adversarial poisoning against MetaPoison (robuster App. C.2: "our
    own surrogate attack at the batch level, which we unroll"; the authors' ``MetaPoisoning``):
    ``steps`` signed-Adam steps on δ from randn·ε, each descending CE(f_θ₂(x_t), y_t) after
    K = 2 SGD steps (lr 0.1) on CE(f(x_p + δ), y_p) from the current weights. The targets
    are returned unchanged."""
    if x_p.shape[0] == 0 or x_t.shape[0] == 0:
        return x_p, x_t
    std = getattr(getattr(model, "normalize", None), "std", None)
    settings = MetaPoisonParams(loss="cross_entropy")
    with torch.enable_grad():
        delta = SignedAdam(x_p, eps, lr=lr, init="randn", generator=generator,
                           scale=std.flatten() if isinstance(std, torch.Tensor) else None)
        for _ in range(steps):
            loss = meta_loss(model, delta.poisoned(), y_p, x_t.detach(), y_t, settings)
            (grad,) = torch.autograd.grad(loss, delta.u)  # the signs of d/dδ (the scale is positive)
            delta.step(grad)
    return delta.poisoned().detach().clamp_(0, 1).to(x_p.dtype), x_t
