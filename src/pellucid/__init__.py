"""pellucid: explain medical imaging models and measure how good the explanations are."""

from __future__ import annotations

from typing import Any

from pellucid.version import __version__

__all__ = ["__version__", "evaluate", "explain"]


def explain(model: Any, inputs: Any, method: str, target: Any = None, layer: Any = None,
            activation: str | None = None, unlike_training_data: str = "warn",
            check_inputs: bool = True, **options: Any):
    """Explain ``model`` on ``inputs`` (B, C, *spatial) with ``method`` for ``target``.

    ``model`` is an ``nn.Module`` or a :class:`pellucid.models.LoadedModel` (whose card supplies
    the default layer and output activation). ``target`` is a :mod:`pellucid.targets` target, class
    indices, or None for the predicted class (classification) / predicted region of class 0
    (segmentation). ``options`` go to the method (see ``pellucid.explainers.available()``).
    Returns a :class:`pellucid.explainers.Explanation`.

    With a ``LoadedModel`` each input (normalised, as the model takes it) is checked against the
    card's description of the training inputs (:mod:`pellucid.models.training_inputs`); every
    check is in ``explanation.extras["training_data"]``, one per input. An input unlike them (for
    a model trained on synthetic data also any input, when the card describes none) gets, by
    ``unlike_training_data``: ``"warn"`` (the default) a warning naming the input, ``"refuse"`` a
    one-line :class:`pellucid.errors.ModelError` (what the command line, the service, the PACS
    command and the node do with a patient's file for a phantom-trained model), ``"ignore"``
    nothing. A tensor does not say whether it is a patient's image, so the API warns where the
    file paths refuse. ``check_inputs=False`` leaves the check to the caller (the case pipeline
    checks each case with its intended use; a benchmark explains held-out cases of the model's own
    dataset).
    """
    from pellucid.explainers import create
    from pellucid.models.store import LoadedModel

    checks = None
    if isinstance(model, LoadedModel):
        card = model.card
        if check_inputs:
            checks = _training_data_checks(model, inputs, unlike_training_data)
        if card is not None:
            layer = layer if layer is not None else card.default_layer
            activation = activation or card.activation
        model = model.module
    explainer = create(method, **options)
    if not explainer.needs_layer:
        layer = None
    explanation = explainer.explain(model, inputs, target=target, layer=layer, activation=activation)
    if checks is not None:
        explanation.extras["training_data"] = checks
    return explanation


def _training_data_checks(loaded: Any, inputs: Any, unlike: str) -> list[dict[str, Any]]:
    """Each input against the model's training inputs (see :func:`explain`)."""
    import warnings

    import torch

    from pellucid.errors import ConfigError, ModelError
    from pellucid.models.training_inputs import check_inputs

    if unlike not in ("warn", "refuse", "ignore"):
        raise ConfigError(f"unlike_training_data must be 'warn', 'refuse' or 'ignore', got {unlike!r}")
    if not isinstance(inputs, torch.Tensor):
        return []
    card, out = loaded.card, []
    synthetic = card is not None and card.synthetic
    for k, check in enumerate(check_inputs(loaded.module, card, inputs)):
        out.append(check.as_dict())
        if synthetic and check.distance is None:
            why = (f"the model was trained on synthetic data and cannot tell a patient image from "
                   f"its training images ({check.not_checked})")
        elif check.unlike:
            why = (f"unlike the {'synthetic ' if synthetic else ''}images the model was trained on "
                   f"(feature distance {check.distance:.1f} > {check.threshold:.1f}, the threshold "
                   f"at {check.false_alarm:.0%} false alarms)")
        else:
            continue
        if unlike == "refuse":
            raise ModelError(f"input {k}: {why}: the model does not answer for it "
                             f"(unlike_training_data='warn' explains it with a warning)")
        if unlike == "warn":
            warnings.warn(f"input {k}: {why}; its explanation is of a model outside what it "
                          f"learned", stacklevel=3)
    return out


def evaluate(model: Any, inputs: Any, explanation: Any, target: Any = None,
             metrics: Any = ("pointing_game",), masks: Any = None, boxes: Any = None,
             explain_fn: Any = None, cache: Any = None):
    """Score an explanation with metrics from the registry (see ``pellucid.metrics.available()``);
    returns {name: MetricResult} with per-sample scores (NaN = excluded)."""
    from pellucid.metrics import evaluate as run

    return run(model, inputs, explanation, target, metrics, masks, boxes, explain_fn, cache)
