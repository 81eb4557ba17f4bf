"""VictimModule: trains a victim model on a (poisoned) training set and measures it on
clean test data, in the three scenarios of both papers (DESIGN.md, "Training
scenarios"):

- ``scratch``: the model as built, every layer trained;
- ``finetune``: a pre-trained backbone, a re-initialised classifier, every layer trained;
- ``transfer``: the backbone frozen (and kept in eval mode, so its BatchNorm statistics
  do not move), only the re-initialised linear classifier trained with the profile's
  optimiser (robuster's "transfer"). Robuster's 0.001× learning rate for fine-tuning
  arrives with the defense tables that use it.

The fourth scenario, ``linear_eval`` (the shortcuts paper's features extracted once and
an L-BFGS classifier), trains nothing with Lightning: ``poisonbench.fitting.linear_eval``.

The network is passed in, not built here. Augmentation (random crop with zero padding
4 and horizontal flip) runs on the batch's device in ``on_after_batch_transfer``.

On CUDA (the GPU path; the CPU path is unchanged, bit for bit): the network and its
inputs in channels_last, fused SGD/Adam, and, with ``train.compile`` (``auto`` = on
where ``torch.compile`` works, eager where a network fails to compile), the network's
forward compiled; the module and its
state dict keep the plain network, so checkpoints and the defenses' hooks see it as
always. The metrics skip their per-step argument checks (``validate_args=False``).
A defense acts through two hooks called here (``TrainingHooks``, which
``poisonbench.defenses.base.Defense`` implements; this layer knows no defense): its
per-batch hook inside ``training_step`` (after augmentation, under the trainer's
autocast, with the model in training mode), and its per-step hook in Lightning's
``on_before_optimizer_step`` (after backward, DDP all-reduce and AMP unscaling). Its
other two hooks (filtering the training set, replacing the model) act before the
module exists, in the job. Accuracies are in percent.
"""
from __future__ import annotations

from typing import Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from poisonbench.data.augment import random_crop_flip, to_float
from poisonbench.errors import ConfigError
from poisonbench.schema.job_config import AUTO_TRUE_FALSE, OPTIMIZERS

TRAINED_SCENARIOS = ("scratch", "finetune", "transfer")


