"""Wachter counterfactuals: they flip the decision with a small change, or say they did not."""

from __future__ import annotations

import pytest
import torch

import pellucid
from pellucid.targets import ClassTarget, SegmentationTarget


def test_counterfactual_flips_a_phantom_finding(chest_model):
    from pellucid.data import ChestPhantom

    ds = ChestPhantom(20, 128, seed=50)
    sample = next(ds[i] for i in range(20) if ds[i]["label"][0] == 1)  # cardiomegaly present
    x = chest_model.card.normalize(sample["image"][None])
    target = ClassTarget(0, activation="sigmoid")
    exp = pellucid.explain(chest_model.module, x, "counterfactual", target=target, steps=200)
    assert bool(exp.extras["valid"][0])
    assert exp.extras["margin_before"][0] > 0 > exp.extras["margin_after"][0]
    with torch.no_grad():
        assert chest_model.module(exp.extras["counterfactual"])[0, 0] < 0
    assert exp.attributions.shape == (1, 1, 128, 128)
    assert float(exp.extras["l1"][0]) < 0.5 * float(x.abs().mean())
    assert exp.cost.backward_passes == exp.cost.forward_passes - 2


def test_counterfactual_inside_a_region_only(chest_model):
    from pellucid.data import ChestPhantom

    ds = ChestPhantom(20, 128, seed=51)
    sample = next(ds[i] for i in range(20) if ds[i]["label"][0] == 1)
    x = chest_model.card.normalize(sample["image"][None])
    region = sample["mask"][0]
    exp = pellucid.explain(chest_model.module, x, "counterfactual",
                           target=ClassTarget(0, activation="sigmoid"), region=region, steps=200)
    assert exp.raw[0, 0][region == 0].abs().max() == 0
    assert exp.raw.abs().sum() > 0


def test_counterfactual_that_does_not_converge_is_reported(chest_model):
    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=52)[0]["image"][None])
    with pytest.warns(UserWarning, match="did not flip the decision"):
        exp = pellucid.explain(chest_model.module, x, "counterfactual", steps=1, lr=1e-6)
    assert not bool(exp.extras["valid"][0])


def test_counterfactual_for_a_segmentation_region(brain_unet):
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(6, 64, seed=53)
    x = torch.stack([ds[i]["image"] for i in range(6) if ds[i]["label"].item()][:1])
    exp = pellucid.explain(brain_unet.module, x, "counterfactual",
                           target=SegmentationTarget(0, "predicted"), steps=200, lr=0.05)
    assert bool(exp.extras["valid"][0])
    assert exp.extras["margin_after"][0] < 0
