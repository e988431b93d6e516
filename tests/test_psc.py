"""Prediction-saliency correlation (pellucid.metrics.psc) on the phantom-trained classifier, against
what the paper's two failures look like: an "explanation" that never looks at the model (the
input's edges) keeps its map while the attack changes the prediction (insensitive, PSC near 0);
a map drawn at random moves while the prediction stays (fragile); Grad-CAM follows the prediction
(PSC near 1, measured 0.88-0.94)."""

from __future__ import annotations

import torch

import pellucid
from pellucid.targets import ClassTarget
from tests.test_metrics_sanity import _cases, _edges


def test_psc_separates_gradcam_from_maps_that_ignore_the_prediction(chest_model):
    x, _ = _cases(chest_model, 2, n=8)
    target = ClassTarget(2, activation="sigmoid")
    cam = pellucid.explain(chest_model, x, "gradcam", target=target, layer="layer3")
    ours = pellucid.evaluate(chest_model, x, cam, metrics=["psc"])["psc"]
    edges = pellucid.evaluate(chest_model, x, _edges(None, x, None), target=cam.target,
                              explain_fn=_edges, metrics=["psc"])["psc"]
    assert ours.scores.mean() >= 0.7 and ours.scores.mean() - edges.scores.mean() >= 0.4, \
        (ours.scores, edges.scores)
    # the attack changes every prediction within the budget; the edge map stays, Grad-CAM's moves
    assert not torch.isnan(edges.extras["flip_budget"]).any()
    assert edges.extras["insensitive"].all(), edges.extras["map_similarity_at_flip"]
    assert ours.extras["insensitive"].float().mean() <= 0.25, ours.extras["map_similarity_at_flip"]
    # shapes: 2 x steps perturbations per sample, prediction and map change in [0, ...)
    assert ours.extras["delta_prediction"].shape == (8, 8) and (ours.extras["delta_map"] >= -1e-6).all()

    calls = [0]

    def random_map(model, inputs, target):
        calls[0] += 1
        g = torch.Generator().manual_seed(calls[0])
        return torch.rand(inputs.shape[0], *inputs.shape[2:], generator=g)
    fragile = pellucid.evaluate(chest_model, x, random_map(None, x, None), target=cam.target,
                                explain_fn=random_map, metrics=["psc"])["psc"]
    # random maps change under the smallest noise although the prediction does not
    assert fragile.extras["fragile"].all()
    assert (fragile.extras["map_change_budget"] == fragile.extras["budgets"][0]).all()
