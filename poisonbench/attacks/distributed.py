"""Crafting on several devices: one process per rank, one process group over loopback.

``run_ranks(fn, devices, *args)`` calls ``fn(*args, device)`` once per listed device,
each call in its own process (``torch.multiprocessing``: spawned for GPU ranks, forked
from a clean fork server for CPU ranks, see ``_context``) holding rank r of a
``torch.distributed`` group initialised over 127.0.0.1 on a free port: NCCL for CUDA
tensors, with gloo beside it for the few CPU tensors attacks exchange
(``cpu:gloo,cuda:nccl``), or gloo alone for CPU ranks. It returns rank 0's value to
the caller. Inside ``fn``, ``crafting.shard`` / ``gather`` / ``reduce_sum`` /
``broadcast_`` see the group, and ``crafting.context()`` is the caller's
``CraftContext`` (so its ``on_unit`` hook must be picklable: a module-level function).

- With one device nothing is spawned: ``fn`` runs in the calling process, unchanged.
- Rank r on ``cuda:i`` sees that one GPU only (``CUDA_VISIBLE_DEVICES``) and is given
  ``cuda:0``: code that says "the GPU" (a Lightning trainer with ``devices: 1``
  training a crafting model) then uses the rank's own GPU, not the first one.
- CPU ranks use one intra-op thread each: ranks are the parallelism.
- Errors: a ``PoisonbenchError`` in any rank is raised again in the caller, as is;
  anything else becomes one ``RuntimeError`` naming the rank, with that rank's
  traceback in its text. The other ranks are terminated either way.
- Arguments and rank 0's result travel through shared memory (``/dev/shm``; a
  container needs room there for the dataset, e.g. ``docker run --shm-size``).
"""
from __future__ import annotations

import dataclasses
import os
import queue as queue_module
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

from poisonbench.attacks import crafting
from poisonbench.errors import ConfigError, PoisonbenchError

DeviceSpec = str | torch.device | Sequence[str | torch.device] | None

RESULT_WAIT_S = 600.0  # how long rank 0 keeps its result's shared memory alive for the caller
GROUP_TIMEOUT = timedelta(minutes=60)  # a collective waits this long for a slow rank
ERROR_GRACE_S = 3.0  # after a first error, how long the other ranks' reports are awaited


# ------------------------------------------------------------------------ devices


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_devices(spec: DeviceSpec) -> list[torch.device]:
    """The devices of ``spec``: one device, a comma-separated string (``cuda:0,cuda:1``,
    ``cpu,cpu``) or a sequence; ``None`` is ``default_device()``.

    Several devices are one rank each: all CPU (any number of ranks) or all distinct
    GPUs named by index. Anything else is a ``ConfigError``.
    """
    if spec is None:
        return [default_device()]
    if isinstance(spec, torch.device):
        items: list = [spec]
    elif isinstance(spec, str):
        items = spec.split(",")
    else:
        items = list(spec)
    text = ",".join(str(item).strip() for item in items)
    if not items or any(not str(item).strip() for item in items):
        raise ConfigError(f"devices must be a comma-separated list such as cuda:0,cuda:1 or cpu,cpu, got {text!r}")
    devices = []
    for item in items:
        try:
            devices.append(item if isinstance(item, torch.device) else torch.device(str(item).strip()))
        except (RuntimeError, TypeError, ValueError):
            raise ConfigError(f"unknown device {str(item).strip()!r}; expected cpu, cuda or cuda:N") from None
    if len(devices) > 1:
        kinds = sorted({d.type for d in devices})
        if len(kinds) > 1:
            raise ConfigError(f"crafting ranks must all be CPUs or all be GPUs, got {text!r}")
        if kinds[0] not in ("cpu", "cuda"):
            raise ConfigError(f"crafting on several devices takes cpu or cuda devices, got {text!r}")
    gpus = [d for d in devices if d.type == "cuda"]
    if gpus:
        if not torch.cuda.is_available():
            raise ConfigError(f"devices {text!r} name a GPU, but no CUDA GPU is available here")
        count = torch.cuda.device_count()
        if len(devices) > 1 and any(d.index is None for d in gpus):
            raise ConfigError(f"name each GPU by its index when crafting on several (e.g. cuda:0,cuda:1), got {text!r}")
        for d in gpus:
            if d.index is not None and d.index >= count:
                raise ConfigError(f"device {d} does not exist: {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
        if len({d.index for d in gpus}) < len(gpus):
            raise ConfigError(f"devices {text!r} list a GPU twice; NCCL runs one rank per GPU")
    return devices


def describe_devices(devices: Sequence[torch.device]) -> str:
    """The hardware of a crafting run, for its cost record: ``NVIDIA H100 80GB HBM3``,
    ``2× NVIDIA H100 80GB HBM3``, ``cpu ×2 ranks, x86_64 (16 cores)``."""
    from poisonbench import provenance

    devices = [torch.device(d) for d in devices]
    kind, world = devices[0].type, len(devices)
    if kind == "cuda" and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(d) for d in devices]
        if len(set(names)) == 1:
            return names[0] if world == 1 else f"{world}× {names[0]}"
        return " + ".join(names)
    if kind == "cpu":
        name = provenance.hardware("cpu")["name"]
        return name if world == 1 else f"cpu ×{world} ranks, {name}"
    return kind if world == 1 else f"{kind} ×{world} ranks"


