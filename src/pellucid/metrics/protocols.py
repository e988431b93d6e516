"""Published localisation protocols for chest X-ray explanations, with bootstrap intervals.

- ``chexlocalize`` (Saporta et al. 2022, Nature Machine Intelligence): the map (already at image
  resolution) is min-max scaled and binarised with Otsu's threshold (or a fixed ``threshold``);
  per image IoU with the ground-truth mask, counted only when both masks are non-empty; mIoU is the
  mean over counted images. The hit rate is the share of images whose map maximum lies in the mask.
  Both come with a 95 % percentile-bootstrap interval over images (1000 resamples).
- ``box_accuracy`` (Wang et al. 2017, ChestX-ray8): the map is min-max scaled and thresholded at
  ``threshold``; boxes are drawn around every connected component above it, and the predicted
  region B is the union of those boxes. With G the union of the sample's ground-truth boxes,
  IoBB = |B & G| / |B| (how much of what the map marks lies in the box) and IoU = |B & G| / |B | G|;
  the per-sample score is the IoBB, and the accuracies (share of samples with IoU or IoBB > T, T =
  0.1 ... 0.7) are in ``extras``. A map that marks a one-pixel blob in the box and a large region
  elsewhere scores the share of its marked area in the box, not 1.
  ``mode="best_component"`` keeps the earlier per-component reading (the best IoBB of any single
  component's box, by name only: a one-pixel blob in the box scores 1, a random map about 0.85).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pellucid.bootstrap import bootstrap_ci
from pellucid.errors import ConfigError
from pellucid.metrics.base import Context, Metric, MetricResult, register
from pellucid.metrics.localization import binarise

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else float("nan")


@register
@dataclass
class CheXlocalize(Metric):
    """CheXlocalize protocol: per-image IoU of the Otsu-binarised map (mIoU and hit rate with CIs)."""

    binarise: str = "otsu"
    threshold: float = 0.5
    resamples: int = 1000
    seed: int = 0
    name: ClassVar[str] = "chexlocalize"
    gallery_rank: ClassVar[int | None] = 5
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"mask"})

    def compute(self, ctx: Context) -> MetricResult:
        b = ctx.attributions.shape[0]
        a = ctx.attributions.reshape(b, -1).float()
        m = ctx.masks.reshape(b, -1).bool()
        pred = binarise(a, self.binarise, self.threshold)
        inter = (pred & m).sum(1).float()
        union = (pred | m).sum(1).float()
        counted = (m.sum(1) > 0) & (pred.sum(1) > 0)
        iou = torch.where(counted, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
        hit = (a == a.amax(1, keepdim=True)) & m
        hits = torch.where(m.sum(1) > 0, hit.any(1).float(), torch.full_like(inter, float("nan")))
        extras = {"miou": _nanmean(iou), "miou_ci": bootstrap_ci(iou, self.resamples, seed=self.seed),
                  "hit_rate": _nanmean(hits),
                  "hit_rate_ci": bootstrap_ci(hits, self.resamples, seed=self.seed), "hits": hits}
        return MetricResult(self.name, iou, extras=extras)


def heatmap_boxes(heatmap: np.ndarray, threshold: float) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1 in pixel edges) around the 8-connected components of the min-max
    scaled map at or above ``threshold``."""
    from scipy import ndimage

    lo, hi = heatmap.min(), heatmap.max()
    if hi <= lo:
        return []
    labels, _ = ndimage.label((heatmap - lo) / (hi - lo) >= threshold, structure=np.ones((3, 3)))
    return [(float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            for sl in ndimage.find_objects(labels) if sl is not None]


def box_overlaps(pred: tuple[float, ...], true: tuple[float, ...]) -> tuple[float, float]:
    """(IoU, IoBB) of a predicted box with a ground-truth box, both x0, y0, x1, y1."""
    ix = max(0.0, min(pred[2], true[2]) - max(pred[0], true[0]))
    iy = max(0.0, min(pred[3], true[3]) - max(pred[1], true[1]))
    inter = ix * iy
    area_p = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_t = (true[2] - true[0]) * (true[3] - true[1])
    return inter / (area_p + area_t - inter), inter / area_p


@register
@dataclass
class BoxAccuracy(Metric):
    """ChestX-ray14 box protocol: IoBB of the map's thresholded boxes with the ground-truth boxes."""

    threshold: float = 0.5
    thresholds: tuple[float, ...] = THRESHOLDS
    mode: str = "union"
    name: ClassVar[str] = "box_accuracy"
    category: ClassVar[str] = "localization"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset({"boxes"})

    def compute(self, ctx: Context) -> MetricResult:
        if ctx.attributions.ndim != 3:
            raise ConfigError("box_accuracy is defined for 2D images")
        if self.mode not in ("union", "best_component"):
            raise ConfigError(f"box_accuracy: mode must be 'union' or 'best_component', got "
                              f"{self.mode!r}")
        ious, iobbs = [], []
        for heat, truth in zip(ctx.attributions.detach().cpu().numpy(), ctx.boxes, strict=True):
            truth = [tuple(t) for t in truth.tolist()]
            if not truth:
                ious.append(float("nan"))
                iobbs.append(float("nan"))
                continue
            boxes = heatmap_boxes(heat, self.threshold)
            if self.mode == "best_component":
                pairs = [box_overlaps(p, t) for p in boxes for t in truth]
                ious.append(max((p[0] for p in pairs), default=0.0))
                iobbs.append(max((p[1] for p in pairs), default=0.0))
                continue
            iou, iobb = region_overlaps(boxes, truth, heat.shape)
            ious.append(iou)
            iobbs.append(iobb)
        iou, iobb = torch.tensor(ious), torch.tensor(iobbs)
        valid = ~torch.isnan(iou)
        accuracy = {f"{kind}>{t}": float((v[valid] > t).float().mean()) if valid.any() else float("nan")
                    for kind, v in (("iou", iou), ("iobb", iobb)) for t in self.thresholds}
        return MetricResult(self.name, iobb, extras={"iou": iou, "accuracy": accuracy})


def _box_region(boxes: list[tuple[float, ...]], shape: tuple[int, int]) -> np.ndarray:
    """The pixels (h, w) covered by the union of boxes x0, y0, x1, y1 (pixel edges; a pixel counts
    when its centre lies inside a box)."""
    h, w = shape
    region = np.zeros((h, w), dtype=bool)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    for x0, y0, x1, y1 in boxes:
        region |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return region


def region_overlaps(pred: list[tuple[float, ...]], truth: list[tuple[float, ...]],
                    shape: tuple[int, int]) -> tuple[float, float]:
    """(IoU, IoBB) of the union of the predicted boxes with the union of the ground-truth boxes on
    the image grid; (0, 0) when nothing is predicted."""
    b, g = _box_region(pred, shape), _box_region(truth, shape)
    if not b.any():
        return 0.0, 0.0
    inter = float((b & g).sum())
    return inter / float((b | g).sum()), inter / float(b.sum())
