"""Blur IG, Guided IG and XRAI against PAIR's ``saliency`` 0.2.1 (``saliency.core``), the method set
of Arun et al.'s radiology study: within 1e-4 of the map's scale (measured 2e-7 for Blur IG, which
blurs with SciPy as PAIR does, and below 1e-6 for the others) on a CNN, a torchvision ViT, a 3D
network (Guided IG; Blur IG against SciPy's blur of the three axes, which PAIR's 2D blur cannot do)
and a U-Net region; XRAI refuses a volume."""

from __future__ import annotations

import numpy as np
import pytest
import saliency.core as sal
import torch
from scipy import ndimage
from torch import nn

import pellucid
from pellucid.errors import ConfigError
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record

TOL = 1e-4


@pytest.fixture(autouse=True)
def _numpy2_quantile(monkeypatch):
    """saliency 0.2.1's Guided IG calls ``np.quantile(..., interpolation=)``, which numpy 2 renamed
    ``method=``; the same computation under the new name."""
    original = np.quantile

    def quantile(a, q, interpolation=None, **kwargs):
        if interpolation is not None:
            kwargs["method"] = interpolation
        return original(a, q, **kwargs)
    monkeypatch.setattr(np, "quantile", quantile)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3)).eval()


def _images(n: int, size: int, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return nn.functional.avg_pool2d(torch.rand(n, channels, size, size, generator=g), 5, 1, 2)


def _pair_gradients(model: nn.Module, score, channels_last: bool):
    """PAIR's call_model_function: gradients of ``score(output)`` at a numpy batch."""
    def call(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(np.asarray(batch), dtype=torch.float32)
        if channels_last:
            t = t.movedim(-1, 1)
        t.requires_grad_(True)
        (grad,) = torch.autograd.grad(score(model(t)).sum(), t)
        if channels_last:
            grad = grad.movedim(1, -1)
        return {sal.INPUT_OUTPUT_GRADIENTS: grad.numpy()}
    return call


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    assert np.abs(ref).max() > 0, "degenerate reference"
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _blur_ig_pair(model, x, classes, **opts) -> np.ndarray:
    return np.stack([sal.BlurIG().GetMask(
        x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, lambda o, c=c: o[:, c], True),
        batch_size=8, **opts).transpose(2, 0, 1) for i, c in enumerate(classes)])


def _guided_ig_pair(model, x, score_of, **opts) -> np.ndarray:
    return np.stack([sal.GuidedIG().GetMask(x[i].numpy(), _pair_gradients(model, score_of(i), False),
                                            **opts) for i in range(len(x))])


@pytest.mark.parametrize("what", ["cnn", "vit"])
def test_blur_ig_and_guided_ig_equal_pair(what):
    from tests.test_transformers import tiny_vit

    model = _cnn() if what == "cnn" else tiny_vit()
    x = _images(2, 32)
    classes = [1, 2]
    target = ClassTarget(torch.tensor(classes))
    ours = pellucid.explain(model, x, "blurig", target=target, steps=24, max_sigma=12)
    ref = _blur_ig_pair(model, x, classes, steps=24, max_sigma=12)
    record("blurig", peer("saliency", "BlurIG"), ours.raw, ref, what)
    assert _rel(ours.raw, ref) <= TOL
    # summation against the fully blurred input, up to the path's quadrature
    with torch.no_grad():
        gap = (model(x) - model(ours.extras["baseline"]))[[0, 1], classes]
    assert (ours.extras["delta"].abs() <= 0.2 * gap.abs().max() + 1e-4).all(), (ours.extras, gap)
    ours = pellucid.explain(model, x, "guidedig", target=target, steps=30)
    ref = _guided_ig_pair(model, x, lambda i: (lambda o, c=classes[i]: o[:, c]), x_steps=30)
    record("guidedig", peer("saliency", "GuidedIG"), ours.raw, ref, what)
    assert _rel(ours.raw, ref) <= TOL


def test_guided_ig_max_dist_zero_is_integrated_gradients_and_blur_ig_sqrt_spacing():
    model, x = _cnn(), _images(2, 24)
    target = ClassTarget(torch.tensor([0, 2]))
    guided = pellucid.explain(model, x, "guidedig", target=target, steps=16, max_dist=0.0)
    straight = pellucid.explain(model, x, "integratedgradients", target=target, steps=16,
                                quadrature="riemann_left")
    assert _rel(guided.raw, straight.raw) <= 1e-4
    # sqrt spacing, one path point per call: PAIR's per-batch width is then each point's own
    ours = pellucid.explain(model, x, "blurig", target=target, steps=10, max_sigma=8, sqrt=True,
                            batch_size=1)
    ref = np.stack([sal.BlurIG().GetMask(
        x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, lambda o, c=c: o[:, c], True),
        steps=10, max_sigma=8, sqrt=True, batch_size=1).transpose(2, 0, 1)
        for i, c in enumerate([0, 2])])
    assert _rel(ours.raw, ref) <= TOL
    # several points per call: PAIR scales them all by the last one's width, an option here
    pair_like = pellucid.explain(model, x, "blurig", target=target, steps=10, max_sigma=8,
                                 sqrt=True, batch_size=5, steps_batched_as_pair=True)
    ref5 = np.stack([sal.BlurIG().GetMask(
        x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, lambda o, c=c: o[:, c], True),
        steps=10, max_sigma=8, sqrt=True, batch_size=5).transpose(2, 0, 1)
        for i, c in enumerate([0, 2])])
    assert _rel(pair_like.raw, ref5) <= TOL and _rel(ours.raw, ref5) > 1e-2


