"""Complexity of an explanation: how concentrated is it?

- ``sparseness`` (Chalasani et al. 2020): Gini index of |a| sorted ascending,
  G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i)); 1 = all mass on one pixel, 0 = uniform.
- ``complexity`` (Bhatt et al. 2020): entropy of p = |a| / sum |a|, H = -sum p log p; lower is simpler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.metrics.base import Context, Metric, MetricResult, register


@register
@dataclass
class Sparseness(Metric):
    """Sparseness: the Gini index of the absolute attributions."""

    name: ClassVar[str] = "sparseness"
    category: ClassVar[str] = "complexity"
    role: ClassVar[str] = "property"
    higher_is_better: ClassVar[bool] = True

    def compute(self, ctx: Context) -> MetricResult:
        b = ctx.attributions.shape[0]
        a = torch.sort(ctx.attributions.reshape(b, -1).abs().double(), dim=1).values
        n = a.shape[1]
        i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
        gini = ((2 * i - n - 1) * a).sum(1) / (n * a.sum(1)).clamp_min(1e-300)
        return MetricResult(self.name, gini.float())


@register
@dataclass
class Complexity(Metric):
    """Complexity: the entropy of the normalised absolute attributions."""

    name: ClassVar[str] = "complexity"
    category: ClassVar[str] = "complexity"
    role: ClassVar[str] = "property"
    higher_is_better: ClassVar[bool] = False

    def compute(self, ctx: Context) -> MetricResult:
        b = ctx.attributions.shape[0]
        a = ctx.attributions.reshape(b, -1).abs().double()
        p = a / a.sum(1, keepdim=True).clamp_min(1e-300)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
        return MetricResult(self.name, entropy.float())
