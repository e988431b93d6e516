"""Tensor resizing shared by the readers (images bilinear with antialiasing, masks nearest)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize (C, *spatial) to (C, *size): bilinear/trilinear, antialiased when shrinking in 2D."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    mode = "bilinear" if image.ndim == 3 else "trilinear"
    out = F.interpolate(image[None].float(), size=tuple(size), mode=mode, align_corners=False,
                        antialias=image.ndim == 3)
    return out[0]


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a (K, *spatial) mask with nearest-neighbour sampling; keeps it binary."""
    if tuple(mask.shape[1:]) == tuple(size):
        return mask
    return F.interpolate(mask[None].float(), size=tuple(size), mode="nearest-exact")[0]


def zscore_nonzero(volume: torch.Tensor) -> torch.Tensor:
    """Per-channel z-score over the non-zero voxels (the usual BraTS normalisation); zeros stay 0."""
    out = torch.zeros_like(volume, dtype=torch.float32)
    for c in range(volume.shape[0]):
        ch = volume[c].float()
        fg = ch != 0
        if fg.any():
            vals = ch[fg]
            out[c][fg] = (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-8)
    return out


def resize_affine(affine: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Voxel-to-world affine after resampling ``old`` voxels to ``new`` (voxel centres aligned, as
    ``align_corners=False`` resamples): column j scales by old/new, the origin moves half a voxel."""
    scale = torch.tensor([o / n for o, n in zip(old, new, strict=True)], dtype=affine.dtype)
    out = affine.clone()
    out[:3, :3] = affine[:3, :3] * scale
    out[:3, 3] = affine[:3, 3] + affine[:3, :3] @ (0.5 * scale - 0.5)
    return out