def test_3d_guided_ig_equals_pair_and_blur_ig_blurs_all_three_axes():
    from pellucid.models import build

    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 2).module.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 16, 16, 16, generator=g)
    target = ClassTarget(torch.tensor([1]))
    ours = pellucid.explain(model, x, "guidedig", target=target, steps=12)
    ref = _guided_ig_pair(model, x, lambda i: (lambda o: o[:, 1]), x_steps=12)
    record("guidedig", peer("saliency", "GuidedIG"), ours.raw, ref, "MONAI ResNet-18 3D")
    assert _rel(ours.raw, ref) <= TOL
    # Blur IG's sum written out with SciPy's blur over the three spatial axes
    sigmas, grad_step = np.linspace(0, 4, 7), 0.01
    vol = x[0, 0].double().numpy()
    total = np.zeros_like(vol)
    for i in range(6):
        point = ndimage.gaussian_filter(vol, sigmas[i], mode="constant")
        slope = (ndimage.gaussian_filter(vol, sigmas[i] + grad_step, mode="constant") - point) / grad_step
        t = torch.tensor(point, dtype=torch.float32)[None, None].requires_grad_(True)
        (grad,) = torch.autograd.grad(model(t)[0, 1], t)
        total += (sigmas[i + 1] - sigmas[i]) * slope * grad[0, 0].double().numpy()
    ours = pellucid.explain(model, x, "blurig", target=target, steps=6, max_sigma=4)
    record("blurig", "SciPy gaussian_filter (3 axes), the paper's sum", ours.raw[0, 0], -total,
           "MONAI ResNet-18 3D")
    assert _rel(ours.raw[0, 0], -total) <= TOL
    # the blur a GPU runs (torch passes) is SciPy's, bit for bit, in 2D and 3D
    from pellucid.explainers.paths import torch_gaussian

    for t, sigma in ((x, 2.5), (_images(2, 40), 0.4), (_images(2, 40), 9.0)):
        axes = [0, 0] + [sigma] * (t.ndim - 2)
        assert torch.equal(torch_gaussian(t, sigma),
                           torch.from_numpy(ndimage.gaussian_filter(t.numpy(), axes, mode="constant")))


def test_xrai_equals_pair_on_a_cnn_and_a_unet_region_and_refuses_a_volume():
    from monai.networks.nets import UNet

    model, x = _cnn(), _images(2, 72)
    for algorithm in ("full", "fast"):
        ours = pellucid.explain(model, x, "xrai", target=ClassTarget(torch.tensor([1, 2])),
                                steps=12, algorithm=algorithm)
        params = sal.XRAIParameters(steps=12, algorithm=algorithm)
        ref = np.stack([sal.XRAI().GetMask(
            x[i].permute(1, 2, 0).numpy(), _pair_gradients(model, lambda o, c=c: o[:, c], True),
            batch_size=12, extra_parameters=params) for i, c in enumerate([1, 2])])
        record("xrai", peer("saliency", f"XRAI ({algorithm})"), ours.raw[:, 0], ref, "CNN")
        assert _rel(ours.raw[:, 0], ref) <= TOL
    torch.manual_seed(0)
    unet = UNet(2, 1, 2, (8, 16, 32), (2, 2)).eval()
    img = _images(1, 64, channels=1)
    with torch.no_grad():
        region = (unet(img).argmax(1) == 1).float()
    target = SegmentationTarget(1, region=region, activation="softmax")
    ours = pellucid.explain(unet, img, "xrai", target=target, steps=8)
    ref = sal.XRAI().GetMask(
        img[0].permute(1, 2, 0).numpy(),
        _pair_gradients(unet, lambda o: (o[:, 1] * region).flatten(1).sum(1), True),
        batch_size=8, extra_parameters=sal.XRAIParameters(steps=8))
    record("xrai", peer("saliency", "XRAI (full)"), ours.raw[0, 0], ref, "MONAI UNet region")
    assert _rel(ours.raw[0, 0], ref) <= TOL
    with pytest.raises(ConfigError, match="2D images"):
        pellucid.explain(nn.Sequential(nn.Flatten(), nn.Linear(512, 2)), torch.rand(1, 1, 8, 8, 8),
                         "xrai", target=ClassTarget(0))
