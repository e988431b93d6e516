"""The trivial baselines against hand computations: the centred Gaussian, the gradient magnitude
and the seeded uniform map; each runs the model once and binds the target like any method."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import pellucid


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_centre_prior_is_the_gaussian_by_hand():
    x = torch.rand(2, 2, 9, 12)
    e = pellucid.explain(_model(), x, method="centre", target=1, sigma=0.25)
    assert e.attributions.shape == (2, 1, 9, 12) and e.cost.forward_passes == 1
    rows, cols = np.meshgrid(np.arange(9) - 4.0, np.arange(12) - 5.5, indexing="ij")
    by_hand = np.exp(-(rows / (0.25 * 9)) ** 2 / 2 - (cols / (0.25 * 12)) ** 2 / 2)
    np.testing.assert_allclose(e.attributions[0, 0].numpy(), by_hand, rtol=1e-6)
    assert int(e.target.classes[0]) == 1


def test_edges_are_the_gradient_magnitude_by_hand():
    x = torch.rand(1, 2, 7, 8, dtype=torch.float64)
    e = pellucid.explain(_model().double(), x, method="edges")
    a = x[0].numpy()
    by_hand = np.sqrt(sum(np.gradient(a[c], axis=d) ** 2 for c in range(2) for d in (0, 1)))
    np.testing.assert_allclose(e.attributions[0, 0].numpy(), by_hand, rtol=1e-10)
    flat = torch.ones(1, 2, 7, 8, dtype=torch.float64)
    assert pellucid.explain(_model().double(), flat, method="edges").attributions.abs().max() == 0


def test_random_map_is_uniform_and_seeded():
    x = torch.rand(1, 2, 64, 64)
    first = pellucid.explain(_model(), x, method="random", seed=3).attributions
    again = pellucid.explain(_model(), x, method="random", seed=3).attributions
    other = pellucid.explain(_model(), x, method="random", seed=4).attributions
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0 and float(first.max()) <= 1 and abs(float(first.mean()) - 0.5) < 0.02
