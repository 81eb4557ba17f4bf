"""SimCLR (Chen et al., 2020): contrastive pre-training of a backbone without labels.

The shortcuts paper's strongest defense (Yu et al., 2022, Section 4, Table 4) reads
features from a ResNet-152 that SimCLR pre-trained on ImageNet; poisonbench
pre-trains its own backbones with the same method on auxiliary data that is never
the poisoned training set (``poisonbench.pretrain.auxiliary``).

Per batch of N images, two random views of each (``poisonbench.pretrain.views``,
drawn on the batch's device in ``on_after_batch_transfer``) go through the backbone
``f`` and a projection head ``g`` (an MLP with one hidden layer, Section 2.1:
``z = W2 ReLU(BN(W1 h))``, 128-d output, hidden width = feature width). The NT-Xent loss
(Section 2.1, Algorithm 1) pulls each view towards its partner among the 2N − 2
other views, with cosine similarity over a temperature τ. Optimisation: SGD with
momentum or LARS (Section 2.2), a linear warm-up then a cosine decay without
restarts, per step (Section 2.3, "Default setting"). Only the backbone is kept: the
head is thrown away (Section 2.1) and the saved ImageClassifier's classifier is
freshly initialised.

Under DDP each process contrasts its own batch only (no gathering of negatives and
no synchronised BatchNorm across devices, which SimCLR used); ``pretrain`` runs on
one device.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from poisonbench.data.augment import to_float
from poisonbench.data.imageset import ImageSet
from poisonbench.data.module import PoisonedDataModule
from poisonbench.errors import ConfigError
from poisonbench.pretrain.lars import LARS
from poisonbench.pretrain.views import ViewParams, random_view
from poisonbench.fitting.trainer import CHECKPOINT_FILE, build_trainer, resumed_seconds

OPTIMIZERS = ("sgd", "lars")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimCLRParams:
    """SimCLR's hyperparameters; defaults follow Chen et al. (2020) for CIFAR-10 (Appendix B.9)."""

    epochs: int = 500  # B.9 trains CIFAR-10 for hundreds of epochs; contrastive learning gains from longer training
    batch_size: int = 1024  # B.9's best CIFAR-10 model (94.0% linear eval) used batch 1024
    temperature: float = 0.5  # τ: the best value for CIFAR-10 in B.9 (searched over 0.1, 0.5, 1.0)
    optimizer: str = "lars"  # Section 2.2: LARS for large batches
    lr_per_256: float = 0.3  # learning rate = 0.3 × batch / 256 (Section 2.3, default setting) → 1.2 at 1024
    momentum: float = 0.9
    weight_decay: float = 1e-6  # Section 2.3, default setting (with LARS)
    warmup_epochs: int = 10  # linear warm-up, then cosine decay without restarts (Section 2.3)
    projection_dim: int = 128  # Section 2.3: z is 128-d
    views: ViewParams = field(default_factory=ViewParams)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"SimCLR optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SimCLR {name} must be a positive integer, got {value!r}")
        if not self.temperature > 0:
            raise ConfigError(f"SimCLR temperature must be positive, got {self.temperature}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"SimCLR warmup_epochs must lie in [0, epochs={self.epochs}], got {self.warmup_epochs}")

    def with_epochs(self, epochs: int) -> SimCLRParams:
        """The same recipe over ``epochs`` epochs, the warm-up the same fraction of the run."""
        warmup = min(epochs, round(self.warmup_epochs * epochs / self.epochs))
        return replace(self, epochs=epochs, warmup_epochs=warmup)

    @property
    def lr(self) -> float:
        return self.lr_per_256 * self.batch_size / 256

    def to_dict(self) -> dict:
        return asdict(self)


# The cpu recipe: the embedded digits' aux split (447 images) with small_cnn, about half
# a minute on one CPU thread (measurements in poisonbench/pretrain/__init__.py). Plain SGD
# with momentum (a batch of 64 needs no LARS); the crop keeps at least a fifth of the
# image (the 8% floor of ImageNet-sized crops can cut a digit down to one stroke).
DIGITS = SimCLRParams(
    epochs=40, batch_size=64, optimizer="sgd", lr_per_256=1.0, momentum=0.9, weight_decay=5e-4,
    warmup_epochs=4, views=ViewParams(crop_scale=(0.2, 1.0)),
)

RECIPES: dict[str, SimCLRParams] = {"digits": DIGITS}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al., 2020, Eq. 1), averaged over all 2N anchors.

    ``z1[k]`` and ``z2[k]`` are the projections of two views of image k. Each of the
    2N views is an anchor whose positive is its partner and whose negatives are the
    other 2N − 2 views; similarities are cosines divided by ``temperature``.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))  # a view is never its own negative
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


