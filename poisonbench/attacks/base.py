"""The attack extension point: ``ATTACKS`` maps a name to an ``Attack``.

An attack is a frozen hyperparameter dataclass (defaults = the paper's values) and a
``craft(imageset, params, seed, device) -> PoisonStore`` function. Attacks know
nothing of trainers or runners (STYLE.md, convention 4). ``craft_cached`` puts the
store under its content address, so equal configs share one file.

Several devices. ``Attack.craft`` and ``craft_cached`` take one device or a list
(``["cuda:0", "cuda:1"]``, ``"cpu,cpu"``): one rank per device, started by
``distributed.run_ranks``; the caller alone gets the store, verifies it, and (in
``craft_cached``) writes it and its ``.craft.json`` cost record (seconds, hardware,
ranks). How an attack uses the ranks is declared when it is registered (``ranks``):

- ``one`` (the default): it does not shard; given several devices it crafts on the
  first one alone, so the store is the one-device store.
- ``invariant``: its ranks share the work and the store does not depend on how many
  there are (``error_minimizing`` and the chunked-PGD attacks: each rank computes
  whole batches of the one-rank run with their own random streams, on rank 0's
  model; tests/test_distributed_crafting.py checks 2 ranks against 1). So the cache
  key is the one-device key, and a job on one GPU finds a store crafted on eight.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from poisonbench.attacks.distributed import DeviceSpec, parse_devices, run_ranks
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore, cache_path
from poisonbench.errors import ConfigError
from poisonbench.params import parse_params
from poisonbench.registry import Registry

CraftFn = Callable[[ImageSet, Any, int, torch.device], PoisonStore]
RANKS = ("one", "invariant")  # how an attack uses several devices (module docstring)


@dataclass(frozen=True)
class Attack:
    name: str
    params_type: type
    craft_fn: CraftFn
    version: int = 1  # bump when the algorithm changes: cached stores of older versions are not reused
    # Parameters of a smoke run (--fast-dev-run, registry tests): the same code path at a
    # tiny cost (a few steps, a tiny crafting model). Never used for a measurement.
    smoke: dict = dataclasses.field(default_factory=dict)
    ranks: str = "one"  # one | invariant: how it uses several devices (module docstring)

    def __post_init__(self) -> None:
        if self.ranks not in RANKS:
            raise ValueError(f"attack {self.name!r}: ranks must be one of {', '.join(RANKS)}, got {self.ranks!r}")

    def devices(self, device: DeviceSpec = "cpu") -> list[torch.device]:
        """The devices this attack crafts on for ``device`` (one, a list, or ``cuda:0,cuda:1``):
        all of them when it shards, else the first."""
        devices = parse_devices(device)
        return devices if self.ranks != "one" else devices[:1]

    def params(self, overrides: dict | None = None) -> Any:
        """The hyperparameters with ``overrides`` applied, checked by the shared checker
        (unknown keys, types, each field's declared range)."""
        return parse_params(self.params_type, overrides, f"attack {self.name!r}", "attack_params")

    def craft(self, imageset: ImageSet, params: dict | Any = None, seed: int = 0,
              device: DeviceSpec = "cpu") -> PoisonStore:
        """The store for (params, seed), crafted on ``device``: one device, or several
        (one rank each, see ``devices``)."""
        if not isinstance(params, self.params_type):
            params = self.params(params)
        if not 0 <= int(seed) < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {seed}")
        devices = self.devices(device)
        if len(devices) == 1:
            store = self.craft_fn(imageset, params, int(seed), devices[0])
        else:
            store = run_ranks(self.craft_fn, devices, imageset, params, int(seed))
        store.verify(imageset)  # an attack that breaks its own budget is a bug caught here
        return store


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str, params_type: type, version: int = 1,
                    smoke: dict | None = None, ranks: str = "one") -> Callable[[CraftFn], CraftFn]:
    """Register ``craft_fn`` under ``name`` with its hyperparameter dataclass (the
    parameters of its smoke run, and how it uses several devices: ``ranks``)."""

    def add(craft_fn: CraftFn) -> CraftFn:
        ATTACKS.register(name)(Attack(name, params_type, craft_fn, version, dict(smoke or {}), ranks))
        return craft_fn

    return add


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def craft_cached(name: str, imageset: ImageSet, params: dict | None, seed: int,
                 device: DeviceSpec = "cpu", *, progress: bool = False,
                 checkpoint_every_s: float = 180.0) -> tuple[PoisonStore, float]:
    """Open the store for this exact (attack, params, base, seed) or craft and save it.

    ``device``: one device, or several as one rank each (``["cuda:0", "cuda:1"]``,
    ``"cpu,cpu"``; the store, and so its cache key, is the one-device store). An
    interrupted crafting run leaves ``<store>.partial.safetensors`` (one
    ``.partial.rankN`` file per rank for per-rank state) beside the store's path; the
    next call resumes from it. Returns the store and the seconds spent crafting (0 on a
    cache hit).
    """
    from poisonbench.attacks.crafting import CraftContext, crafting
    from poisonbench.attacks.distributed import describe_devices

    attack = ATTACKS.get(name)
    full = attack.params(params)
    devices = attack.devices(device)
    world = len(devices)
    path = cache_path(name, params_dict(full), imageset.name, imageset.fingerprint, seed, attack.version)
    if path.exists():
        return PoisonStore.open(path, imageset), 0.0
    partial = path.with_name(path.stem + ".partial.safetensors")
    start = time.perf_counter()
    with crafting(CraftContext(checkpoint=partial, every_s=checkpoint_every_s, progress=progress)):
        store = attack.craft(imageset, full, seed, devices)
    seconds = time.perf_counter() - start
    store.save(path)
    for leftover in path.parent.glob(path.stem + ".partial*.safetensors"):  # per-rank files a crash left
        leftover.unlink(missing_ok=True)
    from poisonbench.files import write_json

    write_json(craft_cost_path(path), {"seconds": round(seconds, 3), "hardware": describe_devices(devices),
                                       "ranks": world})
    return store, seconds


def craft_cost_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.stem + ".craft.json")


def craft_cost(store_path: Path | None) -> dict | None:
    """What crafting a cached store cost (seconds, hardware), recorded when it was made."""
    import json

    if store_path is None or not craft_cost_path(Path(store_path)).is_file():
        return None
    return json.loads(craft_cost_path(Path(store_path)).read_text())
