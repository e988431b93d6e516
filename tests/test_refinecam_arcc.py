"""RefineCAM and the ARCC metric against pytorch-grad-cam 1.5.7 (``RefineCAM``, ``metrics.arcc.ARCC``):
the map within 1e-4 of its [0, 1] scale (measured 1e-6) on a ResNet-18, a torchvision ViT and a 3D
MONAI ResNet; ARCC and its three parts within 1e-4 with the ROAD imputation noise off in both (the
peer draws it from torch's global generator, pellucid from a seeded one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAMPlusPlus, RefineCAM
from pytorch_grad_cam.metrics.arcc import ARCC
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget
from tests.peers import peer, record

TOL = 1e-4


def _resnet():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def _refine(model, x, layers, classes, reshape=None):
    ours = pellucid.explain(model, x, "refinecam", target=ClassTarget(classes, activation="softmax"),
                            layers=tuple(layers))
    ref = RefineCAM(model, [model.get_submodule(n) for n in layers], reshape_transform=reshape)(
        input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    assert ref.std() > 0.01, "degenerate reference"
    record("refinecam", peer("grad-cam", "RefineCAM"), ours.attributions[:, 0], ref,
           f"{type(model).__name__} {tuple(x.shape)}, {len(layers)} layers")
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL
    return ours


def test_refinecam_equals_the_peer_on_resnet18_and_picks_three_stages_by_default():
    model = _resnet()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    _refine(model, x, ["layer4", "layer3", "layer2"], [1, 3])
    default = pellucid.explain(model, x, "refinecam", target=ClassTarget([1, 3]))
    assert default.extras["layers"] == ["layer4", "layer3", "layer2"]
    with pytest.raises(ConfigError, match="refinecam: fuse"):
        pellucid.explain(model, x, "refinecam", target=ClassTarget([1, 3]), fuse="min")


def test_refinecam_equals_the_peer_on_a_vit_and_a_3d_resnet():
    from tests.test_cam_2026 import _tokens_to_grid, _vit

    vit, x = _vit()
    layers = ["encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_0.ln_1"]
    _refine(vit, x, layers, [1, 2], reshape=_tokens_to_grid)
    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 3).module.eval()
    v = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = pellucid.explain(model, v, "refinecam", target=ClassTarget([0, 2], activation="softmax"),
                            layers=("layer4", "layer3"), base_options={"upsample": "bspline"})
    ref = RefineCAM(model, [model.layer4, model.layer3])(
        input_tensor=v, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(2)])
    record("refinecam", peer("grad-cam", "RefineCAM"), ours.attributions[:, 0], ref,
           "MONAI ResNet-18 3D, 2 layers")
    assert np.abs(ours.attributions[:, 0].numpy() - ref).max() <= TOL


def test_arcc_equals_the_peer_without_imputation_noise(monkeypatch):
    monkeypatch.setattr(NoisyLinearImputer.__init__, "__defaults__",
                        (0.0, NoisyLinearImputer.__init__.__defaults__[1]))
    model = _resnet()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    classes = [0, 2, 4]
    target = ClassTarget(classes, activation="softmax")
    cam = pellucid.explain(model, x, "gradcampp", target=target, layer="layer3")
    got = pellucid.evaluate(model, x, cam, metrics=[("arcc", {"noise": 0.0})])["arcc"]
    base = GradCAMPlusPlus(model, [model.layer3])
    grey = base(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    # the peer's ROAD scores its targets as given: the softmax probability, pellucid's default
    ref = ARCC(base)(x, grey, [ClassifierOutputSoftmaxTarget(c) for c in classes], model)
    record("arcc", peer("grad-cam", "metrics.arcc.ARCC (noise 0)"), got.scores, ref,
           "ResNet-18, Grad-CAM++ at layer3")
    assert np.abs(got.scores.numpy() - ref).max() <= TOL, (got.scores, ref, got.extras)
    assert ((got.scores > 0) & (got.scores <= 1)).all()
