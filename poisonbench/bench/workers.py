"""Long-lived worker processes for the local executor (``--jobs-per-device K``).

Each worker is started once (``spawn``: no CUDA or thread pool inherited from the
parent) and runs many jobs in turn, taking them one at a time from the parent, which
keeps the queue, the progress line and every decision about what runs next. A worker
runs a job exactly as the in-process path does: it claims the job directory (an flock
that dies with the worker), asks the parent whether the job is still wanted, prepares
the directory and runs ``training.run.run_job`` with its output in the job's
``job.log``. A job that raises is reported, its traceback left in ``job.log``, and the
worker takes the next one; the parent stops handing out jobs after a failure, as the
in-process path does, and raises it once the running ones are over.

Results do not depend on the number of workers: every job that trains on the CPU runs
with ``CPU_JOB_THREADS`` intra-op threads whatever K is (a job's floats depend on the
thread count; ``provenance.hardware`` records it in result.json), and the poison stores
that jobs share are crafted once, before the jobs that read them, by one worker each
(``CraftTask``), with the same threads and device the job itself would use.

Stopping: workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group);
the parent, stopped, sends each worker SIGTERM, which unwinds its running job (the
directory is left unfinished, to be run again), and kills a worker that has not ended
after ``STOP_GRACE_S``. A worker whose parent dies gets SIGTERM from the kernel (Linux)
or notices at its next look at the queue.

On GPUs, when more than one worker shares a GPU and ``nvidia-cuda-mps-control`` is on
the PATH, the workers run under the CUDA MPS daemon (one already running for this user
is used; otherwise one is started in a private pipe folder and stopped at the end), so
that the kernels of several small jobs share the GPU instead of time-slicing it.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Callable, Iterator

from poisonbench.errors import JobError, PoisonbenchError
from poisonbench.threads import CPU_JOB_THREADS, torch_threads  # noqa: F401  (re-exported to the executors)

# Default workers on a CPU (``--jobs-per-device auto``): one per usable core, at most this
# many (each holds torch and its data: a few hundred MB).
MAX_AUTO_CPU_WORKERS = 8
# Seconds a stopped worker gets to unwind its job before it is killed.
STOP_GRACE_S = 20.0
# Seconds between looks at the workers while waiting for a message.
POLL_S = 1.0
MPS_CONTROL = "nvidia-cuda-mps-control"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_jobs_per_device(gpus: list[str] | None) -> int:
    """``--jobs-per-device auto``: one per GPU; on the CPU one per usable core."""
    if gpus:
        return 1
    return max(1, min(usable_cores() // CPU_JOB_THREADS, MAX_AUTO_CPU_WORKERS))


def worker_devices(gpus: list[str] | None, jobs_per_device: int, jobs: int) -> list[str | None]:
    """The GPU of each worker (``None``: the CPU), ``jobs_per_device`` per GPU of
    ``gpus`` (each once), round-robin so that the first workers spread over the GPUs;
    never more workers than jobs."""
    unique = list(dict.fromkeys(str(g) for g in gpus)) if gpus else [None]
    devices = [g for _ in range(jobs_per_device) for g in unique]
    return devices[:max(1, jobs)]


def thread_budget(workers: int) -> int:
    """Threads a worker may use for work off the CPU's critical path (a GPU job's host side)."""
    return max(1, usable_cores() // max(1, workers))


def job_threads(config: dict, budget: int) -> int:
    """Intra-op threads for a job: ``CPU_JOB_THREADS`` when it trains on the CPU (its
    floats depend on it), else the worker's share of the cores."""
    from poisonbench.training.run import compute_device

    return CPU_JOB_THREADS if compute_device(config["train"]).type == "cpu" else budget


@dataclass(frozen=True)
class CraftTask:
    """A poison store that several jobs read, crafted once before them: what
    ``run_job`` would pass to ``craft_cached`` for an availability attack."""

    attack: str
    params: dict = field(hash=False, compare=False)
    dataset: str
    poison_seed: int
    key: str  # attack, canonical params, dataset and seed: equal keys, one store

    def craft(self, data_root: str | None) -> None:
        import torch

        from poisonbench.attacks import craft_cached
        from poisonbench.data import load_imageset

        device = "cuda" if torch.cuda.is_available() else "cpu"  # as run_job crafts
        with torch_threads(CPU_JOB_THREADS) if device == "cpu" else contextlib.nullcontext():
            craft_cached(self.attack, load_imageset(self.dataset, data_root, "train"), self.params,
                         self.poison_seed, device)


# ------------------------------------------------------------------------- the worker

