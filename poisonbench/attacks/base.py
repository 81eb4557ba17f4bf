"""The attack extension point: ``ATTACKS`` maps a name to an ``Attack``.

An attack is a frozen hyperparameter dataclass (defaults = the paper's values) and a
``craft(imageset, params, seed, device) -> PoisonStore`` function. Attacks know
nothing of trainers or runners (STYLE.md, convention 4). ``craft_cached`` puts the
store under its content address, so equal configs share one file.

Several devices. ``Attack.craft`` and ``craft_cached`` take one device or a list
(``["cuda:0", "cuda:1"]``, ``"cpu,cpu"``): one rank per device, started by
``distributed.run_ranks``; the caller alone gets the store, verifies it, and (in
``craft_cached``, through ``poisonbench.artifacts``) writes it and its ``.cost.json`` record (seconds, hardware,
ranks). How an attack uses the ranks is declared when it is registered (``ranks``):

- ``one`` (the default): it does not shard; given several devices it crafts on the
  first one alone, so the store is the one-device store.
- ``invariant``: its ranks share the work and the store does not depend on how many
  there are (``error_minimizing`` and the chunked-PGD attacks: each rank computes
  whole batches of the one-rank run with their own random streams, on rank 0's
  model; tests/test_distributed_crafting.py checks 2 ranks against 1). So the cache
  key is the one-device key, and a job on one GPU finds a store crafted on eight.
- ``summed``: its ranks share the work of each step and add their parts with
  ``crafting.reduce_sum`` (``gradient_matching``: each rank differentiates a slice of
  the poisons, the parameter gradients are summed over the ranks). The store is the
  one-device store up to the order of floating-point additions, not bit for bit: signed
  Adam turns a gradient entry within rounding of zero into a whole step, so over a long
  craft the pixels drift apart at the same loss. Its key therefore names the rank count
  when there are several: the same command gives the same store, and a one-device job
  never reads a store that one device would not have made. An attack may give a ``prepare(inp, params)`` that
  the caller runs on the first device before the ranks start (gradient matching trains
  its surrogate there, once, so that every rank reads the same cached model).

What its stores may claim is declared too, and ``check_store`` holds every store to it
(on every cache hit and after every craft): the store's attack, params, seed, dataset
and base are the ones asked for; its budget is the one its params give (``budget``:
the ``eps`` param as an ℓ∞ radius, or with ``norm="l2"`` the image radius
sqrt(C·H·W)·eps, the shortcuts paper's §3.2 convention; an attack without that param
changes nothing); and a clean-label attack (``keeps_labels``, the default) keeps every
label. A cached store that fails any check is not used: it is crafted again.

Integrity attacks (the robuster paper; ``integrity=True``) attack a trial's target.
Their craft function is ``craft(inp: AttackInput, params) -> PoisonStore``: the input
carries the training set, the seed and device, the test split, the trial's ``Target``
and what the attacker knows of the victim (``VictimSpec``). Their stores carry the
target (``target_index``, ``target_label``, ``test_fingerprint``; a patch also its
``trigger``), change only the target's poison images, and are cached under a key that
adds the target (and the victim, for an attack whose surrogate imitates it:
``victim="recipe"``). ``targets`` says how many test images of the target class a
trial draws for the attack (None: all of them, as backdoor success is measured).

Adaptive attacks (robuster §5.1: "all attacks shown are adaptive, if possible";
``victim="adaptive"``): the attacker trains its surrogate with the victim's defense.
Attacks sit below defenses, so the job hands the defense over as ``AttackInput.defense``
(a ``VictimDefense``: its name, params and a factory of fresh ``TrainingHooks``, so the
surrogate's defense state is not the victim's), present only when the defense acts
inside training (a filter or a replaced network leaves a surrogate as it is). The
store's key then adds the defense (``VictimSpec.key(defense=True)``): an undefended and
a defended column craft against their own surrogates, on the same target (drawn from
the poison seed alone). An attack's ``adaptive`` param (default: on, the authors'
``adaptive_attack``) turns it off; it is not part of the store's params
(``VICTIM_PARAMS``): its effect is the victim part of the key, so an undefended store is
one store whatever the flag says, under the key it had before the flag existed.
Availability attacks keep ``craft(imageset, params, seed, device)``, their stores and
their cache keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from poisonbench.artifacts import CorruptArtifact, cost_path, get_or_make
from poisonbench.attacks.distributed import DeviceSpec, parse_devices, run_ranks
from poisonbench.data.imageset import ImageSet
from poisonbench.data.store import PoisonStore, cache_path
from poisonbench.data.targets import Target, draw_target, poison_count
from poisonbench.errors import ConfigError, PoisonStoreError
from poisonbench.files import canonical_json
from poisonbench.fitting.victim import TrainingHooks
from poisonbench.params import parse_params
from poisonbench.registry import Registry

log = logging.getLogger(__name__)

CraftFn = Callable[[ImageSet, Any, int, torch.device], PoisonStore]
RANKS = ("one", "invariant", "summed")  # how an attack uses several devices (module docstring)
BUDGET_NORMS = ("linf", "l2", "l0")  # the ball of an attack's budget param (module docstring)
VICTIM_USES = ("none", "recipe", "adaptive")  # what of the victim an integrity attack's store depends on
# Params that say what of the victim an attack uses, not how it crafts: the victim part of
# the store's key carries their effect, so they stay out of the store's params and key.
VICTIM_PARAMS = ("adaptive",)
# Keys of a training mapping that say where it runs, not what it computes: not in victim keys.
EXECUTION_KEYS = ("accelerator", "devices", "strategy", "eval_every")


@dataclass(frozen=True)
class VictimSpec:
    """What an adaptive or transfer attacker knows of the victim: its model, its training
    recipe (the job's ``train`` mapping), scenario, defense and base model (its settings
    as written, with the defense that ``defense: job`` stood for where there is one: a
    defended job's base model is another network)."""

    model: str
    model_params: dict
    train: dict
    scenario: str = "scratch"
    defense: str = "none"
    defense_params: dict = dataclasses.field(default_factory=dict)
    base_model: dict | None = None

    def key(self, defense: bool = True) -> dict:
        """JSON-able, hashed into store keys; without the defense for an attack whose
        surrogate does not train with it (its store then serves every defense column)."""
        train = {k: v for k, v in self.train.items() if k not in EXECUTION_KEYS}
        out = {"model": self.model, "model_params": self.model_params, "train": train,
               "scenario": self.scenario, "base_model": self.base_model}
        if defense:
            out.update(defense=self.defense, defense_params=self.defense_params)
        return out


@dataclass(frozen=True)
class VictimDefense:
    """The victim's defense as an adaptive attacker trains its surrogate with it: the
    name and params (what the key records) and ``hooks``, a factory of fresh
    ``TrainingHooks`` objects (the job builds them: attacks import no defense)."""

    name: str
    params: dict
    hooks: Callable[[], TrainingHooks]

    def key(self) -> dict:
        return {"defense": self.name, "defense_params": self.params}


@dataclass(frozen=True)
class AttackInput:
    """Everything an attack may use (integrity attacks take it whole)."""

    train: ImageSet
    seed: int
    device: DeviceSpec = "cpu"
    test: ImageSet | None = None
    target: Target | None = None
    victim: VictimSpec | None = None
    # The weights file of the victim's base model (finetune, transfer): the paper's
    # attacker knows it and crafts on it. Not part of a store's key: ``victim.base_model``
    # (what makes the file) is, so an attack that reads it declares victim="recipe" or
    # "adaptive" (else one store would serve base models trained with other defenses).
    base_weights: Path | None = None
    # The victim's defense where it acts inside training (None: none, or one that does
    # not): an adaptive attack's surrogate trains with it (module docstring).
    defense: VictimDefense | None = None


IntegrityCraftFn = Callable[[AttackInput, Any], PoisonStore]


@dataclass(frozen=True)
class Attack:
    name: str
    params_type: type
    craft_fn: CraftFn
    version: int = 1  # bump when the algorithm changes: cached stores of older versions are not reused
    # Parameters of a smoke run (--fast-dev-run, registry tests): the same code path at a
    # tiny cost (a few steps, a tiny crafting model). Never used for a measurement.
    smoke: dict = dataclasses.field(default_factory=dict)
    ranks: str = "one"  # one | invariant | summed: how it uses several devices (module docstring)
    norm: str = "linf"  # the ball of its budget param: linf | l2 (module docstring, ``budget``)
    budget_param: str = "eps"  # the param that is its budget; absent from its params: it changes nothing
    keeps_labels: bool = True  # clean-label: its stores keep every training label
    integrity: bool = False  # craft(inp: AttackInput, params) against inp.target (module docstring)
    victim: str = "none"  # none | recipe | adaptive: what of inp.victim (and inp.defense) its store depends on
    targets: int | None = 1  # test images of the target class a trial draws for it (None: all, up to 1000)
    # Run by the caller on the first device before several ranks start (module docstring).
    prepare: Callable[[Any, Any], None] | None = None

    def __post_init__(self) -> None:
        if self.ranks not in RANKS:
            raise ValueError(f"attack {self.name!r}: ranks must be one of {', '.join(RANKS)}, got {self.ranks!r}")
        if self.norm not in BUDGET_NORMS:
            raise ValueError(f"attack {self.name!r}: norm must be one of {', '.join(BUDGET_NORMS)}, got {self.norm!r}")
        if self.victim not in VICTIM_USES:
            raise ValueError(f"attack {self.name!r}: victim must be one of {', '.join(VICTIM_USES)}, got {self.victim!r}")

    def budget(self, params: Any, image_shape: tuple[int, ...]) -> tuple[str, float]:
        """The (norm, eps) its stores must declare for ``params`` on images of ``image_shape``
        (C, H, W): the budget param as an ℓ∞ radius, or the ℓ2 image radius sqrt(C·H·W)·eps."""
        if not hasattr(params, self.budget_param):
            return "none", 0.0
        eps = float(getattr(params, self.budget_param))
        if self.norm == "l2":
            return "l2", math.sqrt(math.prod(image_shape)) * eps
        return self.norm, eps  # linf: a radius in pixels; l0: a pixel count

    def devices(self, device: DeviceSpec = "cpu") -> list[torch.device]:
        """The devices this attack crafts on for ``device`` (one, a list, or ``cuda:0,cuda:1``):
        all of them when it shards, else the first."""
        devices = parse_devices(device)
        return devices if self.ranks != "one" else devices[:1]

    def params(self, overrides: dict | None = None) -> Any:
        """The hyperparameters with ``overrides`` applied, checked by the shared checker
        (unknown keys, types, each field's declared range)."""
        return parse_params(self.params_type, overrides, f"attack {self.name!r}", "attack_params")

    def craft(self, imageset: ImageSet | AttackInput, params: dict | Any = None, seed: int | None = None,
              device: DeviceSpec | None = None) -> PoisonStore:
        """The store for (params, seed), crafted on ``device``: one device, or several
        (one rank each, see ``devices``). ``imageset`` may be an ``AttackInput`` (an
        integrity attack needs one); ``seed`` and ``device`` then default to its own (else
        to 0 and the CPU)."""
        if not isinstance(params, self.params_type):
            params = self.params(params)
        if seed is None and not isinstance(imageset, AttackInput):
            seed = 0
        inp = self.input(imageset, seed, device)
        if self.integrity:
            devices = self.devices(inp.device)
            if len(devices) == 1:
                store = self.craft_fn(dataclasses.replace(inp, device=devices[0]), params)
            else:
                if self.prepare is not None:
                    self.prepare(dataclasses.replace(inp, device=devices[0]), params)
                store = run_ranks(_craft_integrity, devices, self.craft_fn, inp, params)
            store.verify(inp.train, inp.test)
            check_store(store, self, params, inp.seed, inp.train, inp.target)
            return store
        imageset, seed, device = inp.train, inp.seed, inp.device
        devices = self.devices(device)
        if len(devices) == 1:
            store = self.craft_fn(imageset, params, int(seed), devices[0])
        else:
            store = run_ranks(self.craft_fn, devices, imageset, params, int(seed))
        store.verify(imageset)  # an attack that breaks its own budget is a bug caught here
        check_store(store, self, params, seed, imageset)  # and so is one that breaks its declaration
        return store

    def input(self, data: ImageSet | AttackInput, seed: int | None = None,
              device: DeviceSpec | None = None) -> AttackInput:
        """``data`` as an ``AttackInput`` (``seed``/``device`` given here override its own),
        checked for what this attack needs."""
        if isinstance(data, AttackInput):
            inp = data
            if seed is not None:
                inp = dataclasses.replace(inp, seed=int(seed))
            if device is not None:
                inp = dataclasses.replace(inp, device=device)
        else:
            if seed is None:
                raise ConfigError(f"attack {self.name!r} needs a seed")
            inp = AttackInput(data, int(seed), "cpu" if device is None else device)
        if not 0 <= int(inp.seed) < 2**32:
            raise ConfigError(f"seed must lie in [0, 2**32), got {inp.seed}")
        if self.integrity:
            if inp.target is None:
                raise ConfigError(f"attack {self.name!r} is an integrity attack: it needs a trial's target")
            if inp.test is not None and inp.test.fingerprint != inp.target.test_fingerprint:
                raise ConfigError(f"the target of attack {self.name!r} was drawn from another test split than the one given")
        if inp.defense is not None:
            victim = inp.victim
            if victim is None or (victim.defense, victim.defense_params) != (inp.defense.name, inp.defense.params):
                raise ConfigError(f"attack {self.name!r} was given the hooks of defense {inp.defense.name!r}, "
                                  f"but its victim is defended by {victim.defense if victim else 'nothing'!r}")
        return inp

    def adapts(self, params: Any = None) -> bool:
        """Whether, with ``params``, this attack trains its surrogate with the victim's
        defense: declared ``victim="adaptive"``, and its ``adaptive`` param (if any) on."""
        return self.victim == "adaptive" and bool(getattr(params, "adaptive", True))

    def cache_context(self, inp: AttackInput, params: Any = None) -> dict | None:
        """What an integrity attack's store depends on besides (params, base, seed): the
        target; the victim where its surrogate imitates it; and the victim's defense where
        the surrogate trains with it (``adapts(params)`` and the input carries it)."""
        if not self.integrity:
            return None
        context = {"target": inp.target.key()}
        if self.victim != "none" and inp.victim is not None:
            context["victim"] = inp.victim.key(defense=self.adapts(params) and inp.defense is not None)
        files = file_digests(params)
        if files:  # a file a param names (a trigger image) keys by its content, not its path alone
            context["files"] = files
        return context

    def draw_target(self, train: ImageSet, test: ImageSet, seed: int, params: Any) -> Target:
        """The trial's target for this attack: its poison budget (``params.budget``) and
        its number of target images (``targets``)."""
        if not hasattr(params, "budget"):
            raise ConfigError(f"attack {self.name!r} has no poison budget parameter")
        return draw_target(train, test, seed, float(params.budget), targets=self.targets)


def _craft_integrity(craft_fn: IntegrityCraftFn, inp: AttackInput, params: Any, device: torch.device) -> PoisonStore:
    """One rank of an integrity attack's craft (``run_ranks`` adds the rank's device)."""
    return craft_fn(dataclasses.replace(inp, device=device), params)


def file_digests(params: Any) -> dict[str, str]:
    """sha256 of every existing file named by a ``*_file`` param of ``params``."""
    if params is None or not dataclasses.is_dataclass(params):
        return {}
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if f.name.endswith("_file") and isinstance(value, str) and Path(value).expanduser().is_file():
            out[f.name] = hashlib.sha256(Path(value).expanduser().read_bytes()).hexdigest()
    return out


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(name: str, params_type: type, version: int = 1,
                    smoke: dict | None = None, ranks: str = "one", norm: str = "linf",
                    budget_param: str = "eps", keeps_labels: bool = True, integrity: bool = False,
                    victim: str = "none", targets: int | None = 1,
                    prepare: Callable[[Any, Any], None] | None = None) -> Callable[[CraftFn], CraftFn]:
    """Register ``craft_fn`` under ``name`` with its hyperparameter dataclass (the
    parameters of its smoke run, how it uses several devices: ``ranks``, and what its
    stores may change: ``norm``, ``budget_param``, ``keeps_labels``). ``integrity``: its
    craft function is ``craft(inp: AttackInput, params)`` (module docstring), its store
    depends on ``victim`` of the input, and a trial draws ``targets`` target images.
    ``prepare``: run by the caller before several ranks start (module docstring)."""

    def add(craft_fn: CraftFn) -> CraftFn:
        ATTACKS.register(name)(Attack(name, params_type, craft_fn, version, dict(smoke or {}), ranks,
                                      norm, budget_param, bool(keeps_labels), bool(integrity), victim, targets,
                                      prepare))
        return craft_fn

    return add


def params_dict(params: Any) -> dict:
    """The params a store records and is keyed by: all but ``VICTIM_PARAMS``."""
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in VICTIM_PARAMS}


