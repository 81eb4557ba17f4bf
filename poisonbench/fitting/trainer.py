"""The Lightning Trainer of a job, built from the resolved ``train`` config.

Nothing here names a device: ``accelerator``/``devices``/``strategy`` come from the
profile (``devices: 2, strategy: ddp`` works as written), and ``precision: auto``
means bf16 mixed precision on CUDA and plain fp32 elsewhere.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch


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


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return str(precision)
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_cuda else "32-true"


def build_trainer(train: dict, job_dir: Path | None, *, fast_dev_run: bool = False,
                  extra_loggers: list | None = None, progress_bar: bool = False) -> L.Trainer:
    """``job_dir/metrics.csv`` (CSVLogger) when there is a job directory, plus ``extra_loggers``."""
    quiet_lightning()  # also with a progress bar: the bar, not third-party notices
    accelerator = str(train.get("accelerator", "auto"))
    loggers = list(extra_loggers or [])
    if job_dir is not None:
        loggers.insert(0, L.pytorch.loggers.CSVLogger(save_dir=str(job_dir), name="", version=""))
    return L.Trainer(
        accelerator=accelerator,
        devices=train.get("devices", 1),
        strategy=train.get("strategy", "auto"),
        precision=resolve_precision(str(train.get("precision", "auto")), accelerator),
        max_epochs=int(train["epochs"]),
        check_val_every_n_epoch=int(train.get("eval_every", 1)),
        num_sanity_val_steps=0,
        fast_dev_run=fast_dev_run,
        logger=loggers or False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # PoisonedDataModule shards by rank itself
        log_every_n_steps=50,
        default_root_dir=str(job_dir) if job_dir is not None else None,
    )
