"""Metrics: one registry; ``pellucid.evaluate`` runs them. See ``docs/metrics.md``."""

from pellucid.metrics import (  # noqa: F401  (each module registers its metrics)
    arcc,
    complexity,
    cost,
    faithfulness,
    localization,
    modality,
    protocols,
    psc,
    randomization,
    road,
    robustness,
)
from pellucid.metrics.base import Context, Metric, MetricResult, available, create
from pellucid.metrics.evaluate import evaluate

__all__ = ["Context", "Metric", "MetricResult", "available", "create", "evaluate"]