def check_store(store: PoisonStore, attack: Attack, params: Any, seed: int, imageset: ImageSet,
                target: Target | None = None) -> None:
    """Raise PoisonStoreError unless ``store`` is what ``attack`` with ``params`` and ``seed``
    makes on ``imageset`` (and, for an integrity attack, against ``target``), as far as its
    metadata and labels tell: what was asked for, not what the file says (a store copied
    onto another key's path, a declared budget that is not its params', labels a
    clean-label attack does not change, another trial's target)."""
    where = f"poison store {store.path}" if store.path else "poison store"
    asked = {"attack": attack.name, "params": params_dict(params), "seed": int(seed),
             "dataset": imageset.name, "base_fingerprint": imageset.fingerprint}
    held = {"attack": store.attack, "params": store.params, "seed": store.seed,
            "dataset": store.dataset, "base_fingerprint": store.base_fingerprint}
    for key, want in asked.items():
        if canonical_json(held[key]) == canonical_json(want):
            continue
        if key == "params":
            names = sorted(k for k in {*want, *held[key]} if want.get(k, "?") != held[key].get(k, "?"))
            raise PoisonStoreError(f"{where} holds {attack.name} params that differ from those asked for in {', '.join(names)}")
        raise PoisonStoreError(f"{where} holds {key} {held[key]!r}, not the {want!r} asked for")
    norm, eps = attack.budget(params, tuple(imageset.images.shape[1:]))
    if store.norm != norm or not math.isclose(store.eps, eps, rel_tol=1e-9, abs_tol=0.0):
        def show(n: str, e: float) -> str:  # an l0 budget is a pixel count, the others pixel levels
            return f"{n} {e:g} pixels" if n == "l0" else f"{n} {e * 255:.4g}/255"
        raise PoisonStoreError(f"{where} declares budget {show(store.norm, store.eps)}, but {attack.name} "
                               f"with its params has {show(norm, eps)}")
    if attack.integrity:
        _check_target(store, attack, params, imageset, target, where)
    if attack.keeps_labels and store.index.numel():
        changed = int((store.labels != imageset.labels[store.index]).sum())
        if changed:
            raise PoisonStoreError(f"{where} changes {changed} labels, but {attack.name} is a clean-label attack")