class _Stop(BaseException):
    """SIGTERM in a worker: unwinds the running job (no ``except Exception`` takes it)."""


def _on_term(signum: int, frame) -> None:
    raise _Stop()


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _output_to(path: Path, mode: str = "w") -> Iterator[None]:
    """Send this process's stdout and stderr (the file descriptors: C libraries and
    child processes too) to ``path`` within the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, mode) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _failure(err: BaseException) -> tuple[bytes | None, str]:
    text = f"{type(err).__name__}: {err}".strip()
    try:
        pickled = pickle.dumps(err) if isinstance(err, PoisonbenchError) else None
        if pickled is not None:
            pickle.loads(pickled)
    except Exception:
        pickled = None
    return pickled, text


def worker_main(wid: int, tasks, replies, budget: int, data_root: str | None, wandb: bool,
                log: str) -> None:
    """A worker's life: take tasks from ``tasks`` until ``None``, answer on ``replies``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    _die_with_parent()
    parent = os.getppid()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    base = open(log, "a")
    os.dup2(base.fileno(), 1)
    os.dup2(base.fileno(), 2)
    try:
        import torch

        from poisonbench.bench.executors import needs_child, run_child
        from poisonbench.schema.job_dir import JobBusyError, claim
        from poisonbench.training.run import load_config, prepare_dir, run_job

        torch.set_num_threads(budget)
        replies.put(("ready", wid, None, None))
        while True:
            try:
                task = tasks.get(timeout=5.0)
            except Empty:
                if os.getppid() != parent:  # orphaned where no death signal came
                    return
                continue
            if task is None:
                return
            kind, payload = task
            if kind == "craft":
                try:
                    payload.craft(data_root)
                except Exception as err:
                    traceback.print_exc()
                    replies.put(("failed", wid, payload.key, _failure(err)))
                else:
                    replies.put(("crafted", wid, payload.key, None))
                continue
            job_dir, wait = Path(payload[0]), payload[1]
            try:
                held = claim(job_dir, wait=wait)
            except JobBusyError:
                replies.put(("busy", wid, str(job_dir), None))
                continue
            except Exception as err:
                replies.put(("failed", wid, str(job_dir), _failure(err)))
                continue
            with held:
                replies.put(("claimed", wid, str(job_dir), None))
                if not tasks.get():  # the parent's answer: is the job still to be run?
                    replies.put(("skip", wid, str(job_dir), None))
                    continue
                try:
                    config = load_config(job_dir)
                    if needs_child(config):  # several processes: Lightning relaunches a command line
                        run_child(job_dir, data_root, wandb, claimed=held)
                    else:
                        with _output_to(job_dir / "job.log"), torch_threads(job_threads(config, budget)):
                            try:
                                prepare_dir(job_dir, config, keep=("job.log",), claimed=held)
                                run_job(config, job_dir, data_root=data_root, wandb=wandb)
                            except Exception:
                                traceback.print_exc()  # into job.log
                                raise
                except Exception as err:
                    replies.put(("failed", wid, str(job_dir), _failure(err)))
                else:
                    replies.put(("done", wid, str(job_dir), None))
                finally:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    except _Stop:
        pass
    finally:
        base.close()


# ------------------------------------------------------------------------- the parent

@dataclass
class _Worker:
    process: object
    tasks: object
    device: str | None
    log: Path
    ready: bool = False
    running: tuple[str, str] | None = None  # (kind, job dir or craft key)


