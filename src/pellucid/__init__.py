"""pellucid: explain medical imaging models and measure how good the explanations are."""

from __future__ import annotations

from typing import Any

from pellucid.version import __version__

__all__ = ["__version__", "evaluate", "explain"]


def explain(model: Any, inputs: Any, method: str, target: Any = None, layer: Any = None,
            activation: str | None = None, **options: Any):
    """Explain ``model`` on ``inputs`` (B, C, *spatial) with ``method`` for ``target``.

    ``model`` is an ``nn.Module`` or a :class:`pellucid.models.LoadedModel` (whose card supplies
    the default layer and output activation). ``target`` is a :mod:`pellucid.targets` target, class
    indices, or None for the predicted class (classification) / predicted region of class 0
    (segmentation). ``options`` go to the method (see ``pellucid.explainers.available()``).
    Returns a :class:`pellucid.explainers.Explanation`.
    """
    from pellucid.explainers import create
    from pellucid.models.store import LoadedModel

    if isinstance(model, LoadedModel):
        card = model.card
        if card is not None:
            layer = layer if layer is not None else card.default_layer
            activation = activation or card.activation
        model = model.module
    explainer = create(method, **options)
    if not explainer.needs_layer:
        layer = None
    return explainer.explain(model, inputs, target=target, layer=layer, activation=activation)


def evaluate(model: Any, inputs: Any, explanation: Any, target: Any = None,
             metrics: Any = ("pointing_game",), masks: Any = None, boxes: Any = None,
             explain_fn: Any = None, cache: Any = None):
    """Score an explanation with metrics from the registry (see ``pellucid.metrics.available()``);
    returns {name: MetricResult} with per-sample scores (NaN = excluded)."""
    from pellucid.metrics import evaluate as run

    return run(model, inputs, explanation, target, metrics, masks, boxes, explain_fn, cache)