def _check_target(store: PoisonStore, attack: Attack, params: Any, imageset: ImageSet,
                  target: Target | None, where: str) -> None:
    """An integrity store attacks its trial's target with the poisons its budget allows."""
    held = store.target
    if held is None:
        raise PoisonStoreError(f"{where} is a {attack.name} store without targets (target_index, target_label)")
    if hasattr(params, "budget") and store.index.numel() > poison_count(float(params.budget), len(imageset)):
        raise PoisonStoreError(f"{where} changes {store.index.numel()} images, more than {attack.name}'s budget "
                               f"{params.budget:g} of {len(imageset)} allows")
    if target is not None:
        problem = held.mismatch(target)
        if problem:
            raise PoisonStoreError(f"{where} attacks another trial's target: its {problem} differ from those asked for")


def check_declared(store: PoisonStore, imageset: ImageSet, target: Target | None = None) -> PoisonStore:
    """``check_store`` against what the store itself names (a store given by path, not
    by a cache key): a registered attack's declared budget and labels (and an integrity
    store's target, against ``target`` when given). A store of an attack this
    poisonbench does not know is held to its own verified budget alone."""
    if store.attack not in ATTACKS:
        return store
    attack = ATTACKS.get(store.attack)
    try:
        params = attack.params(store.params)
    except ConfigError as err:
        raise PoisonStoreError(f"poison store {store.path} holds params that {attack.name} does not take ({err})") from None
    check_store(store, attack, params, store.seed, imageset, target)
    return store


