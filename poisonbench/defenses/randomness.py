"""Seeded random streams for the per-batch and per-step defenses.

Each draw of a defense comes from a stream named by its keys only (the defense's name,
its ``seed``, and a rank and a call count where it needs them), never from the global
RNG: a run is reproducible, the draws do not shift the data order or the model's
initialisation, and a stream keyed without the rank is the same on every DDP rank.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from poisonbench.attacks.crafting import rank_world


def stream_seed(*keys: object) -> int:
    """A 63-bit seed that is a function of ``keys`` only (their ``str``), stable across
    processes and machines (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(key) for key in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def torch_stream(device: torch.device | str, *keys: object) -> torch.Generator:
    """A torch generator on ``device`` seeded by ``keys``."""
    return torch.Generator(device=device).manual_seed(stream_seed(*keys))


def numpy_stream(*keys: object) -> np.random.Generator:
    """A NumPy generator seeded by ``keys`` (for scalar draws torch cannot seed, e.g. Beta)."""
    return np.random.default_rng(stream_seed(*keys))


class BatchDraws:
    """Mixin of a per-batch defense: the keys of each batch's stream, (its name, its
    ``seed``, the DDP rank, the batches it has handled so far), so each rank draws its
    own and a run is reproducible rank by rank. The count travels in a training
    checkpoint (``state_dict``), so a resumed run goes on drawing where it stopped."""

    calls: int = 0  # batches handled (per instance once the first one is drawn)

    def batch_keys(self, name: str, seed: int) -> tuple:
        rank, _ = rank_world()
        keys = (name, seed, rank, self.calls)
        self.calls += 1
        return keys

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state) -> None:
        self.calls = int(state.get("calls", 0))
