"""The crafting loop shared by the feature-collision attacks (``poison_frogs``,
``bullseye``, ``convex_polytope``; the robuster paper's transfer and fine-tuning rows).

Each attack is an objective on penultimate features: ``objective(poison_features,
target_features) -> loss`` (poisons [N, D], targets [T, D]); the rest is here and is the
authors' loop for every iterative witch (DP ``witchcoven/witch_base.py::_run_trial``):

1. Feature extractor: the victim's base model (the attacker knows it; ``inp.base_weights``,
   what a finetune or transfer job passes), its backbone in eval mode (BatchNorm's
   running statistics, as ``victim.eval()``). Without a base model, the ``surrogate``
   param trains one on the clean training set (smoke runs, tests, a scratch victim).
2. Target features once, from the clean target image(s), no augmentation.
3. δ starts at randn·ε clipped (``init``); each step the differentiable augmentation
   (``translate_flip``) is re-drawn on the poisons, the objective's gradient with
   respect to δ goes through ``steps.SignedAdam`` (its sign into Adam, lr 0.1 in the
   model's normalised units with ``scale="std"``, ×0.1 at 3/8, 5/8 and 7/8 of ``steps``),
   and δ is projected onto the ℓ∞ ball and the image box.
4. ``restarts`` fresh starts; the one with the lowest last-step loss is kept (DP's score).

The objective couples all poisons (Bullseye's mean, Convex Polytope's coefficients), so
it is evaluated on all of them at once; ``batch_size`` only bounds memory: features are
computed in chunks without a graph, the objective's gradient with respect to them is
taken once, and each chunk is then pushed back through the network with that gradient
(exactly the full-batch gradient).

Resumable: every step is a unit of ``crafting`` whose randomness (the augmentation) is
``unit_generator(seed, unit)``; the checkpoint holds δ, Adam's moments and the best
restart so far, so a resumed craft computes what an uninterrupted one does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from poisonbench.attacks import crafting
from poisonbench.attacks.base import AttackInput, params_dict
from poisonbench.attacks.batch import BATCH_ATTACKS, step_scale
from poisonbench.attacks.quantize import add_levels, round_linf
from poisonbench.attacks.steps import INITS, SignedAdam, signed_adam_restarts
from poisonbench.attacks.surrogate import SurrogateRecipe, check_surrogate_keys, trained_model
from poisonbench.data.augment import translate_flip
from poisonbench.data.store import PoisonStore
from poisonbench.data.targets import poison_count
from poisonbench.errors import ConfigError
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier
from poisonbench.models.weights import load_weights
from poisonbench.params import ranged

SCALES = ("std", "pixel")

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FeatureCollisionParams:
    """What every feature-collision attack takes (defaults: robuster App. C and the
    authors' witch_base loop; each attack subclasses it)."""

    eps: float = ranged(16 / 255, 0, 1, low_open=True)  # ℓ∞ radius, pixel units (robuster C.1)
    budget: float = ranged(0.01, 0, 1, low_open=True)  # fraction of the training set poisoned
    steps: int = ranged(240, 1, None)  # robuster C.2 (the authors' default is 250)
    lr: float = ranged(0.1, 0, None, low_open=True)  # signed Adam (the authors' --tau 0.1)
    restarts: int = ranged(1, 1, None)  # robuster C.2 (the authors' default is 8)
    init: str = "randn"  # randn·ε clipped (the authors' --init randn)
    augment: bool = True  # differentiable augmentation re-drawn every step (--paugment)
    max_shift: int = ranged(4, 0, 16)  # pixels of the augmentation's shift
    batch_size: int = ranged(512, 1, None)  # poisons per forward pass (memory only)
    scale: str = "std"  # std: lr in the model's normalised units (the authors'); pixel
    # Without a base model (a scratch victim, a smoke run): a feature extractor trained on
    # the clean training set: model, model_params, epochs (required), batch_size, lr.
    surrogate: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        check_surrogate_keys(self.surrogate)
        if self.surrogate and not {"model", "epochs"} <= set(self.surrogate):
            raise ValueError("surrogate needs at least model and epochs")

    @property
    def milestones(self) -> list[int]:
        """Steps where the lr drops ×0.1: 3/8, 5/8, 7/8 of the steps (robuster C.2)."""
        return [int(self.steps * 3 / 8), int(self.steps * 5 / 8), int(self.steps * 7 / 8)]


# Parameters of a smoke run: two steps on a tiny feature extractor trained one epoch.
SMOKE = {"steps": 2, "surrogate": {"model": "small_cnn", "model_params": {"width": 4, "pool": 1}, "epochs": 1}}


def feature_model(inp: AttackInput, params: FeatureCollisionParams, name: str,
                  device: torch.device, progress: bool = False) -> ImageClassifier:
    """The network whose features the poisons collide in, in eval mode on ``device``: the
    victim's base model when the input has its weights, else the ``surrogate`` param's."""
    if inp.base_weights is not None:
        victim = inp.victim
        if victim is None:
            raise ConfigError(f"{name}: the base model's weights need the victim's model to be read")
        # The backbone is what matters; a base model trained on another dataset (robuster's
        # TRANSFER*) has another head, which load_weights leaves at its initialisation.
        model = build_model(victim.model, inp.train.num_classes, **dict(victim.model_params))
        return load_weights(model, inp.base_weights).to(device).eval()
    if not params.surrogate:
        raise ConfigError(f"{name} crafts in the feature space of the victim's base model: run it in the "
                          "finetune or transfer scenario with a base_model, or give the surrogate param "
                          "(model and epochs)")
    over = dict(params.surrogate)
    recipe = SurrogateRecipe(epochs=int(over["epochs"]), **{k: over[k] for k in ("batch_size", "lr") if k in over})
    model, _ = trained_model(inp.train, over["model"], dict(over.get("model_params") or {}), "relu", recipe,
                             inp.seed, device, progress=progress)
    return model.eval()


def _scale(model: ImageClassifier, params: FeatureCollisionParams) -> torch.Tensor | None:
    normalize = getattr(model, "normalize", None)
    if params.scale == "pixel" or normalize is None:
        return None
    return normalize.std.flatten()


def features(model: ImageClassifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of float images in [0, 1], in chunks, without a graph."""
    with torch.no_grad():
        return torch.cat([model.features(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def objective_gradient(model: ImageClassifier, inputs: torch.Tensor, target_features: torch.Tensor,
                       objective: Objective, batch_size: int) -> tuple[torch.Tensor, float]:
    """(d objective / d inputs, objective) for the poison ``inputs`` (float, [N, C, H, W]):
    the features in chunks without a graph, the objective's gradient with respect to
    them, then each chunk back through the network with its part of that gradient."""
    feats = features(model, inputs, batch_size).requires_grad_(True)
    loss = objective(feats, target_features)
    (feat_grad,) = torch.autograd.grad(loss, feats)
    grad = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        part = slice(start, start + batch_size)
        chunk = inputs[part].detach().requires_grad_(True)
        (grad[part],) = torch.autograd.grad(model.features(chunk), chunk, grad_outputs=feat_grad[part])
    return grad, float(loss.detach())


def step_gradient(model: ImageClassifier, clean: torch.Tensor, delta: torch.Tensor, target_features: torch.Tensor,
                  objective: Objective, params: FeatureCollisionParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    """(d objective / d δ, objective) for one step, through the augmentation."""
    delta = delta.detach().requires_grad_(True)
    inputs = clean + delta
    if params.augment:
        inputs = translate_flip(inputs, params.max_shift, generator)
    grad_inputs, loss = objective_gradient(model, inputs.detach(), target_features, objective, params.batch_size)
    if not params.augment:
        return grad_inputs, loss
    (grad,) = torch.autograd.grad(inputs, delta, grad_outputs=grad_inputs)
    return grad, loss


def objective_value(model: ImageClassifier, poisons: torch.Tensor, targets: torch.Tensor,
                    objective: Objective) -> float:
    """The objective of float ``poisons`` against float ``targets`` (no augmentation): what
    crafting lowers (for tests and reports)."""
    with torch.no_grad():
        return float(objective(features(model, poisons), features(model, targets)))


def craft_features(inp: AttackInput, params: FeatureCollisionParams, name: str, objective: Objective,
                   description: str) -> PoisonStore:
    """The store of attack ``name``: the trial's poisons moved so that ``objective`` of
    their features against the target's is low (module docstring)."""
    train, target, device = inp.train, inp.target, torch.device(inp.device)
    if inp.test is None:
        raise ConfigError(f"{name} needs the test split its target images come from")
    count = poison_count(params.budget, len(train))
    if len(target.poison_index) != count:
        raise ConfigError(f"the trial's target has {len(target.poison_index)} poison images; {name} "
                          f"with budget {params.budget:g} needs {count}")
    ctx = crafting.context()
    model = feature_model(inp, params, name, device, ctx.progress)
    model.requires_grad_(False)  # gradients reach the poisons only

    targets = torch.tensor(target.target_index, dtype=torch.int64)
    target_features = features(model, inp.test.images[targets].to(device).float().div_(255))
    index = torch.tensor(target.poison_index, dtype=torch.int64)
    clean = train.images[index].to(device).float().div_(255)
    scale = _scale(model, params)

    best = signed_adam_restarts(
        description, clean, params.eps, steps=params.steps, restarts=params.restarts, lr=params.lr,
        init=params.init, milestones=params.milestones, scale=scale, seed=inp.seed,
        step_gradient=lambda delta, generator: step_gradient(model, clean, delta, target_features, objective,
                                                             params, generator))

    levels = round_linf(best.cpu(), params.eps)
    kept = targets.clone()
    store = PoisonStore(
        index=index, images=add_levels(train.images[index], levels), labels=train.labels[index].clone(),
        attack=name, params=params_dict(params), dataset=train.name, base_fingerprint=train.fingerprint,
        norm="linf", eps=params.eps, seed=inp.seed, test_fingerprint=target.test_fingerprint,
        extras={"target_index": kept, "target_label": torch.full_like(kept, target.adversarial_class)},
    )
    return store


# ------------------------------------------------------------------- per-batch form


@BATCH_ATTACKS.register("feature_collision")
def batch_feature_collision(model: ImageClassifier, x_p: torch.Tensor, y_p: torch.Tensor, x_t: torch.Tensor,
                            y_t: torch.Tensor, *, steps: int, eps: float, lr: float = 0.1,
                            generator: torch.Generator, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The inner attack of adversarial poisoning against the feature-collision rows (robuster
    App. C.3: "we replicate the original objective of the attack in the mini-batch setting";
    the authors' ``adversarial-fc``, used for Poison Frogs, Bullseye and Convex Polytope
    alike): ``steps`` signed-Adam steps from randn·ε on the mean squared distance between
    the poisons' mean feature and the targets' mean feature. Targets returned unchanged."""
    if x_p.shape[0] == 0 or x_t.shape[0] == 0:
        return x_p, x_t
    with torch.enable_grad():
        with torch.no_grad():
            goal = model.features(x_t).float().mean(dim=0)
        delta = SignedAdam(x_p, eps, lr=lr, init="randn", scale=step_scale(model), generator=generator)
        for _ in range(steps):
            loss = (model.features(delta.poisoned()).float().mean(dim=0) - goal).pow(2).mean()
            (grad,) = torch.autograd.grad(loss, delta.u)  # the signs of d/dδ (the scale is positive)
            delta.step(grad)
    return delta.poisoned().detach().clamp_(0, 1).to(x_p.dtype), x_t