def craft_cached(name: str, imageset: ImageSet | AttackInput, params: dict | None, seed: int | None = None,
                 device: DeviceSpec | None = None, *, progress: bool = False,
                 checkpoint_every_s: float = 180.0) -> tuple[PoisonStore, float]:
    """Open the store for this exact (attack, params, base, seed) or craft and save it.

    ``imageset`` may be an ``AttackInput`` (an integrity attack needs one: its key adds
    the target, and the victim where its store depends on it); ``seed`` and ``device``
    then default to the input's.

    ``device``: one device, or several as one rank each (``["cuda:0", "cuda:1"]``,
    ``"cpu,cpu"``; the key is the one-device key unless the attack's ranks are ``summed``). An
    interrupted crafting run leaves ``<store>.partial.safetensors`` (one
    ``.partial.rankN`` file per rank for per-rank state) beside the store's path; the
    next call resumes from it. Returns the store and the seconds spent crafting (0 on a
    cache hit).
    """
    from poisonbench.attacks.crafting import CraftContext, crafting, crafting_seconds
    from poisonbench.attacks.distributed import describe_devices

    attack = ATTACKS.get(name)
    full = attack.params(params)
    inp = attack.input(imageset, seed, device)
    imageset, seed = inp.train, inp.seed
    devices = attack.devices(inp.device)
    context = attack.cache_context(inp, full)
    if attack.ranks == "summed" and len(devices) > 1:  # not the one-device store bit for bit
        context = {**(context or {}), "ranks": len(devices)}
    path = cache_path(name, params_dict(full), imageset.name, imageset.fingerprint, seed, attack.version, context)
    partial = path.with_name(path.stem + ".partial.safetensors")

    def load(entry: Path) -> PoisonStore:
        try:
            store = PoisonStore.open(entry, imageset, inp.test if attack.integrity else None)
            check_store(store, attack, full, seed, imageset, inp.target)
        except PoisonStoreError as err:  # a cache entry is derived data: make it again
            raise CorruptArtifact(f"{err}; crafting it again") from None
        craft_cost(entry)  # a bad cost record is named now, not after training
        return store

    def make(_entry: Path) -> PoisonStore:
        nonlocal earlier  # read under the entry's lock: a killed maker's last checkpoint counts
        earlier = crafting_seconds(partial)
        ctx = CraftContext(checkpoint=partial, every_s=checkpoint_every_s, progress=progress,
                           earlier_s=earlier, started_at=time.time())
        with crafting(ctx):
            return attack.craft(inp if attack.integrity else imageset, full, seed, devices)

    def save(store: PoisonStore, tmp: Path) -> None:
        save_file(store.tensors(), str(tmp), metadata=store.metadata())

    # Seconds the interrupted runs before this one spent, as their last checkpoint recorded.
    earlier = 0.0
    made = get_or_make(path, load=load, make=make, save=save, earlier_s=lambda: earlier,
                       describe=lambda: {"hardware": describe_devices(devices), "ranks": len(devices),
                                         "resumed_s": round(earlier, 3),
                                         "store_sha256": PoisonStore.read_metadata(path)["content_sha256"]})
    made.value.path = path
    if not made.cached:
        for leftover in path.parent.glob(path.stem + ".partial*.safetensors"):  # per-rank files a crash left
            leftover.unlink(missing_ok=True)
    return made.value, made.seconds


