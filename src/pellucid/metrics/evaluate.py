"""``evaluate``: score an explanation with several metrics, checking its inputs once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, MetricResult, create


def _masks(masks: torch.Tensor | None, boxes: Sequence[torch.Tensor] | None,
           spatial: tuple[int, ...], b: int) -> torch.Tensor | None:
    if masks is not None:
        m = torch.as_tensor(masks)
        if m.ndim == len(spatial) + 2 and m.shape[1] == 1:
            m = m[:, 0]
        if tuple(m.shape) != (b, *spatial):
            raise ConfigError(f"masks have shape {tuple(torch.as_tensor(masks).shape)}; expected "
                              f"{(b, *spatial)} (or with a channel of 1) to match the inputs")
        return m > 0
    if boxes is None:
        return None
    if len(spatial) != 2:
        raise ConfigError("boxes are for 2D images; give masks for 3D inputs")
    if len(boxes) != b:
        raise ConfigError(f"got boxes for {len(boxes)} samples, the batch has {b}")
    h, w = spatial
    out = torch.zeros(b, h, w, dtype=torch.bool)
    ys, xs = torch.arange(h).float() + 0.5, torch.arange(w).float() + 0.5
    for i, bx in enumerate(boxes):
        bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4)
        for x0, y0, x1, y1 in bx.tolist():
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h or x1 <= x0 or y1 <= y0:
                raise ConfigError(f"box {(x0, y0, x1, y1)} of sample {i} is outside the "
                                  f"{w}x{h} image or empty")
            out[i] |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None]
    return out


def evaluate(model: Any, inputs: torch.Tensor, explanation: Any, target: Any = None,
             metrics: Sequence[str | tuple[str, dict]] = ("pointing_game",),
             masks: torch.Tensor | None = None,
             boxes: Sequence[torch.Tensor] | None = None) -> dict[str, MetricResult]:
    """Score ``explanation`` (an Explanation or a (B, 1, *spatial) tensor) with ``metrics``.

    ``masks`` (B, [1,] *spatial) or ``boxes`` (per sample (N, 4) as x0, y0, x1, y1 pixels) give the
    ground truth for localisation metrics. Returns {metric name: MetricResult}.
    """
    attributions = getattr(explanation, "attributions", explanation)
    if not isinstance(attributions, torch.Tensor):
        raise ConfigError("explanation must be an Explanation or a tensor of attributions")
    b, spatial = inputs.shape[0], tuple(inputs.shape[2:])
    if attributions.ndim == inputs.ndim:
        attributions = attributions[:, 0] if attributions.shape[1] == 1 else attributions.sum(1)
    if tuple(attributions.shape) != (b, *spatial):
        raise ConfigError(f"attributions have shape {tuple(attributions.shape)}; expected "
                          f"{(b, 1, *spatial)} for inputs {tuple(inputs.shape)}")
    if torch.isnan(attributions).any():
        raise ConfigError("attributions contain NaN")
    gt = _masks(masks, boxes, spatial, b)
    if gt is not None:
        gt = gt.to(attributions.device)
    target = target if target is not None else getattr(explanation, "target", None)
    ctx = Context(getattr(model, "module", model), inputs, attributions.detach(), target, gt)
    results = {}
    for spec in metrics:
        name, options = (spec, {}) if isinstance(spec, str) else spec
        metric = create(name, **options)
        if "mask" in metric.needs and gt is None:
            raise ConfigError(f"metric {name!r} needs ground truth: pass masks= or boxes=")
        if "model" in metric.needs and ctx.model is None:
            raise ConfigError(f"metric {name!r} needs the model")
        results[name] = metric.compute(ctx)
    return results
