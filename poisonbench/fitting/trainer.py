"""The Lightning Trainer of a job, built from the resolved ``train`` config.

Nothing here names a device: ``accelerator``/``devices``/``strategy`` come from the
profile (``devices: 2, strategy: ddp`` works as written), and ``precision: auto``
means bf16 mixed precision on CUDA and plain fp32 elsewhere. On CUDA cuDNN picks its
fastest convolution algorithms (``cudnn.benchmark``); the CPU path is left as it was.

A job's trainer checkpoints its whole training state (``EpochCheckpoint``) into the job
directory, so that a killed or requeued job continues where it stopped
(``poisonbench.fitting.fit``). Under SLURM, Lightning's own requeue on SIGUSR1 is off:
the slurm executor requeues through submitit (one mechanism, not two).
"""
from __future__ import annotations

import logging
import random
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from poisonbench import progress as progress_bars
from poisonbench.artifacts import in_process_group
from poisonbench.files import atomic_path

# A job directory's checkpoint: a name in schema/job_dir.py's WRITTEN, so that clearing
# an attempt removes it (and training/run.py keeps it for an unfinished job, to resume).
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.ckpt"
# Epochs between checkpoints. The final epoch writes none: the job is over, and a job
# killed while it is tested reruns that one epoch, with the same outcome.
CHECKPOINT_EVERY = 1


def quiet_lightning() -> None:
    """Keep the console to progress and results: no banners, tips (litlogger), notices
    that a freshly prepared job directory is not empty or that an epoch is short, no
    deprecations inside Lightning (wandb's own chatter: WANDB_SILENT, set by the CLI)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for pattern in (".*smaller than the logging interval.*", ".*exists and is not empty.*",
                    ".*overridden `on_after_batch_transfer`.*", ".*LeafSpec.*is deprecated.*",
                    ".*litlogger.*", ".*anonymous.*", ".*The `srun` command is available.*"):
        warnings.filterwarnings("ignore", pattern)


def uses_cuda(accelerator: str) -> bool:
    return torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return str(precision)
    return "bf16-mixed" if uses_cuda(accelerator) else "32-true"


def checkpoint_path(job_dir: str | Path) -> Path:
    return Path(job_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def rng_state() -> dict:
    """Every random stream training draws from (augmentation, dropout, defenses), in
    types ``torch.load(weights_only=True)`` accepts: no numpy array, no pickled object."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochCheckpoint(L.Callback):
    """Every ``every`` epochs (not after the last), the trainer's whole state (model,
    optimizer, scheduler, loops, epoch) with the random streams and the accuracy curve
    so far, written atomically to ``path`` (a rename: a killed write leaves the previous
    checkpoint). Loaded with ``weights_only=True``, so it holds no pickled object.

    On resume, Lightning makes the first epoch's batch iterator before anything is
    restored and before the sampler learns its epoch (``FitLoop.setup_data``), where an
    uninterrupted run makes it at the epoch's start. So the first resumed epoch starts
    by restoring the random streams and making its iterator again, as an uninterrupted
    run would at that point (the iterator draws its base seed from the global stream;
    ``ShardedBatchSampler`` orders the batches when the iterator is made). A resumed
    single-process run thus draws what an uninterrupted one would. Under DDP each rank
    keeps its own seeded streams (rank 0's would make every rank draw alike): resumed,
    it is not bit-identical to an uninterrupted run.

    The checkpoint also records the seconds of fitting it holds, over every attempt
    (``seconds``); a resumed fit knows those of the attempts before it (``resumed_s``).
    """

    def __init__(self, path: Path, every: int = CHECKPOINT_EVERY) -> None:
        self.path, self.every = Path(path), int(every)
        self._resumed = False
        self._rng: dict | None = None
        self.resumed_s = 0.0  # seconds of fitting the loaded checkpoint held (0: a fresh fit)
        self._started = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done >= trainer.max_epochs or done % self.every:
            return
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
        else:  # a collective call: every rank dumps, rank 0 alone writes
            trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["poisonbench"] = {"rng": rng_state(),
                                     "curve": [[int(e), float(a)] for e, a in getattr(pl_module, "curve", [])],
                                     "seconds": self.resumed_s + time.perf_counter() - self._started}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        extra = checkpoint.get("poisonbench") or {}
        if hasattr(pl_module, "curve"):
            pl_module.curve = [(int(e), float(a)) for e, a in extra.get("curve", [])]
        self._resumed = True
        self._rng = extra.get("rng") if trainer.world_size == 1 else None
        self.resumed_s = float(extra.get("seconds", 0.0))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._resumed:
            return
        self._resumed = False
        if self._rng is not None:
            set_rng_state(self._rng)
            self._rng = None
        fetcher = trainer.fit_loop._data_fetcher  # no public handle on the epoch's iterator
        if fetcher is not None:
            iter(fetcher)


