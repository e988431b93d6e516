"""Fused multi-layer CAMs for high-resolution maps: one layer equals the base method, several
layers fuse as defined, the default layers go from deep to finer, and the finer map localises a
small lesion at least as well on the phantom classifier."""

from __future__ import annotations

import pytest
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.explainers.fusion import default_layers
from pellucid.models import build
from pellucid.targets import ClassTarget


def test_one_layer_equals_the_base_method_and_two_fuse_by_max():
    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 64, 64)
    base = pellucid.explain(model, x, "layercam", layer="layer4")
    one = pellucid.explain(model, x, "fusedcam", layers=("layer4",))
    assert torch.allclose(one.attributions, base.attributions, atol=1e-6)
    shallow = pellucid.explain(model, x, "layercam", layer="layer3", target=base.target)
    two = pellucid.explain(model, x, "fusedcam", layers=("layer4", "layer3"))
    damped = torch.tanh(2 * shallow.attributions / shallow.attributions.flatten(1).amax(1).view(-1, 1, 1, 1))
    expected = torch.maximum(base.attributions, damped)
    lo = expected.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = expected.flatten(1).amax(1).view(-1, 1, 1, 1)
    assert torch.allclose(two.attributions, (expected - lo) / (hi - lo + 1e-7), atol=1e-5)
    assert two.raw.shape == (2, 2, 64, 64) and two.cost.backward_passes == 2
    assert default_layers(model, x[:1]) == ["layer4", "layer3", "layer2"]
    with pytest.raises(ConfigError, match="base must be a layer CAM"):
        pellucid.explain(model, x, "fusedcam", base="saliency")
    with pytest.raises(ConfigError, match="fuse must be"):
        pellucid.explain(model, x, "fusedcam", fuse="sum")


def test_finer_maps_localise_nodules_on_the_phantom_model(chest_model):
    from pellucid.data import ChestPhantom

    ds = ChestPhantom(200, 128, seed=81)
    cases = [ds[i] for i in range(200) if ds[i]["label"][1] == 1][:12]
    x = chest_model.card.normalize(torch.stack([c["image"] for c in cases]))
    masks = torch.stack([c["mask"][1] for c in cases])
    target = ClassTarget(1, activation="sigmoid")
    metric = [("iou", {"binarise": "topk", "value": 0.02})]
    deep = pellucid.explain(chest_model, x, "layercam", target=target, layer="layer4")
    fused = pellucid.explain(chest_model, x, "fusedcam", target=target)
    iou_deep = pellucid.evaluate(chest_model, x, deep, metrics=metric, masks=masks)["iou"].mean()
    iou_fused = pellucid.evaluate(chest_model, x, fused, metrics=metric, masks=masks)["iou"].mean()
    assert iou_fused > iou_deep, (iou_fused, iou_deep)


def test_fused_cam_on_segmentation_2d_and_3d(brain_unet):
    from pellucid.data import BrainPhantom
    from pellucid.targets import SegmentationTarget

    ds = BrainPhantom(2, 64, seed=4)
    x = torch.stack([ds[i]["image"] for i in range(2)])
    target = SegmentationTarget(0, "predicted")
    fused = pellucid.explain(brain_unet, x, "fusedcam", target=target)
    assert fused.extras["layers"] == ["model.1", "model.0"]  # decoder + encoder at half resolution
    exp = pellucid.explain(brain_unet, x, "fusedcam", target=target,
                           layers=("model.1", "model.1.submodule.0"))  # decoder + encoder stage
    assert exp.attributions.shape == (2, 1, 64, 64) and exp.raw.shape == (2, 2, 64, 64)
    torch.manual_seed(0)
    unet3d = build("unet", 3, 2, 2, unet_channels=(4, 8, 16)).module.eval()
    v = torch.randn(1, 2, 16, 16, 16)
    exp3 = pellucid.explain(unet3d, v, "fusedcam", base="gradcam",
                            target=SegmentationTarget(1, "all"))
    assert exp3.attributions.shape == (1, 1, 16, 16, 16) and torch.isfinite(exp3.attributions).all()