class TrainingHooks(Protocol):
    """What a defense may do inside training: replace the batch, touch the gradients,
    know the epoch; and the state its random draws depend on (counts of batches or steps),
    which a checkpoint keeps so that a resumed run draws what the uninterrupted one would.
    Hooks without ``state_dict`` have no such state."""

    def on_train_batch(self, model: torch.nn.Module, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def on_before_optimizer_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def on_train_epoch_start(self, epoch: int) -> None: ...


def compile_works() -> bool:
    """Whether ``torch.compile`` can build GPU kernels here (dynamo and triton present)."""
    try:
        import torch._dynamo
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(torch._dynamo.is_dynamo_supported() and has_triton())


def resolve_compile(choice: str | bool, on_cuda: bool) -> bool:
    """``train.compile``: ``auto`` = on for CUDA where torch.compile works, off on the CPU."""
    if choice not in AUTO_TRUE_FALSE:
        raise ConfigError(f"train.compile must be auto, true or false; got {choice!r}")
    if choice == "auto":
        return on_cuda and compile_works()
    return bool(choice)


class VictimModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, num_classes: int, train: dict,
                 scenario: str = "scratch", augment: bool = True, crop_padding: int = 4,
                 defense: TrainingHooks | None = None) -> None:
        super().__init__()
        if scenario == "linear_eval":
            raise ConfigError("scenario 'linear_eval' trains nothing here: it runs in poisonbench.fitting.linear_eval")
        if scenario not in TRAINED_SCENARIOS:
            raise ConfigError(f"unknown scenario {scenario!r}; known here: {', '.join(TRAINED_SCENARIOS)}")
        if train.get("optimizer", "sgd") not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {train.get('optimizer')!r}; known: {', '.join(OPTIMIZERS)}")
        self.model, self.scenario, self.train_cfg = model, scenario, dict(train)
        self.augment, self.crop_padding = augment, crop_padding
        self.defense = defense
        if scenario in ("finetune", "transfer"):
            model.reset_head(num_classes)
        if scenario == "transfer":
            model.backbone.requires_grad_(False)
        # One metric object per stage (train / val / test); the labels are checked where
        # they are made, not on every step.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.curve: list[tuple[int, float]] = []  # (epoch, clean test accuracy %)
        self.channels_last = False
        self.on_cuda = False
        self.compiled = False
        resolve_compile(self.train_cfg.get("compile", "auto"), False)  # a bad value fails here
        # The compiled forward lives outside the module's registry (a plain attribute in
        # __dict__), so the state dict and checkpoints hold the network's own names.
        self.__dict__["_compiled_model"] = None

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        # channels_last for the whole model and its inputs pays on CUDA tensor cores (on
        # CPU a model may pick its own layout, as small_cnn does). It is set here, before
        # the strategy wraps the model: DDP's gradient buckets take the parameters'
        # layout at wrapping time.
        from lightning.pytorch.accelerators import CUDAAccelerator

        self.on_cuda = isinstance(self.trainer.accelerator, CUDAAccelerator)
        self.channels_last = self.on_cuda
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        choice = self.train_cfg.get("compile", "auto")
        self.compiled = resolve_compile(choice, self.on_cuda)
        if self.compiled and self.__dict__["_compiled_model"] is None:
            if choice == "auto":  # where a network does not compile, it runs eagerly instead of failing
                import torch._dynamo

                torch._dynamo.config.suppress_errors = True
            self.__dict__["_compiled_model"] = torch.compile(self.model)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        images, labels = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images, self.crop_padding)
        images = to_float(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def on_train_epoch_start(self) -> None:
        if self.scenario == "transfer":
            self.model.backbone.eval()
        if self.defense is not None:
            self.defense.on_train_epoch_start(self.current_epoch)

    # ----------------------------------------------------------------- steps
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        compiled = self.__dict__["_compiled_model"]
        return (compiled if compiled is not None else self.model)(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.defense is not None:
            images, labels = self.defense.on_train_batch(self.model, images, labels)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)  # class indices, or soft labels [N, C] from a defense
        hard = labels.argmax(dim=1) if labels.is_floating_point() else labels
        self.train_acc.update(logits.detach(), hard)
        # No sync_dist: a collective inside logging runs only where a progress bar reads
        # it (rank 0) and deadlocks DDP against the metric syncs of the epoch-end hooks.
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc.compute() * 100)
        self.train_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.val_acc.update(self(images), labels)

    def on_validation_epoch_end(self) -> None:
        acc = float(self.val_acc.compute()) * 100
        self.val_acc.reset()
        self.log("val/acc", acc)
        if not self.trainer.sanity_checking:
            self.curve.append((self.current_epoch + 1, acc))

    def test_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self.test_acc.update(self(images), labels)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc.compute() * 100)
        self.test_acc.reset()

    # ------------------------------------------------------------- optimiser
    def on_before_optimizer_step(self, optimizer) -> None:
        if self.defense is not None:
            self.defense.on_before_optimizer_step(self.model, optimizer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = getattr(self.defense, "state_dict", None)
        if state is not None:
            checkpoint["defense_state"] = {key: int(value) for key, value in state().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        load = getattr(self.defense, "load_state_dict", None)
        if load is not None and "defense_state" in checkpoint:
            load(checkpoint["defense_state"])

    def configure_optimizers(self):
        cfg = self.train_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        # One fused kernel per step on CUDA; the CPU keeps torch's default implementation.
        fused = {"fused": True} if self.on_cuda else {}
        if cfg.get("optimizer", "sgd") == "adam":  # momentum and nesterov do not apply
            optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0), **fused)
        else:
            optimizer = torch.optim.SGD(
                params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                nesterov=bool(cfg.get("nesterov", False)), weight_decay=cfg.get("weight_decay", 0.0), **fused,
            )
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.get("milestones", [])), gamma=cfg.get("gamma", 0.1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
