"""Crafting machinery shared by every attack that optimises its perturbations.

- Pixel-space steps: ``project`` keeps δ in its ℓ∞ or ℓ2 ball and x + δ in [0, 1];
  ``signed_step`` / ``l2_step`` are PGD's ascent or descent steps (Madry et al. 2018).
- Resumable work: an attack splits its work into numbered *units* (a chunk of images,
  a round of bi-level optimisation). Every unit draws its randomness from
  ``unit_generator(seed, unit)`` only, so a run that stops after unit k and resumes
  from the checkpoint of unit k computes exactly what an uninterrupted run does.
  ``Checkpoint`` writes the attack's partial state (tensors as safetensors, the rest
  as JSON metadata) atomically, at most every ``every_s`` seconds, with their content
  hash (a checkpoint that fails it, or cannot be read, is started over) and the crafting
  seconds spent so far over every run that led to it (``craft_s``), so that the cost
  recorded for a resumed store is the sum of its segments (``crafting_seconds``).
- Sharding: with ``torch.distributed`` initialised (one process per device, started
  by ``poisonbench.attacks.distributed.run_ranks``), each rank crafts ``shard(n)`` of
  the samples (every world-th sample, or every world-th block of ``block`` samples)
  and ``gather`` assembles the full tensor from every rank's rows. ``reduce_sum``,
  ``broadcast_`` and ``broadcast_module`` are the other collectives attacks use; each
  is the identity on one rank, and each moves its tensor to a device the process
  group's backend takes (gloo: CPU tensors, NCCL: CUDA tensors).
- Checkpoints on several ranks: a ``Checkpoint`` of per-rank state writes one file
  per rank (``.rankN``) and resumes only when every rank's file holds the same unit
  (else every rank starts over: a mixed resume could pair different units' collectives);
  a ``shared`` checkpoint holds state that every rank has in full, so rank 0 alone
  writes it, under the one-rank name, and broadcasts it to the others on resume (a
  run may then resume on another number of ranks).
- Progress: a rich progress bar with steps, the current loss and the ETA, on rank 0.

The crafting run's options (checkpoint file, its period, progress, a hook after each
unit) live in a ``CraftContext`` that ``craft_cached`` sets; attacks read it through
``context()``, so their signature stays ``craft(imageset, params, seed, device)``
(STYLE.md, convention 4).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from poisonbench.data.store import tensors_sha256
from poisonbench import progress as progress_bars
from poisonbench.errors import ConfigError
from poisonbench.files import atomic_path

NORMS = ("linf", "l2")


# --------------------------------------------------------------------------- context


@dataclass
class CraftContext:
    """How one crafting run is carried out (not what it computes: nothing here is hashed)."""

    checkpoint: Path | None = None  # partial state of an interrupted run; None: no checkpoints
    every_s: float = 180.0  # least seconds between two checkpoint writes
    progress: bool = False  # rich progress bar on rank 0
    on_unit: Callable[[int], None] | None = None  # called after each finished unit (tests interrupt here)
    units_done: list[int] = field(default_factory=list)  # units computed (not resumed) in this run
    earlier_s: float = 0.0  # crafting seconds of the interrupted runs this one resumes
    started_at: float | None = None  # time.time() when this run began (wall clock: ranks are processes)

    def seconds(self) -> float | None:
        """Crafting seconds so far over every segment, or None when the start is unknown."""
        return None if self.started_at is None else self.earlier_s + max(time.time() - self.started_at, 0.0)


_CONTEXT: contextvars.ContextVar[CraftContext] = contextvars.ContextVar("craft_context", default=CraftContext())


def context() -> CraftContext:
    return _CONTEXT.get()


@contextlib.contextmanager
def crafting(ctx: CraftContext) -> Iterator[CraftContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def unit_generator(seed: int, unit: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one unit of work: a function of (seed, unit) only."""
    return torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(unit) * 7_919) % 2**63)


# ------------------------------------------------------------------------ checkpoint


