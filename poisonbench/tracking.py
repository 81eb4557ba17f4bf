"""Weights & Biases logging (``--wandb``): offline unless ``WANDB_MODE`` says otherwise.

Runs are grouped by table; ``job_type`` is ``craft``, ``train`` or ``aggregate``; a train
run's id is its job hash and its config the resolved cell config (DESIGN.md, "Runner").
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PROJECT = "poisonbench"


def _mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def wandb_logger(config: dict, job_dir: Path, job_type: str = "train"):
    """A Lightning WandbLogger for one job."""
    from lightning.pytorch.loggers import WandbLogger

    name = f"{config.get('row')}/{config.get('column')}/trial{config.get('trial')}"
    logger = WandbLogger(
        project=os.environ.get("WANDB_PROJECT", PROJECT), save_dir=str(job_dir),
        id=Path(job_dir).name, name=name, group=config.get("table"), job_type=job_type,
        config=config, mode=_mode(),
    )
    # Lightning always hands wandb.init an `anonymous` (None by default), which wandb
    # warns about on every run as a deprecated setting; leaving it out changes nothing else.
    logger._wandb_init.pop("anonymous", None)
    return logger


def log_craft(config: dict, job_dir: Path, summary: dict) -> None:
    """A ``craft`` run for a store this job had to craft (cache hits log nothing)."""
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=f"craft-{Path(job_dir).name}",
                     group=config.get("table"), job_type="craft", name=f"craft {config.get('attack')}",
                     dir=str(job_dir), mode=_mode(), reinit="create_new",
                     config={k: config.get(k) for k in ("attack", "attack_params", "dataset", "poison_seed")})
    run.summary.update(summary)
    run.finish()


def log_leaderboard(table: str, profile: str, payload: dict) -> None:
    """Log a rendered leaderboard (its JSON payload) as a W&B Table of an aggregate run."""
    import wandb

    from poisonbench.files import home

    out_dir = home() / "wandb"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = "agg-" + hashlib.sha256(f"{table}|{profile}".encode()).hexdigest()[:16]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, group=table,
                     job_type="aggregate", name=f"{table} ({profile})", dir=str(out_dir),
                     mode=_mode(), config={"table": table, "profile": profile}, reinit="create_new")
    columns = ["row", "column", "mean", "sem", "n", "reference"]
    rows = [[cell.get(c) for c in columns] for cell in payload["cells"]]
    run.log({"leaderboard": wandb.Table(columns=columns, data=rows)})
    run.finish()
