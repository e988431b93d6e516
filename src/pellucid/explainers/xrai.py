"""XRAI: region attribution from over-segmentations (Kapishnikov et al. 2019).

1. Base attribution: integrated gradients, averaged over two constant baselines (the image's
   minimum and its maximum), (x - x0) / n * sum_{k=0}^{n-1} dy/dx(x0 + k/(n-1) (x - x0)) (``steps``
   = n points from the baseline to the input, both ends included, as PAIR's ``saliency``), then the
   maximum over channels.
2. Regions: Felzenszwalb's graph segmentation of the image (min-max scaled to [-1, 1] and resized to
   224 x 224 by a cubic spline, as PAIR does) at scales 50, 100, 150, 250, 500 and 1200 (sigma 0.8,
   segments of at least 150 px), each segment taken back to the image grid (nearest) and dilated by
   a disk of radius 5.
3. Greedy selection (``algorithm="full"``): starting from nothing, add the region whose pixels not
   yet covered have the highest mean attribution (regions adding fewer than ``min_pixel_diff``
   pixels are dropped), until ``area_threshold`` of the image is covered; each pixel gets the gain
   of the region that covered it, the rest the mean attribution of the rest. ``"fast"`` ranks
   regions once by their own mean.

Equal to PAIR's ``saliency.core.XRAI`` 0.2.1 (same base attribution, segments and selection; the
regions are held as one matrix, so each selection round is one product). Felzenszwalb's
segmentation is defined on 2D images: a volume is refused.

Kapishnikov et al., "XRAI: Better attributions through regions", ICCV 2019; Felzenszwalb &
Huttenlocher, "Efficient graph-based image segmentation", IJCV 2004.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution, rows_for
from pellucid.explainers.gradients import gradient_rows
from pellucid.explainers.registry import register

SCALES = (50, 100, 150, 250, 500, 1200)
SEGMENT_SIGMA = 0.8
MIN_SEGMENT = 150
SEGMENT_SIZE = (224, 224)
DILATION = 5
ALGORITHMS = ("full", "fast")


def felzenszwalb_regions(image: np.ndarray, resize: bool = True) -> np.ndarray:
    """(M, H, W) boolean regions of one (C, H, W) image: every segment of every scale, dilated."""
    from skimage import segmentation
    from skimage.morphology import disk
    from skimage.transform import resize as sk_resize

    im = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    shape = im.shape[:2]
    lo, hi = im.min(), im.max()
    im = (im - lo) / (hi - lo) * 2.0 - 1.0 if hi > lo else np.zeros_like(im)
    if resize:
        im = sk_resize(im, SEGMENT_SIZE, order=3, mode="constant", preserve_range=True,
                       anti_aliasing=True)
    regions = []
    footprint = disk(DILATION)
    for scale in SCALES:
        seg = segmentation.felzenszwalb(im, scale=scale, sigma=SEGMENT_SIGMA, min_size=MIN_SEGMENT)
        if resize:
            seg = sk_resize(seg, shape, order=0, preserve_range=True, mode="constant",
                            anti_aliasing=False).astype(int)
        regions += [_dilated(seg == label, footprint)
                    for label in range(seg.min(), seg.max() + 1)]
    return np.stack(regions)


def _dilated(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``skimage.morphology.dilation(mask, footprint)`` of a boolean mask, computed on its bounding
    box grown by the footprint's radius only (the same pixels: a symmetric convex footprint reaches
    nothing further, and the edge reflection skimage pads with adds none)."""
    from scipy import ndimage

    out = np.zeros_like(mask)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if not len(rows):
        return out
    r = footprint.shape[0] // 2
    top, bottom = max(rows[0] - r, 0), min(rows[-1] + r + 1, mask.shape[0])
    left, right = max(cols[0] - r, 0), min(cols[-1] + r + 1, mask.shape[1])
    out[top:bottom, left:right] = ndimage.binary_dilation(mask[top:bottom, left:right],
                                                          structure=footprint)
    return out


