"""Crafting models: networks from the ``MODELS`` registry that attacks optimise against.

``build_crafting_model`` builds one, optionally with every ReLU replaced by Tanh (the
shortcuts paper, Appendix C / Table 5: "we replace the ReLU layers with Tanh layers
in the crafting models"). ``trained_model`` fits one on clean data
(``poisonbench.fitting``) and caches its weights as an artifact under
``$POISONBENCH_HOME/surrogates/``, keyed by everything that determines them, so that the
targeted and the untargeted adversarial poisons of one table share one crafting model.
An adaptive attacker's surrogate trains with the victim's defense (``defense``: a
``VictimDefense``, whose fresh hooks act in the surrogate's training as in the
victim's); its key then adds the defense (and is unchanged without one).
A cached model is verified when it is read (readable safetensors, the content hash it
was written with, every weight of the model with its shape); one that fails is trained
again. Fitted in one process, its training checkpoints every epoch into
``<entry>.partial/`` (``poisonbench.artifacts.partial_dir``), where a killed fit
continues on the next call; under several crafting ranks each rank fits it at once,
as before (``fitting.trainer.fits_alone``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from poisonbench.artifacts import Artifact, CorruptArtifact, get_or_make, partial_dir
from poisonbench.attacks.base import VictimDefense
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import tensors_sha256
from poisonbench.errors import ConfigError
from poisonbench.fitting.fit import fit_clean
from poisonbench.fitting.trainer import fits_alone, quiet_lightning
from poisonbench.models import build_model
from poisonbench.models.classifier import ImageClassifier

ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class SurrogateRecipe:
    """How a crafting model is trained on clean data. Defaults: the "conservative" recipe
    of Geiping et al.'s forest, which adversarial_poisons (Fowl et al. 2021b) uses for
    its ResNet-18: 40 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 divided by 10 at
    3/8, 5/8 and 7/8 of training, weight decay 5e-4, random crops and flips."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] | None = None  # None: 3/8, 5/8, 7/8 of the epochs

    def train_config(self) -> dict:
        milestones = list(self.milestones) if self.milestones is not None else [
            self.epochs * 3 // 8, self.epochs * 5 // 8, self.epochs * 7 // 8]
        return {"epochs": self.epochs, "batch_size": self.batch_size, "optimizer": "sgd", "lr": self.lr,
                "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay,
                "milestones": milestones, "gamma": 0.1, "accelerator": "auto", "devices": 1,
                "strategy": "auto", "precision": "32", "eval_every": max(self.epochs, 1)}


# What a ``surrogate`` param of an integrity attack may change of the victim's recipe.
SURROGATE_KEYS = ("model", "model_params", "epochs", "batch_size", "lr")


def check_surrogate_keys(over: dict, allowed: tuple[str, ...] = SURROGATE_KEYS) -> None:
    """A ``surrogate`` param names only what it may change (raises ValueError: the params
    checker turns it into one sentence naming the attack)."""
    unknown = sorted(set(over) - set(allowed))
    if unknown:
        raise ValueError(f"surrogate takes {', '.join(allowed)}, not {unknown[0]!r}")


def surrogate_spec(victim, over: dict, attack: str) -> tuple[str, dict, dict]:
    """(model, model_params, training mapping) of the model an integrity attack trains on
    the clean set: the victim's (``VictimSpec``), with the ``surrogate`` param's changes
    ``over`` (a transfer attack from another model, the tiny model of a smoke run), on
    one device. Without a victim, ``over`` must give at least model and epochs."""
    over = dict(over)
    if victim is None and not {"model", "epochs"} <= set(over):
        raise ConfigError(f"{attack} trains its crafting model with the victim's recipe: give the victim, "
                          "or the surrogate param with at least model and epochs")
    model = over.get("model", victim.model if victim else None)
    model_params = dict(over.get("model_params", victim.model_params if victim else {}))
    train = dict(victim.train) if victim is not None else SurrogateRecipe().train_config()
    if "epochs" in over:
        epochs = int(over["epochs"])
        train["epochs"] = epochs
        if victim is None:  # the default recipe's schedule follows its epochs
            train["milestones"] = [epochs * 3 // 8, epochs * 5 // 8, epochs * 7 // 8]
    for key in ("batch_size", "lr"):
        if key in over:
            train[key] = over[key]
    train.update(accelerator="auto", devices=1, strategy="auto", eval_every=max(int(train["epochs"]), 1))
    return model, model_params, train


def build_crafting_model(name: str, num_classes: int, model_params: dict | None = None,
                         activation: str = "relu") -> ImageClassifier:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    model = build_model(name, num_classes, **dict(model_params or {}))
    if activation == "tanh":
        _swap_relu(model)
    return model


def _swap_relu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Tanh())
        else:
            _swap_relu(child)


def recipe_config(recipe: SurrogateRecipe | dict) -> dict:
    """The training mapping ``fit_clean`` takes: a ``SurrogateRecipe``'s, or a job's
    ``train`` mapping as it is (the victim's recipe, for surrogates that imitate it)."""
    return recipe.train_config() if isinstance(recipe, SurrogateRecipe) else dict(recipe)


def surrogate_artifact(imageset: ImageSet, model: str, model_params: dict, activation: str,
                       recipe: SurrogateRecipe | dict, seed: int, defense: VictimDefense | None = None) -> Artifact:
    """The cache address of a crafting model: everything that determines its weights
    (the defense it trains with only when there is one, so undefended keys stay as they were)."""
    key = {"dataset": imageset.name, "fingerprint": imageset.fingerprint, "model": model,
           "model_params": model_params, "activation": activation, "recipe": recipe_config(recipe),
           "seed": int(seed), "version": 1}
    if defense is not None:
        key.update(defense.key())
    return Artifact("surrogates", key)


def _load_weights(net: nn.Module, path: Path) -> nn.Module:
    """``net`` with the cached weights at ``path``; ``CorruptArtifact`` when they are not
    intact weights of this model."""
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    recorded = meta.get("content_sha256") if isinstance(meta, dict) else None
    # Files written before the hash was recorded are checked by the strict load alone.
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise CorruptArtifact("its content hash does not match")
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        raise CorruptArtifact(f"it does not hold this model's weights ({str(err).splitlines()[0]})") from None
    return net


def _save_weights(net: nn.Module, tmp: Path) -> None:
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(tmp), metadata={"content_sha256": tensors_sha256(weights)})


