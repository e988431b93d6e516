"""The CheXlocalize and ChestX-ray14 box protocols by hand, the cost metric, and the errors of the
metrics that re-explain or need boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pellucid
from pellucid.bootstrap import bootstrap_ci
from pellucid.errors import ConfigError, PellucidError
from pellucid.metrics.protocols import box_overlaps, heatmap_boxes
from tests.peers import peer, record


def test_chexlocalize_by_hand():
    a = torch.zeros(3, 1, 8, 8)
    a[0, 0, 2:4, 2:4] = 1.0  # 4 px hot square; Otsu keeps exactly it
    a[1, 0, 0, 0] = 1.0
    a[2, 0, 5:7, 5:7] = 1.0
    masks = torch.zeros(3, 8, 8)
    masks[0, 2:4, 2:6] = 1  # 8 px: IoU 4 / 8
    masks[1, 4:6, 4:6] = 1  # miss: IoU 0, no hit
    # sample 2 has an empty mask: excluded from IoU and hit rate
    r = pellucid.evaluate(None, torch.zeros(3, 1, 8, 8), a, metrics=["chexlocalize"], masks=masks)
    res = r["chexlocalize"]
    assert res.scores[0].item() == pytest.approx(0.5)
    assert res.scores[1].item() == 0.0
    assert torch.isnan(res.scores[2])
    assert res.extras["miou"] == pytest.approx(0.25)
    assert res.extras["hit_rate"] == pytest.approx(0.5)
    lo, hi = res.extras["miou_ci"]
    assert 0.0 <= lo <= 0.25 <= hi <= 0.5


def test_bootstrap_interval_is_the_percentile_bootstrap():
    v = torch.tensor([0.1, 0.5, 0.2, float("nan"), 0.9, 0.4])
    lo, hi = bootstrap_ci(v, resamples=500, seed=3)
    data = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    rng = np.random.RandomState(3)
    means = data[rng.randint(0, 5, size=(500, 5))].mean(1)
    assert (lo, hi) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    assert lo < data.mean() < hi


def test_box_protocol_by_hand():
    heat = np.zeros((20, 20))
    heat[2:6, 2:10] = 1.0  # component 1: box (2, 2, 10, 6)
    heat[15:17, 15:17] = 0.8  # component 2: box (15, 15, 17, 17)
    assert heatmap_boxes(heat, 0.5) == [(2.0, 2.0, 10.0, 6.0), (15.0, 15.0, 17.0, 17.0)]
    iou, iobb = box_overlaps((2, 2, 10, 6), (6, 2, 14, 6))  # half the predicted box overlaps
    assert iou == pytest.approx(16 / 48) and iobb == pytest.approx(0.5)
    a = torch.tensor(heat, dtype=torch.float32)[None, None].repeat(2, 1, 1, 1)
    boxes = [torch.tensor([[6.0, 2.0, 14.0, 6.0]]), torch.tensor([[0.0, 12.0, 4.0, 16.0]])]
    r = pellucid.evaluate(None, torch.zeros(2, 1, 20, 20), a, metrics=["box_accuracy"],
                          boxes=boxes)["box_accuracy"]
    # the predicted region is the union of both components' boxes: 32 + 4 px, 16 of them in the box
    assert r.scores.tolist() == pytest.approx([16 / 36, 0.0])
    assert r.extras["iou"].tolist() == pytest.approx([16 / 52, 0.0])
    assert r.extras["accuracy"]["iobb>0.4"] == 0.5 and r.extras["accuracy"]["iobb>0.5"] == 0.0
    assert r.extras["accuracy"]["iou>0.3"] == 0.5 and r.extras["accuracy"]["iou>0.4"] == 0.0
    best = pellucid.evaluate(None, torch.zeros(2, 1, 20, 20), a, boxes=boxes,
                             metrics=[("box_accuracy", {"mode": "best_component"})])["box_accuracy"]
    assert best.scores.tolist() == pytest.approx([0.5, 0.0])  # the earlier reading, by name


def test_box_accuracy_does_not_reward_a_one_pixel_blob_or_a_random_map():
    """A one-pixel maximum inside the box beside a large marked region outside it: the best single
    component scored it 1.0 (the defect); the published IoBB is the marked area's share in the box.
    A uniform random map marks about half the image and scores about the box's share of it."""
    heat = torch.zeros(1, 1, 64, 64)
    heat[0, 0, 40:60, 4:60] = 0.9  # a large region outside the box
    heat[0, 0, 10, 10] = 1.0  # one pixel inside the box
    box = [torch.tensor([[5.0, 5.0, 21.0, 21.0]])]
    x = torch.zeros(1, 1, 64, 64)
    union = pellucid.evaluate(None, x, heat, metrics=["box_accuracy"], boxes=box)["box_accuracy"]
    assert union.scores.item() == pytest.approx(1 / (1 + 20 * 56))
    best = pellucid.evaluate(None, x, heat, metrics=[("box_accuracy", {"mode": "best_component"})],
                             boxes=box)["box_accuracy"]
    assert best.scores.item() == 1.0
    noise = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    r = pellucid.evaluate(None, torch.zeros(8, 1, 64, 64), noise, metrics=["box_accuracy"],
                          boxes=box * 8)["box_accuracy"]
    assert r.scores.max() < 0.2  # the box covers 16 x 16 of 64 x 64 px: its share is 1/16
    with pytest.raises(PellucidError, match="box_accuracy: mode must be"):
        pellucid.evaluate(None, x, heat, metrics=[("box_accuracy", {"mode": "best"})], boxes=box)


