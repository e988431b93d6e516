"""Similarity of two explanation maps, for the randomisation tests (Adebayo et al. 2018).

- ``spearman`` / ``spearman_abs``: Spearman rank correlation of the signed / absolute maps (ties
  get average ranks, as ``scipy.stats.spearmanr``).
- ``ssim``: structural similarity (Wang et al. 2004) of the per-map min-max scaled maps with a
  Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1: ``skimage.metrics.
  structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``; 2D and 3D.
- ``hog``: Pearson correlation of the histograms of oriented gradients (Dalal & Triggs 2005;
  ``skimage.feature.hog``, 9 orientations, 8 px cells, 2 x 2 blocks) of the min-max scaled maps;
  2D only (NaN for 3D maps).

Each takes (B, *spatial) tensors and returns (B,) float64 (NaN where undefined, e.g. a constant map).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from pellucid.errors import ConfigError

SIMILARITIES = ("spearman", "spearman_abs", "ssim", "hog")


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = a.min(), a.max()
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    u, v = u - u.mean(), v - v.mean()
    den = np.sqrt((u * u).sum() * (v * v).sum())
    return float((u * v).sum() / den) if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    out = []
    for u, v in zip(a.flatten(1).double().cpu().numpy(), b.flatten(1).double().cpu().numpy(),
                    strict=True):
        if absolute:
            u, v = np.abs(u), np.abs(v)
        out.append(_pearson(rankdata(u), rankdata(v)))
    return torch.tensor(out, dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from skimage.metrics import structural_similarity

    out = []
    for u, v in zip(a.double().cpu().numpy(), b.double().cpu().numpy(), strict=True):
        u, v = _minmax(u), _minmax(v)
        out.append(structural_similarity(u, v, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0))
    return torch.tensor(out, dtype=torch.float64)


def hog(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from skimage.feature import hog as features

    if a.ndim != 3:
        return torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    out = []
    for u, v in zip(a.double().cpu().numpy(), b.double().cpu().numpy(), strict=True):
        cell = max(2, min(8, min(u.shape) // 4))
        opts = {"orientations": 9, "pixels_per_cell": (cell, cell), "cells_per_block": (2, 2)}
        out.append(_pearson(features(_minmax(u), **opts), features(_minmax(v), **opts)))
    return torch.tensor(out, dtype=torch.float64)


def pair_similarity(name: str, maps: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(P,) similarity ``name`` between ``maps[i[p]]`` and ``maps[j[p]]``, equal to
    ``similarity(name, maps[i], maps[j])``; the Spearman measures rank each map once, not once
    per pair it is in (the randomisation baseline's 28 pairs of 8 maps: 8 rankings, not 56)."""
    if name not in ("spearman", "spearman_abs"):
        return similarity(name, maps[i], maps[j])
    flat = maps.flatten(1).double().cpu().numpy()
    if name == "spearman_abs":
        flat = np.abs(flat)
    ranks = {k: rankdata(flat[k]) for k in sorted(set(i.tolist()) | set(j.tolist()))}
    return torch.tensor([_pearson(ranks[a], ranks[b]) for a, b in zip(i.tolist(), j.tolist(),
                                                                       strict=True)],
                        dtype=torch.float64)


def similarity(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) similarity ``name`` between maps ``a`` and ``b`` (B, *spatial)."""
    if name == "spearman":
        return spearman(a, b)
    if name == "spearman_abs":
        return spearman(a, b, absolute=True)
    if name == "ssim":
        return ssim(a, b)
    if name == "hog":
        return hog(a, b)
    raise ConfigError(f"similarity must be one of {SIMILARITIES}, got {name!r}")
