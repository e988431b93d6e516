"""Tensor resizing shared by the readers (images bilinear with antialiasing, masks nearest)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError

RESIZE_METHODS = ("bilinear", "pil_uint8", "nearest", "bicubic")


def check_resize(method: str) -> str:
    """``method`` if it is one of RESIZE_METHODS, else a one-line ConfigError naming them."""
    if method not in RESIZE_METHODS:
        raise ConfigError(f"resize must be one of {', '.join(RESIZE_METHODS)}, got {method!r}")
    return method


def resize_image(image: torch.Tensor, size: Sequence[int], method: str = "bilinear") -> torch.Tensor:
    """Resize (C, *spatial) to (C, *size). ``method``:

    - ``bilinear`` (the default): bilinear/trilinear, antialiased in 2D; on float images equal to
      PIL's ``Image.resize(BILINEAR)`` in mode "F" (within 1e-5);
    - ``pil_uint8``: what torchvision's ``Resize`` does to an 8-bit PIL image before ``ToTensor``:
      the [0, 1] image as 8 bits, PIL's bilinear resize, rounded to 8 bits, back to [0, 1] (2D);
    - ``nearest``, ``bicubic`` (2D, antialiased)."""
    if method not in RESIZE_METHODS:
        raise ConfigError(f"resize must be one of {', '.join(RESIZE_METHODS)}, got {method!r}")
    if tuple(image.shape[1:]) == tuple(size):
        return image
    if method == "pil_uint8":
        if image.ndim != 3:
            raise ConfigError("resize pil_uint8 is for 2D images")
        import numpy as np
        from PIL import Image

        out = []
        for channel in image.float().clamp(0, 1).numpy():
            small = Image.fromarray(np.rint(channel * 255).astype(np.uint8), mode="L")
            out.append(np.asarray(small.resize((int(size[1]), int(size[0])), Image.BILINEAR),
                                  dtype=np.float32) / 255)
        return torch.from_numpy(np.stack(out))
    if method == "nearest":
        return F.interpolate(image[None].float(), size=tuple(size), mode="nearest-exact")[0]
    if method == "bicubic":
        if image.ndim != 3:
            raise ConfigError("resize bicubic is for 2D images")
        return F.interpolate(image[None].float(), size=tuple(size), mode="bicubic",
                             align_corners=False, antialias=True)[0]
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
