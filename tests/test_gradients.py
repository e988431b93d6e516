"""Gradient attributions: axioms (completeness, zero-noise SmoothGrad = saliency) and equality
with Captum used directly; every method on classification/segmentation, 2D/3D."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record


def _chest_batch(chest_model, n=2, seed=12):
    from pellucid.data import ChestPhantom

    ds = ChestPhantom(n, 128, seed=seed)
    return chest_model.card.normalize(torch.stack([ds[i]["image"] for i in range(n)]))


def test_integrated_gradients_completeness(chest_model):
    x = _chest_batch(chest_model)
    model = chest_model.module
    for baseline in ("zeros", "blur"):  # 64 steps: within 0.2 % of the gap here (256: 0.07 %)
        exp = pellucid.explain(model, x, "integratedgradients", steps=64, baseline=baseline)
        base = exp.extras["baseline"]
        with torch.no_grad():
            y = model(x).gather(1, exp.target.classes[:, None])[:, 0]
            y0 = model(base).gather(1, exp.target.classes[:, None])[:, 0]
        total = exp.raw.flatten(1).sum(1)
        assert torch.allclose(total, y - y0, rtol=0.01, atol=1e-3), (total, y - y0)
        assert exp.cost.forward_passes >= 1 + 64 // 64


def test_integrated_gradients_completeness_for_a_segmentation_target(brain_unet):
    """The U-Net's instance normalisation makes y(a x) constant for a > 0 and different at a = 0, so
    a zero baseline breaks the path; a blurred baseline does not."""
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(4, 64, seed=31)
    x = torch.stack([ds[i]["image"] for i in range(4) if ds[i]["label"].item()][:1])
    target = SegmentationTarget(0, "predicted")
    exp = pellucid.explain(brain_unet.module, x, "integratedgradients", steps=256, target=target,
                           baseline="blur")
    with torch.no_grad():
        y = exp.target.score(brain_unet.module(x))
        y0 = exp.target.score(brain_unet.module(exp.extras["baseline"]))
    assert torch.allclose(exp.raw.flatten(1).sum(1), y - y0, rtol=0.01)


def test_saliency_and_ig_equal_captum_direct(chest_model):
    x = _chest_batch(chest_model, 3)
    model = chest_model.module
    cls = torch.tensor([0, 1, 2])
    ours = pellucid.explain(model, x, "saliency", target=cls)
    ref = Saliency(model).attribute(x, target=cls, abs=True)
    case = f"trained ResNet-18 {tuple(x.shape)}"
    record("saliency", peer("captum", "Saliency"), ours.raw, ref, case)
    assert torch.allclose(ours.raw, ref, atol=1e-6)
    assert torch.allclose(ours.attributions, ref.abs().amax(1, keepdim=True), atol=1e-6)
    assert ours.cost.forward_passes == 1 and ours.cost.backward_passes == 1  # one pass each
    from captum.attr import InputXGradient

    ixg = pellucid.explain(model, x, "inputxgradient", target=cls)
    ref = InputXGradient(model).attribute(x, target=cls)
    record("inputxgradient", peer("captum", "InputXGradient"), ixg.raw, ref, case)
    assert torch.allclose(ixg.raw, ref, atol=1e-6)
    ours = pellucid.explain(model, x, "integratedgradients", target=cls, steps=32)
    ref = IntegratedGradients(model).attribute(x, target=cls, n_steps=32, baselines=0.0)
    record("integratedgradients", peer("captum", "IntegratedGradients"), ours.raw, ref, case)
    # the path's points near the zero baseline put ReLUs on near-ties, which float32 rounding
    # flips differently on the gradient copy (pellucid.inference.gradient_copy) and in Captum:
    # within 1e-5 of Captum, or as close to it as Captum is to the float64 value
    import copy

    exact = IntegratedGradients(copy.deepcopy(model).double()).attribute(
        x.double(), target=cls, n_steps=32, baselines=0.0)
    captum_error = float((ref.double() - exact).abs().max())
    assert float((ours.raw - ref).abs().max()) <= max(1e-5, 2 * captum_error)
    assert float((ours.raw.double() - exact).abs().max()) <= max(1e-5, 2 * captum_error)


def test_smoothgrad_with_zero_noise_is_saliency(chest_model):
    x = _chest_batch(chest_model)
    sal = pellucid.explain(chest_model.module, x, "saliency")
    smooth = pellucid.explain(chest_model.module, x, "smoothgrad", noise=0.0, samples=4)
    assert torch.allclose(sal.raw, smooth.raw, atol=1e-6)
    squared = pellucid.explain(chest_model.module, x, "smoothgrad", noise=0.0, samples=4,
                               squared=True)
    assert torch.allclose(squared.raw, sal.raw**2, atol=1e-6)
    noisy = pellucid.explain(chest_model.module, x, "smoothgrad", samples=8, seed=1)
    again = pellucid.explain(chest_model.module, x, "smoothgrad", samples=8, seed=1)
    assert torch.equal(noisy.raw, again.raw) and not torch.allclose(noisy.raw, sal.raw)


def test_gradientshap_and_baselines(chest_model):
    x = _chest_batch(chest_model)
    background = _chest_batch(chest_model, 4, seed=99)
    exp = pellucid.explain(chest_model.module, x, "gradientshap", background=background, samples=16)
    assert exp.raw.shape == x.shape and torch.isfinite(exp.raw).all()
    with pytest.raises(ConfigError, match=r"background has shape \(4, 1, 64, 64\)"):
        pellucid.explain(chest_model.module, x, "gradientshap", background=background[..., :64, :64])
    with pytest.raises(ConfigError, match="needs background"):
        pellucid.explain(chest_model.module, x, "integratedgradients", baseline="mean")
    mean = pellucid.explain(chest_model.module, x, "integratedgradients", baseline="mean",
                            background=background, steps=8)
    assert torch.allclose(mean.extras["baseline"][0], background.mean(0))


GRADIENT_METHODS = {"saliency": {}, "inputxgradient": {}, "integratedgradients": {"steps": 8},
                    "smoothgrad": {"samples": 3}}


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_on_3d_classification_and_segmentation(method):
    torch.manual_seed(0)
    opts = GRADIENT_METHODS[method]
    resnet = build("resnet18", 3, 2, 3).module.eval()
    x = torch.randn(2, 2, 32, 32, 32)
    exp = pellucid.explain(resnet, x, method, target=ClassTarget(1), **opts)
    assert exp.attributions.shape == (2, 1, 32, 32, 32) and exp.raw.shape == x.shape
    assert exp.cost.forward_passes >= 1 and exp.cost.backward_passes >= 1
    unet = build("unet", 3, 2, 2, unet_channels=(8, 16, 32)).module.eval()
    y = torch.randn(1, 2, 16, 16, 16)
    seg = pellucid.explain(unet, y, method, target=SegmentationTarget(1, "all"), **opts)
    assert seg.attributions.shape == (1, 1, 16, 16, 16) and torch.isfinite(seg.attributions).all()
    assert seg.attributions.abs().sum() > 0


@pytest.mark.slow
def test_smoothgrad_and_gradientshap_agree_with_captum_in_expectation():
    """Native SmoothGrad / GradientSHAP draw their noise from a seeded CPU generator (the same on
    every device), so they cannot equal Captum draw for draw; with many samples both estimate the
    same expectation. Chunking never changes the draws."""
    from captum.attr import GradientShap, NoiseTunnel
    from captum.attr import Saliency as CaptumSaliency

    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x, background = torch.randn(2, 1, 48, 48), torch.randn(5, 1, 48, 48)
    ours = pellucid.explain(model, x, "smoothgrad", target=0, samples=160, noise=0.1)
    std = float(0.1 * (x.max() - x.min()))
    ref = NoiseTunnel(CaptumSaliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=160,
                                                       stdevs=std, abs=True, target=0)
    case = f"ResNet-18 {tuple(x.shape)}, 160-320 samples"
    record("smoothgrad", peer("captum", "NoiseTunnel(Saliency)"), ours.raw, ref, case,
           "correlation")
    assert torch.corrcoef(torch.stack([ours.raw.flatten(), ref.flatten()]))[0, 1] > 0.95
    ours = pellucid.explain(model, x, "gradientshap", target=0, samples=320, background=background)
    ref = GradientShap(model).attribute(x, baselines=background, n_samples=320, target=0)
    record("gradientshap", peer("captum", "GradientShap"), ours.raw, ref, case, "correlation")
    assert torch.corrcoef(torch.stack([ours.raw.flatten(), ref.flatten()]))[0, 1] > 0.95
    for method, opts in (("smoothgrad", {"samples": 6}),
                         ("gradientshap", {"samples": 6, "background": background, "noise": 0.1})):
        small = pellucid.explain(model, x, method, target=0, batch_size=2, **opts)
        large = pellucid.explain(model, x, method, target=0, batch_size=64, **opts)
        assert torch.allclose(small.raw, large.raw, atol=1e-6), method
        assert small.cost.forward_passes == 6 + 1 and large.cost.forward_passes == 1 + 1


def test_integrated_gradients_quadratures_equal_captum_and_bad_names_are_refused():
    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 48, 48)
    for rule in ("riemann_trapezoid", "riemann_left"):
        ours = pellucid.explain(model, x, "integratedgradients", target=1, steps=12, quadrature=rule)
        ref = IntegratedGradients(model).attribute(x, target=1, n_steps=12, method=rule)
        record("integratedgradients", peer("captum", f"IntegratedGradients({rule})"), ours.raw,
               ref, f"ResNet-18 {tuple(x.shape)}")
        assert torch.allclose(ours.raw, ref, atol=1e-6), rule
    with pytest.raises(ConfigError, match="unknown quadrature 'simpson'"):
        pellucid.explain(model, x, "integratedgradients", quadrature="simpson")


def test_expected_gradients_is_gradientshap_without_noise_and_captums_in_expectation():
    """Expected gradients (Erion et al. 2021) draws the same baselines and path points as
    GradientSHAP without input noise: equal to it draw for draw, and to Captum's GradientShap with
    stdevs=0 in expectation (correlation over 320 draws)."""
    from captum.attr import GradientShap

    from pellucid.errors import ConfigError

    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x, background = torch.randn(2, 1, 48, 48), torch.randn(5, 1, 48, 48)
    # from the second call at this shape on, both run the model's gradient copy
    # (pellucid.inference.gradient_copy; tests/test_gradient_copy.py compares it with the model)
    pellucid.explain(model, x, "saliency", target=0)
    eg = pellucid.explain(model, x, "expectedgradients", target=0, samples=320, background=background)
    gs = pellucid.explain(model, x, "gradientshap", target=0, samples=320, background=background)
    assert "gradient_copy" in eg.extras and "gradient_copy" in gs.extras
    assert torch.equal(eg.raw, gs.raw)
    ref = GradientShap(model).attribute(x, baselines=background, n_samples=320, stdevs=0.0, target=0)
    record("expectedgradients", peer("captum", "GradientShap(stdevs=0)"), eg.raw, ref,
           f"ResNet-18 {tuple(x.shape)}, 320 samples", "correlation")
    assert torch.corrcoef(torch.stack([eg.raw.flatten(), ref.flatten()]))[0, 1] > 0.95
    with pytest.raises(ConfigError, match="draws no input noise"):
        pellucid.explain(model, x, "expectedgradients", target=0, background=background, noise=0.1)