def run_pool(job_dirs: list[Path], devices: list[str | None], *, data_root: str | None, wandb: bool,
             crafts: dict[Path, CraftTask] | None, pending: Callable[[Path], bool],
             on_done: Callable[[Path], None], on_skip: Callable[[Path], None],
             on_busy: Callable[[Path], None], on_note: Callable[[str], None], log_dir: Path) -> None:
    """Run ``job_dirs`` on one worker per entry of ``devices``; see the module docstring."""
    crafts = crafts or {}
    todo_crafts = list({t.key: t for t in (crafts.get(d) for d in job_dirs) if t is not None}.values())
    first: deque[Path] = deque(job_dirs)
    later: deque[Path] = deque()
    crafted: set[str] = set()
    errors: list[BaseException] = []
    budget = thread_budget(len(devices))
    ctx = mp.get_context("spawn")
    replies = ctx.Queue()
    workers: list[_Worker] = []
    with mps(devices, on_note) as mps_env:
        try:
            for wid, device in enumerate(devices):
                env = {**mps_env, "OMP_NUM_THREADS": str(budget), "MKL_NUM_THREADS": str(budget)}
                if device is not None:
                    env["CUDA_VISIBLE_DEVICES"] = device
                log = log_dir / f"worker-{wid}.log"
                tasks = ctx.Queue()
                process = ctx.Process(target=worker_main, args=(wid, tasks, replies, budget, data_root, wandb,
                                                                str(log)))
                with _environ(env):  # spawn copies the environment at start
                    process.start()
                workers.append(_Worker(process, tasks, device, log))

            def next_task() -> tuple[str, object] | None:
                if errors:
                    return None
                if todo_crafts:
                    return "craft", todo_crafts.pop(0)
                for job_dir in first:
                    need = crafts.get(job_dir)
                    if need is None or need.key in crafted:
                        first.remove(job_dir)
                        return "job", (str(job_dir), False)
                if not first and later:  # held by another process: wait for it, after the others
                    return "job", (str(later.popleft()), True)
                return None

            def busy() -> bool:
                return any(w.running for w in workers)

            while True:
                for w in workers:
                    if w.ready and w.running is None:
                        task = next_task()
                        if task is None:
                            break
                        kind, payload = task
                        w.running = (kind, payload.key if kind == "craft" else payload[0])
                        w.tasks.put(task)
                if not busy() and (errors or not (first or later or todo_crafts)):
                    break
                try:
                    kind, wid, what, info = replies.get(timeout=POLL_S)
                except Empty:
                    _check_alive(workers)
                    continue
                w = workers[wid]
                if kind == "ready":
                    w.ready = True
                elif kind == "claimed":
                    w.tasks.put(bool(pending(Path(what))))
                elif kind == "busy":
                    w.running = None
                    on_busy(Path(what))
                    later.append(Path(what))
                elif kind == "skip":
                    w.running = None
                    on_skip(Path(what))
                elif kind == "done":
                    w.running = None
                    on_done(Path(what))
                elif kind == "crafted":
                    w.running = None
                    crafted.add(what)
                elif kind == "failed":
                    running, w.running = w.running, None
                    errors.append(_error(running, what, info, w))
        finally:
            _stop(workers)
    if errors:
        raise errors[0]


def _error(running: tuple[str, str] | None, what: str, info: tuple[bytes | None, str], w: _Worker) -> BaseException:
    pickled, text = info
    if pickled is not None:
        return pickle.loads(pickled)
    if running and running[0] == "craft":
        return JobError(f"crafting a poison store failed: {text}; see {w.log}")
    return JobError(f"job {what} failed: {text}; see {Path(what) / 'job.log'}")


def _check_alive(workers: list[_Worker]) -> None:
    for w in workers:
        if not w.process.is_alive():
            doing = f"while running {w.running[1]}" if w.running else "before it was done"
            raise JobError(f"a worker process ended {doing} (exit code {w.process.exitcode}); see {w.log}")


def _stop(workers: list[_Worker]) -> None:
    """End every worker: ``None`` to the idle, SIGTERM to the busy, a kill after
    ``STOP_GRACE_S`` to any still alive."""
    for w in workers:
        if not w.process.is_alive():
            continue
        if w.running is None and w.ready:
            w.tasks.put(None)
        else:
            w.process.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
    for w in workers:
        w.tasks.close()
        w.tasks.cancel_join_thread()


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------- CUDA MPS

@contextlib.contextmanager
def mps(devices: list[str | None], on_note: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """The environment under which workers sharing a GPU reach a CUDA MPS daemon: ``{}``
    when no GPU is shared, when ``nvidia-cuda-mps-control`` is not installed, or when one
    already serves this user (the workers find it as any CUDA process does); else a
    daemon started now in a private pipe folder, stopped when the block ends."""
    gpus = [d for d in devices if d is not None]
    control = shutil.which(MPS_CONTROL)
    if len(gpus) == len(set(gpus)) or control is None:
        yield {}
        return
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if (pipe / "control").exists():
        on_note(f"several jobs per GPU: using the CUDA MPS daemon already running ({pipe})")
        yield {}
        return
    folder = Path(tempfile.mkdtemp(prefix="pb-mps-"))  # short: a socket path has at most 107 bytes
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir()
    try:
        started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True,
                                 timeout=30)
        ok = started.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        on_note(f"several jobs per GPU: could not start the CUDA MPS daemon ({MPS_CONTROL} -d); "
                f"the jobs time-slice the GPU instead")
        shutil.rmtree(folder, ignore_errors=True)
        yield {}
        return
    on_note(f"several jobs per GPU: started the CUDA MPS daemon ({folder}); it stops when the run ends")
    try:
        yield env
    finally:
        try:
            subprocess.run([control], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(folder, ignore_errors=True)
