"""The ``MODELS`` registry and ``build_model``, the checked way to make a model from a config.

A factory is ``(num_classes: int, **params) -> ImageClassifier`` whose parameters are
keyword-only with their defaults in the signature; ``build_model`` reads that
signature to reject unknown or missing parameters with a sentence that names the
allowed ones, instead of a ``TypeError`` from deep inside a run.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from poisonbench.errors import ConfigError
from poisonbench.registry import Registry

from poisonbench.models.classifier import ImageClassifier

ModelFactory = Callable[..., ImageClassifier]

MODELS: Registry[ModelFactory] = Registry("model")

# "timm:<arch>" is shorthand for model `timm` with parameter `arch`, so a table row
# can say `model: timm:resnet152` in one value.
TIMM_PREFIX = "timm:"


def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters model ``name`` accepts (after ``num_classes``), by name."""
    factory = MODELS.get(name)
    params = list(inspect.signature(factory).parameters.values())[1:]
    return {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build_model(name: str, num_classes: int, **params: Any) -> ImageClassifier:
    """Build registered model ``name`` (or ``"timm:<arch>"``) for ``num_classes`` classes.

    Raises ``UnknownNameError`` for an unknown name and ``ConfigError`` for an unknown
    or missing parameter.
    """
    name, params = check_model(name, params)
    return MODELS.get(name)(num_classes, **params)


def check_model(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name and parameters ``build_model`` passes to the factory, checked
    without building anything (so a plan can check every row up front)."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        if "arch" in params and params["arch"] != arch:
            raise ConfigError(f"model {name!r} names arch {arch!r} but its parameters say arch {params['arch']!r}")
        name, params = "timm", {**params, "arch": arch}
    MODELS.get(name)
    allowed = model_parameters(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise ConfigError(f"model {name!r} has no parameter {', '.join(map(repr, unknown))}; allowed: {listed}")
    missing = [p for p, spec in allowed.items() if spec.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ConfigError(f"model {name!r} needs parameter {', '.join(map(repr, missing))}")
    return name, params
