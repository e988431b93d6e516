"""The one explainer registry: every method is registered here by name with its family and what
it requires from the caller beyond the model, inputs and target (``requires``: a vocabulary checked
at registration; the benchmark supplies what a method declares, e.g. a background set)."""

from __future__ import annotations

from typing import Any

from pellucid.registry import Registry

FAMILIES = ("cam", "attention", "gradient", "relevance", "perturbation", "counterfactual", "baseline")
# "background": a set of reference inputs (GradientSHAP); "prior": per sample, the mean
# ground-truth map of its class over the training data (the ``prior`` baseline)
REQUIRES = frozenset({"background", "prior"})


def _check(cls: type) -> None:
    if getattr(cls, "family", None) not in FAMILIES:
        raise ValueError(f"{cls.__name__}: family must be one of {FAMILIES}")
    unknown = set(getattr(cls, "requires", frozenset())) - REQUIRES
    if unknown:
        raise ValueError(f"{cls.__name__}: requires {sorted(unknown)} is not in {sorted(REQUIRES)}")


REGISTRY: Registry = Registry("method", _check)
register = REGISTRY.register


def available() -> list[dict[str, Any]]:
    """Every registered method: name, family, whether it needs a layer, what it requires, and a
    one-line summary."""
    out = []
    for name, cls in REGISTRY.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append({"name": name, "family": cls.family, "needs_layer": cls.needs_layer,
                    "requires": sorted(getattr(cls, "requires", ())),
                    "summary": doc[0] if doc else ""})
    return out


def names() -> list[str]:
    """The registered method names, sorted (``pellucid.explain``'s ``method`` takes any of them)."""
    return REGISTRY.names()


def create(method: str, **options: Any):
    """Instantiate explainer ``method`` with ``options``; unknown names or options are errors."""
    return REGISTRY.create(method, **options)
