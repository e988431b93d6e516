"""ROAD: RemOve And Debias (Rong et al. 2022, ICML).

A fraction p of the pixels, the most relevant first (MoRF) or the least relevant first (LeRF), is
removed and filled by *noisy linear imputation*: each removed pixel equals the weighted mean of
its 8 neighbours (weight 1/6 for the 4 edge neighbours, 1/12 for the diagonals; in 3D the 26
neighbours weighted 1 : 1/2 : 1/4 for face : edge : corner, normalised), a sparse linear system
over all removed pixels solved jointly, plus Gaussian noise (sigma ``noise``). The imputation
leaks no shape of the removed region, unlike a constant fill.

The curve is the target score (probability by default) at each fraction; MoRF's mean over the
fractions is lower for a faithful map, LeRF's higher, and ``road`` = (LeRF - MoRF) / 2 (as
pytorch-grad-cam's ``ROADCombined``). Fraction p removes the pixels at or above the map's
100 (1 - p) percentile (linear interpolation), pytorch-grad-cam's selection rule.

The system is symmetric positive definite (diagonally dominant wherever a removed pixel touches a
kept one), so it is solved for every sample, fraction and channel at once by Jacobi-preconditioned
conjugate gradients with the (separable) stencil applied in place; the result equals a direct
sparse solve
(checked against pytorch-grad-cam's ``NoisyLinearImputer``, which uses SciPy's ``spsolve``).
Unlike Quantus 0.6.0 it works for any number of channels and for 3D volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.metrics.faithfulness import clean_scores, run_batches, scoring_target

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """sum_j w_j v(i + o_j) over the neighbours (zero outside the image) of (N, 1, *spatial).

    The weights are separable: K = (a x a [x a] - centre) / (2^d - 1) with a = (1/2, 1, 1/2), so
    the sum is d three-tap passes minus the centre, O(d) work per pixel."""
    out = v
    for dim in range(2, v.ndim):
        pad = [0, 0] * (v.ndim - dim - 1) + [1, 1]
        padded = F.pad(out, pad)
        n = out.shape[dim]
        out = padded.narrow(dim, 1, n) + 0.5 * (padded.narrow(dim, 0, n) + padded.narrow(dim, 2, n))
    return (out - v) / (2 ** (v.ndim - 2) - 1)


def linear_impute(images: torch.Tensor, removed: torch.Tensor, tol: float = 1e-6,
                  max_iter: int = 5000) -> torch.Tensor:
    """Fill the ``removed`` pixels of ``images`` (N, C, *spatial), ``removed`` (N, *spatial) bool,
    with the solution of the neighbour-mean system (no noise): Jacobi-preconditioned conjugate
    gradients in float32 for all images and channels together, to a relative residual ``tol`` (the
    imputation noise, 0.01, is far above it)."""
    n, c = images.shape[:2]
    spatial = images.shape[2:]
    x = images.float().reshape(n * c, 1, *spatial)
    u = removed[:, None].expand(n, c, *spatial).reshape(n * c, 1, *spatial).float()
    diag = neighbour_sum(torch.ones_like(u)) * u + (1 - u)  # identity on kept pixels (unused)
    rhs = neighbour_sum(x * (1 - u)) * u

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (diag * v - neighbour_sum(v * u)) * u

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))

    sol = rhs / diag
    res = rhs - apply(sol)
    z = res / diag
    p = z.clone()
    rz = dot(res, z)
    bound = tol * rhs.flatten(1).norm(dim=1).clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((res.flatten(1).norm(dim=1) <= bound).all()):
            break
        ap = apply(p)
        alpha = rz / dot(p, ap).clamp_min(1e-30)
        sol = sol + alpha * p
        res = res - alpha * ap
        z = res / diag
        rz_new = dot(res, z)
        p = z + rz_new / rz.clamp_min(1e-30) * p
        rz = rz_new
    filled = torch.where(u > 0, sol, x)
    return filled.reshape(n, c, *spatial).to(images.dtype)


def removal_masks(attributions: torch.Tensor, fractions: torch.Tensor,
                  most_relevant_first: bool) -> torch.Tensor:
    """(B, F, *spatial) pixels removed at each fraction: MoRF removes a >= q_{1-p}(a); LeRF
    removes -a >= q_{1-p}(-a) (quantiles with linear interpolation, as ``numpy.percentile``)."""
    b = attributions.shape[0]
    a = attributions.reshape(b, -1).double()
    if not most_relevant_first:
        a = -a
    q = torch.quantile(a, (1 - fractions).to(a), dim=1).T  # (B, F)
    removed = a[:, None, :] >= q[:, :, None]
    return removed.reshape(b, len(fractions), *attributions.shape[1:])


def road_scores(ctx: Context, fractions: tuple[float, ...], noise: float, seed: int,
                probability: bool) -> dict[str, torch.Tensor]:
    """Scores (B, F) after MoRF and LeRF removal, and the clean scores; computed once per map."""
    return ctx.shared(("road", tuple(fractions), noise, seed, probability),
                      lambda: _road_scores(ctx, fractions, noise, seed, probability))


def _road_scores(ctx: Context, fractions: tuple[float, ...], noise: float, seed: int,
                 probability: bool) -> dict[str, torch.Tensor]:
    x = ctx.inputs
    if x.ndim not in (4, 5):
        raise ConfigError("ROAD needs 2D or 3D images (B, C, H, W) or (B, C, D, H, W)")
    if not all(0 < f < 1 for f in fractions):
        raise ConfigError(f"ROAD fractions must lie strictly between 0 and 1, got {fractions}")
    b = x.shape[0]
    fr = torch.tensor(fractions, dtype=torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    target = scoring_target(ctx, probability)
    out: dict[str, torch.Tensor] = {}
    for order, morf in (("morf", True), ("lerf", False)):
        removed = removal_masks(ctx.attributions, fr.to(x.device), morf)  # (B, F, *spatial)
        flat_removed = removed.reshape(b * len(fr), *removed.shape[2:])
        images = x.repeat_interleave(len(fr), dim=0)
        filled = linear_impute(images, flat_removed)
        if noise > 0:
            jitter = torch.randn(filled.shape, generator=gen).to(filled) * noise
            filled = torch.where(flat_removed[:, None], filled + jitter, filled)
        rep = torch.arange(b, device=x.device).repeat_interleave(len(fr))
        scores = run_batches(ctx.model, lambda lo, hi, f=filled: f[lo:hi], len(filled), x, target,
                             lambda lo, hi, r=rep: r[lo:hi])
        out[order] = scores.reshape(b, len(fr))
    out["clean"] = clean_scores(ctx, probability)
    return out


@dataclass
class _Road(Metric):
    fractions: tuple[float, ...] = FRACTIONS
    noise: float = 0.01
    seed: int = 0
    probability: bool = True
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def scores(self, ctx: Context) -> dict[str, torch.Tensor]:
        return road_scores(ctx, tuple(float(f) for f in self.fractions), self.noise, self.seed,
                           self.probability)


@register
@dataclass
class RoadMoRF(_Road):
    """ROAD, most relevant first: mean score after removing fractions p of the top pixels."""

    name: ClassVar[str] = "road_morf"
    higher_is_better: ClassVar[bool] = False

    def compute(self, ctx: Context) -> MetricResult:
        s = self.scores(ctx)
        return MetricResult(self.name, s["morf"].mean(1), curves=s["morf"],
                            extras={"fractions": list(self.fractions), "clean": s["clean"]})


@register
@dataclass
class RoadLeRF(_Road):
    """ROAD, least relevant first: mean score after removing fractions p of the bottom pixels."""

    name: ClassVar[str] = "road_lerf"
    higher_is_better: ClassVar[bool] = True

    def compute(self, ctx: Context) -> MetricResult:
        s = self.scores(ctx)
        return MetricResult(self.name, s["lerf"].mean(1), curves=s["lerf"],
                            extras={"fractions": list(self.fractions), "clean": s["clean"]})


@register
@dataclass
class Road(_Road):
    """ROAD combined: (mean LeRF score - mean MoRF score) / 2; higher is better."""

    name: ClassVar[str] = "road"
    higher_is_better: ClassVar[bool] = True

    def compute(self, ctx: Context) -> MetricResult:
        s = self.scores(ctx)
        return MetricResult(self.name, (s["lerf"].mean(1) - s["morf"].mean(1)) / 2,
                            extras={"morf": s["morf"], "lerf": s["lerf"], "clean": s["clean"],
                                    "fractions": list(self.fractions)})


