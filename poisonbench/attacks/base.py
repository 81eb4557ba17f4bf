"""The attack extension point: ``ATTACKS`` maps a name to an ``Attack``.

An attack is a frozen hyperparameter dataclass (defaults = the paper's values) and a
``craft(imageset, params, seed, device) -> PoisonStore`` function. Attacks know
nothing of trainers or runners (STYLE.md, convention 4). ``craft_cached`` puts the
store under its content address, so equal configs share one file.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore, cache_path
from poisonbench.errors import ConfigError
from poisonbench.registry import Registry

CraftFn = Callable[[ImageSet, Any, int, torch.device], PoisonStore]


@dataclass(frozen=True)
class Attack:
    name: str
    params_type: type
    craft_fn: CraftFn
    version: int = 1  # bump when the algorithm changes: cached stores of older versions are not reused
    # Parameters of a smoke run (--fast-dev-run, registry tests): the same code path at a
    # tiny cost (a few steps, a tiny crafting model). Never used for a measurement.
    smoke: dict = dataclasses.field(default_factory=dict)

    def params(self, overrides: dict | None = None) -> Any:
        """The hyperparameters with ``overrides`` applied; unknown keys are an error."""
        overrides = dict(overrides or {})
        allowed = [f.name for f in dataclasses.fields(self.params_type)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} for attack {self.name!r}; allowed: {', '.join(allowed) or 'none'}")
        try:
            return self.params_type(**overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad parameters for attack {self.name!r}: {err}") from None

    def craft(self, imageset: ImageSet, params: dict | Any = None, seed: int = 0,
              device: str | torch.device = "cpu") -> PoisonStore:
        if not isinstance(params, self.params_type):
            params = self.params(params)
        if not 0 <= int(seed) < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {seed}")
        store = self.craft_fn(imageset, params, int(seed), torch.device(device))
        store.verify(imageset)  # an attack that breaks its own budget is a bug caught here
        return store


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str, params_type: type, version: int = 1,
                    smoke: dict | None = None) -> Callable[[CraftFn], CraftFn]:
    """Register ``craft_fn`` under ``name`` with its hyperparameter dataclass (and the
    parameters of its smoke run)."""

    def add(craft_fn: CraftFn) -> CraftFn:
        ATTACKS.register(name)(Attack(name, params_type, craft_fn, version, dict(smoke or {})))
        return craft_fn

    return add


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def craft_cached(name: str, imageset: ImageSet, params: dict | None, seed: int,
                 device: str | torch.device = "cpu", *, progress: bool = False,
                 checkpoint_every_s: float = 180.0) -> tuple[PoisonStore, float]:
    """Open the store for this exact (attack, params, base, seed) or craft and save it.

    An interrupted crafting run leaves ``<store>.partial.safetensors`` beside the store's
    path; the next call resumes from it. Returns the store and the seconds spent
    crafting (0 on a cache hit).
    """
    from poisonbench.attacks.crafting import CraftContext, crafting

    attack = ATTACKS.get(name)
    full = attack.params(params)
    path = cache_path(name, params_dict(full), imageset.name, imageset.fingerprint, seed, attack.version)
    if path.exists():
        return PoisonStore.open(path, imageset), 0.0
    partial = path.with_name(path.stem + ".partial.safetensors")
    start = time.perf_counter()
    with crafting(CraftContext(checkpoint=partial, every_s=checkpoint_every_s, progress=progress)):
        store = attack.craft(imageset, full, seed, device)
    seconds = time.perf_counter() - start
    store.save(path)
    from poisonbench import provenance
    from poisonbench.files import write_json

    device = torch.device(device)
    write_json(craft_cost_path(path), {"seconds": round(seconds, 3),
                                       "hardware": provenance.hardware(device.type).get("name")})
    return store, seconds


def craft_cost_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.stem + ".craft.json")


def craft_cost(store_path: Path | None) -> dict | None:
    """What crafting a cached store cost (seconds, hardware), recorded when it was made."""
    import json

    if store_path is None or not craft_cost_path(Path(store_path)).is_file():
        return None
    return json.loads(craft_cost_path(Path(store_path)).read_text())
