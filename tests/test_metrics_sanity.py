"""Sanity of the metrics on a phantom-trained classifier: Grad-CAM must beat baselines that ignore
the model, and the randomisation test must separate it from an edge detector (Adebayo 2018)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pellucid
from pellucid.data import ChestPhantom
from pellucid.targets import ClassTarget


def _cases(chest_model, cls: int, n: int = 16):
    ds = ChestPhantom(200, 128, seed=81)
    cases = [ds[i] for i in range(200) if ds[i]["label"][cls] == 1][:n]
    x = chest_model.card.normalize(torch.stack([c["image"] for c in cases]))
    masks = torch.stack([c["mask"][cls] for c in cases])
    return x, masks


def _blob(n: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    return torch.exp(-((yy - 64) ** 2 + (xx - 64) ** 2) / (2 * 20.0**2)).expand(n, 1, 128, 128)


def test_gradcam_localises_lesions_better_than_blob_and_random(chest_model):
    # TorchRay's 15 px tolerance at 224 px, scaled to 128 px
    metrics = [("pointing_game", {"tolerance": 9}), ("iou", {"binarise": "topk", "value": 0.02})]
    for cls in (1, 2):  # nodule, consolidation: small lesions anywhere in the lungs
        x, masks = _cases(chest_model, cls)
        target = ClassTarget(cls, activation="sigmoid")
        cam = pellucid.explain(chest_model, x, "gradcam", target=target, layer="layer3")
        rand = torch.rand(len(x), 1, 128, 128, generator=torch.Generator().manual_seed(0))
        got = {name: pellucid.evaluate(chest_model, x, a, target=cam.target, metrics=metrics,
                                       masks=masks)
               for name, a in (("gradcam", cam), ("blob", _blob(len(x))), ("random", rand))}
        pg = {k: v["pointing_game"].mean() for k, v in got.items()}
        iou = {k: v["iou"].mean() for k, v in got.items()}
        assert pg["gradcam"] >= 0.75 and pg["gradcam"] - max(pg["blob"], pg["random"]) >= 0.4, (cls, pg)
        assert iou["gradcam"] > 5 * max(iou["blob"], iou["random"], 0.01), (cls, iou)


def _edges(model, inputs, target):
    """Sobel gradient magnitude of the input: an 'explanation' that never looks at the model."""
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])[None, None]
    gx = F.conv2d(inputs[:, :1], kx, padding=1)
    gy = F.conv2d(inputs[:, :1], kx.transpose(2, 3), padding=1)
    return (gx**2 + gy**2).sqrt()[:, 0]


def test_cascading_randomisation_separates_gradcam_from_an_edge_detector(chest_model):
    x, _ = _cases(chest_model, 2, n=8)
    cam = pellucid.explain(chest_model, x, "gradcam", target=ClassTarget(2, activation="sigmoid"),
                           layer="layer3")
    opts = {"progress": False, "measures": ("ssim", "spearman_abs")}
    ours = pellucid.evaluate(chest_model, x, cam, metrics=[("model_randomization", opts)])
    edges = _edges(None, x, None)
    theirs = pellucid.evaluate(chest_model, x, edges[:, None], target=cam.target, explain_fn=_edges,
                               metrics=[("model_randomization", opts)])
    r, e = ours["model_randomization"], theirs["model_randomization"]
    assert r.extras["passed"].float().mean() >= 0.75, (r.scores, r.extras["baseline"])
    assert not e.extras["passed"].any()
    assert torch.allclose(e.scores, torch.ones_like(e.scores).double().float())  # unchanged maps
    # similarity falls as more of the network is randomised
    assert r.curves[:, -1].mean() < r.curves[:, 0].mean()
    # skip_layers (Quantus' MPRT(skip_layers=True)): one explanation after the last step, the same
    # score as the cascade's last step
    skipped = pellucid.evaluate(chest_model, x, cam, metrics=[("model_randomization",
                                                               {**opts, "skip_layers": True})])
    s = skipped["model_randomization"]
    torch.testing.assert_close(s.scores, r.scores)
    torch.testing.assert_close(s.curves[:, 0], r.curves[:, -1])
    assert s.extras["steps"] == r.extras["steps"][-1:] and s.curves.shape[1] == 1
    calls = []

    def counted(model, inputs, target):
        calls.append(1)
        return _edges(model, inputs, target)
    for skip in (False, True):
        calls.clear()
        pellucid.evaluate(chest_model, x, edges[:, None], target=cam.target, explain_fn=counted,
                          metrics=[("model_randomization", {**opts, "skip_layers": skip})])
        assert len(calls) == (1 if skip else len(r.extras["steps"])), (skip, len(calls))


def test_pair_similarity_equals_the_per_pair_measure_with_ties_and_constant_maps():
    """The randomisation baseline ranks each map once; every measure equals ranking per pair
    (scipy's average ranks for ties; NaN for a constant map)."""
    from scipy.stats import spearmanr

    from pellucid.metrics.similarity import SIMILARITIES, pair_similarity, similarity

    gen = torch.Generator().manual_seed(0)
    for shape in ((6, 16, 16), (6, 12, 12, 12)):
        maps = torch.randn(shape, generator=gen)
        maps[2] = maps[2].round()  # ties
        maps[4] = 1.0  # constant
        i, j = torch.tensor([0, 0, 1, 2, 3, 4, 5]), torch.tensor([1, 2, 3, 5, 2, 0, 2])
        for name in SIMILARITIES:
            got = pair_similarity(name, maps, i, j)
            want = similarity(name, maps[i], maps[j])
            assert torch.equal(got.isnan(), want.isnan()), name
            assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=0, atol=1e-12), name
        got = pair_similarity("spearman", maps, i, j)
        assert got[1] == pytest.approx(spearmanr(maps[0].flatten(), maps[2].flatten())[0])


def test_cascading_randomisation_reproduces_adebayo_guided_backprop_stays_gradients_do_not(
        chest_model):
    """Adebayo et al. 2018, Fig. 2: as the model is randomised from the output down, guided
    backpropagation's map stays similar to the original (it reconstructs the image, whatever the
    weights above), while the gradient's and Grad-CAM's fall at the first randomised block."""
    x, _ = _cases(chest_model, 2, n=8)
    target = ClassTarget(2, activation="sigmoid")
    opts = {"progress": False, "depth": "auto", "measures": ("ssim",)}
    curves = {}
    for method in ("guidedbackprop", "saliency", "gradcam"):
        exp = pellucid.explain(chest_model, x, method, target=target)
        result = pellucid.evaluate(chest_model, x, exp, metrics=[("model_randomization", opts)])
        r = result["model_randomization"]
        curves[method] = r.curves.mean(0)
        steps = r.extras["steps"]
    assert steps[:3] == ["fc", "layer4", "layer3"], steps  # five or more blocks from the output
    top = slice(0, 2)  # the head and the last residual stage randomised
    assert (curves["guidedbackprop"][top] >= 0.8).all(), curves
    for other in ("saliency", "gradcam"):
        assert (curves["guidedbackprop"][top] - curves[other][top] >= 0.3).all(), curves
    assert curves["saliency"][0] <= 0.5, curves
