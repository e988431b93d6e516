"""Interpretable features for perturbation methods: superpixels (SLIC; supervoxels in 3D), a grid,
or label maps the user gives (e.g. organ masks). Labels are re-indexed to 0..M-1 per sample."""

from __future__ import annotations

import numpy as np
import torch

from pellucid.errors import ConfigError


def slic_labels(image: torch.Tensor, n_segments: int, compactness: float) -> torch.Tensor:
    """SLIC superpixels (2D) or supervoxels (3D) of one image (C, *spatial), channels as features
    (Achanta et al. 2012, scikit-image). The image is min-max scaled to [0, 1] first, for which a
    compactness near 0.1 follows edges (10, meant for Lab colour, gives a near-regular grid)."""
    from skimage.segmentation import slic

    arr = image.detach().float().cpu().numpy()
    arr = (arr - arr.min()) / (arr.max() - arr.min() + 1e-12)
    labels = slic(np.moveaxis(arr, 0, -1), n_segments=n_segments, compactness=compactness,
                  channel_axis=-1, start_label=0, enforce_connectivity=True)
    return torch.from_numpy(labels.astype(np.int64))


def grid_labels(shape: tuple[int, ...], cells: int | tuple[int, ...]) -> torch.Tensor:
    """A regular grid of ``cells`` per axis over ``shape``."""
    cells = (cells,) * len(shape) if isinstance(cells, int) else tuple(cells)
    idx = [torch.div(torch.arange(n) * c, n, rounding_mode="floor")
           for n, c in zip(shape, cells, strict=True)]
    grids = torch.meshgrid(*idx, indexing="ij")
    labels = torch.zeros(shape, dtype=torch.long)
    for g, c in zip(grids, cells, strict=True):
        labels = labels * c + g
    return labels


def _reindex(labels: torch.Tensor) -> torch.Tensor:
    _, inverse = torch.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape)


def feature_labels(inputs: torch.Tensor, features: str | torch.Tensor, n_features: int,
                   compactness: float) -> list[torch.Tensor]:
    """Per-sample label maps (*spatial) with values 0..M_b-1 on the inputs' device."""
    b, spatial = inputs.shape[0], tuple(inputs.shape[2:])
    if isinstance(features, torch.Tensor):
        lab = features.long()
        if tuple(lab.shape) == spatial:
            lab = lab.expand(b, *spatial)
        if lab.ndim == len(spatial) + 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if tuple(lab.shape) != (b, *spatial):
            raise ConfigError(f"features label map has shape {tuple(features.shape)}; expected "
                              f"{spatial} or {(b, *spatial)}")
        return [_reindex(lab[i]).to(inputs.device) for i in range(b)]
    if features == "slic":
        return [slic_labels(inputs[i], n_features, compactness).to(inputs.device) for i in range(b)]
    if features == "grid":
        cells = max(1, round(n_features ** (1 / len(spatial))))
        lab = grid_labels(spatial, cells).to(inputs.device)
        return [_reindex(lab) for _ in range(b)]
    raise ConfigError(f"features must be 'slic', 'grid' or a label tensor, got {features!r}")