class ProjectionHead(nn.Module):
    """g(h) = W2 ReLU(BN(W1 h)) (Section 2.1), the hidden layer as wide as the features.

    The paper writes g without normalization; the batch normalization after the hidden
    layer follows the authors' released code, which normalizes inside the head. It
    matters on small data: with the digits recipe cut to 20 epochs (small_cnn, seed 0)
    the linear probe on raw features reached 91.8% with it and 79.6% without (module
    docstring of poisonbench.pretrain).
    """

    def __init__(self, feature_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, feature_dim, bias=False),  # BN's shift replaces the bias
            nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, out_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear from 1/warmup to 1 over ``warmup`` steps, then
    a cosine decay to 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class SimCLRModule(L.LightningModule):
    """Trains ``model.features`` (an ImageClassifier's normalize + backbone) with SimCLR."""

    def __init__(self, model: nn.Module, params: SimCLRParams = SimCLRParams()) -> None:
        super().__init__()
        self.model, self.params = model, params
        self.projection = ProjectionHead(model.feature_dim, params.projection_dim)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        images, _labels = batch  # labels are never looked at
        images = to_float(images)
        return random_view(images, self.params.views), random_view(images, self.params.views)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.model.features(images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        view1, view2 = batch
        # One forward pass over both views: BatchNorm sees the 2N views together.
        z = self(torch.cat([view1, view2]))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.params.temperature)
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=view1.shape[0])
        return loss

    def configure_optimizers(self):
        p = self.params
        parameters = [q for q in self.parameters() if q.requires_grad]
        if p.optimizer == "lars":
            optimizer = LARS(parameters, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        else:
            optimizer = torch.optim.SGD(parameters, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = round(total * p.warmup_epochs / p.epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_simclr(model: nn.Module, aux: ImageSet, params: SimCLRParams, *, seed: int = 0,
                 accelerator: str = "auto", work_dir: Path | None = None) -> tuple[dict, float]:
    """Pre-train ``model``'s backbone on ``aux`` (labels unused) in place; returns
    ``{"loss": …}``, the mean NT-Xent loss of the last epoch, and the seconds of the
    interrupted runs it continued (0 for a fresh run).

    With a ``work_dir``, the training state (backbone, projection head, optimiser,
    schedule, random streams) is checkpointed there every epoch and a checkpoint found
    there is resumed from, to the backbone an uninterrupted run gives (bit-identical on
    one CPU process; ``fitting.trainer.EpochCheckpoint``)."""
    train = {"epochs": params.epochs, "accelerator": accelerator, "devices": 1}
    data = PoisonedDataModule(aux, aux, store=None, batch_size=params.batch_size, seed=seed)
    module = SimCLRModule(model, params)
    ckpt = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    trainer = build_trainer(train, None, checkpoint=ckpt)
    resume = ckpt if ckpt is not None and ckpt.is_file() else None
    if resume is not None:
        log.warning("resuming SimCLR pre-training from its checkpoint %s", resume)
    with warnings.catch_warnings():
        # The data module offers its (unused) evaluation loader; SimCLR has no validation.
        warnings.filterwarnings("ignore", ".*no `validation_step`.*")
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    loss = trainer.callback_metrics.get("train/loss")
    return {"loss": float(loss) if loss is not None else None}, resumed_seconds(trainer)