# ------------------------------------------------------------------------ launcher


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(fn: Callable[..., Any], devices: DeviceSpec, *args: Any) -> Any:
    """``fn(*args, device)`` on every device of ``devices`` as one rank each; returns
    rank 0's value. One device: a plain call in this process."""
    devices = parse_devices(devices)
    if len(devices) == 1:
        return fn(*args, devices[0])
    ctx = crafting.context()
    rank_ctx = dataclasses.replace(ctx, units_done=[])
    mp = _context(devices[0].type)
    messages, received = mp.Queue(), mp.Event()
    procs = start_processes(_rank_main, nprocs=len(devices), join=False, start_method=mp.get_start_method(),
                            args=(fn, args, devices, _visible_gpus(), dict(os.environ), free_port(), rank_ctx,
                                  messages, received))
    try:
        outcome = _wait(procs, messages, devices)
        if outcome[0] != "ok":
            raise _as_error(outcome)
        received.set()
        for process in procs.processes:
            process.join()
        failed = _failed(procs)
        if failed is not None:
            raise RuntimeError(f"crafting rank {failed[0]} failed after rank 0 had its result: {failed[1]}")
        value, units_done = outcome[1]
        ctx.units_done.extend(units_done)
        return value
    finally:
        _stop(procs)


def _context(kind: str):
    """Where ranks start from. GPU ranks: spawn (a fresh interpreter; its seconds of
    imports are nothing beside GPU crafting, and no CUDA state can leak into it). CPU
    ranks: a fork server where there is one (a clean process, never touched by CUDA or
    threads, that imports poisonbench once and forks each rank from there, so a rank
    starts in a fraction of a second instead of importing torch, Lightning and the
    attacks again: what makes small CPU runs and the tests cheap), else spawn. Neither
    forks the caller, whose CUDA context and thread pools a child could not use."""
    import multiprocessing

    if kind == "cpu" and "forkserver" in multiprocessing.get_all_start_methods():
        mp = torch.multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["poisonbench.attacks"])
        return mp
    return torch.multiprocessing.get_context("spawn")


