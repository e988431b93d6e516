"""The differentiable copy that input-gradient methods run (pellucid.inference.gradient_copy):
the sub-pixel form of a convolution's input gradient against autograd in float64, the copy's
output and input gradient against the model's per network family, its use from the second call
on, and the models and methods it must not touch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pellucid
from pellucid.inference import gradient_copy as gc
from pellucid.targets import SegmentationTarget
from tests.test_incremental import Branchy, _convnext, _nnunet, _smp, _xrv, _zoo


@pytest.mark.parametrize("nd", [2, 3])
def test_the_sub_pixel_input_gradient_equals_autograd(nd):
    conv = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    gen = torch.Generator().manual_seed(nd)
    worst, cases = 0.0, 0
    for kernel in (1, 2, 3, 4, 7):
        for stride in (1, 2, 3):
            for padding in (0, 1, kernel // 2, kernel, kernel + 1):
                sizes = (9, 12, 7)[:nd] if nd == 3 else (13, 10)
                if any(s + 2 * padding < kernel for s in sizes):
                    continue
                ks = (kernel, max(kernel - 1, 1), kernel)[:nd]  # not cubic
                x = torch.randn(2, 3, *sizes, dtype=torch.float64, generator=gen,
                                requires_grad=True)
                w = torch.randn(5, 3, *ks, dtype=torch.float64, generator=gen)
                strides, pads = (stride,) * nd, (padding,) * nd
                y = conv(x, w, None, strides, pads)
                g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
                (want,) = torch.autograd.grad(y, x, g)
                kern, lows = gc.phase_kernels(w, strides, pads)
                have = gc.phase_input_gradient(g, kern, lows, strides, tuple(sizes))
                assert have.shape == want.shape
                worst = max(worst, float((have - want).abs().max() / want.abs().max()))
                cases += 1
    assert cases > 50 and worst < 1e-12, (cases, worst)


@pytest.mark.parametrize("nd", [2, 3])
def test_a_few_channel_transposed_convolution_equals_torchs_both_ways(nd):
    """Its forward (a convolution's input gradient) and its input gradient (a strided
    convolution), with output padding, in float64."""
    convt = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]
    torch.manual_seed(nd)
    for kernel, stride, padding, extra in ((3, 2, 1, 1), (2, 2, 0, 0), (4, 3, 1, 2), (3, 1, 1, 0)):
        layer = convt(6, 3, kernel, stride, padding, extra).double().requires_grad_(False)
        assert gc._replaceable(layer) is gc._ConvTranspose
        fast = gc._ConvTranspose(layer)
        x = torch.randn(2, 6, *(5, 7, 6)[:nd], dtype=torch.float64, requires_grad=True)
        want = layer(x)
        have = fast(x)
        assert have.shape == want.shape
        assert torch.allclose(have, want, rtol=0, atol=1e-12)
        g = torch.randn_like(want)
        assert torch.allclose(torch.autograd.grad(have, x, g)[0],
                              torch.autograd.grad(want, x, g)[0], rtol=0, atol=1e-12)


class PerChannel(nn.Module):
    """A per-channel PReLU (not replaced), a strided few-channel stem, BatchNorm after a
    convolution whose output is used twice (not folded), a dilated convolution (kept)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(2, 8, 5, stride=2, padding=2)
        self.act = nn.PReLU(8, init=0.2)
        self.mid = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(8).eval()
        self.bn.running_mean.uniform_(-0.3, 0.3)
        self.bn.running_var.uniform_(0.5, 2.0)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.mid(self.act(self.stem(x)))
        return self.head(torch.relu(self.bn(y)) + 0.1 * y)


FAMILIES = {
    "torchvision ResNet-18 2D": (lambda: _zoo("resnet18", 2), (1, 64, 64), dict(folded=1, last=True)),
    "MONAI ResNet-18 3D": (lambda: _zoo("resnet18", 3), (1, 24, 24, 24), dict(folded=1, last=True)),
    "MONAI DenseNet-121 2D": (lambda: _zoo("densenet121", 2), (1, 64, 64), dict(folded=1)),
    "MONAI U-Net 2D": (lambda: _zoo("unet", 2), (1, 48, 48), dict(prelus=1, convs=1, last=False)),
    "MONAI U-Net 3D": (lambda: _zoo("unet", 3), (1, 24, 24, 24), dict(prelus=1, last=False)),
    "timm ConvNeXt": (_convnext, (3, 64, 64), dict(last=False)),
    "smp U-Net": (_smp, (1, 64, 64), dict(folded=1, convs=1)),
    "TorchXRayVision DenseNet": (_xrv, (1, 224, 224), dict(folded=1, convs=1)),
    "nnU-Net PlainConvUNet": (_nnunet, (1, 64, 64), dict(convs=1, last=False)),
    "per-channel PReLU, shared BatchNorm": (PerChannel, (2, 30, 26), dict(folded=0, prelus=0)),
}