class Checkpoint:
    """Partial crafting state: the last finished unit, tensors and JSON-able extras.

    Written through a temporary file and a rename, so a kill leaves the previous
    checkpoint or the new one, never half of one. The file is removed once the store
    is written.

    On several ranks: per-rank state (the default) goes to one file per rank
    (``<stem>.rankN<suffix>``), and ``load`` resumes only when every rank's file holds
    the same unit. ``shared=True`` is for state every rank holds in full (the same
    tensors on each): rank 0 alone writes it, under the one-rank name, and ``load``
    broadcasts rank 0's copy to the others.
    """

    def __init__(self, path: Path | None, every_s: float = 180.0, shared: bool = False) -> None:
        self.rank, self.world = rank_world()
        self.shared = bool(shared)
        if path is not None and self.world > 1 and not self.shared:  # each rank keeps the state of its own shard
            path = Path(path).with_name(f"{Path(path).stem}.rank{self.rank}{Path(path).suffix}")
        self.path, self.every_s = (Path(path) if path else None), float(every_s)
        self._writer = not self.shared or self.rank == 0
        self._last = time.monotonic()

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(last finished unit, tensors, extras) or None when there is nothing to resume.

        On several ranks every rank calls it (it is collective) and every rank gets the
        same answer: the same unit, or None on all of them.
        """
        if self.path is None:  # the same on every rank: no collective needed
            return None
        if self.world == 1:
            return self._read()
        if self.shared:
            return _broadcast_state(self._read() if self.rank == 0 else None)
        found = self._read()
        units = torch.tensor([found[0] if found is not None else -1], dtype=torch.int64)
        everyone = gather(units, self.world)
        if bool((everyone == units).all()) and found is not None:
            return found
        if found is not None:  # the ranks stopped after different units: start over on all of them
            self.remove()
        return None

    def _read(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            tensors = load_file(str(self.path))
            with open(self.path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            meta = header.get("__metadata__") or {}
            if "sha256" in meta and meta["sha256"] != tensors_sha256(tensors):
                raise ValueError("content hash mismatch")
            return int(meta["unit"]), tensors, json.loads(meta.get("extras", "{}"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
            # A checkpoint is only an optimisation: an unreadable one is started over.
            self.path.unlink(missing_ok=True)
            return None

    def due(self) -> bool:
        """Whether ``every_s`` has passed since the last write (never without a path)."""
        return self.path is not None and self._writer and time.monotonic() - self._last >= self.every_s

    def save(self, unit: int, tensors: dict[str, torch.Tensor], extras: dict | None = None,
             force: bool = False) -> bool:
        """Write the state after ``unit`` if ``every_s`` has passed (or ``force``).

        A shared checkpoint is written by rank 0 only; the others return False."""
        if self.path is None or not self._writer or (not force and time.monotonic() - self._last < self.every_s):
            return False
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"unit": str(int(unit)), "extras": json.dumps(extras or {}, sort_keys=True),
                "sha256": tensors_sha256(cpu)}  # a flipped bit restarts the run instead of steering it
        spent = context().seconds()
        if spent is not None:
            meta["craft_s"] = repr(round(spent, 3))
        with atomic_path(self.path) as tmp:
            save_file(cpu, str(tmp), metadata=meta)
        self._last = time.monotonic()
        return True

    def remove(self) -> None:
        if self.path is not None and self._writer:
            self.path.unlink(missing_ok=True)


def crafting_seconds(path: Path) -> float:
    """The crafting seconds recorded by the checkpoint at ``path`` (or its rank-0 file
    when the run had several ranks): 0 when there is none or it cannot be read."""
    path = Path(path)
    for candidate in (path, path.with_name(f"{path.stem}.rank0{path.suffix}")):
        try:
            with open(candidate, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            seconds = float(header["__metadata__"]["craft_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return 0.0


def _broadcast_state(found: tuple[int, dict[str, torch.Tensor], dict] | None
                     ) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """Rank 0's checkpoint (or its None) on every rank: a JSON header, then each tensor."""
    rank, _ = rank_world()
    header = None
    if rank == 0 and found is not None:
        unit, tensors, extras = found
        header = {"unit": unit, "extras": extras,
                  "tensors": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]}
    header = broadcast_json(header)
    if header is None:
        return None
    tensors = found[1] if rank == 0 else {
        name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, dtype, shape in header["tensors"]}
    for name, _, _ in header["tensors"]:
        broadcast_(tensors[name])
    return int(header["unit"]), tensors, header["extras"]


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "opt") -> dict[str, torch.Tensor]:
    """The tensors of an optimizer's per-parameter state (momentum buffers, Adam moments)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{index}.{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           prefix: str = "opt") -> None:
    """Restore what ``optimizer_tensors`` wrote into a freshly built optimizer."""
    state = optimizer.state_dict()
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, index, key = name.split(".", 2)
            per_param.setdefault(int(index), {})[key] = value
    state["state"] = per_param
    optimizer.load_state_dict(state)


def module_tensors(module: torch.nn.Module, prefix: str = "model") -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "model") -> None:
    cut = len(prefix) + 1
    module.load_state_dict({k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})


# ---------------------------------------------------------------------- pixel space


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def project(delta: torch.Tensor, clean: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """δ moved into its ball of radius ``eps`` (pixel units) and into [-x, 1 - x]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.ndim - 1)))
        delta = delta * factor
    return (clean + delta).clamp(0.0, 1.0) - clean


def step(delta: torch.Tensor, grad: torch.Tensor, size: float, norm: str = "linf",
         descend: bool = False) -> torch.Tensor:
    """One PGD step: the gradient's sign (ℓ∞) or its unit direction (ℓ2), times ``size``."""
    if norm == "linf":
        direction = grad.sign()
    else:
        direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
    return delta - size * direction if descend else delta + size * direction