def select_regions(attr: torch.Tensor, regions: torch.Tensor, algorithm: str = "full",
                   area_threshold: float = 1.0, min_pixel_diff: int = 50) -> torch.Tensor:
    """XRAI's map of one sample from its attribution (H, W) and regions (M, H, W), float64."""
    a = attr.flatten().double()
    masks = regions.flatten(1).bool()
    out = torch.full_like(a, -torch.inf)
    covered = torch.zeros_like(masks[0])
    if algorithm == "full":
        alive = torch.arange(len(masks))  # the regions still in play, in PAIR's scan order
        while covered.double().mean() <= area_threshold:
            new = masks[alive] & ~covered
            count = new.sum(1)
            keep = count >= min_pixel_diff
            alive, new, count = alive[keep], new[keep], count[keep]
            if not len(alive):
                break
            gain = (new.double() @ a) / count
            best = int(gain.argmax())  # the first of equal gains, as PAIR's scan in order
            out[new[best]] = gain[best]
            covered |= masks[alive[best]]
            alive = torch.cat([alive[:best], alive[best + 1:]])
    else:
        own = (masks.double() @ a) / masks.sum(1).clamp_min(1)
        own = torch.where(masks.any(1), own, -torch.inf)
        for k in sorted(range(len(masks)), key=lambda i: -float(own[i])):  # stable, as PAIR's sort
            new = masks[k] & ~covered
            if int(new.sum()) < min_pixel_diff:
                continue
            out[new] = a[new].mean()
            covered |= masks[k]
    rest = out == -torch.inf
    if rest.any():
        out[rest] = a[rest].mean()
    return out.view_as(attr)


@register
@dataclass
class XRAI(InputAttribution):
    """XRAI (Kapishnikov et al. 2019): integrated gradients from a black and a white baseline,
    pooled over Felzenszwalb regions at six scales, regions ranked greedily by attribution density;
    ``steps`` IG points per baseline, ``algorithm`` ``"full"`` or ``"fast"``, ``area_threshold``
    the covered fraction at which the greedy ranking stops. 2D images only."""

    steps: int = 100
    algorithm: str = "full"
    area_threshold: float = 1.0
    min_pixel_diff: int = 50
    resize: bool = True
    batch_size: int | None = None
    name: ClassVar[str] = "xrai"
    input_gradients: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"xrai: algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.steps < 2 or not 0 < self.area_threshold <= 1 or self.min_pixel_diff < 1:
            raise ConfigError("xrai needs steps >= 2, 0 < area_threshold <= 1, min_pixel_diff >= 1")

    def base_attribution(self, runner, model, inputs, bound) -> torch.Tensor:
        """PAIR's integrated gradients, mean over the min and max baselines, max over channels."""
        b, rows = inputs.shape[0], rows_for(inputs)
        shape = (-1, *([1] * (inputs.ndim - 1)))
        low = inputs.flatten(1).min(1).values.view(shape).expand_as(inputs)
        high = inputs.flatten(1).max(1).values.view(shape).expand_as(inputs)
        alphas = np.linspace(0, 1, self.steps)
        per_call = max(1, gradient_rows(self.batch_size, model, inputs) // b)
        total = torch.zeros_like(inputs)
        for base in (low, high):
            diff, grads = inputs - base, torch.zeros_like(inputs)
            for start in range(0, self.steps, per_call):
                chunk = alphas[start:start + per_call]
                x = torch.cat([base + float(a) * diff for a in chunk]).requires_grad_(True)
                with torch.enable_grad():
                    scores = bound.score(runner.forward(x), rows.repeat(len(chunk)))
                    (grad,) = runner.backward(scores.sum(), [x])
                grads += grad.view(len(chunk), *inputs.shape).sum(0)
            total += grads * diff / self.steps
        return (total / 2).amax(1).detach()

    def attribute(self, runner, model, inputs, bound, output):
        if inputs.ndim != 4:
            raise ConfigError("xrai: Felzenszwalb's segmentation is defined on 2D images; a volume "
                              "is refused (use a region method defined in 3D, e.g. occlusion)")
        attr = self.base_attribution(runner, model, inputs, bound)
        maps = []
        for i in range(inputs.shape[0]):
            regions = torch.from_numpy(felzenszwalb_regions(inputs[i].cpu().numpy(), self.resize))
            maps.append(select_regions(attr[i].cpu(), regions, self.algorithm,
                                       self.area_threshold, self.min_pixel_diff))
        out = torch.stack(maps).to(inputs)[:, None]
        return out, {"ig": attr}
