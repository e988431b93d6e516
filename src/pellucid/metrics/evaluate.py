"""``evaluate``: score an explanation with several metrics, checking its inputs once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.base import model_guard
from pellucid.metrics.base import NEEDS, Context, ExplainFn, MetricResult, create, unmet_needs
from pellucid.models.outputs import tensor_outputs
from pellucid.targets import BoundTarget, as_target


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


def explanation_fn(explanation: Any, chunk: int = 32):
    """An ``explain_fn`` that re-runs ``explanation``'s method with its options and layer on new
    inputs (or a changed model), ``chunk`` samples per call; returns (N, *spatial) maps."""
    from pellucid.explainers import create

    def run(model: torch.nn.Module, inputs: torch.Tensor, target: BoundTarget) -> torch.Tensor:
        explainer = create(explanation.method, **explanation.options)
        maps = []
        for start in range(0, inputs.shape[0], chunk):
            rows = torch.arange(start, min(start + chunk, inputs.shape[0]))
            out = explainer.explain(model, inputs[start:start + chunk], target=target.take(rows),
                                    layer=explanation.layer)
            maps.append(out.attributions.sum(1).detach())
        return torch.cat(maps)

    return run


def evaluate(model: Any, inputs: torch.Tensor, explanation: Any, target: Any = None,
             metrics: Sequence[str | tuple[str, dict]] = ("pointing_game",),
             masks: torch.Tensor | None = None,
             boxes: Sequence[torch.Tensor] | None = None,
             explain_fn: ExplainFn | None = None,
             cache: dict | None = None) -> dict[str, MetricResult]:
    """Score ``explanation`` (an Explanation or a (B, 1, *spatial) tensor) with ``metrics``.

    ``masks`` (B, [1,] *spatial) or ``boxes`` (per sample (N, 4) as x0, y0, x1, y1 pixels) give the
    ground truth for localisation metrics. Robustness and randomisation metrics re-explain: with an
    Explanation they re-run its method; with a bare tensor pass ``explain_fn(model, inputs,
    bound_target) -> (N, *spatial)``. ``cache`` (a dict) shares work between calls: the clean
    forward and the perturbations that do not read the map (faithfulness correlation's random
    subsets, infidelity's noise) across every explanation of the same inputs and target; the rest
    per map. A cache filled for other inputs, target or weights is emptied, never reused.
    Returns {metric name: MetricResult}.
    """
    attributions = getattr(explanation, "attributions", explanation)
    if not isinstance(attributions, torch.Tensor):
        raise ConfigError("explanation must be an Explanation or a tensor of attributions")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
        raise ConfigError("inputs must be a tensor (B, C, H, W) or (B, C, D, H, W)")
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
    box_list = [torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4) for bx in boxes] \
        if boxes is not None else None
    module = getattr(model, "module", model)
    specs = [(spec, {}) if isinstance(spec, str) else spec for spec in metrics]
    chosen = [(name, create(name, **options)) for name, options in specs]
    target = target if target is not None else getattr(explanation, "target", None)
    if not isinstance(target, BoundTarget) and module is not None \
            and any("model" in m.needs for _, m in chosen):
        with model_guard(module), torch.no_grad():
            target = as_target(target, module(inputs))
    if explain_fn is None and hasattr(explanation, "method"):
        explain_fn = explanation_fn(explanation)
    ctx = Context(module, inputs, attributions.detach(), target, gt, box_list,
                  explanation if hasattr(explanation, "method") else None, explain_fn,
                  cache if cache is not None else {})
    available = {"explainer"} if explain_fn is not None else set()
    available |= {k for k, present in (("model", ctx.model is not None), ("mask", gt is not None),
                                       ("boxes", box_list is not None),
                                       ("explanation", ctx.explanation is not None),
                                       ("channel_maps", True)) if present}
    results = {}
    for name, metric in chosen:
        missing = unmet_needs(metric, available)
        if missing:
            raise ConfigError(f"metric {name!r} needs {NEEDS[missing[0]]}")
        start = time.perf_counter()
        with tensor_outputs(module) if module is not None else contextlib.nullcontext():
            results[name] = metric.compute(ctx)
        results[name].seconds = time.perf_counter() - start
        results[name].higher_is_better = metric.is_higher_better()
    return results
