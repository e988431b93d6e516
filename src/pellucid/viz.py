"""Figures: a heatmap overlay per case and a cases x methods grid. 3D maps are shown on the axial
slice (last axis) that holds the most attribution."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def best_slice(attribution: np.ndarray) -> int:
    """Index along the last axis of a 3D map with the largest summed |attribution|."""
    return int(np.abs(attribution).reshape(-1, attribution.shape[-1]).sum(0).argmax())


def display_pair(image: torch.Tensor | np.ndarray, attribution: torch.Tensor | np.ndarray,
                 channel: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(grey image, map) as 2D arrays for display: one channel of the image, and for 3D the slice
    with the most attribution. ``image`` is (C, *spatial) or (*spatial); the map (1, *spatial)."""
    img, att = _to_numpy(image), _to_numpy(attribution)
    if att.ndim == img.ndim and att.shape[0] == 1:
        att = att[0]
    if img.ndim == att.ndim + 1:
        img = img[min(channel, img.shape[0] - 1)]
    if att.ndim == 3:
        k = best_slice(att)
        img, att = img[..., k], att[..., k]
    return img, att


def overlay(image: torch.Tensor | np.ndarray, attribution: torch.Tensor | np.ndarray,
            title: str = "", alpha: float = 0.5, cmap: str = "jet", channel: int = 0,
            contour: np.ndarray | None = None) -> Figure:
    """Image (C, *spatial) with the map (1, *spatial) on top, a colour bar and a title."""
    img, att = display_pair(image, attribution, channel)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(img, cmap="gray")
    lo, hi = float(att.min()), float(att.max())
    im = ax.imshow(att, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi if hi > lo else lo + 1)
    if contour is not None and contour.any():
        ax.contour(contour, levels=[0.5], colors="white", linewidths=0.8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attribution")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    return fig


def grid(images: Sequence, maps: dict[str, Sequence], row_titles: Sequence[str] | None = None,
         contours: Sequence[np.ndarray | None] | None = None, alpha: float = 0.5,
         channel: int = 0) -> Figure:
    """Cases (rows) x methods (columns): the image first, then each method's overlay."""
    methods = list(maps)
    n = len(images)
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.2 * n),
                             squeeze=False)
    for i in range(n):
        base, _ = display_pair(images[i], maps[methods[0]][i], channel)
        axes[i, 0].imshow(base, cmap="gray")
        if contours is not None and contours[i] is not None and np.asarray(contours[i]).any():
            axes[i, 0].contour(np.asarray(contours[i]), levels=[0.5], colors="lime", linewidths=0.8)
        axes[i, 0].set_title(row_titles[i] if row_titles else "image", fontsize=7)
        for j, m in enumerate(methods, start=1):
            img, att = display_pair(images[i], maps[m][i], channel)
            axes[i, j].imshow(img, cmap="gray")
            axes[i, j].imshow(att, cmap="jet", alpha=alpha)
            if i == 0:
                axes[i, j].set_title(m, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
