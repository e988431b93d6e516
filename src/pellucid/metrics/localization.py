"""Localisation metrics: does the explanation point at the ground-truth region?

A sample whose mask is empty is excluded (NaN), never counted as a hit.

=====================  ========================================================  ======================
metric                 score per sample                                          source
=====================  ========================================================  ======================
pointing_game          1 if a maximum of the map lies in the mask (dilated by    Zhang et al. 2018
                       ``tolerance`` pixels), else 0                             (TorchRay: 15 px)
energy_pointing_game   sum of the positive map inside the mask / its total       Wang et al. 2020
relevance_mass         sum of relevance inside / total relevance (positive part  Arras et al. 2022
                       with ``positive=True``)
relevance_rank         fraction of the K highest-ranked pixels inside the mask,  Arras et al. 2022
                       K = mask size
iou, dice              overlap of the binarised map (Otsu, fixed threshold or    CheXlocalize, Saporta
                       top-k %) with the mask                                    et al. 2022
auprc                  average precision of the pixels' values as detectors of   Arun et al. 2021
                       the mask
=====================  ========================================================  ======================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register


def _flat(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = ctx.attributions.shape[0]
    a = ctx.attributions.reshape(b, -1).float()
    m = ctx.masks.reshape(b, -1).bool()
    empty = m.sum(1) == 0
    return a, m, empty


def _nan_where(scores: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    scores = scores.float()  # (a bool tensor would turn NaN into True: Quantus 0.6.0's bug)
    return torch.where(empty, torch.full_like(scores, float("nan")), scores)


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (B, *spatial) masks by a (2r+1)-wide cube (max pooling), 2D or 3D."""
    if radius <= 0:
        return masks
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[masks.ndim - 1]
    return pool(masks[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


@register
@dataclass
class PointingGame(Metric):
    """Pointing game: is a maximum of the map inside the (tolerance-dilated) mask?

    ``ties``: ``any`` (a hit when any of several equal maxima is inside, as Quantus) or ``first``
    (only the first maximum in C order counts, as ``argmax`` does in TorchRay)."""

    tolerance: int = 0
    ties: str = "any"
    name: ClassVar[str] = "pointing_game"
    gallery_rank: ClassVar[int | None] = 1
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        if self.ties not in ("any", "first"):
            raise ConfigError(f"pointing_game: ties must be 'any' or 'first', got {self.ties!r}")
        masks = dilate(ctx.masks.bool(), self.tolerance)
        b = masks.shape[0]
        a = ctx.attributions.reshape(b, -1)
        if self.ties == "first":
            peak = torch.zeros_like(a, dtype=torch.bool)
            peak[torch.arange(b, device=a.device), a.argmax(1)] = True
        else:
            peak = a == a.amax(1, keepdim=True)
        hit = (peak & masks.reshape(b, -1)).any(1)
        empty = ctx.masks.reshape(b, -1).sum(1) == 0
        return MetricResult(self.name, _nan_where(hit, empty))


@register
@dataclass
class EnergyPointingGame(Metric):
    """Energy-based pointing game: share of the map's energy inside the mask.

    ``normalise`` the map first: ``clip`` (negative values to 0: the default, Score-CAM's code),
    ``none`` (the raw map: a signed map's negative part counts against), or ``clip_minmax`` (clip,
    then min-max to [0, 1] per sample, as pytorch-grad-cam's ``scale_cam_image`` hands a map out)."""

    normalise: str = "clip"
    name: ClassVar[str] = "energy_pointing_game"
    gallery_rank: ClassVar[int | None] = 0
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        a, m, empty = _flat(ctx)
        if self.normalise not in ("clip", "none", "clip_minmax"):
            raise ConfigError(f"energy_pointing_game: normalise must be 'clip', 'none' or "
                              f"'clip_minmax', got {self.normalise!r}")
        if self.normalise != "none":
            a = a.clamp_min(0)
        if self.normalise == "clip_minmax":
            lo = a.amin(1, keepdim=True)
            a = (a - lo) / (a.amax(1, keepdim=True) - lo).clamp_min(1e-12)
        total = a.sum(1)
        score = (a * m).sum(1) / (total.clamp_min(1e-12) if self.normalise != "none" else total)
        return MetricResult(self.name, _nan_where(score, empty))


@register
@dataclass
class RelevanceMass(Metric):
    """Relevance mass accuracy: relevance inside the mask over all relevance."""

    positive: bool = True
    name: ClassVar[str] = "relevance_mass"
    gallery_rank: ClassVar[int | None] = 2
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        a, m, empty = _flat(ctx)
        if self.positive:
            a = a.clamp_min(0)
        score = (a * m).sum(1) / a.sum(1)
        return MetricResult(self.name, _nan_where(score, empty))


@register
@dataclass
class RelevanceRank(Metric):
    """Relevance rank accuracy: share of the top-K pixels (K = mask size) inside the mask."""

    name: ClassVar[str] = "relevance_rank"
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        a, m, empty = _flat(ctx)
        order = torch.argsort(-a, dim=1, stable=True)
        k = m.sum(1)
        ranked = torch.gather(m, 1, order)
        top = torch.arange(a.shape[1], device=a.device)[None] < k[:, None]
        score = (ranked & top).sum(1).float() / k.clamp_min(1)
        return MetricResult(self.name, _nan_where(score, empty))


def otsu_threshold_skimage(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row as ``skimage.filters.threshold_otsu`` computes it for float
    images: a ``bins``-bin histogram over [min, max], the threshold the centre of the bin that
    maximises w1 w2 (mu1 - mu2)^2 between the bins up to it and those after it."""
    out = []
    for row in values.double():
        lo, hi = row.min(), row.max()
        if lo == hi:
            out.append(lo)
            continue
        hist = torch.histc(row, bins, float(lo), float(hi))
        edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64)
        centres = (edges[:-1] + edges[1:]) / 2
        w1, w2 = hist.cumsum(0), hist.flip(0).cumsum(0).flip(0)
        m1 = (hist * centres).cumsum(0) / w1.clamp_min(1e-300)
        m2 = ((hist * centres).flip(0).cumsum(0) / w2.flip(0).clamp_min(1e-300)).flip(0)
        between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
        out.append(centres[int(torch.argmax(between))])
    return torch.stack(out).to(values.dtype)[:, None]


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row (maximises the between-class variance over ``bins`` levels)."""
    lo, hi = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    scaled = ((values - lo) / (hi - lo).clamp_min(1e-12) * (bins - 1)).round().long()
    hist = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(
        1, scaled, torch.ones_like(values))
    p = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(bins, device=values.device, dtype=p.dtype)
    w0 = p.cumsum(1)
    mu0 = (p * levels).cumsum(1)
    mu_t = mu0[:, -1:]
    between = (mu_t * w0 - mu0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    best = between.argmax(1, keepdim=True).float()
    return lo + (best + 0.5) / (bins - 1) * (hi - lo)


def binarise(a: torch.Tensor, method: str, value: float, otsu: str = "pellucid") -> torch.Tensor:
    """(B, N) maps to masks: ``otsu``, ``threshold`` (of the min-max scaled map) or ``topk``
    (the ``value`` fraction of highest pixels). ``otsu``: ``pellucid`` (256 rounded levels of the
    min-max map) or ``skimage`` (``skimage.filters.threshold_otsu``'s 256 bins)."""
    if method == "otsu":
        if otsu not in ("pellucid", "skimage"):
            raise ConfigError(f"otsu must be 'pellucid' or 'skimage', got {otsu!r}")
        return a > (otsu_threshold(a) if otsu == "pellucid" else otsu_threshold_skimage(a))
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    scaled = (a - lo) / (hi - lo).clamp_min(1e-12)
    if method == "threshold":
        return scaled >= value
    if method == "topk":
        k = max(1, round(value * a.shape[1]))
        kth = torch.topk(a, k, dim=1).values[:, -1:]
        return a >= kth
    raise ConfigError(f"binarise must be 'otsu', 'threshold' or 'topk', got {method!r}")


@dataclass
class _Overlap(Metric):
    binarise: str = "otsu"
    value: float = 0.5
    otsu: str = "pellucid"  # or "skimage": scikit-image's threshold_otsu
    clip: str = "none"  # "positive": max(a, 0) before binarising; "abs": |a|
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        a, m, empty = _flat(ctx)
        if self.clip not in ("none", "positive", "abs"):
            raise ConfigError(f"{self.name}: clip must be 'none', 'positive' or 'abs', "
                              f"got {self.clip!r}")
        # a signed map (integrated gradients, LRP): Otsu on the raw values splits the strongest
        # negative evidence from the rest, so the "region" is mostly background; clip first
        a = a.clamp_min(0) if self.clip == "positive" else a.abs() if self.clip == "abs" else a
        pred = binarise(a, self.binarise, self.value, self.otsu)
        inter = (pred & m).sum(1).float()
        score = self.formula(inter, pred.sum(1).float(), m.sum(1).float())
        excluded = empty | (pred.sum(1) == 0)  # CheXlocalize: both masks non-empty
        return MetricResult(self.name, _nan_where(score, excluded))


@register
@dataclass
class IoU(_Overlap):
    """IoU of the binarised map with the mask (counted when both are non-empty)."""

    name: ClassVar[str] = "iou"
    gallery_rank: ClassVar[int | None] = 3

    @staticmethod
    def formula(inter, pred, true):
        return inter / (pred + true - inter)


@register
@dataclass
class Dice(_Overlap):
    """Dice of the binarised map with the mask (counted when both are non-empty)."""

    name: ClassVar[str] = "dice"

    @staticmethod
    def formula(inter, pred, true):
        return 2 * inter / (pred + true)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision of one score vector against binary labels, sum_k (R_k - R_{k-1}) P_k over
    the distinct score thresholds (equal to scikit-learn's ``average_precision_score``)."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order].double()
    tps, fps = y.cumsum(0), (1 - y).cumsum(0)
    ends = torch.nonzero(s[1:] != s[:-1]).flatten()
    ends = torch.cat([ends, torch.tensor([len(s) - 1], device=s.device)])
    tp, fp = tps[ends], fps[ends]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    previous = torch.cat([torch.zeros(1, dtype=recall.dtype, device=recall.device), recall[:-1]])
    return ((recall - previous) * precision).sum()


@register
@dataclass
class LocalizationAUPRC(Metric):
    """Localisation AUPRC: average precision of the map's pixels as detectors of the mask."""

    name: ClassVar[str] = "auprc"
    gallery_rank: ClassVar[int | None] = 4
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        a, m, empty = _flat(ctx)
        scores = torch.stack([average_precision(a[i], m[i]) if not empty[i]
                              else torch.tensor(float("nan"), dtype=torch.float64)
                              for i in range(len(a))])
        return MetricResult(self.name, scores.float())
