"""Crafting machinery shared by every attack that optimises its perturbations.

- Pixel-space steps: ``project`` keeps δ in its ℓ∞ or ℓ2 ball and x + δ in [0, 1];
  ``signed_step`` / ``l2_step`` are PGD's ascent or descent steps (Madry et al. 2018).
- Resumable work: an attack splits its work into numbered *units* (a chunk of images,
  a round of bi-level optimisation). Every unit draws its randomness from
  ``unit_generator(seed, unit)`` only, so a run that stops after unit k and resumes
  from the checkpoint of unit k computes exactly what an uninterrupted run does.
  ``Checkpoint`` writes the attack's partial state (tensors as safetensors, the rest
  as JSON metadata) atomically, at most every ``every_s`` seconds.
- Sharding: with ``torch.distributed`` initialised (one process per GPU), each rank
  crafts ``shard(n)`` of the samples and ``gather`` assembles the full perturbation
  once, at the end.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

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
    """

    def __init__(self, path: Path | None, every_s: float = 180.0) -> None:
        rank, world = rank_world()
        if path is not None and world > 1:  # each rank keeps the state of its own shard
            path = Path(path).with_name(f"{Path(path).stem}.rank{rank}{Path(path).suffix}")
        self.path, self.every_s = (Path(path) if path else None), float(every_s)
        self._last = time.monotonic()

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(last finished unit, tensors, extras) or None when there is nothing to resume."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            tensors = load_file(str(self.path))
            with open(self.path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            meta = header.get("__metadata__") or {}
            return int(meta["unit"]), tensors, json.loads(meta.get("extras", "{}"))
        except (OSError, ValueError, KeyError, RuntimeError):
            # A checkpoint is only an optimisation: an unreadable one is started over.
            self.path.unlink(missing_ok=True)
            return None

    def save(self, unit: int, tensors: dict[str, torch.Tensor], extras: dict | None = None,
             force: bool = False) -> bool:
        """Write the state after ``unit`` if ``every_s`` has passed (or ``force``)."""
        if self.path is None or (not force and time.monotonic() - self._last < self.every_s):
            return False
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"unit": str(int(unit)), "extras": json.dumps(extras or {}, sort_keys=True)}
        with atomic_path(self.path) as tmp:
            save_file(cpu, str(tmp), metadata=meta)
        self._last = time.monotonic()
        return True

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


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


def shard(n: int) -> torch.Tensor:
    """The sample positions this rank crafts: every world-th one, starting at its rank."""
    rank, world = rank_world()
    return torch.arange(rank, n, world)


def gather(part: torch.Tensor, n: int) -> torch.Tensor:
    """The full [n, ...] tensor from every rank's ``shard(n)`` rows (once, at the end)."""
    rank, world = rank_world()
    if world == 1:
        return part
    size = -(-n // world)
    padded = torch.zeros((size, *part.shape[1:]), dtype=part.dtype, device=part.device)
    padded[: part.shape[0]] = part
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    full = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
    for r, piece in enumerate(pieces):
        rows = torch.arange(r, n, world)
        full[rows] = piece[: rows.numel()]
    return full


# ------------------------------------------------------------------------- progress


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """``advance(n=1, loss=None)`` for a rich bar with steps, loss and ETA (rank 0 only)."""
    rank, _ = rank_world()
    if not context().progress or rank != 0:
        yield lambda n=1, loss=None: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, loss="-")

        def advance(n: int = 1, loss: float | None = None) -> None:
            bar.update(task, advance=n, **({"loss": f"{loss:.4f}"} if loss is not None else {}))

        yield advance


def finish_unit(unit: int) -> None:
    """Record a computed unit and run the context's hook (tests interrupt a run here)."""
    ctx = context()
    ctx.units_done.append(unit)
    if ctx.on_unit is not None:
        ctx.on_unit(unit)
