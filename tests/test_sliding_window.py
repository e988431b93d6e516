"""Sliding-window explanation of volumes larger than the network's input: equal to the
whole-volume explanation where the volume fits in one patch, and bounded to patches otherwise."""

from __future__ import annotations

import pytest
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.models.sliding import SlidingWindow
from pellucid.targets import SegmentationTarget


@pytest.fixture(scope="module")
def unet3d():
    torch.manual_seed(0)
    return build("unet", 3, 2, 2, unet_channels=(4, 8, 16)).module.eval()


def test_one_patch_equals_the_whole_volume(unet3d):
    x = torch.randn(1, 2, 16, 16, 16)
    wrapped = SlidingWindow(unet3d, (16, 16, 16), overlap=0.0, mode="constant")
    with torch.no_grad():
        assert torch.allclose(wrapped(x), unet3d(x), atol=1e-5)
    target = SegmentationTarget(1, "all")
    for method in ("saliency", "integratedgradients", "occlusion"):
        opts = {"steps": 16} if method == "integratedgradients" else \
            {"window": 8, "stride": 8} if method == "occlusion" else {}
        whole = pellucid.explain(unet3d, x, method, target=target, **opts)
        patched = pellucid.explain(wrapped, x, method, target=target, **opts)
        assert torch.allclose(whole.raw, patched.raw, atol=1e-5, rtol=1e-4), method


def test_patches_cover_a_larger_volume(unet3d):
    x = torch.randn(1, 2, 24, 24, 24)
    wrapped = SlidingWindow(unet3d, (16, 16, 16), overlap=0.5, batch_size=2)
    exp = pellucid.explain(wrapped, x, "saliency", target=SegmentationTarget(1, "all"))
    assert exp.attributions.shape == (1, 1, 24, 24, 24)
    assert torch.isfinite(exp.attributions).all() and exp.attributions.abs().sum() > 0
    with pytest.raises(ConfigError, match="once per patch"):
        pellucid.explain(wrapped, x, "gradcam", target=SegmentationTarget(1, "all"))
    with pytest.raises(ConfigError, match="overlap"):
        SlidingWindow(unet3d, (16, 16, 16), overlap=1.0)