def _visible_gpus() -> list[str] | None:
    """The caller's ``CUDA_VISIBLE_DEVICES`` as a list (None when unset): what ``cuda:i`` means here."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _wait(procs, messages, devices) -> tuple:
    """Rank 0's result, or the error that stopped the run: a ``PoisonbenchError`` that a
    rank reported; else a rank that died without a report (a signal, the OOM killer);
    else the earliest report (one rank's failure makes its peers' collectives fail
    after it)."""
    reports: list[tuple] = []
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        try:
            message = messages.get(timeout=0.2)
            if message[0] == "ok":
                return message
            reports.append(message)
        except queue_module.Empty:
            pass
        if deadline is None and (reports or _failed(procs) is not None):
            deadline = time.monotonic() + ERROR_GRACE_S  # the time for the other ranks' reports to arrive
        elif deadline is not None and all(p.exitcode is not None for p in procs.processes):
            if not _drain(messages, reports):  # every rank is gone and its report read
                break
        elif not reports and all(p.exitcode == 0 for p in procs.processes):
            return ("bug", 0, str(devices[0]), 0.0, "rank 0 exited without a result", "")
    reports = [r for r in reports if r[0] != "ok"]  # rank 0 finished, but another rank did not
    users = [r for r in reports if r[0] == "user"]
    if users:
        return min(users, key=lambda r: r[3])
    reported = {r[1] for r in reports}
    for rank, process in enumerate(procs.processes):
        if rank not in reported and process.exitcode not in (None, 0):
            return ("bug", rank, str(devices[rank]), 0.0,
                    f"the process was {_exit_text(process.exitcode)} without a report (see its output above; a script "
                    "that crafts on several devices needs its top level under `if __name__ == '__main__':`)", "")
    if not reports:
        return ("bug", 0, str(devices[0]), 0.0, "a rank failed after rank 0 had its result", "")
    return min(reports, key=lambda r: r[3])


def _drain(messages, reports: list) -> bool:
    """Move what is in the queue now into ``reports``; whether there was anything."""
    got = False
    while True:
        try:
            reports.append(messages.get(timeout=0.05))
            got = True
        except queue_module.Empty:
            return got


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"ended with exit code {code}"


def _failed(procs) -> tuple[int, str] | None:
    """The first rank that exited with an error, and how."""
    for rank, process in enumerate(procs.processes):
        if process.exitcode not in (None, 0):
            return rank, _exit_text(process.exitcode)
    return None


def _stop(procs) -> None:
    """Every rank still running terminated (SIGTERM, then SIGKILL after 30 s) and reaped."""
    for process in procs.processes:
        if process.is_alive():
            process.terminate()
    for process in procs.processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()


def _as_error(outcome: tuple) -> Exception:
    if outcome[0] == "user":
        return outcome[4]
    _, rank, device, _, message, trace = outcome
    text = f"crafting rank {rank} ({device}) failed: {message}"
    return RuntimeError(text + (f"\n--- traceback of rank {rank} ---\n{trace}" if trace else ""))


def _rank_main(rank: int, fn, args, devices, visible, environ, port, ctx, messages, received) -> None:
    """One rank: the caller's environment, its device, the process group, ``fn`` inside
    the caller's context. An error is reported first and the process group left to the
    exit, so that the report is sent before the peers see the connection drop."""
    os.environ.clear()
    os.environ.update(environ)  # a fork server's children would otherwise see the server's
    device, world = devices[rank], len(devices)
    try:
        if device.type == "cuda":
            # Before anything touches CUDA in this process: the rank's GPU becomes cuda:0.
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[device.index] if visible is not None else str(device.index)
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            backend = "cpu:gloo,cuda:nccl"
        else:
            torch.set_num_threads(1)
            backend = "gloo"
        if sys.platform.startswith("linux") and "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: never look for a network
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=GROUP_TIMEOUT)
        with crafting.crafting(ctx):
            value = fn(*args, device)
    except PoisonbenchError as err:
        messages.put(("user", rank, str(devices[rank]), time.time(), err))
        sys.exit(1)
    except Exception as err:  # a bug: reported with its traceback, then this rank exits
        messages.put(("bug", rank, str(devices[rank]), time.time(), f"{type(err).__name__}: {err}",
                      traceback.format_exc()))
        sys.exit(1)
    dist.destroy_process_group()
    if rank == 0:
        messages.put(("ok", (value, ctx.units_done)))
        received.wait(RESULT_WAIT_S)  # the caller maps the result's shared memory before this process ends