def craft_cost_path(store_path: Path) -> Path:
    """The store's cost record: the artifact helper's, beside it."""
    return cost_path(store_path)


def craft_cost(store_path: Path | None) -> dict | None:
    """What crafting a cached store cost (seconds, hardware), recorded when it was made.

    A record that is unreadable, malformed or made for another store is not used: the
    warning names it and the command that removes it, and the answer is None (it is a
    measurement, so it cannot be rebuilt; a missing cost never fails a finished job).
    """
    if store_path is None:
        return None
    record = craft_cost_path(Path(store_path))
    if not record.is_file():
        return None
    try:
        cost = json.loads(record.read_text())
        problem = _cost_problem(cost, Path(store_path))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"is not readable JSON ({err})"
    if problem:
        log.warning("crafting cost record %s %s; it is ignored (remove it: rm %s)", record, problem, record)
        return None
    return cost


def _cost_problem(cost: Any, store_path: Path) -> str | None:
    """What is wrong with a store's cost record, or None."""
    if not isinstance(cost, dict):
        return f"is a JSON {type(cost).__name__}, not an object"
    seconds = cost.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return f"has seconds {seconds!r}, not a finite number of seconds"
    if not isinstance(cost.get("hardware"), str):
        return f"has hardware {cost.get('hardware')!r}, not a text"
    if "ranks" in cost and (isinstance(cost["ranks"], bool) or not isinstance(cost["ranks"], int) or cost["ranks"] < 1):
        return f"has ranks {cost['ranks']!r}, not a positive integer"
    if "store_sha256" in cost:  # records older than this check lack it
        try:
            held = PoisonStore.read_metadata(store_path).get("content_sha256")
        except PoisonStoreError:
            held = None
        if cost["store_sha256"] != held:
            return "was recorded for another store (its store_sha256 differs)"
    return None
