"""Metrics: one registry; ``pellucid.evaluate`` runs them. (Localisation, complexity and
the RISE/Grad-CAM++ faithfulness metrics so far.)"""

from pellucid.metrics import (  # noqa: F401  (each module registers its metrics)
    complexity,
    faithfulness,
    localization,
)
from pellucid.metrics.base import Context, Metric, MetricResult, available, create
from pellucid.metrics.evaluate import evaluate

__all__ = ["Context", "Metric", "MetricResult", "available", "create", "evaluate"]
