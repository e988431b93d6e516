"""DeepLIFT and DeepLiftShap (pellucid.explainers.deeplift) against Captum 0.9's ``DeepLift`` and
``DeepLiftShap`` (within 1e-5 of the attribution's scale; measured 0.0) on a CNN with ReLU, ELU,
tanh, batch norm and max pooling; the paper's summation-to-delta on a torchvision ResNet-18
(overlapping max pooling, ReLU modules called twice: Captum refuses it), a 3D MONAI U-Net region
(PReLU, which Captum leaves to its gradient) and a ViT (GELU; softmax attention keeps a residual
that is reported); Captum's own residual where a ReLU feeds a max pooling directly (its module hooks
on adjacent modules), which one linear step between them removes."""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap
from torch import nn

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record

TOL = 1e-5
GEN = torch.Generator().manual_seed(0)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ref.abs().max() > 0, "degenerate reference"
    return float((ours.detach() - ref.detach()).abs().max() / ref.abs().max())


def _cnn(separated: bool = True) -> nn.Module:
    """Conv, ReLU, max pooling, batch norm, ELU, tanh; ``separated``: an identity average pooling
    between each activation and the max pooling it feeds (Captum's hooks then see two tensors)."""
    torch.manual_seed(0)
    gap = [nn.AvgPool2d(1)] if separated else []
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), *gap, nn.MaxPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(), *gap, nn.MaxPool2d(2),
                        nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        net[4 + len(gap)].running_mean.normal_()
        net[4 + len(gap)].running_var.uniform_(0.5, 2)
    return net.eval()


