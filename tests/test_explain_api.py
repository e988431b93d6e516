"""The explain API: registry, targets, model left untouched, bounded memory, clear errors, 3D."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import pellucid
from pellucid.errors import ConfigError, ModelError
from pellucid.explainers import available, candidate_layers, default_layer
from pellucid.explainers.cam import CAM
from pellucid.explainers.registry import REGISTRY
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget

CAMS = [name for name, cls in REGISTRY.items() if issubclass(cls, CAM)]  # every single-layer CAM


class TinyNet(nn.Module):
    """conv (1 -> 2 channels, 1x1, fixed weights) -> ReLU -> global average pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [-1.0, 3.0]]))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_registry_lists_the_cam_family():
    listed = {m["name"]: m for m in available()}
    assert set(CAMS) <= set(listed)
    for name in CAMS:
        assert listed[name]["family"] == "cam" and listed[name]["needs_layer"]
        assert listed[name]["summary"]


def test_gradcam_by_hand_on_a_tiny_model():
    """A = (ReLU(x), ReLU(-x)); y_c = sum_k W[c,k] mean(A_k); dy_c/dA_k = W[c,k]/HW, so Grad-CAM's
    weights are W[c,k]/HW and the map is ReLU(W[c,0] ReLU(x) + W[c,1] ReLU(-x)) / HW."""
    x = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    model = TinyNet().eval()
    exp = pellucid.explain(model, x, "gradcam", target=1, layer="relu", normalize="none")
    a0, a1 = x.clamp_min(0), (-x).clamp_min(0)
    expected = (-1.0 * a0 + 3.0 * a1).clamp_min(0) / 4
    assert torch.allclose(exp.attributions, expected)
    assert torch.allclose(exp.raw, (-1.0 * a0 + 3.0 * a1) / 4)
    assert exp.cost.forward_passes == 1 and exp.cost.backward_passes == 1
    assert exp.target.classes.tolist() == [1] and exp.layer == "relu"
    # default target: the arg-max logit
    default = pellucid.explain(model, x, "gradcam", layer="relu", normalize="none")
    assert default.target.classes.tolist() == [int(model(x).argmax())]


def test_probability_targets():
    """A sigmoid probability only rescales each sample's gradient (same normalised map); a softmax
    probability mixes in the other classes: dp_c/dA = p_c (dy_c/dA - sum_j p_j dy_j/dA)."""
    x = torch.randn(2, 1, 6, 6)
    model = TinyNet().eval()
    opts = {"layer": "relu", "normalize": "none", "relu": False}
    logit = pellucid.explain(model, x, "gradcam", target=ClassTarget(0), **opts)
    sig = pellucid.explain(model, x, "gradcam", target=ClassTarget(0, "probability", "sigmoid"),
                           **opts)
    y = model(x).detach()
    s = torch.sigmoid(y[:, 0])
    assert torch.allclose(sig.raw, logit.raw * (s * (1 - s)).view(2, 1, 1, 1), atol=1e-6)
    soft = pellucid.explain(model, x, "gradcam", target=ClassTarget(0, "probability"), **opts)
    other = pellucid.explain(model, x, "gradcam", target=ClassTarget(1), **opts)
    p = torch.softmax(y, 1)
    expected = p[:, :1, None, None] * ((1 - p[:, :1, None, None]) * logit.raw
                                       - p[:, 1:, None, None] * other.raw)
    assert torch.allclose(soft.raw, expected, atol=1e-6)


def test_model_is_left_exactly_as_found_also_on_error():
    model = build("resnet18", 2, 1, 3).module
    model.train()
    model.layer1.eval()
    model.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 1, 64, 64)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for m in model.modules())

    for method in CAMS:
        pellucid.explain(model, x, method, layer="layer4")
    with pytest.raises(ConfigError):
        pellucid.explain(model, x, "gradcam", target=7, layer="layer4")
    with pytest.raises(ModelError):
        pellucid.explain(model, torch.randn(2, 3, 64, 64), "scorecam", layer="layer4")
    assert hooks() == 0
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched despite train mode
        assert torch.equal(v, before[k]), k


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_explaining_500_times_does_not_grow_memory():
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 32, 32)
    for _ in range(50):
        pellucid.explain(model, x, "gradcam", layer="layer4")
    start = _rss_mb()
    for i in range(500):
        pellucid.explain(model, x, "gradcampp" if i % 2 else "gradcam", layer="layer4")
    assert _rss_mb() - start < 25


def test_clear_errors_for_bad_requests():
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(1, 1, 64, 64)
    with pytest.raises(ConfigError, match=r"unknown method 'gradcamm'; available: .*gradcam"):
        pellucid.explain(model, x, "gradcamm")
    with pytest.raises(ConfigError, match="unknown layer 'layer5'; closest: layer4"):
        pellucid.explain(model, x, "gradcam", layer="layer5")
    with pytest.raises(ConfigError, match="class index 3 is out of range for a model with 3 outputs"):
        pellucid.explain(model, x, "gradcam", target=3, layer="layer4")
    with pytest.raises(ModelError, match=r"cannot take input of shape \(1, 3, 64, 64\)"):
        pellucid.explain(model, torch.randn(1, 3, 64, 64), "gradcam", layer="layer4")
    with pytest.raises(ConfigError, match="inputs must be a tensor"):
        pellucid.explain(model, torch.randn(64, 64), "gradcam")
    with pytest.raises(ConfigError, match="has no option 'batchsize'"):
        pellucid.explain(model, x, "scorecam", batchsize=3)
    with pytest.raises(ConfigError, match="plusplus must be"):
        pellucid.explain(model, x, "gradcampp", plusplus="paper")
    with pytest.raises(ConfigError, match="ClassTarget needs a"):
        unet = build("unet", 2, 1, 2).module.eval()
        pellucid.explain(unet, torch.randn(1, 1, 32, 32), "gradcam", target=ClassTarget(0))


