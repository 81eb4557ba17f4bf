"""``poisonbench run``: expand tables into jobs, skip what is done, run the rest, and
render the leaderboards from what is on disk.

State lives on disk (DomainBed): a job is done when its directory holds a valid
``result.json`` of it; a directory without one is left over from a killed run and is
prepared afresh when the job runs. Killing a run at any moment and starting it again
therefore finishes every job exactly once; so do two runs at once, because a job runs
only under its claim (``jobs.claim``), and a run that finds a job claimed waits for it
and then runs it only if it is still not done. Nothing is deleted before a job runs:
``--rerun`` replaces a result when its new one is written.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from poisonbench import progress as progress_bars
from poisonbench.bench.aggregate import aggregate, table_state
from poisonbench.bench.catalogue import load_suite, planned_catalogue
from poisonbench.bench.executors import EXECUTORS, ready
from poisonbench.bench.workers import CPU_JOB_THREADS, CraftTask, auto_jobs_per_device, torch_threads
from poisonbench.bench.jobs import Job, expand, job_state, read_results, runs_root
from poisonbench.bench.render import render_all, render_table
from poisonbench.bench.tables import TableSpec, load_table
from poisonbench.errors import ConfigError
from poisonbench.schema.job_dir import make_job_dir, result_stamp

REPO = Path(__file__).resolve().parent.parent.parent


def leaderboards_dir() -> Path:
    """``$POISONBENCH_LEADERBOARDS``, else ``leaderboards/`` of the checkout."""
    return Path(os.environ.get("POISONBENCH_LEADERBOARDS") or REPO / "leaderboards")


def resolve_tables(suite: str | None, table: str | None) -> list[TableSpec]:
    ids = load_suite(suite) if suite else [table]
    return [load_table(t) for t in ids]


@dataclass
class Plan:
    spec: TableSpec
    jobs: list[Job]


def plan(specs: list[TableSpec], *, profile: str | None, trials: int | None,
         rows: list[str] | None, fast_dev_run: bool) -> list[Plan]:
    if fast_dev_run and trials is None:
        trials = 1
    if rows and len(specs) > 1:
        known = {r for spec in specs for r in spec.row_ids}
        unknown = sorted(set(rows) - known)
        if unknown:
            raise ConfigError(f"no table of the suite has row {unknown[0]!r}; rows: {', '.join(sorted(known))}")
    out = []
    for spec in specs:
        wanted = [r for r in rows if r in spec.row_ids] if rows and len(specs) > 1 else rows
        if rows and not wanted:
            continue  # a suite run restricted to rows this table does not have
        out.append(Plan(spec, expand(spec, profile=profile, trials=trials, rows=wanted or None,
                                     fast_dev_run=fast_dev_run)))
    return out


def not_implemented(plans: list[Plan]) -> dict[tuple[str, str, str], str]:
    """``{(table, row, column): what is missing}`` for the cells that name a planned
    attack or defense (``configs/tables/catalogue.yaml``): they are skipped, not failed."""
    catalogue = planned_catalogue()
    return {(p.spec.id, j.row, j.column): catalogue.missing(j.config)
            for p in plans for j in p.jobs if catalogue.missing(j.config)}


def show_plan(plans: list[Plan], console: Console) -> None:
    root = runs_root()
    blocked = not_implemented(plans)
    for p in plans:
        table = Table(title=f"{p.spec.id}: {len(p.jobs)} jobs", title_justify="left")
        for col in ("row", "column", "trial", "state", "directory"):
            table.add_column(col)
        for job in p.jobs:
            missing = blocked.get((p.spec.id, job.row, job.column))
            state = f"not implemented ({missing})" if missing else job_state(job, root)
            table.add_row(job.row, job.column, str(job.trial), state, str(job.dir(root)))
        console.print(table)


def run(plans: list[Plan], *, rerun: bool = False, executor: str = "local", data_root: str | None = None,
        wandb: bool = False, gpus: list[str] | None = None, slurm: dict | None = None,
        jobs_per_device: int | str = 1, render: bool = True, console: Console | None = None) -> None:
    """Run the plans' jobs that are not done and render their leaderboards.

    ``jobs_per_device``: worker processes per GPU of ``gpus`` (or on the CPU), or
    ``"auto"`` (``bench.workers.auto_jobs_per_device``); results do not depend on it.
    """
    console = console or Console(stderr=True)
    root = runs_root()
    ready(executor)  # before any directory is touched
    if jobs_per_device == "auto":
        jobs_per_device = auto_jobs_per_device(gpus)
    launch = EXECUTORS.get(executor)
    blocked = not_implemented(plans)
    for (table, row, column), missing in blocked.items():
        console.print(f"{table} row {row!r} column {column!r}: not implemented yet ({missing}); skipped")
    todo = [j for p in plans for j in p.jobs
            if (p.spec.id, j.row, j.column) not in blocked and (rerun or job_state(j, root) != "done")]
    skipped = sum(len(p.jobs) for p in plans) - len(todo) - sum(
        1 for p in plans for j in p.jobs if (p.spec.id, j.row, j.column) in blocked)
    if skipped:
        console.print(f"{skipped} jobs already done (use --rerun to run them again)")
    by_dir = {j.dir(root): j for j in todo}
    # With --rerun, the result each job replaces: one written since came from another run.
    replaces = {d: result_stamp(d) for d in by_dir} if rerun else {}
    for job_dir, job in by_dir.items():
        make_job_dir(job_dir, job.config)  # refuses a foreign directory before any work; removes nothing

    def pending(job_dir: Path) -> bool:
        """Whether a claimed job is still to be run by this run."""
        if rerun:
            return result_stamp(job_dir) == replaces[job_dir]
        return job_state(by_dir[job_dir], root) != "done"

    crafts = None
    if gpus:
        precraft(todo, data_root, console, gpus)
    elif executor == "local" and jobs_per_device > 1:  # CPU workers craft the shared stores first, in parallel
        crafts = {j.dir(root): craft_task(j.config) for j in todo}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress, progress_bars.shared(progress):
        task = progress.add_task("trials", total=len(todo))

        def label(job_dir: Path) -> str:
            return by_dir[job_dir].label if job_dir in by_dir else str(job_dir)

        def done(job_dir: Path) -> None:
            progress.update(task, advance=1, description=label(job_dir))

        def skip(job_dir: Path) -> None:
            progress.console.print(f"{label(job_dir)}: done by another run meanwhile; not run again")
            done(job_dir)

        def busy(job_dir: Path) -> None:
            progress.console.print(f"{label(job_dir)}: another process is running it; "
                                   f"waiting for it after the other jobs")

        launch(list(by_dir), data_root=data_root, wandb=wandb, gpus=gpus, slurm=slurm,
               jobs_per_device=jobs_per_device, crafts=crafts, pending=pending, on_done=done, on_skip=skip,
               on_busy=busy, on_note=progress.console.print)
    if render:
        for p in plans:
            write_leaderboard(p, wandb=wandb, console=console)
        render_all(leaderboards_dir(), root, tables=[])  # refresh the index only


def craft_task(config: dict) -> CraftTask | None:
    """The poison store a job reads, as ``run_job`` would craft it, when jobs can share it:
    an availability attack's (an integrity attack's store depends on the trial's target
    and victim, which the job itself draws)."""
    from poisonbench.attacks import ATTACKS

    if config["attack"] == "none":
        return None
    attack = ATTACKS.get(config["attack"])
    if attack.integrity:
        return None
    params = dict(config.get("attack_params") or {})
    if config.get("fast_dev_run"):  # what the job itself crafts (training/run.py)
        params = {**params, **attack.smoke}
    key = json.dumps([config["attack"], params, config["dataset"], config["poison_seed"]], sort_keys=True)
    return CraftTask(config["attack"], params, config["dataset"], int(config["poison_seed"]), key)


def precraft(jobs: list[Job], data_root: str | None, console: Console, gpus: list[str] | None = None) -> None:
    """Craft each distinct store once before parallel jobs start, so that jobs sharing a
    fixed poison seed do not all craft the same store at once (memory, not correctness:
    stores are written atomically).

    With ``gpus`` (the ids of ``--gpus``, each counted once however many workers share
    it), a store is crafted on them: on all of them as the ranks of one run when its
    attack shards (``ranks`` ``invariant`` or ``summed``: the store is the one a job would
    craft on one device, up to summation order for ``summed``), else on the first.
    Without ``gpus``, or on a machine without CUDA (where the jobs train on the CPU
    too), on the CPU.
    """
    import torch

    from poisonbench.attacks import ATTACKS, craft_cached
    from poisonbench.data import load_imageset

    gpus = list(dict.fromkeys(str(g) for g in gpus)) if gpus else None
    devices = gpu_devices(gpus) if gpus and torch.cuda.is_available() else ["cpu"]
    seen = set()
    for job in jobs:
        task = craft_task(job.config)
        if task is None or task.key in seen:
            continue
        seen.add(task.key)
        on = devices if ATTACKS.get(task.attack).ranks != "one" else devices[:1]
        where = ", ".join(str(d) for d in on)
        console.print(f"crafting {task.attack} on {task.dataset} (seed {task.poison_seed}) on {where}")
        # On the CPU with the jobs' thread count: the store is the one a job would craft.
        with torch_threads(CPU_JOB_THREADS) if on == ["cpu"] else contextlib.nullcontext():
            craft_cached(task.attack, load_imageset(task.dataset, data_root, "train"), task.params,
                         task.poison_seed, on)


def gpu_devices(gpus: list[str]) -> list[str]:
    """``--gpus`` ids as this process's CUDA devices. The local executor gives each job
    ``CUDA_VISIBLE_DEVICES=<id>``, so an id is a physical GPU; where this process itself
    sees only some GPUs (``CUDA_VISIBLE_DEVICES`` set), ``cuda:i`` is the i-th of those."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    order = [v.strip() for v in visible.split(",")] if visible is not None else None
    devices = []
    for gpu in gpus:
        gpu = str(gpu).strip()
        if order is not None and gpu in order:
            devices.append(f"cuda:{order.index(gpu)}")
        elif order is None and gpu.isdigit():
            devices.append(f"cuda:{int(gpu)}")
        else:
            seen = f"CUDA_VISIBLE_DEVICES={visible}" if order is not None else "CUDA_VISIBLE_DEVICES is unset: ids are 0, 1, …"
            raise ConfigError(f"--gpus names GPU {gpu!r}, which this process cannot see ({seen})")
    return devices


def write_leaderboard(p: Plan, *, wandb: bool = False, console: Console | None = None,
                      force: bool = False) -> Path | None:
    root = runs_root()
    results = read_results(p.jobs, root)
    if not results:
        return None
    cells = aggregate(p.spec, p.jobs, results)
    profile = p.jobs[0].config["profile"]
    path = render_table(p.spec, cells, results, leaderboards_dir(), profile, force=force)
    if console:
        table = [line for line in path.read_text().splitlines() if line.startswith("|")]
        console.print(f"{p.spec.title} (profile {profile})", style="bold", markup=False)
        console.print("\n".join(table), markup=False, highlight=False)
        console.print(f"{p.spec.id}: {table_state(cells, p.spec.trials).status} → {path}")
    if wandb:
        from poisonbench.tracking import log_leaderboard

        log_leaderboard(p.spec.id, profile, json.loads(path.with_suffix(".json").read_text()),
                        image=path.with_suffix(".png"))
    return path
