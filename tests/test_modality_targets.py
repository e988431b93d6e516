"""Multi-modal attribution (exact modality Shapley values, MSFI), regression targets and
segmentation-error targets, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pellucid
from pellucid.errors import ConfigError
from pellucid.explainers.modality import channel_attribution, modality_shapley
from pellucid.metrics.modality import msfi
from pellucid.targets import RegressionTarget, SegmentationErrorTarget


class ChannelModel(nn.Module):
    """Logit 0 = sum_c w_c mean(x_c) + mean(x_0) mean(x_1) (an interaction of two modalities)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))

    def forward(self, x):
        m = x.flatten(2).mean(2)
        s = (m * self.w).sum(1) + m[:, 0] * m[:, 1]
        return torch.stack([s, -s], 1)


def test_modality_shapley_by_hand_and_efficiency():
    torch.manual_seed(0)
    x = torch.rand(3, 4, 6, 6) + 0.5
    out = modality_shapley(ChannelModel(), x, target=0)
    m = x.flatten(2).mean(2).double()
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    expected = m * w
    expected[:, 0] += m[:, 0] * m[:, 1] / 2  # the interaction is shared equally
    expected[:, 1] += m[:, 0] * m[:, 1] / 2
    assert torch.allclose(out["values"], expected, atol=1e-5)
    assert torch.allclose(out["values"].sum(1), (out["full"] - out["empty"]).double(), atol=1e-5)
    with pytest.raises(ConfigError, match="at most 12"):
        modality_shapley(ChannelModel(), torch.rand(1, 13, 4, 4), target=0)


def test_msfi_by_hand():
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :2] = 1.0  # modality 0: half of its positive attribution inside (rows 0-1 of 0-3)
    maps[0, 0, 2:] = 1.0
    maps[0, 1, 0, 0] = 2.0  # modality 1: all inside
    maps[0, 1, 3, 3] = -5.0  # negative attribution does not count
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    importance = torch.tensor([[3.0, 1.0]])
    assert msfi(maps, mask, importance).item() == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)
    assert msfi(maps, mask, torch.tensor([[3.0, -1.0]])).item() == pytest.approx(0.5)  # clipped


def test_msfi_metric_runs_on_a_four_modality_unet(brain_unet):
    from pellucid.data import BrainPhantom
    from pellucid.targets import SegmentationTarget

    ds = BrainPhantom(4, 64, seed=2)
    x = torch.stack([ds[i]["image"] for i in range(4)])
    masks = torch.stack([ds[i]["mask"][0] for i in range(4)])
    exp = pellucid.explain(brain_unet, x, "inputxgradient", target=SegmentationTarget(0, "predicted"))
    assert exp.raw.shape == (4, 4, 64, 64)
    r = pellucid.evaluate(brain_unet, x, exp, metrics=["msfi"], masks=masks)["msfi"]
    valid = r.scores[~torch.isnan(r.scores)]
    assert len(valid) >= 2 and ((valid >= 0) & (valid <= 1)).all()
    per_channel = channel_attribution(exp.raw)
    assert per_channel.shape == (4, 4)
    cam = pellucid.explain(brain_unet, x, "gradcam", target=SegmentationTarget(0, "predicted"))
    with pytest.raises(ConfigError, match="per-modality maps"):
        pellucid.evaluate(brain_unet, x, cam, metrics=["msfi"], masks=masks)


class Regressor(nn.Module):
    """Predicted survival (days) = 100 + sum(w * x)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.arange(16.0)[None])
            self.lin.bias.fill_(100.0)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_regression_target_with_gradients_and_metrics():
    x = torch.rand(2, 1, 4, 4)
    model = Regressor()
    exp = pellucid.explain(model, x, "saliency", target=RegressionTarget(0, reference=365.0))
    assert torch.allclose(exp.raw[0, 0].flatten(), torch.arange(16.0))  # |d survival / d x|
    ig = pellucid.explain(model, x, "integratedgradients", target=RegressionTarget(), steps=64)
    total = ig.raw.flatten(1).sum(1)
    assert torch.allclose(total, (model(x) - model(torch.zeros_like(x)))[:, 0], rtol=1e-3)
    bound = RegressionTarget(0, reference=365.0).bind(model(x))
    assert torch.allclose(bound.score(model(x)), model(x)[:, 0] - 365.0)
    r = pellucid.evaluate(model, x, ig, metrics=[("deletion", {"step": 4})])
    assert r["deletion"].curves.shape == (2, 5)
    with pytest.raises(ConfigError, match="out of range"):
        RegressionTarget(3).bind(model(x))


def test_segmentation_error_regions_by_hand():
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0  # predicted: the top-left 2x2
    truth = torch.zeros(4, 4)
    truth[1:3, 1:3] = 1  # truth: the centre 2x2
    fp = SegmentationErrorTarget(truth, 0, "fp").bind(logits)
    fn = SegmentationErrorTarget(truth, 0, "fn").bind(logits)
    expected_fp = torch.zeros(1, 4, 4)
    expected_fp[0, :2, :2] = 1
    expected_fp[0, 1, 1] = 0  # predicted and true: not an error
    expected_fn = torch.zeros(1, 4, 4)
    expected_fn[0, 1:3, 1:3] = 1
    expected_fn[0, 1, 1] = 0
    assert torch.equal(fp.region, expected_fp) and torch.equal(fn.region, expected_fn)
    assert fp.score(logits).item() == pytest.approx(3 * 5.0)
    assert fn.score(logits).item() == pytest.approx(3 * -5.0)
    with pytest.raises(ConfigError, match="'fp' or 'fn'"):
        SegmentationErrorTarget(truth, 0, "both").bind(logits)


def test_error_targets_explain_a_unet(brain_unet):
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(2, 64, seed=9)
    x = torch.stack([ds[i]["image"] for i in range(2)])
    truth = torch.stack([ds[i]["mask"][0] for i in range(2)])
    for kind in ("fp", "fn"):
        exp = pellucid.explain(brain_unet, x, "gradcam", target=SegmentationErrorTarget(truth, 0, kind))
        assert exp.attributions.shape == (2, 1, 64, 64)
        assert torch.isfinite(exp.attributions).all()
