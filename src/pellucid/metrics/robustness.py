"""Robustness: how much does the explanation move when the input barely moves?

- ``max_sensitivity`` (Yeh et al. 2019): max over ``nr_samples`` perturbations x' = x + u,
  u ~ U(-r, r) per element, of ||a(x') - a(x)||_2 / ||a(x)||_2. Lower is better.
- ``local_lipschitz`` (Alvarez-Melis & Jaakkola 2018): max over x' = x + e, e ~ N(mean, std^2),
  of ||a(x') - a(x)||_2 / ||x' - x||_2. Lower is better.

The explanation is re-run (same method, options, layer and bound target) on all B x nr_samples
perturbed inputs in chunks, rather than once per perturbation as Quantus does. Noise is drawn by a
seeded numpy RandomState in Quantus 0.6.0's order (one (B, C*N) array per sample step), so equal
seeds give the same perturbations and the same values as ``quantus.MaxSensitivity`` /
``quantus.LocalLipschitzEstimate``. Samples whose perturbation changes the prediction are kept
(Quantus' default) unless ``exclude_changed`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pellucid.errors import ConfigError
from pellucid.explainers.base import model_guard
from pellucid.metrics.base import Context, Metric, MetricResult, register


def perturbation_noise(x: torch.Tensor, kind: str, nr_samples: int, seed: int,
                       a: float, b: float) -> torch.Tensor:
    """(nr_samples, B, C, *spatial) noise: ``uniform`` on [-a, a] (or [a, b] when b is given) or
    ``gaussian`` with mean a and std b, one (B, C*N) draw per step from RandomState(seed)."""
    rng = np.random.RandomState(seed)
    shape = (x.shape[0], x[0].numel())
    steps = []
    for _ in range(nr_samples):
        if kind == "uniform":
            steps.append(rng.uniform(-a, a, size=shape) if b is None else rng.uniform(a, b, size=shape))
        else:
            steps.append(rng.normal(a, b, size=shape))
    return torch.as_tensor(np.stack(steps)).reshape(nr_samples, *x.shape)


def perturbed_explanations(ctx: Context, noise: torch.Tensor, exclude_changed: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Perturbed inputs (S, B, ...), their maps (S, B, *spatial) and a (S, B) mask of the pairs that
    count (all, or those whose predicted class did not change)."""
    x = ctx.inputs
    s, b = noise.shape[:2]
    perturbed = (x.double()[None] + noise.to(x.device)).to(x.dtype)  # float64 sum, as numpy
    flat = perturbed.reshape(s * b, *x.shape[1:])
    rows = torch.arange(b, device=x.device).repeat(s)
    maps = ctx.explain_fn(ctx.model, flat, ctx.target.take(rows)).reshape(s, b, *x.shape[2:])
    keep = torch.ones(s, b, dtype=torch.bool, device=x.device)
    if exclude_changed:
        with model_guard(ctx.model), torch.no_grad():
            clean = ctx.model(x).argmax(1)
            changed = torch.cat([ctx.model(flat[i:i + 64]).argmax(1) for i in range(0, len(flat), 64)])
        changed = changed.reshape(s, b, *changed.shape[1:]).flatten(2) != clean.flatten(1)[None]
        keep = ~changed.any(2)
    return perturbed, maps, keep


def _nanmax(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    values = torch.where(keep, values, torch.full_like(values, float("nan")))
    out = torch.where(keep.any(0), values.nan_to_num(float("-inf")).amax(0),
                      torch.full_like(values[0], float("nan")))
    return out


@dataclass
class _Robustness(Metric):
    nr_samples: int = 20
    seed: int = 42
    exclude_changed: bool = False
    category: ClassVar[str] = "robustness"
    role: ClassVar[str] = "property"
    higher_is_better: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"model", "explainer"})

    def check(self) -> None:
        if self.nr_samples < 1:
            raise ConfigError(f"{self.name}: nr_samples must be at least 1, got {self.nr_samples}")


@register
@dataclass
class MaxSensitivity(_Robustness):
    """Max-sensitivity: max ||a(x + u) - a(x)|| / ||a(x)|| over uniform noise |u| <= radius."""

    radius: float = 0.2
    name: ClassVar[str] = "max_sensitivity"

    def compute(self, ctx: Context) -> MetricResult:
        self.check()
        noise = perturbation_noise(ctx.inputs, "uniform", self.nr_samples, self.seed, self.radius, None)
        _, maps, keep = perturbed_explanations(ctx, noise, self.exclude_changed)
        a = ctx.attributions.flatten(1).double()
        diff = (maps.flatten(2).double() - a[None]).norm(dim=2)
        ratio = diff / a.norm(dim=1).clamp_min(1e-30)[None]
        return MetricResult(self.name, _nanmax(ratio, keep).float(),
                            extras={"per_sample": ratio.T.float()})


@register
@dataclass
class LocalLipschitz(_Robustness):
    """Local Lipschitz estimate: max ||a(x') - a(x)|| / ||x' - x|| over Gaussian x' around x."""

    mean: float = 0.0
    std: float = 0.1
    name: ClassVar[str] = "local_lipschitz"

    def compute(self, ctx: Context) -> MetricResult:
        self.check()
        noise = perturbation_noise(ctx.inputs, "gaussian", self.nr_samples, self.seed, self.mean,
                                   self.std)
        perturbed, maps, keep = perturbed_explanations(ctx, noise, self.exclude_changed)
        a = ctx.attributions.flatten(1).double()
        num = (maps.flatten(2).double() - a[None]).norm(dim=2)
        den = (perturbed.flatten(2).double() - ctx.inputs.flatten(1).double()[None]).norm(dim=2)
        ratio = num / (den + 1e-10)
        return MetricResult(self.name, _nanmax(ratio, keep).float(),
                            extras={"per_sample": ratio.T.float()})