def _captum(cls, model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets hooks
        return cls(model).attribute(*args, **kwargs)


def test_deeplift_and_deepliftshap_equal_captum_on_a_cnn():
    net = _cnn()
    x = torch.randn(4, 1, 16, 16, generator=GEN)
    base = 0.3 * torch.randn(4, 1, 16, 16, generator=GEN)
    y = torch.tensor([0, 1, 2, 1])
    ours = pellucid.explain(net, x, "deeplift", target=ClassTarget(y), baseline=base)
    ref, ref_delta = _captum(DeepLift, net, x, base, target=y, return_convergence_delta=True)
    record("deeplift", peer("captum", "DeepLift"), ours.raw, ref, "CNN: ReLU, ELU, tanh, max pool")
    assert _rel(ours.raw, ref) <= TOL
    assert ours.extras["delta"].abs().max() < 1e-5 and ref_delta.abs().max() < 1e-5
    background = torch.randn(5, 1, 16, 16, generator=GEN)
    ours = pellucid.explain(net, x, "deepliftshap", target=ClassTarget(y), background=background,
                            batch_size=8)  # several doubled passes
    ref = _captum(DeepLiftShap, net, x, background, target=y)
    record("deepliftshap", peer("captum", "DeepLiftShap"), ours.raw, ref, "CNN, 5 baselines")
    assert _rel(ours.raw, ref) <= TOL
    # each baseline's summation-to-delta averaged: sum = y(x) - mean_k y(x0_k)
    with torch.no_grad():
        expected = net(x).gather(1, y[:, None])[:, 0] - net(background)[:, y].mean(0)
    torch.testing.assert_close(ours.raw.flatten(1).sum(1), expected, atol=1e-5, rtol=1e-5)


def test_captum_loses_summation_to_delta_where_a_relu_feeds_a_max_pool_directly():
    x = torch.randn(4, 1, 16, 16, generator=GEN)
    base = 0.3 * torch.randn(4, 1, 16, 16, generator=GEN)
    y = torch.tensor([0, 1, 2, 1])
    net = _cnn(separated=False)
    ours = pellucid.explain(net, x, "deeplift", target=ClassTarget(y), baseline=base)
    ref, ref_delta = _captum(DeepLift, net, x, base, target=y, return_convergence_delta=True)
    assert ours.extras["delta"].abs().max() < 1e-5
    assert ref_delta.abs().max() > 1e-3, ref_delta  # measured 0.05-0.13
    assert _rel(ours.raw, ref) > 1e-2


def test_captum_nonlinearities_reproduce_captum_on_functional_relus_and_prelu():
    """The paper rescales every non-linearity; Captum only its modules (a functional ReLU and a
    PReLU keep their gradients there): ``nonlinearities="captum"`` equals Captum, the default keeps
    summation-to-delta where Captum does not."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.act, self.prelu = nn.Sigmoid(), nn.PReLU(6, 0.2)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = self.act(self.a(x))
            h = torch.relu(self.b(h))
            return self.head(self.prelu(h - 0.5).mean((2, 3)))

    net = Functional().eval()
    x = torch.randn(3, 1, 12, 12, generator=GEN)
    y = torch.tensor([0, 1, 1])
    ref, ref_delta = _captum(DeepLift, net, x, torch.zeros_like(x), target=y,
                             return_convergence_delta=True)
    captum_like = pellucid.explain(net, x, "deeplift", target=ClassTarget(y),
                                   nonlinearities="captum")
    record("deeplift", peer("captum", "DeepLift"), captum_like.raw, ref,
           "functional ReLU and PReLU, nonlinearities='captum'")
    assert _rel(captum_like.raw, ref) <= TOL
    paper = pellucid.explain(net, x, "deeplift", target=ClassTarget(y))
    assert paper.extras["delta"].abs().max() < 1e-5 < ref_delta.abs().max()


def test_summation_to_delta_on_resnet18_a_3d_unet_region_and_a_vit():
    import torchvision

    from tests.test_transformers import tiny_vit

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=3).eval()  # 3x3/2 max pooling, shared ReLUs
    x = torch.randn(2, 3, 64, 64, generator=GEN)
    got = pellucid.explain(resnet, x, "deeplift", target=ClassTarget(torch.tensor([0, 2])),
                           baseline="blur")
    with torch.no_grad():
        gap = resnet(x)[[0, 1], [0, 2]] - resnet(got.extras["baseline"])[[0, 1], [0, 2]]
    assert gap.abs().min() > 1e-3  # a change to explain
    assert got.extras["delta"].abs().max() <= 1e-4 * gap.abs().max(), (got.extras["delta"], gap)
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(3, 1, 2, (8, 16, 32), (2, 2), norm="batch").eval()  # MONAI's PReLU
    v = torch.randn(2, 1, 16, 16, 16, generator=GEN)
    seg = pellucid.explain(unet, v, "deeplift", target=SegmentationTarget(1, activation="softmax"))
    assert seg.raw.shape == v.shape and seg.raw.abs().sum() > 0
    assert seg.extras["delta"].abs().max() < 1e-4, seg.extras["delta"]
    # instance norm (build's default) divides by the sample's own spread, which is no element-wise
    # step: a residual remains, reported rather than hidden
    inst = pellucid.explain(build("unet", 3, 1, 2).module.eval(), v, "deeplift",
                            target=SegmentationTarget(1, activation="softmax"))
    assert torch.isfinite(inst.extras["delta"]).all()
    vit = tiny_vit()
    img = torch.randn(2, 3, 32, 32, generator=GEN)
    vt = pellucid.explain(vit, img, "deeplift", target=ClassTarget(torch.tensor([1, 2])))
    assert vt.raw.shape == img.shape and torch.isfinite(vt.extras["delta"]).all()


def test_a_network_without_nonlinearity_and_bad_options_are_refused():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with pytest.raises(ConfigError, match="no non-linearity"):
        pellucid.explain(linear, torch.randn(1, 1, 4, 4), "deeplift", target=ClassTarget(0))
    with pytest.raises(ConfigError, match="nonlinearities"):
        pellucid.explain(linear, torch.randn(1, 1, 4, 4), "deeplift", target=ClassTarget(0),
                         nonlinearities="some")
    with pytest.raises(ConfigError, match="background"):
        pellucid.explain(_cnn(), torch.randn(1, 1, 16, 16), "deepliftshap", target=ClassTarget(0))
