"""The CAM family equals pytorch-grad-cam 1.5.7 (the test oracle) within 1e-4: same model, inputs,
layer and target; 2D torchvision ResNet-18, MONAI DenseNet-121, a 3D MONAI ResNet, a 2D U-Net with
SemanticSegmentationTarget. EigenCAM is compared up to the SVD's arbitrary sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

import pellucid
from pellucid.models import build
from pellucid.targets import SegmentationTarget
from tests.peers import peer, record

PEERS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "scorecam": ScoreCAM,
         "layercam": LayerCAM, "xgradcam": XGradCAM, "hirescam": HiResCAM, "eigencam": EigenCAM,
         "ablationcam": AblationCAM}
TOL = 1e-4


def _peer(method, model, layer, x, targets=None):
    with PEERS[method](model=model, target_layers=[layer]) as cam:
        if method in ("scorecam", "ablationcam"):
            cam.batch_size = 64
        return cam(input_tensor=x, targets=targets)


def _eigen_flipped(model, layer, x):
    """pytorch-grad-cam's EigenCAM with the opposite singular-vector sign."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    proj = -get_2d_projection(store["a"].numpy())
    size = tuple(x.shape[2:])[::-1]  # pytorch-grad-cam's (width, height[, depth]) order
    return scale_cam_image(np.maximum(scale_cam_image(np.maximum(proj, 0), size), 0))


def _check(method, model, layer_name, x, target=None, peer_targets=None, **options):
    layer = model.get_submodule(layer_name)
    ours = pellucid.explain(model, x, method, target=target, layer=layer_name, **options)
    ours = ours.attributions[:, 0].numpy()
    ref = _peer(method, model, layer, x, peer_targets)
    assert ours.shape == ref.shape
    assert ref.std() > 0.01, "degenerate reference map"
    if method == "eigencam":  # each sample may come with either singular-vector sign
        flipped = _eigen_flipped(model, layer, x)
        gap, flipped_gap = (np.abs(ours - r).reshape(len(ref), -1).max(1) for r in (ref, flipped))
        ref = np.where((flipped_gap < gap).reshape(-1, *[1] * (ref.ndim - 1)), flipped, ref)
    diff = np.abs(ours - ref).max()
    record(method, peer("grad-cam", PEERS[method].__name__), ours, ref,
           f"{type(model).__name__} {tuple(x.shape)}")
    assert diff <= TOL, f"{method}: max abs difference {diff}"


@pytest.mark.parametrize("method", list(PEERS))
def test_resnet18_trained_on_phantoms(chest_model, method):
    from pellucid.data import ChestPhantom

    model = chest_model.module
    n = 1 if method in ("scorecam", "ablationcam") else 3  # a forward per channel: 512 per image
    x = chest_model.card.normalize(torch.stack([ChestPhantom(3, 128, seed=11)[i]["image"]
                                                for i in range(n)]))
    _check(method, model, "layer4", x)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(PEERS))
def test_monai_densenet121(method):
    torch.manual_seed(0)
    model = build("densenet121", 2, 1, 4).module.eval()
    n = 1 if method in ("scorecam", "ablationcam") else 2  # a forward per channel: 1024
    x = torch.randn(n, 1, 64, 64)
    _check(method, model, "class_layers.relu", x)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "xgradcam", "hirescam",
                                    "eigencam"])
def test_3d_monai_resnet_with_spline_upsampling(method):
    """pytorch-grad-cam resizes 3D maps with scipy's cubic spline zoom; ``upsample='bspline'`` is
    the same resize in torch. (Its Score-CAM and Ablation-CAM fail on 3D inputs.)"""
    torch.manual_seed(0)
    model = build("resnet18", 3, 2, 3).module.eval()
    x = torch.randn(2, 2, 48, 48, 48)
    _check(method, model, "layer3", x, upsample="bspline")


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "scorecam", "layercam", "xgradcam",
                                    "hirescam", "eigencam"])
def test_unet_semantic_segmentation_target(brain_unet, method):
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(8, 64, seed=21)
    x = torch.stack([ds[i]["image"] for i in range(8) if ds[i]["label"].item() == 1][:2])
    model = brain_unet.module
    with torch.no_grad():
        masks = (model(x)[:, 0] > 0).float()
    assert masks.sum() > 50
    peer_targets = [SemanticSegmentationTarget(0, m.numpy()) for m in masks]
    _check(method, model, "model.1.submodule.2", x, target=SegmentationTarget(0, masks),
           peer_targets=peer_targets)
    # the "predicted" region is the same mask, found by the target itself
    a = pellucid.explain(model, x, method, target=SegmentationTarget(0, "predicted"),
                         layer="model.1.submodule.2").attributions
    b = pellucid.explain(model, x, method, target=SegmentationTarget(0, masks),
                         layer="model.1.submodule.2").attributions
    assert torch.allclose(a, b)


def test_gradcampp_summed_reading_matches_its_formula(chest_model):
    """The torch-cam/MONAI reading puts sum(A g^3) in the denominator: check against a hand
    computation at layer3 (where gradients vary over space). At layer4, followed by global average
    pooling and a linear layer, g is constant over space and both readings coincide."""
    from pellucid.data import ChestPhantom

    model = chest_model.module
    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=3)[0]["image"][None])
    store = {}
    layer = model.layer3

    def hook(module, inputs, output):
        store["a"] = output
        output.register_hook(lambda g: store.update(g=g))

    h = layer.register_forward_hook(hook)
    out = model(x)
    out[0, out.argmax()].backward()
    h.remove()
    a, g = store["a"].detach(), store["g"]
    alpha = g**2 / (2 * g**2 + (a * g**3).sum((2, 3), keepdim=True) + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (g.clamp_min(0) * alpha).sum((2, 3))
    cam = (w[:, :, None, None] * a).sum(1, keepdim=True).clamp_min(0)
    cam = torch.nn.functional.interpolate(cam, size=(128, 128), mode="bilinear")
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    ours = pellucid.explain(model, x, "gradcampp", layer="layer3", plusplus="summed")
    assert torch.allclose(ours.attributions, cam, atol=1e-5)
    eq19 = pellucid.explain(model, x, "gradcampp", layer="layer3")
    assert (eq19.attributions - ours.attributions).abs().max() > 0.01
    at4 = [pellucid.explain(model, x, "gradcampp", layer="layer4", plusplus=p).attributions
           for p in ("eq19", "summed")]
    assert torch.allclose(at4[0], at4[1], atol=1e-4)
    model.zero_grad(set_to_none=True)