def test_default_and_candidate_layers():
    x2 = torch.zeros(1, 1, 64, 64)
    assert default_layer(build("resnet18", 2, 1, 2).module, x2) == "layer4"
    assert default_layer(build("densenet121", 2, 1, 2).module, x2) == "class_layers.relu"
    unet = build("unet", 2, 1, 2).module
    assert default_layer(unet, x2) == "model.1"
    names = [c["name"] for c in candidate_layers(unet, x2)]
    assert "model.1.submodule.2" in names
    exp = pellucid.explain(build("resnet18", 2, 1, 2).module, x2, "gradcam")
    assert exp.layer == "layer4"


@pytest.mark.parametrize("method", CAMS)
def test_every_cam_runs_on_3d_classifier_and_3d_unet(method):
    torch.manual_seed(0)
    resnet = build("resnet18", 3, 4, 2).module.eval()
    x = torch.randn(2, 4, 32, 32, 32)
    exp = pellucid.explain(resnet, x, method, layer="layer3")
    assert exp.attributions.shape == (2, 1, 32, 32, 32)
    assert torch.isfinite(exp.attributions).all()
    assert float(exp.attributions.min()) >= 0 and float(exp.attributions.max()) <= 1 + 1e-6
    unet = build("unet", 3, 4, 3, unet_channels=(8, 16, 32)).module.eval()
    y = torch.randn(1, 4, 24, 24, 24)
    if method == "finercam":  # it compares classes of a softmax classification head: refused
        with pytest.raises(ConfigError, match="softmax classification head"):
            pellucid.explain(unet, y, method, target=SegmentationTarget(1, "all"),
                             layer="model.1.submodule.2")
        return
    seg = pellucid.explain(unet, y, method, target=SegmentationTarget(1, "all"),
                           layer="model.1.submodule.2")
    assert seg.attributions.shape == (1, 1, 24, 24, 24) and torch.isfinite(seg.attributions).all()


@pytest.mark.slow
def test_scorecam_batching_bounds_work_without_changing_the_result():
    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 64, 64)  # 1024 channel maps: a chunk of 512 and ones that split them
    ref = pellucid.explain(model, x, "scorecam", layer="layer4", batch_size=512)
    for bs in (1, 7, 64):
        exp = pellucid.explain(model, x, "scorecam", layer="layer4", batch_size=bs)
        assert torch.allclose(exp.attributions, ref.attributions, atol=1e-5)
    # forwards: the clean batch, the zero input (constant maps), and the non-constant maps in chunks
    store = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: store.update(a=o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    flat = store["a"].flatten(2)
    constant = int((flat.amax(2) == flat.amin(2)).sum())
    live = 2 * 512 - constant
    exp = pellucid.explain(model, x, "scorecam", layer="layer4", batch_size=64)
    assert exp.cost.forward_passes == 1 + (constant > 0) + math.ceil(live / 64)
    assert exp.cost.forward_samples == 2 + (constant > 0) + live


def test_ablationcam_cost_counts_every_ablated_copy():
    """The fast path feeds one input and expands it at the layer: the 512 ablated rows of a
    ResNet-18's layer4 are counted, in chunks of 64 (9 passes with the clean forward)."""
    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    exp = pellucid.explain(model, torch.randn(1, 1, 64, 64), "ablationcam", layer="layer4")
    assert exp.cost.forward_passes == 1 + 512 // 64
    assert exp.cost.forward_samples == 1 + 512


def test_ablationcam_weights_are_relative_score_drops():
    """On the tiny model, zeroing channel k at the ReLU changes y_c by W[c,k] mean(A_k)."""
    x = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    model = TinyNet().eval()
    exp = pellucid.explain(model, x, "ablationcam", target=0, layer="relu", normalize="none",
                           relu=False)
    a = torch.stack([x.clamp_min(0), (-x).clamp_min(0)])[:, 0, 0]  # (2, 2, 2)
    y = 2.0 * a[0].mean() + 1.0 * a[1].mean()
    w = torch.stack([2.0 * a[0].mean(), 1.0 * a[1].mean()]) / y
    assert torch.allclose(exp.raw[0, 0], (w[:, None, None] * a).sum(0), atol=1e-6)


def test_loaded_model_supplies_layer_and_activation(chest_model):
    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(2, 128, seed=5)[0]["image"][None])
    exp = pellucid.explain(chest_model, x, "gradcam", target=ClassTarget(1, kind="probability",
                                                                          activation="sigmoid"))
    assert exp.layer == "layer4" and exp.target.activation == "sigmoid"


def test_scorecam_with_every_channel_constant_runs_no_empty_forward():
    """A 16^3 volume leaves layer3 of a 3D ResNet at 1x1x1: every normalised map is all zero, so
    every channel is scored by the one zero-input forward (regression: an empty chunk was run)."""
    torch.manual_seed(0)
    model = build("resnet18", 3, 1, 2).module.eval()
    exp = pellucid.explain(model, torch.randn(1, 1, 16, 16, 16), "scorecam", layer="layer3")
    assert exp.attributions.shape == (1, 1, 16, 16, 16)
    assert torch.isfinite(exp.attributions).all()
    assert exp.cost.forward_passes == 2  # the clean input and the zero input