class EpochBar(L.Callback):
    """The epochs of a fit as a bar under ``poisonbench run``'s trials bar."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._bar = progress_bars.bar("epochs", int(trainer.max_epochs or 0))
        self._update = self._bar.__enter__()
        self._update(trainer.current_epoch)  # a resumed fit starts part of the way

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._update(1)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._bar.__exit__(None, None, None)


def fits_alone(train: dict) -> bool:
    """Whether a fit with the ``train`` recipe is this process's alone: one device, and
    no process group of several around it (torchmetrics syncs a fit's metrics over such
    a group, so its other ranks must fit at the same time). Only such a fit keeps a
    resumable checkpoint beside a cache entry and is made under the entry's lock."""
    if in_process_group():
        return False
    if any(name in str(train.get("strategy", "auto")) for name in ("ddp", "fsdp", "deepspeed")):
        return False
    devices = train.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return len(devices) <= 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) <= 1
    if devices in ("auto", -1, "-1"):
        return str(train.get("accelerator", "auto")) == "cpu" or torch.cuda.device_count() <= 1
    return int(devices) <= 1


def resumed_seconds(trainer: L.Trainer) -> float:
    """The seconds of fitting that the checkpoint ``trainer`` resumed from held (0 for a
    fresh fit or one without checkpoints)."""
    return sum(c.resumed_s for c in trainer.callbacks if isinstance(c, EpochCheckpoint))


def build_trainer(train: dict, job_dir: Path | None, *, fast_dev_run: bool = False,
                  extra_loggers: list | None = None, progress_bar: bool = False,
                  checkpoint: Path | None = None) -> L.Trainer:
    """``job_dir/metrics.csv`` (CSVLogger) when there is a job directory, plus
    ``extra_loggers``; with ``checkpoint``, the training state is saved there every
    ``CHECKPOINT_EVERY`` epochs (``EpochCheckpoint``)."""
    quiet_lightning()  # also with a progress bar: the bar, not third-party notices
    accelerator = str(train.get("accelerator", "auto"))
    loggers = list(extra_loggers or [])
    if job_dir is not None:
        loggers.insert(0, L.pytorch.loggers.CSVLogger(save_dir=str(job_dir), name="", version=""))
    callbacks = [EpochCheckpoint(checkpoint)] if checkpoint is not None and not fast_dev_run else []
    if progress_bars.active() and not fast_dev_run:
        callbacks.append(EpochBar())
    # Lightning requeues a SLURM job itself on SIGUSR1 unless told not to; the slurm
    # executor's requeue is submitit's (poisonbench.bench.executors).
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    return L.Trainer(
        accelerator=accelerator,
        devices=train.get("devices", 1),
        strategy=train.get("strategy", "auto"),
        precision=resolve_precision(str(train.get("precision", "auto")), accelerator),
        benchmark=True if uses_cuda(accelerator) else None,  # None: cuDNN's setting untouched
        max_epochs=int(train["epochs"]),
        check_val_every_n_epoch=int(train.get("eval_every", 1)),
        num_sanity_val_steps=0,
        fast_dev_run=fast_dev_run,
        logger=loggers or False,
        enable_checkpointing=False,  # no ModelCheckpoint: EpochCheckpoint writes the one checkpoint
        callbacks=callbacks,
        plugins=plugins,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # PoisonedDataModule shards by rank itself
        log_every_n_steps=50,
        default_root_dir=str(job_dir) if job_dir is not None else None,
    )