def test_cost_metric_reports_passes_time_and_memory():
    from pellucid.models import build

    model = build("resnet18", 2, 1, 2).module
    x = torch.randn(2, 1, 32, 32)
    e = pellucid.explain(model, x, "scorecam", layer="layer3")
    r = pellucid.evaluate(model, x, e, metrics=["cost"])["cost"]
    assert r.extras["backward_passes"] == 0 and r.extras["forward_passes"] >= 2
    assert r.scores.shape == (2,) and (r.scores > 0).all()
    assert r.extras["peak_memory_bytes"] is not None and r.extras["peak_memory_bytes"] >= 0


def test_metric_errors():
    from pellucid.models import build

    model = build("resnet18", 2, 1, 2).module
    x = torch.randn(2, 1, 16, 16)
    a = torch.rand(2, 1, 16, 16)
    with pytest.raises(ConfigError, match="re-explains"):
        pellucid.evaluate(model, x, a, target=0, metrics=["max_sensitivity"])
    with pytest.raises(ConfigError, match="needs the Explanation"):
        pellucid.evaluate(model, x, a, target=0, metrics=["cost"])
    with pytest.raises(ConfigError, match="needs ground-truth boxes"):
        pellucid.evaluate(model, x, a, target=0, metrics=["box_accuracy"],
                          masks=torch.ones(2, 16, 16))
    with pytest.raises(ConfigError, match="order must be"):
        pellucid.evaluate(model, x, a, target=0, metrics=[("pixel_flipping", {"order": "up"})])
    with pytest.raises(ConfigError, match="subset_size"):
        pellucid.evaluate(model, x, a, target=0,
                          metrics=[("faithfulness_correlation", {"subset_size": 999})])
    with pytest.raises(ConfigError, match=r"metric 'road' has no option 'percent'; options: fractions"):
        pellucid.evaluate(model, x, a, target=0, metrics=[("road", {"percent": 3})])


def _score(metric: str, a: torch.Tensor, masks: torch.Tensor, **options) -> torch.Tensor:
    result = pellucid.evaluate(None, torch.zeros_like(a), a, metrics=[(metric, options)],
                               masks=masks)
    return result[metric].scores


def test_pointing_game_ties_any_and_first_argmax_by_hand():
    """Two equal maxima, the first (in C order) outside the mask and the second inside: a hit when
    any maximum counts (Quantus), a miss when only the first argmax does (TorchRay)."""
    a = torch.zeros(2, 1, 6, 6)
    a[:, 0, 0, 0] = a[:, 0, 4, 4] = 1.0
    masks = torch.zeros(2, 6, 6)
    masks[0, 4, 4] = 1  # only the second maximum inside
    masks[1, 0, 0] = 1  # only the first
    assert _score("pointing_game", a, masks).tolist() == [1.0, 1.0]
    flat = a.reshape(2, -1)
    by_hand = [float(masks[i].reshape(-1)[int(flat[i].argmax())]) for i in range(2)]
    assert _score("pointing_game", a, masks, ties="first").tolist() == by_hand == [0.0, 1.0]
    with pytest.raises(ConfigError, match="ties must be"):
        _score("pointing_game", a, masks, ties="last")


def test_skimage_otsu_iou_equals_threshold_otsu():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.gamma(2.0, 1.0, (4, 1, 24, 20))).float()
    masks = torch.from_numpy(rng.random((4, 24, 20)) < 0.3)
    ious = _score("iou", a, masks, otsu="skimage")
    refs = []
    for i in range(4):
        pred = a[i, 0].numpy() > threshold_otsu(a[i, 0].numpy())
        truth = masks[i].numpy()
        refs.append((pred & truth).sum() / (pred | truth).sum())
        assert ious[i].item() == pytest.approx(refs[-1], abs=1e-6)
    record("iou", peer("scikit-image", "threshold_otsu, then IoU (otsu='skimage')"), ious, refs,
           "four 24 x 20 maps")
    assert not torch.allclose(ious, _score("iou", a, masks))  # pellucid's own binning differs


def test_energy_pointing_game_normalisations_by_hand():
    a = torch.tensor([[[[2.0, -1.0], [1.0, 0.5]]]])
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert _score("energy_pointing_game", a, masks).item() == pytest.approx(2 / 3.5)  # clip
    assert _score("energy_pointing_game", a, masks, normalise="none").item() == \
        pytest.approx((2 - 1) / 2.5)
    scaled = np.array([2.0, 0.0, 1.0, 0.5]) / 2.0  # clipped, then min-max (min 0, max 2)
    assert _score("energy_pointing_game", a, masks, normalise="clip_minmax").item() == \
        pytest.approx(scaled[:2].sum() / scaled.sum())
