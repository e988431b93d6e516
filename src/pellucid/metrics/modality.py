"""Modality-specific feature importance (MSFI, Jin et al. 2023, "Guidelines and evaluation of
clinical explainable AI in medical image analysis"): does the explanation put a modality's
attribution inside the lesion in proportion to how much the model relies on that modality?

    MSFI = sum_m I_m * (sum_{i in mask} a+_{m,i} / sum_i a+_{m,i}) / sum_m I_m

with a+ the positive part of the per-modality map (``Explanation.raw``, B x C x spatial) and I_m the
modality's importance: its Shapley value (``pellucid.explainers.modality.modality_shapley``), clipped
at 0. MSFI lies in [0, 1]; higher is better. It needs per-channel maps (gradient, LRP, perturbation
methods), not a CAM's single map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register


def msfi(maps: torch.Tensor, masks: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """(B,) MSFI from per-modality maps (B, C, *spatial), masks (B, *spatial), importance (B, C)."""
    positive = maps.clamp_min(0).flatten(2).double()
    inside = (positive * masks.flatten(1)[:, None].double()).sum(2)
    fraction = inside / positive.sum(2).clamp_min(1e-30)
    weight = importance.double().clamp_min(0)
    total = weight.sum(1)
    score = (weight * fraction).sum(1) / total.clamp_min(1e-30)
    return torch.where(total > 0, score, torch.full_like(score, float("nan"))).float()


@register
@dataclass
class MSFI(Metric):
    """MSFI: Shapley-weighted share of each modality's positive attribution inside the mask."""

    baseline: float = 0.0
    name: ClassVar[str] = "msfi"
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model", "mask", "explanation", "channel_maps"})

    def compute(self, ctx: Context) -> MetricResult:
        from pellucid.explainers.modality import modality_shapley

        raw = ctx.explanation.raw
        c = ctx.inputs.shape[1]
        if raw is None or raw.ndim != ctx.inputs.ndim or raw.shape[1] != c or c < 2:
            raise ConfigError("msfi needs per-modality maps of a multi-channel input (the raw output "
                              "of a gradient, LRP or perturbation method), not a single map")
        shap = modality_shapley(ctx.model, ctx.inputs, ctx.target, self.baseline)
        importance = shap["values"]
        empty = ctx.masks.flatten(1).sum(1) == 0
        score = msfi(raw.detach(), ctx.masks, importance)
        score = torch.where(empty.to(score.device), torch.full_like(score, float("nan")), score)
        return MetricResult(self.name, score, extras={"modality_importance": importance})
