"""Executors: how a list of prepared job directories gets run (DomainBed's launchers).

- ``local``: in this process, in order; a job that trains on several processes
  (``devices > 1``) runs as ``poisonbench job DIR`` in a child, because Lightning's DDP
  launcher re-executes the command line that started it.
- ``local`` with ``gpus`` or ``jobs_per_device`` > 1: K long-lived worker processes per
  listed GPU (or on the CPU), each running many jobs in turn (``bench.workers``).
- ``slurm``: submitit job arrays, one array task per job directory; a requeued task
  resumes its job from the job's checkpoint.

Every executor runs a job by its directory alone, so any other launcher can too. A job
runs only under its claim (``jobs.claim``, an flock that dies with its process): the
local executor claims each job before it starts it (a child inherits the claim; a
worker claims the jobs it runs), puts
off a job another process holds and waits for it after the others, and asks
``pending`` once it holds the claim whether the job is still to be run, so that two
runs of one table, or N workers, run each job once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from poisonbench.bench.jobs import runs_root
from poisonbench.bench.workers import (CraftTask, job_threads, run_pool, torch_threads, usable_cores,
                                       worker_devices)
from poisonbench.schema.job_dir import LOCK_FD_ENV, Claim, JobBusyError, claim
from poisonbench.errors import ConfigError, JobError
from poisonbench.registry import Registry

EXECUTORS: Registry = Registry("executor")
OnDone = Callable[[Path], None]


def ready(name: str) -> None:
    """Fail, before any job directory is touched, when executor ``name`` cannot run
    here (an unknown name; slurm without submitit)."""
    EXECUTORS.get(name)
    if name == "slurm":
        _submitit()


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm executor needs submitit: pip install 'poisonbench[slurm]'") from None
    return submitit




def job_command(job_dir: Path, data_root: str | None, wandb: bool) -> list[str]:
    cmd = [sys.executable, "-m", "poisonbench", "job", str(job_dir)]
    if data_root:
        cmd += ["--data-root", str(data_root)]
    if wandb:
        cmd.append("--wandb")
    return cmd


def run_child(job_dir: Path, data_root: str | None, wandb: bool, env: dict | None = None,
              claimed: Claim | None = None) -> None:
    """Run ``poisonbench job DIR`` in a child, which inherits ``claimed`` (so the claim
    lives as long as the child does); a child outlives no interrupted parent."""
    log = job_dir / "job.log"
    env = {**os.environ, **(env or {})}
    fds: tuple[int, ...] = ()
    if claimed is not None and claimed.fd is not None:
        env[LOCK_FD_ENV], fds = str(claimed.fd), (claimed.fd,)
    with open(log, "w") as out:
        child = subprocess.Popen(job_command(job_dir, data_root, wandb), stdout=out, stderr=subprocess.STDOUT,
                                 env=env, pass_fds=fds)
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait()
    if code != 0:
        raise JobError(f"job {job_dir} failed with exit code {code}; see {log}")


def needs_child(config: dict) -> bool:
    devices = config["train"].get("devices", 1)
    return not (devices in (1, "1", "auto") or devices == [0])


@EXECUTORS.register("local")
def run_local(job_dirs: list[Path], *, data_root: str | None = None, wandb: bool = False,
              gpus: list[str] | None = None, jobs_per_device: int = 1, crafts: dict[Path, CraftTask] | None = None,
              pending: Callable[[Path], bool] = lambda d: True,
              on_done: OnDone = lambda d: None, on_skip: OnDone = lambda d: None,
              on_busy: OnDone = lambda d: None, on_note: Callable[[str], None] = lambda s: None,
              **_: object) -> None:
    """Run the jobs here: in this process, in order, or on ``jobs_per_device`` worker
    processes per GPU of ``gpus`` (on the CPU without ``gpus``), each running many jobs
    in turn (``bench.workers``).

    ``crafts``: the poison store each job reads, crafted once by one worker before the
    jobs that need it (the in-process path crafts in the first job that needs it).
    ``on_busy``: a job another process holds (it is waited for after the others);
    ``on_skip``: a job that ``pending`` no longer wants once claimed.
    """
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise ConfigError(f"jobs per device must be a positive integer; got {jobs_per_device!r}")
    if not job_dirs:
        return
    devices = worker_devices(gpus, jobs_per_device, len(job_dirs))
    if devices != [None]:
        log_dir = runs_root() / "_workers"
        run_pool(job_dirs, devices, data_root=data_root, wandb=wandb, crafts=crafts, pending=pending,
                 on_done=on_done, on_skip=on_skip, on_busy=on_busy, on_note=on_note, log_dir=log_dir)
        return

    from poisonbench.training.run import load_config, prepare_dir, run_job

    later: list[Path] = []
    for job_dir in job_dirs:
        try:
            held = claim(job_dir)
        except JobBusyError:
            on_busy(job_dir)
            later.append(job_dir)
            continue
        with held:
            _run_here(job_dir, held, data_root, wandb, pending, on_done, on_skip, load_config, prepare_dir, run_job)
    for job_dir in later:
        with claim(job_dir, wait=True) as held:
            _run_here(job_dir, held, data_root, wandb, pending, on_done, on_skip, load_config, prepare_dir, run_job)


def _run_here(job_dir: Path, held: Claim, data_root, wandb, pending, on_done, on_skip, load_config, prepare_dir,
              run_job) -> None:
    if not pending(job_dir):
        on_skip(job_dir)
        return
    config = load_config(job_dir)
    if needs_child(config):
        run_child(job_dir, data_root, wandb, claimed=held)
    else:
        with torch_threads(job_threads(config, usable_cores())):
            prepare_dir(job_dir, config, claimed=held)
            run_job(config, job_dir, data_root=data_root, wandb=wandb)
    on_done(job_dir)


class ResumableJob:
    """What each slurm array task runs: the job in its directory (``run_job_dir``), which
    resumes from the job's checkpoint when an earlier attempt left one.

    On the time-limit (or preemption) signal, submitit calls ``checkpoint`` and requeues
    what it returns: the same job, which resumes from its last epoch's checkpoint (the
    training state is saved every epoch; fitting/trainer.py). A job requeued otherwise
    (``scontrol requeue``, a node failure) resumes the same way. Lightning's own SLURM
    requeue is off, so that one mechanism acts, not two.
    """

    def __call__(self, job_dir: str, data_root: str | None, wandb: bool) -> None:
        from poisonbench.training.run import load_config, run_job_dir

        # The local executor's thread count, so that a job's floats on a CPU do not
        # depend on where it ran (bench.workers.CPU_JOB_THREADS).
        with torch_threads(job_threads(load_config(Path(job_dir)), usable_cores())):
            run_job_dir(job_dir, data_root, wandb)

    def checkpoint(self, job_dir: str, data_root: str | None, wandb: bool):
        return _submitit().helpers.DelayedSubmission(self, job_dir, data_root, wandb)


# Seconds between looks at the array tasks' result files, and between asks of squeue (a
# shared controller); a task that squeue no longer lists and that left no result in
# GONE_LOOKS asks in a row died without one (killed, out of memory).
POLL_S = 5.0
SQUEUE_EVERY_S = 30.0
GONE_LOOKS = 3


@EXECUTORS.register("slurm")
def run_slurm(job_dirs: list[Path], *, data_root: str | None = None, wandb: bool = False,
              slurm: dict | None = None, on_done: OnDone = lambda d: None, **_: object) -> None:
    """Submit one array task per job and wait. Each task claims its job itself
    (``run_job_dir``); a requeued task resumes its job from its checkpoint
    (``ResumableJob``)."""
    submitit = _submitit()
    if not job_dirs:
        return
    folder = job_dirs[0].parent.parent / "_slurm"
    executor = submitit.AutoExecutor(folder=str(folder))
    executor.update_parameters(**(slurm or {}))
    futures = executor.map_array(ResumableJob(), [str(d) for d in job_dirs], [data_root] * len(job_dirs),
                                 [wandb] * len(job_dirs))
    wait_slurm(dict(zip(job_dirs, futures)), on_done, submitit)


def wait_slurm(waiting: dict, on_done: OnDone, submitit, poll_s: float = POLL_S,
               squeue_every_s: float = SQUEUE_EVERY_S) -> None:
    """Wait for every array task, reporting each as it ends. A task's end is its result
    file, or its absence from squeue: without slurm accounting (no slurmdbd, as on a
    single-node cluster) submitit cannot learn that a task died without a result."""
    misses: dict = {}
    asked = float("-inf")
    while waiting:
        queued = None
        if time.monotonic() - asked >= squeue_every_s:
            queued, asked = _queued(), time.monotonic()
        for job_dir, future in list(waiting.items()):
            if future.done():
                del waiting[job_dir]
                try:
                    future.result()
                except submitit.core.utils.UncompletedJobError as err:  # FailedJobError too
                    raise JobError(f"job {job_dir} failed on SLURM (task {future.job_id}): "
                                   f"{_last_line(err)}; see {future.paths.stderr}") from None
                on_done(job_dir)
            elif queued is None:
                continue
            elif future.job_id not in queued:
                misses[job_dir] = misses.get(job_dir, 0) + 1
                if misses[job_dir] >= GONE_LOOKS and not future.done():
                    raise JobError(f"job {job_dir}: SLURM task {future.job_id} ended without a result "
                                   f"(killed?); see {future.paths.stderr}")
            else:
                misses.pop(job_dir, None)
        if waiting:
            time.sleep(poll_s)


def _queued() -> set[str] | None:
    """The ids of this user's array tasks that squeue lists (pending, running, being
    requeued), or None when squeue does not answer."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__
