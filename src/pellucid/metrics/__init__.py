"""Metrics: one registry; ``pellucid.evaluate`` runs them. (Localisation and complexity so far.)"""

from pellucid.metrics import complexity, localization  # noqa: F401  (registers the metrics)
from pellucid.metrics.base import Context, Metric, MetricResult, available, create
from pellucid.metrics.evaluate import evaluate

__all__ = ["Context", "Metric", "MetricResult", "available", "create", "evaluate"]
