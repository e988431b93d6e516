"""ARCC: one score from coherency, complexity and ROAD (pytorch-grad-cam 1.5.7, with RefineCAM,
arXiv 2605.14641; its parts from Poppi et al. 2021, "Revisiting the evaluation of class activation
mapping for explainability", CVPR-W).

With the map M min-max scaled to [0, 1] per sample:

- complexity C = mean |M| (the share of the image the map lights up; lower is simpler);
- coherency H = (rho(M, M') + 1) / 2, rho Pearson's correlation between M and the map M' the same
  method gives for the input masked by the map, x * M (a map that explains the evidence it kept
  is coherent);
- ROAD R = clip(2 r, 0, 1), r the combined ROAD score (LeRF - MoRF) / 2 at removed fractions
  ``fractions`` (0.2, 0.4, 0.6, 0.8: the peer's percentiles 80, 60, 40, 20), :mod:`road`;

ARCC = 3 / (1 / H + 1 / (1 - C) + 1 / R), the harmonic mean of the three (each term with the peer's
1e-8 guard). Higher is better. Equal to the peer's ``ARCC`` (tested with the imputation noise off,
the only random part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.metrics.road import road_scores

EPS = 1e-8


def unit_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map min-max scaled to [0, 1] (the peer's ``scale_cam_image``: (m - min) / (max + 1e-7)
    after the shift)."""
    flat = maps.flatten(1).double()
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (flat.max(1, keepdim=True).values + 1e-7)
    return flat.view(maps.shape)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of each row pair, with the peer's 1e-8 guard on the denominator."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    n = a.shape[1] - 1
    cov = (a * b).sum(1) / n
    return cov / ((a.square().sum(1) / n).sqrt() * (b.square().sum(1) / n).sqrt() + EPS)


@register
@dataclass
class ARCC(Metric):
    """ARCC: the harmonic mean of coherency, 1 - complexity and the rescaled ROAD score."""

    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    noise: float = 0.01
    seed: int = 0
    probability: bool = True
    name: ClassVar[str] = "arcc"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def compute(self, ctx: Context) -> MetricResult:
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ConfigError(f"arcc: fractions must lie in (0, 1), got {self.fractions}")
        maps = unit_maps(ctx.attributions)
        complexity = maps.abs().flatten(1).mean(1)
        spatial = ctx.inputs.ndim - 2
        weight = maps.view(maps.shape[0], 1, *maps.shape[-spatial:]).to(ctx.inputs)
        again = ctx.explain_fn(ctx.model, ctx.inputs * weight, ctx.target)
        coherency = (pearson(unit_maps(again.detach()), maps) + 1) / 2
        s = road_scores(ctx, tuple(float(f) for f in self.fractions), self.noise, self.seed,
                        self.probability)
        road = ((s["lerf"].mean(1) - s["morf"].mean(1)) / 2).double()
        road = (2 * road).clamp(0, 1)
        arcc = 3 / (1 / (coherency + EPS) + 1 / (1 - complexity + EPS) + 1 / (road + EPS))
        return MetricResult(self.name, arcc.float(),
                            extras={"coherency": coherency.float(), "complexity": complexity.float(),
                                    "road": road.float()})