# the model libraries' networks need the "models" extra (not installed by make test-lowest)
LIBRARIES = {"timm ConvNeXt", "smp U-Net", "TorchXRayVision DenseNet", "nnU-Net PlainConvUNet"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.models) if f in LIBRARIES
                                    else f for f in FAMILIES])
def test_the_copy_has_the_models_output_and_input_gradient(family):
    """float32: output within 1e-5 of its scale; input gradient as close to the float64 model's
    as the float32 model's own (median and 99th percentile within 4x: a deep network in float32
    is itself off its float64 gradient, and near-ties of max pooling or ReLU flip both ways)."""
    import copy

    make, shape, expect = FAMILIES[family]
    model = make()
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *shape, generator=gen)
    made = gc.make_gradient_copy(model, x)
    got = {"folded": made.folded, "prelus": made.prelus, "convs": made.convs,
           "last": made.channels_last}
    for key, value in expect.items():  # booleans equal, counts at least (0: none)
        ok = got[key] == value if isinstance(value, bool) or value == 0 else got[key] >= value
        assert ok, (family, key, made.describe())

    def run(forward, inputs):
        leaf = inputs.clone().requires_grad_(True)
        out = forward(leaf)
        out = out if isinstance(out, torch.Tensor) else out[0]
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        return out.detach().double(), grad.double()

    out0, g0 = run(model, x)
    out1, g1 = run(made.forward, x)
    _, exact = run(copy.deepcopy(model).double(), x.double())
    assert (out1 - out0).abs().max() <= 1e-5 * out0.abs().max().clamp_min(1.0)
    scale = exact.abs().max()
    own, ours = ((g - exact).abs().flatten() / scale for g in (g0, g1))
    for q in (0.5, 0.99):
        assert float(ours.quantile(q)) <= 4 * float(own.quantile(q)) + 1e-7, (family, q)


def test_explainers_run_the_copy_from_the_second_call_with_equal_maps():
    model = _zoo("resnet18", 2)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    first = pellucid.explain(model, x, "saliency", target=1)
    second = pellucid.explain(model, x, "saliency", target=1)
    assert "gradient_copy" not in first.extras
    assert "BatchNorm folded" in second.extras["gradient_copy"]
    err = (second.raw - first.raw).abs() / first.raw.abs().max()
    assert float((err > 1e-4).float().mean()) <= 1e-3 and float(err.median()) < 1e-6
    # integrated gradients (the same shape: the copy is made) equals it on the model itself
    # (a fresh copy of the model object is explained once: no copy)
    import copy

    ig = pellucid.explain(model, x, "integratedgradients", target=1, steps=16)
    plain = pellucid.explain(copy.deepcopy(model), x, "integratedgradients", target=1, steps=16)
    assert "gradient_copy" in ig.extras and "gradient_copy" not in plain.extras
    err = (ig.raw - plain.raw).abs() / plain.raw.abs().max()
    assert float((err > 1e-4).float().mean()) <= 1e-3 and float(err.median()) < 1e-6
    assert torch.allclose(ig.extras["delta"], plain.extras["delta"], atol=1e-4)


def test_a_3d_segmentation_target_on_the_copy():
    model = _zoo("unet", 3)
    x = torch.randn(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(2))
    target = SegmentationTarget(0, "all")
    maps = [pellucid.explain(model, x, "saliency", target=target) for _ in range(2)]
    assert "PReLU as leaky ReLU" in maps[1].extras["gradient_copy"]
    assert torch.allclose(maps[1].raw, maps[0].raw, atol=1e-5 * float(maps[0].raw.abs().max()))


