"""Supervised pre-training: a backbone trained with labels on auxiliary data.

The labelled counterpart of SimCLR for the pre-trained-feature-extractor defense
(Yu et al., 2022, Section 4): the backbone learns to classify the auxiliary set
(CIFAR-100 for CIFAR-10 and the reverse, digits' ``aux`` split for digits; see
``poisonbench.pretrain.auxiliary``), and only its backbone is kept. Training is the
victims' own machinery (VictimModule, the scenario ``scratch``, with its random crop
and flip), so the recipe is a victim recipe: by default the shortcuts paper's
(Appendix E).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from poisonbench.data.imageset import ImageSet
from poisonbench.errors import ConfigError
from poisonbench.fitting.fit import fit_clean
from poisonbench.models.classifier import ImageClassifier


@dataclass(frozen=True)
class SupervisedParams:
    """A victim training recipe; defaults are the shortcuts paper's (Yu et al., 2022, Appendix E)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1  # for ResNets and DenseNets (0.01 for VGG)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # the paper is silent; the authors' code uses 5e-4
    milestones: tuple[int, ...] = (50, 75)  # lr ÷ 10 at these epochs
    gamma: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"supervised pre-training {name} must be a positive integer, got {value!r}")
        if any(not 0 < m <= self.epochs for m in self.milestones):
            raise ConfigError(f"milestones must lie in [1, epochs={self.epochs}], got {list(self.milestones)}")

    def with_epochs(self, epochs: int) -> SupervisedParams:
        """The same recipe over ``epochs`` epochs, milestones at the same fractions of the run."""
        milestones = tuple(sorted({max(1, round(m * epochs / self.epochs)) for m in self.milestones}))
        return type(self)(**{**asdict(self), "epochs": epochs, "milestones": milestones})

    def train_config(self) -> dict:
        """The ``train`` dict VictimModule and build_trainer take."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "optimizer": "sgd", "lr": self.lr,
                "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay,
                "milestones": list(self.milestones), "gamma": self.gamma}

    def to_dict(self) -> dict:
        return {**asdict(self), "milestones": list(self.milestones)}


# The cpu recipe for digits' aux split (447 images) with small_cnn: the cpu profile's
# victim recipe (configs/profiles/cpu.yaml: batch 64, lr 0.05, ÷10 for the last fifth)
# over the SimCLR recipe's 40 epochs (measurements in poisonbench/pretrain/__init__.py).
DIGITS = SupervisedParams(epochs=40, batch_size=64, lr=0.05, milestones=(32,))

RECIPES: dict[str, SupervisedParams] = {"digits": DIGITS}


def train_supervised(model: ImageClassifier, aux: ImageSet, params: SupervisedParams, *, seed: int = 0,
                     eval_set: ImageSet | None = None, accelerator: str = "auto",
                     work_dir: Path | None = None) -> tuple[dict, float]:
    """Train ``model`` (whose head has ``aux.num_classes`` outputs) on ``aux`` in place.

    Returns ``{"eval_acc": …}``, the clean accuracy (%) on ``eval_set`` (default: ``aux``
    itself, without augmentation) after the last epoch, and the seconds of the
    interrupted runs it continued from ``work_dir``'s checkpoint (``fit_clean``).
    """
    train = {**params.train_config(), "accelerator": accelerator, "devices": 1,
             "eval_every": params.epochs}  # one evaluation, after the last epoch
    fitted = fit_clean(model, aux, train, seed=seed, eval_set=eval_set if eval_set is not None else aux,
                       work_dir=work_dir)
    acc = fitted.trainer.callback_metrics.get("val/acc")
    return {"eval_acc": float(acc) if acc is not None else None}, fitted.resumed_s
