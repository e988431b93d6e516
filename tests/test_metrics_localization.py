"""Localisation and complexity metrics against Quantus 0.6.0 (same attributions and masks) and by
hand; empty masks are excluded (Quantus counts them as pointing-game hits); clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.metrics import available
from tests.peers import peer, record


@pytest.fixture()
def maps_and_masks():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 1, 32, 32, generator=gen) ** 3
    masks = torch.zeros(6, 1, 32, 32)
    masks[0, :, 4:12, 4:12] = 1
    masks[1, :, 20:30, 2:9] = 1
    masks[2, :, 10:20, 10:20] = 1
    masks[3, :, 0:5, 27:32] = 1
    masks[4, :, 12:14, 12:30] = 1
    masks[5, :, 1:31, 1:31] = 1
    a[0, 0, 6, 6] = 5.0  # a clear hit
    a[1, 0, 2, 28] = 5.0  # a clear miss
    x = torch.zeros(6, 1, 32, 32)
    return x, a, masks


def _q(metric, x, a, s):
    return np.asarray(metric(model=None, x_batch=x.numpy(), y_batch=np.zeros(len(x), int),
                             a_batch=a.numpy(), s_batch=s.numpy(), channel_first=True))


def test_against_quantus(maps_and_masks):
    x, a, s = maps_and_masks
    ours = pellucid.evaluate(None, x, a, metrics=["pointing_game", "relevance_mass",
                                                  "relevance_rank", "sparseness", "complexity"],
                             masks=s)
    opts = {"normalise": False, "disable_warnings": True}
    ref = {
        "pointing_game": _q(quantus.PointingGame(abs=False, **opts), x, a, s),
        "relevance_mass": _q(quantus.RelevanceMassAccuracy(abs=False, **opts), x, a, s),
        "relevance_rank": _q(quantus.RelevanceRankAccuracy(abs=False, **opts), x, a, s),
        "sparseness": _q(quantus.Sparseness(abs=True, **opts), x, a, s),
        "complexity": _q(quantus.Complexity(abs=True, **opts), x, a, s),
    }
    tolerance = {"pointing_game": 0, "relevance_mass": 1e-6, "relevance_rank": 1e-6,
                 "sparseness": 1e-3, "complexity": 1e-5}  # Quantus adds 1e-7 to every pixel
    classes = {"pointing_game": "PointingGame", "relevance_mass": "RelevanceMassAccuracy",
               "relevance_rank": "RelevanceRankAccuracy", "sparseness": "Sparseness",
               "complexity": "Complexity"}
    for name, values in ref.items():
        got = ours[name].scores.numpy()
        record(name, peer("quantus", classes[name]), got, values, "six 32 x 32 maps and masks")
        assert np.allclose(got, values.astype(float), atol=tolerance[name]), (name, got, values)
    assert ours["pointing_game"].scores[:2].tolist() == [1.0, 0.0]


def test_empty_masks_are_excluded_not_hits(maps_and_masks):
    x, a, s = maps_and_masks
    s = s.clone()
    s[3] = 0
    ours = pellucid.evaluate(None, x, a, metrics=["pointing_game", "relevance_mass"], masks=s)
    assert torch.isnan(ours["pointing_game"].scores[3])
    assert torch.isnan(ours["relevance_mass"].scores[3])
    quantus_pg = _q(quantus.PointingGame(abs=False, normalise=False, disable_warnings=True), x, a, s)
    assert bool(quantus_pg[3]) is True  # Quantus 0.6.0 assigns NaN into a bool array: a "hit"
    mean = ours["pointing_game"].mean()
    assert mean == pytest.approx(float(np.nanmean(np.delete(quantus_pg.astype(float), 3))))


def test_pointing_game_tolerance_and_energy_by_hand():
    a = torch.zeros(1, 1, 20, 20)
    a[0, 0, 2, 2] = 1.0
    a[0, 0, 10, 10] = 0.5
    m = torch.zeros(1, 20, 20)
    m[0, 5:12, 5:12] = 1
    x = torch.zeros(1, 1, 20, 20)
    r = pellucid.evaluate(None, x, a, metrics=["pointing_game", ("energy_pointing_game", {})],
                          masks=m)
    assert r["pointing_game"].scores.item() == 0.0
    assert r["energy_pointing_game"].scores.item() == pytest.approx(0.5 / 1.5)
    near = pellucid.evaluate(None, x, a, metrics=[("pointing_game", {"tolerance": 3})], masks=m)
    assert near["pointing_game"].scores.item() == 1.0  # (2,2) is 3 px from the mask corner (5,5)


def test_iou_and_dice_of_binarised_maps():
    a = torch.zeros(1, 1, 10, 10)
    a[0, 0, 2:6, 2:6] = 1.0
    m = torch.zeros(1, 10, 10)
    m[0, 4:8, 4:8] = 1
    x = torch.zeros(1, 1, 10, 10)
    r = pellucid.evaluate(None, x, a, metrics=["iou", "dice", ("iou", {"binarise": "topk",
                                                                        "value": 0.16})], masks=m)
    assert r["iou"].scores.item() == pytest.approx(4 / 28)  # Otsu splits 0 from 1 exactly
    assert r["dice"].scores.item() == pytest.approx(8 / 32)


def test_a_signed_map_is_clipped_before_otsu_when_asked():
    """A signed map: +1 on the 4x4 mask, -4 on another 4x4 patch, 0 elsewhere. Otsu on the raw
    values splits -4 from {0, 1} (between-class variance 2.36 against 0.42): 84 pixels predicted,
    IoU 16/84. Clipped at 0: the mask alone, IoU 1. |a|: Otsu splits 4 from {0, 1} (1.95 against
    1.36): the negative patch alone, IoU 0."""
    a = torch.zeros(1, 1, 10, 10)
    a[0, 0, 4:8, 4:8] = 1.0
    a[0, 0, 0:4, 0:4] = -4.0
    m = torch.zeros(1, 10, 10)
    m[0, 4:8, 4:8] = 1
    x = torch.zeros(1, 1, 10, 10)
    raw, positive, absolute = (
        pellucid.evaluate(None, x, a, metrics=[("iou", {"clip": c})], masks=m)["iou"].scores.item()
        for c in ("none", "positive", "abs"))
    assert raw == pytest.approx(16 / 84)
    assert positive == pytest.approx(1.0)
    assert absolute == 0.0
    with pytest.raises(ConfigError, match="clip must be"):
        pellucid.evaluate(None, x, a, metrics=[("iou", {"clip": "relu"})], masks=m)


def test_boxes_become_masks_and_3d_works():
    x = torch.zeros(1, 1, 16, 16)
    a = torch.zeros(1, 1, 16, 16)
    a[0, 0, 5, 5] = 1
    r = pellucid.evaluate(None, x, a, metrics=["pointing_game"], boxes=[torch.tensor([[4, 4, 8, 8]])])
    assert r["pointing_game"].scores.item() == 1.0
    vol = torch.rand(2, 1, 8, 8, 8)
    mask = torch.zeros(2, 8, 8, 8)
    mask[:, 2:5, 2:5, 2:5] = 1
    r3 = pellucid.evaluate(None, torch.zeros(2, 4, 8, 8, 8), vol,
                           metrics=["pointing_game", "relevance_rank", "iou", "sparseness"],
                           masks=mask)
    assert all(v.scores.shape == (2,) for v in r3.values())


def test_bad_inputs_give_clear_errors():
    x = torch.zeros(2, 1, 8, 8)
    a = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"masks have shape \(2, 7, 8\)"):
        pellucid.evaluate(None, x, a, metrics=["pointing_game"], masks=torch.zeros(2, 7, 8))
    with pytest.raises(ConfigError, match="outside the 8x8 image"):
        pellucid.evaluate(None, x, a, metrics=["pointing_game"],
                          boxes=[torch.tensor([[0, 0, 9, 4]]), torch.tensor([[0, 0, 2, 2]])])
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        pellucid.evaluate(None, x, bad, metrics=["sparseness"])
    with pytest.raises(ConfigError, match="needs ground truth"):
        pellucid.evaluate(None, x, a, metrics=["relevance_mass"])
    with pytest.raises(ConfigError, match="unknown metric"):
        pellucid.evaluate(None, x, a, metrics=["deletion_auc_typo"])


def test_registry_lists_categories():
    listed = {m["name"]: m for m in available()}
    assert listed["pointing_game"]["category"] == "localization"
    assert listed["complexity"]["higher_is_better"] is False
    assert listed["relevance_mass"]["needs"] == ["mask"]


def test_auprc_equals_scikit_learn(maps_and_masks):
    from sklearn.metrics import average_precision_score

    x, a, s = maps_and_masks
    a = (a * 20).round() / 20  # ties, which the threshold grouping must handle
    ours = pellucid.evaluate(None, x, a, metrics=["auprc"], masks=s)["auprc"].scores
    refs = [average_precision_score(s[i].flatten().numpy(), a[i].flatten().numpy())
            for i in range(len(a))]
    record("auprc", peer("scikit-learn", "average_precision_score"), ours, refs,
           "six 32 x 32 maps with ties")
    for i, ref in enumerate(refs):
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
