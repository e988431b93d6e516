"""The one explainer registry: every method is registered here by name with its family."""

from __future__ import annotations

import dataclasses
from typing import Any

from pellucid.errors import ConfigError

FAMILIES = ("cam", "gradient", "relevance", "perturbation", "counterfactual")
_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add an explainer class under ``cls.name``."""
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family must be one of {FAMILIES}")
    if cls.name in _REGISTRY:
        raise ValueError(f"explainer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[dict[str, Any]]:
    """Every registered method: name, family, whether it needs a layer, and a one-line summary."""
    out = []
    for name, cls in sorted(_REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append({"name": name, "family": cls.family, "needs_layer": cls.needs_layer,
                    "summary": doc[0] if doc else ""})
    return out


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(method: str, **options: Any):
    """Instantiate explainer ``method`` with ``options``; unknown names or options are errors."""
    key = method.strip().lower().replace("-", "").replace("_", "")
    lookup = {n.replace("-", "").replace("_", ""): n for n in _REGISTRY}
    if key not in lookup:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(names())}")
    cls = _REGISTRY[lookup[key]]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"method {cls.name!r} has no option {unknown[0]!r}; options: "
                          f"{', '.join(sorted(valid)) or 'none'}")
    return cls(**options)
