"""The defense extension point: ``DEFENSES`` maps a name to a ``Defense`` subclass.

A defense is a frozen hyperparameter dataclass (defaults = its paper's values) and up
to four hooks, one per place where a defense can act on training (DESIGN.md,
"Training scenarios"). Every hook has a no-op default, so a defense overrides only
the one it needs and the trainer calls all four without knowing which are used:

- ``filter_training_set`` before training: which samples of the (poisoned) training
  set to keep (data sanitisation: robuster's k-NN, spectral and activation filters,
  on the features that ``poisonbench.defenses.filtering`` computes once for all three);
- ``on_train_batch`` per batch, after augmentation, inside the training step (so
  under the trainer's autocast and with the model in its training mode): the batch
  the step trains on (adversarial training, adversarial poisoning, mixing
  augmentations; soft labels of shape [N, classes] are allowed);
- ``on_before_optimizer_step`` per optimiser step, after the backward pass (and the
  DDP all-reduce and AMP unscaling), before ``optimizer.step()``: the gradients
  (DP-SGD clipping and noise). Under DDP it runs on every rank: anything random must
  draw the same numbers on every rank, or the replicas drift apart;
- ``prepare_model`` once, before training: the network itself (a pre-trained
  feature extractor in place of a fresh backbone).

A defense knows nothing of Lightning, data modules or attacks (STYLE.md, convention
4): hooks receive the ``ImageClassifier`` and tensors. ``none`` is the undefended
baseline. Register a defense with ``@register_defense(name, ParamsType)`` on its class.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from poisonbench.errors import ConfigError
from poisonbench.params import parse_params
from poisonbench.models.classifier import ImageClassifier
from poisonbench.registry import Registry


@dataclass(frozen=True)
class NoParams:
    """The parameters of a defense that has none."""


class Defense:
    """A defense with its validated parameters; subclasses override the hooks they use."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type] = NoParams
    version: ClassVar[int] = 1  # bump when the algorithm changes

    def __init__(self, params: Any = None) -> None:
        self.params = params if isinstance(params, self.params_type) else self.parse_params(params)

    @classmethod
    def parse_params(cls, overrides: Mapping | None = None) -> Any:
        """The hyperparameters with ``overrides`` applied, checked by the shared checker
        (unknown and missing keys, types, each field's declared range)."""
        return parse_params(cls.params_type, overrides, f"defense {cls.name!r}", "defense_params")

    def describe(self) -> dict:
        """What ``result.json`` records: name, version and the full parameters."""
        return {"name": self.name, "version": self.version, "params": dataclasses.asdict(self.params)}

    def acts_in_training(self) -> bool:
        """Whether it changes training itself (its per-batch or per-step hook), not only
        the data (a filter) or the network (``prepare_model``): what an adaptive attacker
        and a defended base model train with."""
        kind = type(self)
        return (kind.on_train_batch is not Defense.on_train_batch
                or kind.on_before_optimizer_step is not Defense.on_before_optimizer_step)

    # ------------------------------------------------------------------ hooks
    def filter_training_set(self, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                            seed: int, device: torch.device, config: Mapping, poison_count: int = 0,
                            base_model: Callable[[], ImageClassifier] | None = None) -> torch.Tensor | None:
        """Indices (int64) of the training samples to keep, or ``None`` to keep all.

        ``images`` are uint8 N×3×H×W, ``labels`` int64 [N] (the poisoned set, as the
        defender receives it); ``config`` is the resolved job config, for filters that
        first train a model with the job's own recipe. ``poison_count``: how many of the
        samples are poisons (robuster §5.2 gives the filters the exact count, never which
        ones). ``base_model``: when the job starts from a base model (fine-tuning,
        transfer), a function that returns it (trained or loaded on the first call,
        cached), the model the defender already holds; ``None`` from scratch.
        """
        return None

    def on_train_batch(self, model: ImageClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch to train on, from the augmented batch (float images in [0, 1])."""
        return images, labels

    def on_before_optimizer_step(self, model: ImageClassifier, optimizer: torch.optim.Optimizer) -> None:
        """Change ``p.grad`` of the model's parameters in place before the step."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """Training enters ``epoch`` (0-based; also after a resume from a checkpoint)."""

    def state_dict(self) -> dict[str, int]:
        """The counters this defense's random draws depend on, for a training checkpoint:
        a run resumed from it draws what the uninterrupted run draws."""
        return {}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Take back the counters of ``state_dict`` (a checkpoint's)."""

    def prepare_model(self, model: ImageClassifier, num_classes: int, *, config: Mapping | None = None,
                      data_root: str | None = None) -> ImageClassifier:
        """The network to train (the victim as built, or a replacement). ``config`` is the
        resolved job config and ``data_root`` where its data lives, for a defense that
        first makes what it needs (the ``pretrained`` defense pre-trains its backbone)."""
        return model


def check_class_labels(name: str, labels: torch.Tensor) -> None:
    """A per-batch defense that needs class-index labels refuses soft ones (another
    defense's mixed labels) with one sentence."""
    if labels.is_floating_point():
        raise ConfigError(f"defense {name!r} needs class-index labels, not soft labels of shape "
                          f"{tuple(labels.shape)}")


DEFENSES: Registry[type[Defense]] = Registry("defense")


def register_defense(name: str, params_type: type = NoParams,
                     version: int = 1) -> Callable[[type[Defense]], type[Defense]]:
    """Class decorator: register a ``Defense`` subclass under ``name`` with its parameters."""
    if not dataclasses.is_dataclass(params_type):
        raise TypeError(f"defense {name!r}: params_type must be a dataclass, got {params_type!r}")

    def add(cls: type[Defense]) -> type[Defense]:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"defense {name!r} must be a Defense subclass, got {cls!r}")
        cls.name, cls.params_type, cls.version = name, params_type, version
        DEFENSES.register(name)(cls)
        return cls

    return add


def build_defense(name: str | None, params: Mapping | None = None) -> Defense:
    """The defense ``name`` (``None`` means ``none``) with ``params`` applied.

    Raises ``UnknownNameError`` for an unknown name and ``ConfigError`` for bad parameters.
    """
    return DEFENSES.get(name or "none")(params)


@register_defense("none", NoParams)
class NoDefense(Defense):
    """The undefended baseline: every hook is the base class's no-op."""