def random_start(shape: tuple[int, ...], eps: float, norm: str, generator: torch.Generator,
                 device: torch.device, kind: str = "uniform") -> torch.Tensor:
    """A random δ in the ball: uniform in the ℓ∞ box, or Gaussian scaled by eps (``randn``,
    the init of Geiping et al.'s forest, clipped afterwards by ``project``)."""
    if kind == "randn":
        return torch.randn(shape, generator=generator, device=device) * eps
    if norm == "linf":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * eps
    direction = torch.randn(shape, generator=generator, device=device)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, *([1] * (len(shape) - 1)))
    radius = torch.rand(shape[0], generator=generator, device=device).view(-1, *([1] * (len(shape) - 1)))
    return direction * radius * eps


# ------------------------------------------------------------------------- sharding


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _positions(n: int, block: int, rank: int, world: int) -> torch.Tensor:
    index = torch.arange(n)
    return index[(index // block) % world == rank]


def shard(n: int, block: int = 1) -> torch.Tensor:
    """The sample positions this rank crafts, ascending: the blocks of ``block``
    consecutive samples numbered rank, rank + world, …; with ``block`` 1, every
    world-th sample starting at its rank."""
    rank, world = rank_world()
    return _positions(n, max(int(block), 1), rank, world)


def _comm(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on a device the process group's backend takes (itself if it already is)."""
    backend = str(dist.get_backend()).lower()
    if tensor.device.type == "cuda":
        return tensor if "nccl" in backend else tensor.cpu()
    if "gloo" in backend or "mpi" in backend:
        return tensor
    return tensor.to(torch.device("cuda", torch.cuda.current_device()))


def gather(part: torch.Tensor, n: int, block: int = 1) -> torch.Tensor:
    """The full [n, ...] tensor from every rank's ``shard(n, block)`` rows.

    The rows travel as raw bytes, so any dtype arrives bit for bit."""
    rank, world = rank_world()
    if world == 1:
        return part
    rows = [_positions(n, max(int(block), 1), r, world) for r in range(world)]
    if part.shape[0] != rows[rank].numel():
        raise ValueError(f"rank {rank} holds {part.shape[0]} rows; its shard of {n} has {rows[rank].numel()}")
    full = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
    width = math.prod(part.shape[1:])
    if width == 0:
        return full
    as_bytes = part.detach().contiguous().reshape(part.shape[0], width).view(torch.uint8)
    padded = _comm(torch.zeros((max(r.numel() for r in rows), as_bytes.shape[1]), dtype=torch.uint8,
                               device=part.device))
    padded[: part.shape[0]] = as_bytes.to(padded.device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    for r, piece in enumerate(pieces):
        theirs = piece[: rows[r].numel()].view(part.dtype).reshape(rows[r].numel(), *part.shape[1:])
        full[rows[r].to(part.device)] = theirs.to(part.device)
    return full


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself on one rank)."""
    _, world = rank_world()
    if world == 1:
        return tensor
    out = _comm(tensor.detach().clone())
    dist.all_reduce(out)
    return out.to(tensor.device)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s copy; returns it."""
    _, world = rank_world()
    if world == 1:
        return tensor
    moved = _comm(tensor.detach()).contiguous()
    dist.broadcast(moved, src)
    if moved.data_ptr() != tensor.data_ptr():
        with torch.no_grad():
            tensor.copy_(moved)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` replaced by rank ``src``'s values, so
    replicas that train the same way cannot drift apart (non-deterministic kernels)."""
    if rank_world()[1] == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast_(tensor.data, src)


def broadcast_json(value, src: int = 0):
    """Rank ``src``'s JSON-able ``value`` on every rank (UTF-8 bytes in a uint8 tensor)."""
    rank, world = rank_world()
    if world == 1:
        return value
    data = json.dumps(value).encode() if rank == src else b""
    length = broadcast_(torch.tensor([len(data)], dtype=torch.int64), src)
    buffer = torch.zeros(int(length), dtype=torch.uint8)
    if rank == src:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    broadcast_(buffer, src)
    return json.loads(bytes(buffer.tolist()).decode())


# ------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """``advance(n=1, loss=None)`` for a rich bar with steps, loss and ETA (rank 0 only)."""
    rank, _ = rank_world()
    if not (context().progress or progress_bars.active()) or rank != 0:
        yield lambda n=1, loss=None: None
        return
    with progress_bars.bar(description, total, loss="-") as update:

        def advance(n: int = 1, loss: float | None = None) -> None:
            update(n, **({"loss": f"{loss:.4f}"} if loss is not None else {}))

        yield advance


def finish_unit(unit: int) -> None:
    """Record a computed unit and run the context's hook (tests interrupt a run here)."""
    ctx = context()
    ctx.units_done.append(unit)
    if ctx.on_unit is not None:
        ctx.on_unit(unit)
