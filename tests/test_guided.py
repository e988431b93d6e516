"""Guided backpropagation and Guided Grad-CAM (pellucid.explainers.guided) against Captum 0.9's
``GuidedBackprop`` and ``GuidedGradCam`` (within 1e-4 of the attribution's scale; measured 0.0)
on a 2D ResNet-18, a torchvision DenseNet-121, a 3D MONAI ResNet and a U-Net region; the paper's
every-ReLU reading against a hand computation on a network that calls ReLU as a function (where
Captum, which guides ``nn.ReLU`` modules only, differs); a network without ReLU refused."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop, GuidedGradCam

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record

TOL = 1e-4


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach(), ref.detach()
    assert ref.abs().max() > 0, "degenerate reference"
    return float((ours - ref).abs().max() / ref.abs().max())


def _both(model, x, y, layer, what: str, relus: str = "modules", upsample: str = "linear") -> None:
    target = ClassTarget(y)
    ours = pellucid.explain(model, x, "guidedbackprop", target=target, relus=relus).raw
    ref = GuidedBackprop(model).attribute(x, target=y)
    record("guidedbackprop", peer("captum", "GuidedBackprop"), ours, ref, what)
    assert _rel(ours, ref) <= TOL
    mode = "bilinear" if upsample == "linear" and x.ndim == 4 else \
        "trilinear" if upsample == "linear" else "nearest"
    ours = pellucid.explain(model, x, "guidedgradcam", target=target, layer=layer, relus=relus,
                            upsample=upsample).raw
    ref = GuidedGradCam(model, model.get_submodule(layer)).attribute(x, target=y,
                                                                     interpolate_mode=mode)
    record("guidedgradcam", peer("captum", "GuidedGradCam"), ours, ref, what)
    assert _rel(ours, ref) <= TOL


@pytest.mark.parametrize("upsample", ["linear", "nearest"])
def test_resnet18_equals_captum(upsample):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _both(model, x, torch.tensor([1, 3]), "layer4", "torchvision ResNet-18", "all", upsample)


def test_3d_monai_resnet_equals_captum():
    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 3).module.eval()
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    _both(model, x, torch.tensor([0, 2]), "layer3", "MONAI ResNet-18 3D", "all")


def test_densenet_functional_relus_captum_reading_and_the_papers():
    """torchvision's DenseNet calls F.relu after its last block: Captum leaves it unguided
    (``relus="modules"`` equals it); the paper's reading guides it and differs there."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2])
    _both(model, x, y, "features.denseblock4", "torchvision DenseNet-121", "modules")
    every = pellucid.explain(model, x, "guidedbackprop", target=ClassTarget(y)).raw
    assert _rel(every, GuidedBackprop(model).attribute(x, target=y)) > 1e-2


class _Functional(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w1, self.w2 = torch.randn(16, 8, generator=g), torch.randn(12, 16, generator=g)
        self.w3 = torch.randn(3, 12, generator=g)

    def forward(self, x):  # (B, 1, 8): one channel of 8 values
        x = x.flatten(1)
        return torch.relu(torch.nn.functional.relu(x @ self.w1.T) @ self.w2.T) @ self.w3.T


def test_every_relu_is_guided_as_the_paper_by_hand():
    """y = W3 relu(W2 relu(W1 x)): guided, g2 = ReLU(W3[c]) * (h2 > 0), g1 = ReLU(W2^T g2) *
    (h1 > 0), dx = W1^T g1."""
    net = _Functional()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    c = 1
    h1 = torch.relu(x @ net.w1.T)
    h2 = torch.relu(h1 @ net.w2.T)
    g2 = net.w3[c].clamp_min(0) * (h2 > 0)
    g1 = (g2 @ net.w2).clamp_min(0) * (h1 > 0)
    expected = g1 @ net.w1
    ours = pellucid.explain(net, x[:, None], "guidedbackprop", target=c).raw[:, 0]
    assert torch.allclose(ours, expected, atol=1e-5)
    with pytest.raises(ConfigError, match=r"runs no nn\.ReLU module"):
        pellucid.explain(net, x[:, None], "guidedbackprop", target=c, relus="modules")
    with pytest.raises(ConfigError, match="relus must be 'all' or 'modules'"):
        pellucid.explain(net, x[:, None], "guidedbackprop", target=c, relus="some")


def test_a_unet_region_equals_captum_and_a_network_without_relu_is_refused():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(2, 1, 2, (8, 16, 32), (2, 2), act="RELU").eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        region = (unet(x)[:, 1] > 0).float()
    ours = pellucid.explain(unet, x, "guidedbackprop",
                            target=SegmentationTarget(1, region, activation="softmax")).raw
    wrapped = torch.nn.Sequential(unet, _RegionSum(region))
    ref = GuidedBackprop(wrapped).attribute(x, target=0)
    record("guidedbackprop", peer("captum", "GuidedBackprop"), ours, ref, "MONAI UNet region")
    assert _rel(ours, ref) <= TOL
    prelu = build("unet", 2, 1, 1).module.eval()  # MONAI's default activation: PReLU
    with pytest.raises(ConfigError, match="the model runs no ReLU"):
        pellucid.explain(prelu, x, "guidedbackprop", target=SegmentationTarget(0, "all"))


class _RegionSum(torch.nn.Module):
    """(B, K, *spatial) -> (B, 1): class 1 summed over a fixed region (Captum's scalar target)."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.region = region

    def forward(self, out):
        return (out[:, 1] * self.region).flatten(1).sum(1, keepdim=True)
