"""Large volumes, patch-based: a segmentation network applied by sliding window (MONAI's
``sliding_window_inference``: overlapping patches of ``roi_size`` blended with constant or Gaussian
weights) wrapped as one differentiable module, so gradient and perturbation explanations of the
stitched output need memory for one batch of patches, not the whole volume. Where the volume fits
in one patch the result equals the network on the whole volume (tests/test_sliding_window.py).

CAMs hook a layer that runs once per patch, so they are refused on the wrapper: explain the
network itself, patch by patch, for those."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pellucid.errors import ConfigError


class SlidingWindow(nn.Module):
    """``model`` applied by sliding window over inputs larger than ``roi_size``."""

    runs_per_patch = True  # layer hooks would see one patch at a time: CAMs refuse it

    def __init__(self, model: nn.Module, roi_size: Sequence[int], overlap: float = 0.25,
                 batch_size: int = 4, mode: str = "gaussian") -> None:
        super().__init__()
        if mode not in ("constant", "gaussian"):
            raise ConfigError(f"sliding-window mode must be 'constant' or 'gaussian', got {mode!r}")
        if not 0 <= overlap < 1:
            raise ConfigError(f"sliding-window overlap must be in [0, 1), got {overlap}")
        self.model = model
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap, self.batch_size, self.mode = overlap, batch_size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        if len(self.roi_size) != x.ndim - 2:
            raise ConfigError(f"roi_size {self.roi_size} does not match a {x.ndim - 2}D input")
        return sliding_window_inference(x, self.roi_size, self.batch_size, self.model,
                                        overlap=self.overlap, mode=self.mode)


def windowed(loaded, roi_size: Sequence[int], overlap: float = 0.25, batch_size: int = 4,
             mode: str = "gaussian"):
    """A :class:`pellucid.models.LoadedModel` applied by sliding window with patches of
    ``roi_size``; its card keeps everything but the CAM layer (CAMs are refused on the wrapper)."""
    import dataclasses

    card = loaded.card
    if card is not None and card.task != "segmentation":
        raise ConfigError("sliding-window inference is for segmentation networks (dense outputs)")
    if card is not None and len(roi_size) != card.spatial_dims:
        raise ConfigError(f"sliding window {list(roi_size)} has {len(roi_size)} sides; the model is "
                          f"{card.spatial_dims}D")
    module = SlidingWindow(loaded.module, roi_size, overlap, batch_size, mode).eval()
    new_card = dataclasses.replace(card, default_layer=None) if card is not None else None
    return dataclasses.replace(loaded, module=module, card=new_card)
