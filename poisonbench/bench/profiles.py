"""Profiles: hyperparameters per table family (``configs/profiles/<name>.yaml``), and the
config of a job outside any table (``poisonbench train``).

A profile has one family per paper: its ``train`` recipe, ``lr_by_model``, an
``override`` laid over every cell, and ``attack_override``/``defense_override`` (how the
cpu profile shrinks crafting costs and names its backbone).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from poisonbench.bench.catalogue import config_files, lookup
from poisonbench.config import check_keys, check_value, deep_merge, load_yaml, mapping, required
from poisonbench.errors import ConfigError
from poisonbench.params import POSITIVE, check_number
from poisonbench.schema.job_config import DEFAULTS, check_set, check_train, merge_layer

_PROFILE_KEYS = ("name", "description", "families")
_FAMILY_KEYS = ("train", "lr_by_model", "override", "attack_override", "defense_override")


@dataclass(frozen=True)
class Family:
    """A profile's settings for one paper (table family)."""

    train: Mapping[str, Any]
    lr_by_model: Mapping[str, float]
    override: Mapping[str, Any]
    # attack name -> attack_params merged into every cell of that attack (last, so the
    # profile wins): how a profile shrinks crafting models and steps (profile cpu).
    attack_override: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # defense name -> the whole defense_params of that defense under this profile
    defense_override: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def finish(self, config: dict[str, Any], explicit_lr: bool) -> dict[str, Any]:
        """The profile's last word on a merged cell config: attack_override,
        defense_override, lr_by_model."""
        extra = self.attack_override.get(config["attack"])
        if extra:  # merged: the table's budget stays, the crafting cost shrinks
            config["attack_params"] = deep_merge(config.get("attack_params") or {}, extra)
        if config["defense"] in self.defense_override:  # replaced: a backbone is stated whole
            config["defense_params"] = dict(self.defense_override[config["defense"]])
        lr = self.lr_by_model.get(config["model"])
        if lr is not None and not explicit_lr:  # what a table or the command line says wins
            config["train"]["lr"] = lr
        return config


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    families: Mapping[str, Family]
    path: Path | None = None

    def family(self, paper: str) -> Family:
        if paper not in self.families:
            raise ConfigError(
                f"profile {self.name!r} has no family {paper!r}; "
                f"families: {', '.join(sorted(self.families)) or 'none'}"
            )
        return self.families[paper]


def load_profile(name: str) -> Profile:
    """The profile ``configs/profiles/<name>.yaml``, validated."""
    path = lookup("profile", name, config_files("profiles", "*.yaml"))
    data = load_yaml(path)
    where = f"profile {path}"
    check_keys(data, _PROFILE_KEYS, where)
    if data.get("name", name) != name:
        raise ConfigError(f"{where} declares name {data['name']!r}; expected {name!r} from its file name")
    families = {}
    for paper, fam in mapping(required(data, "families", where), f"families in {where}").items():
        fwhere = f"profile {name!r} family {paper!r}"
        fam = mapping(fam, fwhere)
        check_keys(fam, _FAMILY_KEYS, fwhere)
        lr_by_model = mapping(fam.get("lr_by_model"), f"lr_by_model in {fwhere}")
        attack_override = mapping(fam.get("attack_override"), f"attack_override in {fwhere}")
        defense_override = mapping(fam.get("defense_override"), f"defense_override in {fwhere}")
        families[paper] = Family(
            train=check_train(fam.get("train") or {}, fwhere),
            lr_by_model={m: check_number(check_value(lr, float, f"lr_by_model.{m} in {fwhere}"), float,
                                         POSITIVE, f"lr_by_model.{m} in {fwhere}")
                         for m, lr in lr_by_model.items()},
            override=check_set(fam.get("override") or {}, f"{fwhere} override"),
            attack_override={a: dict(mapping(p, f"attack_override.{a} in {fwhere}"))
                             for a, p in attack_override.items()},
            defense_override={d: dict(mapping(p, f"defense_override.{d} in {fwhere}"))
                              for d, p in defense_override.items()},
        )
    return Profile(name=name, description=str(data.get("description", "")), families=families, path=path)


def adhoc_config(profile: str, family: str, layers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A config outside any table (``poisonbench train``), without per-job fields.

    built-in DEFAULTS ⊕ family ``train`` ⊕ family ``override`` ⊕ ``layers`` in order,
    then the profile's last word (``attack_override``, ``defense_override``,
    ``lr_by_model``) except where a layer said otherwise: what the command line says
    explicitly wins, always (in a table the profile's overrides come last instead).
    """
    fam = load_profile(profile).family(family)
    config = merge_layer(merge_layer(DEFAULTS, {"train": fam.train}), fam.override)
    explicit: dict[str, Any] = {}
    for layer in layers:
        layer = check_set(layer, "the command-line options")
        config = merge_layer(config, layer)
        explicit = merge_layer(explicit, layer)
    config = fam.finish(config, explicit_lr="lr" in explicit.get("train", {}))
    for key in ("attack_params", "defense_params"):
        if explicit.get(key):
            config[key] = deep_merge(config.get(key) or {}, explicit[key])
    return config
