"""Faithfulness metrics: does removing what the map calls important change the model's score?

- ``deletion`` / ``insertion`` (RISE protocol, Petsiuk et al. 2018): pixels are ordered by
  decreasing attribution and changed ``step`` at a time (all channels of a pixel together).
  Deletion replaces them with ``baseline`` (zero in the model's input space); insertion starts from a
  blurred copy (Gaussian, kernel 11, sigma 5) and restores them. The curve s_0..s_N is the target
  score (the class probability by default) after each step, and
  AUC = (sum_k s_k - s_0 / 2 - s_N / 2) / N. Lower deletion and higher insertion are better.
- ``average_drop`` / ``increase_in_confidence`` (Chattopadhay et al. 2018): the input times the
  per-sample min-max normalised map gives E; with Y the score on the input and O on E,
  drop = 100 max(0, Y - O) / Y and increase = 100 [Y < O] per sample (their means are the paper's
  Average Drop % and Increase in Confidence %).

Perturbed inputs of all samples and steps run in large batches through the optimised inference copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.explainers.accelerate import AutoBatch, inference_forward
from pellucid.explainers.attribution import gaussian_blur
from pellucid.explainers.base import model_guard
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.targets import BoundClassTarget


def scoring_target(ctx: Context, probability: bool):
    """The explanation's bound target, as a class probability when asked and possible."""
    target = ctx.target
    if target is None:
        raise ConfigError("faithfulness metrics need the explanation's target (pass target=)")
    if probability and isinstance(target, BoundClassTarget) and target.kind == "logit":
        return BoundClassTarget(target.classes, "probability", target.activation)
    return target


def run_batches(model, inputs_fn, n: int, example: torch.Tensor, target, rows_fn) -> torch.Tensor:
    """Scores of ``n`` perturbed inputs built by ``inputs_fn(start, stop)``; the model is run in
    eval mode and left as it was found."""
    out = torch.empty(n, device=example.device)
    with model_guard(model), torch.inference_mode():
        fast = inference_forward(model, example[:1])
        for start, stop in AutoBatch(None, model, example).chunks(n):
            y = fast(inputs_fn(start, stop))
            out[start:stop] = target.score(y, rows_fn(start, stop)).float()
    return out


def trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """(sum s - s_0 / 2 - s_N / 2) / N per row of (B, N + 1) curves."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


@dataclass
class _Curve(Metric):
    step: int | None = None
    probability: bool = True
    baseline: float = 0.0
    start: str = "blur"
    category: ClassVar[str] = "faithfulness"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})
    inserting: ClassVar[bool] = False

    def compute(self, ctx: Context) -> MetricResult:
        x = ctx.inputs
        b, c = x.shape[:2]
        spatial = tuple(x.shape[2:])
        hw = math.prod(spatial)
        step = self.step or max(1, round(math.sqrt(hw)) if len(spatial) == 2 else hw // 256)
        steps = math.ceil(hw / step)
        target = scoring_target(ctx, self.probability)
        order = torch.argsort(-ctx.attributions.reshape(b, -1).float(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(hw, device=x.device).expand(b, hw))
        flat = x.reshape(b, c, hw)
        if self.inserting:
            if self.start == "blur":
                other = gaussian_blur(x, 5.0, 11).reshape(b, c, hw)
            elif self.start == "zeros":
                other = torch.zeros_like(flat)
            else:
                raise ConfigError(f"insertion start must be 'blur' or 'zeros', got {self.start!r}")
        else:
            other = torch.full_like(flat, self.baseline)
        pairs = torch.cartesian_prod(torch.arange(b), torch.arange(steps + 1)).to(x.device)

        def build(start: int, stop: int) -> torch.Tensor:
            rows, k = pairs[start:stop, 0], pairs[start:stop, 1]
            changed = (rank[rows] < (k * step)[:, None])[:, None]  # (n, 1, hw)
            if self.inserting:
                out = torch.where(changed, flat[rows], other[rows])
            else:
                out = torch.where(changed, other[rows], flat[rows])
            return out.reshape(len(rows), c, *spatial)

        scores = run_batches(ctx.model, build, len(pairs), x, target, lambda s, e: pairs[s:e, 0])
        curves = scores.reshape(b, steps + 1)
        return MetricResult(self.name, trapezoid_auc(curves), self.higher_is_better, curves=curves,
                            extras={"step": step})


@register
@dataclass
class Deletion(_Curve):
    """Deletion AUC: the score as the most relevant pixels are removed first (lower is better)."""

    name: ClassVar[str] = "deletion"
    higher_is_better: ClassVar[bool] = False


@register
@dataclass
class Insertion(_Curve):
    """Insertion AUC: the score as the most relevant pixels are restored first (higher is better)."""

    name: ClassVar[str] = "insertion"
    higher_is_better: ClassVar[bool] = True
    inserting: ClassVar[bool] = True


def _masked_scores(ctx: Context, probability: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores Y on the inputs and O on the inputs times the min-max map; computed once per
    evaluate() call for Average Drop and Increase in Confidence together."""
    key = ("masked_scores", probability)
    if key not in ctx.cache:
        ctx.cache[key] = _compute_masked_scores(ctx, probability)
    return ctx.cache[key]


def _compute_masked_scores(ctx: Context, probability: bool) -> tuple[torch.Tensor, torch.Tensor]:
    target = scoring_target(ctx, probability)
    b = ctx.inputs.shape[0]
    a = ctx.attributions.reshape(b, -1).float()
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    norm = ((a - lo) / (hi - lo).clamp_min(1e-12)).reshape(b, 1, *ctx.inputs.shape[2:])
    both = torch.cat([ctx.inputs, ctx.inputs * norm])
    rows = torch.arange(b, device=both.device).repeat(2)
    scores = run_batches(ctx.model, lambda s, e: both[s:e], 2 * b, ctx.inputs, target,
                         lambda s, e: rows[s:e])
    return scores[:b], scores[b:]


@register
@dataclass
class AverageDrop(Metric):
    """Average Drop %: 100 max(0, Y - O) / Y, O the score on the input times the map."""

    probability: bool = True
    name: ClassVar[str] = "average_drop"
    category: ClassVar[str] = "faithfulness"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def compute(self, ctx: Context) -> MetricResult:
        y, o = _masked_scores(ctx, self.probability)
        return MetricResult(self.name, 100 * (y - o).clamp_min(0) / y, False,
                            extras={"clean": y, "masked": o})


@register
@dataclass
class IncreaseInConfidence(Metric):
    """Increase in Confidence %: 100 if the score on the input times the map exceeds the clean one."""

    probability: bool = True
    name: ClassVar[str] = "increase_in_confidence"
    category: ClassVar[str] = "faithfulness"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def compute(self, ctx: Context) -> MetricResult:
        y, o = _masked_scores(ctx, self.probability)
        return MetricResult(self.name, 100 * (y < o).float(), True)
