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


def log_leaderboard(table: str, profile: str, payload: dict, image: Path | None = None) -> None:
    """Log a rendered leaderboard (its JSON payload) to an aggregate run: every metric
    of the table as a W&B Table (``leaderboard``), and where the spec declares a figure
    its points as a W&B scatter (``scatter``) and ``image``, its PNG (``figure``)."""
    import wandb

    from poisonbench.files import home

    out_dir = home() / "wandb"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = "agg-" + hashlib.sha256(f"{table}|{profile}".encode()).hexdigest()[:16]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, group=table,
                     job_type="aggregate", name=f"{table} ({profile})", dir=str(out_dir),
                     mode=_mode(), config={"table": table, "profile": profile}, reinit="create_new")
    columns, rows = leaderboard_rows(payload)
    logged = {"leaderboard": wandb.Table(columns=columns, data=rows)}
    figure = payload.get("figure")
    if figure and figure.get("kind") == "scatter":
        x, y = figure["x"], figure["y"]
        points = [[p["label"], p["role"], p["x"], p["y"], p["x_error"], p["y_error"], p["n"]]
                  for p in figure["points"] if p["x"] is not None and p["y"] is not None]
        drawn = wandb.Table(columns=["label", "role", x, y, f"{x}_error", f"{y}_error", "n"], data=points)
        logged["scatter"] = wandb.plot.scatter(drawn, x, y, title=f"{table}: {y} against {x}")
        if image is not None and Path(image).is_file():
            logged["figure"] = wandb.Image(str(image), caption=f"{table} ({profile})")
    run.log(logged)
    run.finish()


def leaderboard_rows(payload: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of a leaderboard's cells with every metric: the headline metric
    (``metric`` names it per row, which may differ from the table's) as mean, error, n
    and the paper's value, then each other metric of the table as ``<m>``, ``<m>_error``,
    ``<m>_n`` and ``<m>_reference``."""
    extra = list(dict.fromkeys(m for cell in payload["cells"] for m in cell.get("metrics") or {}))
    columns = ["row", "column", "metric", "mean", "error", "n", "reference"]
    for m in extra:
        columns += [m, f"{m}_error", f"{m}_n", f"{m}_reference"]
    rows = []
    for cell in payload["cells"]:
        row = [cell["row"], cell["column"], cell.get("metric", payload.get("metric")), cell.get("mean"),
               cell.get("sem"), cell.get("n"), cell.get("reference")]
        for m in extra:
            stats = (cell.get("metrics") or {}).get(m) or {}
            row += [stats.get("mean"), stats.get("error"), stats.get("n"), stats.get("reference")]
        rows.append(row)
    return columns, rows