def test_models_the_copy_must_not_replace():
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    # a forward hook of the user's: the copy would lose it
    hooked = _zoo("resnet18", 2)
    seen = []
    hooked.layer1.register_forward_hook(lambda m, i, o: seen.append(1))
    for _ in range(3):
        before = len(seen)
        assert "gradient_copy" not in pellucid.explain(hooked, x, "saliency", target=0).extras
        assert len(seen) > before  # the user's hook ran in every call
    # a model torch.fx cannot trace runs as it is, and says why no copy was made
    branchy = Branchy()
    for _ in range(2):
        assert "gradient_copy" not in pellucid.explain(branchy, x, "saliency", target=0).extras
    assert "cannot be traced" in gc.why_not(branchy, x)
    # methods that hook layers or replace backward rules never run the copy
    model = _zoo("resnet18", 2)
    for method in ("gradcam", "guidedbackprop", "lrp", "deeplift"):
        for _ in range(2):
            assert "gradient_copy" not in pellucid.explain(model, x, method, target=0).extras


def test_a_copy_that_disagrees_is_not_used(monkeypatch):
    real = gc._build

    def broken(model, dtype):
        gm, *rest = real(model, dtype)
        with torch.no_grad():
            next(p for p in gm.parameters() if p.ndim == 4).mul_(1.01)
        return (gm, *rest)

    monkeypatch.setattr(gc, "_build", broken)
    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 32, 32)
    for _ in range(2):
        assert "gradient_copy" not in pellucid.explain(model, x, "saliency", target=0).extras
    assert "differs from the model's" in gc.why_not(model, x)


def test_changed_weights_are_not_explained_with_a_stale_copy():
    model = _zoo("resnet18", 2)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        used = pellucid.explain(model, x, "saliency", target=0)
    assert "gradient_copy" in used.extras
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)  # the model changed in place: version bumped
    changed = pellucid.explain(model, x, "saliency", target=0)
    assert "gradient_copy" not in changed.extras  # runs the model itself, once
    again = pellucid.explain(model, x, "saliency", target=0)
    assert "gradient_copy" in again.extras  # rebuilt from the new weights
    err = (again.raw - changed.raw).abs() / changed.raw.abs().max()
    assert float((err > 1e-4).float().mean()) <= 1e-3


def test_lrp_runs_few_channel_convolutions_in_the_sub_pixel_form_and_restores_them(monkeypatch):
    """LRP cannot run a copy (zennit hooks the model's layers), so its few-channel layers switch
    to the sub-pixel input gradient in place, for the call only: the relevance is the same."""
    import contextlib

    import pellucid.explainers.lrp as lrp

    model = _zoo("resnet18", 2)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with gc.few_channel_convolutions(model) as swapped:
        assert swapped >= 1 and "forward" in stem.__dict__
    assert "forward" not in stem.__dict__
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(6))
    fast = pellucid.explain(model, x, "lrp", target=1)
    assert "forward" not in stem.__dict__
    monkeypatch.setattr(lrp, "few_channel_convolutions", lambda m: contextlib.nullcontext(0))
    plain = pellucid.explain(model, x, "lrp", target=1)
    assert torch.allclose(fast.raw, plain.raw, rtol=0, atol=1e-5 * float(plain.raw.abs().max()))


def test_no_copy_where_it_changes_nothing_costs_too_much_or_a_hook_came_later():
    from pellucid.runtime import set_memory_limit

    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(8))
    plain = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, stride=2), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.LazyLinear(3))
    plain(x)
    pellucid.explain(plain, x, "saliency", target=0)
    assert "gradient_copy" in pellucid.explain(plain, x, "saliency", target=0).extras
    wide = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),
                         nn.LazyLinear(3))
    wide(x)
    wide[0] = nn.Conv2d(1, 16, 3, padding=1, dilation=2)  # dilated: kept; nothing else to change
    for _ in range(2):
        assert "gradient_copy" not in pellucid.explain(wide, x, "saliency", target=0).extras
    assert gc.why_not(wide, x) == "nothing in the model to fold or replace"
    model = _zoo("resnet18", 2)
    set_memory_limit(16)  # MB: 6 x (45 MB of weights + activations) does not fit
    try:
        for _ in range(2):
            assert "gradient_copy" not in pellucid.explain(model, x, "saliency", target=0).extras
        assert "needs about" in gc.why_not(model, x)
    finally:
        set_memory_limit(None)
    # a hook registered after the copy was built: the model itself runs, and so the hook
    other = _zoo("resnet18", 2)
    pellucid.explain(other, x, "saliency", target=0)
    assert "gradient_copy" in pellucid.explain(other, x, "saliency", target=0).extras
    seen = []
    handle = other.layer2.register_forward_hook(lambda m, i, o: seen.append(1))
    assert "gradient_copy" not in pellucid.explain(other, x, "saliency", target=0).extras
    assert seen
    handle.remove()
    assert "gradient_copy" in pellucid.explain(other, x, "saliency", target=0).extras
