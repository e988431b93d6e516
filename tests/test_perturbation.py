"""Perturbation attributions: Shapley axioms and hand values, KernelSHAP against exact Shapley and
shap's KernelExplainer, occlusion against Captum, LIME recovering a linear model, RISE locating."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pellucid
from pellucid.errors import ConfigError
from pellucid.explainers.features import grid_labels
from pellucid.models import build
from pellucid.targets import ClassTarget, SegmentationTarget
from tests.peers import peer, record


class RegionModel(nn.Module):
    """Two outputs from 2x2 grid-cell means m_k of a 1-channel 8x8 image:
    y0 = 2 m0 + 1 m1 - 3 m2 + 0.5 m3 + 4 m0 m1 (an interaction), y1 = m3."""

    def forward(self, x):
        m = x[:, 0].reshape(-1, 2, 4, 2, 4).mean((2, 4)).flatten(1)  # (B, 4) cell means
        y0 = 2 * m[:, 0] + m[:, 1] - 3 * m[:, 2] + 0.5 * m[:, 3] + 4 * m[:, 0] * m[:, 1]
        return torch.stack([y0, m[:, 3]], 1)


def _region_input():
    x = torch.ones(1, 1, 8, 8)
    return x, grid_labels((8, 8), 2)


def test_exact_shapley_by_hand_and_efficiency():
    x, labels = _region_input()
    exp = pellucid.explain(RegionModel(), x, "shapley", target=0, features=labels)
    phi = exp.extras["feature_values"][0]
    # with all cell means 1 or 0: v(S) = 2[0] + [1] - 3[2] + .5[3] + 4[0][1]; interaction splits evenly
    assert torch.allclose(phi.double(), torch.tensor([4.0, 3.0, -3.0, 0.5], dtype=torch.float64),
                          atol=1e-6)
    assert abs(float(phi.sum()) - (4 + 3 - 3 + 0.5)) < 1e-5  # f(x) - f(baseline)
    # every pixel carries its cell's value
    assert torch.allclose(exp.attributions[0, 0, :4, :4], torch.full((4, 4), 4.0))


def test_exact_shapley_efficiency_on_a_trained_network(chest_model):
    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=40)[0]["image"][None])
    exp = pellucid.explain(chest_model.module, x, "shapley", features="grid", n_features=9)
    phi = exp.extras["feature_values"][0].double()
    with torch.no_grad():
        y = exp.target.score(chest_model.module(x)).double()
        y0 = exp.target.score(chest_model.module(torch.zeros_like(x))).double()
    assert abs(float(phi.sum() - (y - y0))) < 1e-5 * max(1.0, float(abs(y - y0)))
    assert exp.cost.forward_samples == 1 + 2**9  # the clean input and every coalition


def test_kernelshap_with_all_coalitions_equals_exact_shapley(chest_model):
    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=41)[0]["image"][None])
    exact = pellucid.explain(chest_model.module, x, "shapley", features="slic", n_features=8)
    m = len(exact.extras["feature_values"][0])
    kernel = pellucid.explain(chest_model.module, x, "kernelshap", features="slic", n_features=8,
                              samples=2**m)
    assert torch.allclose(kernel.extras["feature_values"][0], exact.extras["feature_values"][0],
                          atol=1e-4)


def test_kernelshap_agrees_with_shap_kernelexplainer(chest_model):
    """Same features (a 3x3 grid), same background (features off = 0), one sample.
    All 2^9 - 2 coalitions: equal within 1e-4. Sampled (200 vs shap's nsamples=200): the values
    correlate above 0.95 and agree within 15 % of their range."""
    import shap

    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(ChestPhantom(1, 128, seed=42)[0]["image"][None])
    labels = grid_labels((128, 128), 3)
    model = chest_model.module
    with torch.no_grad():
        cls = int(model(x).argmax())

    def f(z: np.ndarray) -> np.ndarray:
        zt = torch.from_numpy(z).float()
        keep = zt[:, labels][:, None]
        with torch.no_grad():
            return model(x * keep)[:, cls].numpy()

    explainer = shap.KernelExplainer(f, np.zeros((1, 9)))
    full = explainer.shap_values(np.ones((1, 9)), nsamples=2**9 - 2, silent=True)[0]
    ours = pellucid.explain(model, x, "kernelshap", features=labels, samples=2**9,
                            target=cls).extras["feature_values"][0].numpy()
    record("kernelshap", peer("shap", "KernelExplainer"), ours, full,
           "trained ResNet-18, 9 features, every coalition")
    assert np.abs(ours - full).max() < 1e-4
    np.random.seed(0)
    sampled = explainer.shap_values(np.ones((1, 9)), nsamples=200, silent=True)[0]
    ours = pellucid.explain(model, x, "kernelshap", features=labels, samples=200,
                            target=cls).extras["feature_values"][0].numpy()
    assert np.corrcoef(ours, sampled)[0, 1] > 0.95
    assert np.abs(ours - sampled).max() < 0.15 * (full.max() - full.min())


def test_too_many_features_for_exact_shapley():
    with pytest.raises(ConfigError, match="at most 12 features"):
        pellucid.explain(RegionModel(), torch.ones(1, 1, 8, 8), "shapley", target=0,
                         features=torch.arange(64).reshape(8, 8))


def test_occlusion_equals_captum(chest_model):
    from captum.attr import Occlusion

    from pellucid.data import ChestPhantom

    x = chest_model.card.normalize(torch.stack([ChestPhantom(2, 128, seed=43)[i]["image"]
                                                for i in range(2)]))
    cls = torch.tensor([0, 2])
    ours = pellucid.explain(chest_model.module, x, "occlusion", target=cls, window=16, stride=8)
    ref = Occlusion(chest_model.module).attribute(x, sliding_window_shapes=(1, 16, 16),
                                                  strides=(1, 8, 8), target=cls, baselines=0.0)
    record("occlusion", peer("captum", "Occlusion"), ours.attributions, ref,
           f"trained ResNet-18 {tuple(x.shape)}, window 16, stride 8")
    assert torch.allclose(ours.attributions, ref, atol=1e-4)
    assert ours.extras["windows"] == 15 * 15


def test_lime_recovers_a_model_linear_in_its_features():
    x, labels = _region_input()
    exp = pellucid.explain(RegionModel(), x, "lime", target=1, features=labels, alpha=1e-8,
                           samples=64)
    assert torch.allclose(exp.extras["feature_values"][0], torch.tensor([0.0, 0.0, 0.0, 1.0]),
                          atol=1e-4)


def test_rise_finds_the_region_the_model_looks_at():
    class Spot(nn.Module):  # the score is the mean of a 6x6 square at rows/cols 20..25
        def forward(self, x):
            return x[:, :, 20:26, 20:26].mean((1, 2, 3))[:, None].repeat(1, 2)

    x = torch.ones(1, 1, 48, 48)
    exp = pellucid.explain(Spot(), x, "rise", target=0, masks=500, cells=6, seed=3, batch_size=16)
    sal = exp.attributions[0, 0]
    inside = sal[20:26, 20:26].mean()
    assert inside > sal[:10, :10].mean() + 0.1 and inside > sal[-10:, -10:].mean() + 0.1
    again = pellucid.explain(Spot(), x, "rise", target=0, masks=500, cells=6, seed=3,
                             batch_size=7)
    assert torch.allclose(exp.attributions, again.attributions, atol=1e-5)
    assert exp.cost.forward_passes == 1 + 500 // 16 + 1


PERTURBATION = {"occlusion": {"window": 8, "stride": 8}, "rise": {"masks": 40, "cells": 4},
                "lime": {"samples": 30, "n_features": 10}, "kernelshap": {"samples": 30,
                                                                          "n_features": 10},
                "shapley": {"n_features": 6}}


@pytest.mark.parametrize("method", list(PERTURBATION))
def test_perturbation_methods_on_3d_classification_and_segmentation(method):
    torch.manual_seed(0)
    resnet = build("resnet18", 3, 2, 3).module.eval()
    x = torch.randn(1, 2, 32, 32, 32)
    exp = pellucid.explain(resnet, x, method, target=ClassTarget(1), **PERTURBATION[method])
    assert exp.attributions.shape == (1, 1, 32, 32, 32) and torch.isfinite(exp.attributions).all()
    assert exp.cost.forward_samples > 2 and exp.cost.backward_passes == 0
    unet = build("unet", 2, 2, 2, unet_channels=(8, 16, 32)).module.eval()
    y = torch.randn(1, 2, 32, 32)
    seg = pellucid.explain(unet, y, method, target=SegmentationTarget(1, "all"),
                           **PERTURBATION[method])
    assert seg.attributions.shape == (1, 1, 32, 32) and seg.attributions.abs().sum() > 0


@pytest.mark.slow
def test_memory_limit_caps_chunks_and_keeps_results():
    """A memory bound cuts batched forwards into chunks of at most bound / (activation bytes per
    input) inputs; the maps do not change and the peak growth shrinks."""
    from pellucid.explainers.accelerate import AutoBatch, activation_bytes
    from pellucid.runtime import set_memory_limit

    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(2, 1, 64, 64)
    per_input = activation_bytes(model, x)
    # at least the input and conv1's output (64 channels at half resolution, float32)
    assert per_input >= 4 * (64 * 64 + 64 * 32 * 32)
    free = pellucid.explain(model, x, "scorecam", target=0)
    try:
        set_memory_limit(3 * per_input / 2**20)
        sizes = [stop - start for start, stop in AutoBatch(None, model, x).chunks(100)]
        assert max(sizes) == 3 and sum(sizes) == 100
        bounded = pellucid.explain(model, x, "scorecam", target=0)
        occl = pellucid.explain(model, x, "occlusion", target=0, window=16, stride=16)
    finally:
        set_memory_limit(None)
    assert torch.allclose(bounded.attributions, free.attributions, atol=1e-5)
    assert torch.allclose(occl.attributions, pellucid.explain(
        model, x, "occlusion", target=0, window=16, stride=16).attributions, atol=1e-5)
    with pytest.raises(ConfigError, match="positive"):
        set_memory_limit(-1)