def trained_model(imageset: ImageSet, model: str, model_params: dict | None, activation: str,
                  recipe: SurrogateRecipe | dict, seed: int, device: torch.device,
                  progress: bool = False, defense: VictimDefense | None = None) -> tuple[ImageClassifier, float]:
    """A crafting model trained on clean ``imageset`` (cached), in eval mode on ``device``;
    ``recipe``: a ``SurrogateRecipe`` or a complete training mapping (a job's ``train``);
    ``defense``: the victim's, trained with through a fresh set of its hooks (adaptive).

    Returns the model and the seconds spent training (0 on a cache hit).
    """
    params = dict(model_params or {})
    resumed = [0.0]  # seconds of the interrupted fits this one continues
    train = recipe_config(recipe)
    if device.type == "cpu":
        train["accelerator"] = "cpu"
    # Crafting on several ranks, each rank fits it at once (their metrics sync), as before.
    alone = fits_alone(train)

    def make(path: Path) -> nn.Module:
        if not progress:
            quiet_lightning()
        with torch.random.fork_rng(devices=[]):
            L.seed_everything(int(seed), verbose=False)
            net = build_crafting_model(model, imageset.num_classes, params, activation)
            fitted = fit_clean(net, imageset, dict(train), seed=int(seed), progress=progress,
                               hooks=defense.hooks() if defense is not None else None,
                               work_dir=partial_dir(path) if alone else None)
        resumed[0] = fitted.resumed_s
        return net

    made = get_or_make(
        surrogate_artifact(imageset, model, params, activation, recipe, seed, defense),
        load=lambda path: _load_weights(build_crafting_model(model, imageset.num_classes, params, activation), path),
        make=make, save=_save_weights, earlier_s=lambda: resumed[0],
        describe=lambda: {"resumed_s": round(resumed[0], 3)}, exclusive=alone)
    return made.value.to(device).eval(), made.seconds
