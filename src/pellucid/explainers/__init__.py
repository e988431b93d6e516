"""Explainers: one registry of methods by name. ``available()`` lists them."""

from pellucid.explainers import (  # noqa: F401  (each module registers its methods)
    attention,
    baselines,
    cam,
    counterfactual,
    crp,
    deeplift,
    fusion,
    gradients,
    guided,
    legrad,
    lrp,
    paths,
    perturbation,
    xrai,
)
from pellucid.explainers.base import (
    Cost,
    Explainer,
    Explanation,
    candidate_layers,
    default_layer,
    model_guard,
    resolve_layer,
    upsample,
)
from pellucid.explainers.registry import available, create, names

__all__ = [
    "Cost", "Explainer", "Explanation", "available", "candidate_layers", "create",
    "default_layer", "model_guard", "names", "resolve_layer", "upsample",
]
