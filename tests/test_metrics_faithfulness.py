"""Deletion/insertion AUC and Average Drop / Increase in Confidence by hand on a tiny model, and
their sanity on a phantom-trained classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pellucid
from pellucid.targets import ClassTarget


class SumModel(nn.Module):
    """Logits (sum of the pixels, 0)."""

    def forward(self, x):
        s = x.flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def _setup():
    x = torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]])
    a = x.clone()  # the map ranks 4, 3, 2, 1
    target = ClassTarget(0).bind(SumModel()(x))
    return x, a, target


def test_deletion_and_insertion_auc_by_hand():
    x, a, target = _setup()
    r = pellucid.evaluate(SumModel(), x, a, target=target,
                          metrics=[("deletion", {"step": 1, "probability": False}),
                                   ("insertion", {"step": 1, "probability": False,
                                                  "start": "zeros"})])
    # deletion: 10, 6, 3, 1, 0 -> (20 - 5 - 0) / 4; insertion: 0, 4, 7, 9, 10 -> (30 - 0 - 5) / 4
    assert r["deletion"].curves[0].tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert r["deletion"].scores.item() == pytest.approx(3.75)
    assert r["insertion"].curves[0].tolist() == [0.0, 4.0, 7.0, 9.0, 10.0]
    assert r["insertion"].scores.item() == pytest.approx(6.25)
    two = pellucid.evaluate(SumModel(), x, a, target=target,
                            metrics=[("deletion", {"step": 2, "probability": False})])
    assert two["deletion"].curves[0].tolist() == [10.0, 3.0, 0.0]  # (13 - 5 - 0) / 2 = 4
    assert two["deletion"].scores.item() == pytest.approx(4.0)


def test_average_drop_and_increase_by_hand():
    x, a, target = _setup()
    r = pellucid.evaluate(SumModel(), x, a, target=target,
                          metrics=[("average_drop", {"probability": False}),
                                   ("increase_in_confidence", {"probability": False})])
    # map (x - 1) / 3 = [[1, 2/3], [1/3, 0]]; E = x * map sums to 4 + 2 + 2/3 = 20/3; Y = 10
    assert r["average_drop"].scores.item() == pytest.approx(100 * (10 - 20 / 3) / 10, rel=1e-5)
    assert r["increase_in_confidence"].scores.item() == 0.0


def test_gradcam_deletes_faster_than_random_on_phantoms(chest_model):
    from pellucid.data import ChestPhantom

    ds = ChestPhantom(40, 128, seed=80)
    cases = [ds[i] for i in range(40) if ds[i]["label"][2] == 1][:6]  # consolidation
    x = chest_model.card.normalize(torch.stack([c["image"] for c in cases]))
    target = ClassTarget(2, activation="sigmoid")
    exp = pellucid.explain(chest_model, x, "gradcam", target=target)
    rand = torch.rand(len(x), 1, 128, 128, generator=torch.Generator().manual_seed(0))
    metrics = ["deletion", "insertion"]
    ours = pellucid.evaluate(chest_model, x, exp, metrics=metrics)
    base = pellucid.evaluate(chest_model, x, rand, target=exp.target, metrics=metrics)
    assert ours["deletion"].mean() < base["deletion"].mean()
    assert ours["insertion"].mean() > base["insertion"].mean()
    assert ours["deletion"].curves.shape == (6, 128 * 128 // 128 + 1)


def test_faithfulness_correlation_fast_sampler_draws_uniform_subsets():
    """``sampler="fast"``: subsets without replacement, every feature equally likely (chi-square),
    reproducible per seed; the metric runs with it and an unknown sampler is refused."""
    from scipy.stats import chisquare

    from pellucid.errors import ConfigError
    from pellucid.metrics.faithfulness import random_subsets

    subsets = random_subsets(64, 16, 200, 4, seed=3, sampler="fast")
    assert subsets.shape == (200, 4, 16)
    assert all(len(set(row.tolist())) == 16 for row in subsets.reshape(-1, 16))
    counts = torch.bincount(subsets.flatten(), minlength=64).numpy()
    assert chisquare(counts).pvalue > 0.001
    assert torch.equal(subsets, random_subsets(64, 16, 200, 4, seed=3, sampler="fast"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x, a = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    r = pellucid.evaluate(model, x, a, target=0, metrics=[
        ("faithfulness_correlation", {"sampler": "fast", "nr_runs": 20, "subset_size": 8})])
    assert torch.isfinite(r["faithfulness_correlation"].scores).all()
    with pytest.raises(ConfigError, match="sampler must be one of"):
        pellucid.evaluate(model, x, a, target=0,
                          metrics=[("faithfulness_correlation", {"sampler": "numpy"})])


class CountingModel(nn.Module):
    """A small conv net that counts the rows it is run on (it refuses tracing, so pellucid runs
    the module itself instead of an optimised copy)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, 3))
        self.rows = 0

    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("counting needs the eager module")
        self.rows += int(x.shape[0])
        return self.net(x)


def test_map_independent_work_is_shared_across_explanations_and_never_reused_wrongly():
    from pellucid.metrics.base import digest

    model = CountingModel().eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    maps = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (2, 3, 4)]
    target = ClassTarget([0, 1, 2])
    metrics = [("faithfulness_correlation", {"nr_runs": 10, "subset_size": 6}),
               ("infidelity", {"n_perturb_samples": 4}), ("average_drop", {})]
    alone = [pellucid.evaluate(model, x, a, target=target, metrics=metrics) for a in maps]
    cache: dict = {}
    model.rows = 0
    first = pellucid.evaluate(model, x, maps[0], target=target, metrics=metrics, cache=cache)
    rows_first = model.rows
    model.rows = 0
    second = pellucid.evaluate(model, x, maps[1], target=target, metrics=metrics, cache=cache)
    # first: binding the target, clean logits, 10 + 4 perturbations per case, clean probabilities
    # and the masked input of average drop; the second map only binds and runs its masked input
    assert rows_first == 3 + 3 + 3 * 10 + 3 * 4 + 3 + 3 and model.rows == 3 + 3
    for got, ref in ((first, alone[0]), (second, alone[1])):
        for name in ("faithfulness_correlation", "infidelity", "average_drop"):
            torch.testing.assert_close(got[name].scores, ref[name].scores, rtol=0, atol=0,
                                       equal_nan=True)
    # other inputs, another target, changed weights: the cache is emptied, values stay right
    y = x.flip(-1)
    other = pellucid.evaluate(model, y, maps[2], target=target, metrics=metrics, cache=cache)
    fresh = pellucid.evaluate(model, y, maps[2], target=target, metrics=metrics)
    again = pellucid.evaluate(model, x, maps[2], target=ClassTarget(0), metrics=metrics, cache=cache)
    fresh_again = pellucid.evaluate(model, x, maps[2], target=ClassTarget(0), metrics=metrics)
    with torch.no_grad():
        model.net[0].weight.mul_(2.0)
    changed = pellucid.evaluate(model, x, maps[2], target=target, metrics=metrics, cache=cache)
    fresh_changed = pellucid.evaluate(model, x, maps[2], target=target, metrics=metrics)
    for got, ref in ((other, fresh), (again, fresh_again), (changed, fresh_changed)):
        for name in ("faithfulness_correlation", "infidelity", "average_drop"):
            torch.testing.assert_close(got[name].scores, ref[name].scores, equal_nan=True)
    assert not torch.equal(changed["infidelity"].scores, alone[2]["infidelity"].scores)
    assert digest(x, target) == digest(x.clone(), ClassTarget([0, 1, 2]))
    assert digest(x) != digest(y) and digest(x) != digest(x.double())
