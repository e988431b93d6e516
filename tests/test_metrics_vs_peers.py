"""Faithfulness, robustness and randomisation metrics against the peers that define them:
Quantus 0.6.0, pytorch-grad-cam 1.5.7's ROAD and confidence metrics, Captum's infidelity."""

from __future__ import annotations

import numpy as np
import pytest
import quantus
import torch

import pellucid
from pellucid.models import build
from pellucid.targets import ClassTarget
from tests.peers import peer, record

CASE = "ResNet-18, four 1 x 32 x 32 inputs"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build("resnet18", 2, 1, 3).module.eval()
    x = torch.randn(4, 1, 32, 32)
    explanation = pellucid.explain(model, x, "gradcam", layer="layer3")
    return model, x, explanation


def _explain_func(model, inputs, targets, **_):
    out = pellucid.explain(model, torch.as_tensor(inputs), "gradcam", target=torch.as_tensor(targets),
                           layer="layer3")
    return out.attributions.numpy()


def _q(metric, model, x, y, a, **kw):
    return np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=np.asarray(y),
                             a_batch=a.numpy(), device="cpu", **kw), dtype=float)


def test_pixel_flipping_equals_quantus(setup):
    model, x, _ = setup
    a = torch.rand(4, 1, 32, 32)  # no ties: Quantus' unstable argsort would order ties differently
    y = model(x).argmax(1)
    r = pellucid.evaluate(model, x, a, target=ClassTarget(y, kind="logit"),
                          metrics=[("pixel_flipping", {"features_in_step": 32})])["pixel_flipping"]
    q = quantus.PixelFlipping(features_in_step=32, perturb_baseline="black", disable_warnings=True)
    curves = _q(q, model, x, y, a, softmax=True)  # its AUC option calls np.trapz, gone in numpy 2
    record("pixel_flipping", peer("quantus", "PixelFlipping"), r.curves, curves, CASE)
    assert np.abs(r.curves.numpy() - curves).max() < 1e-5
    np.testing.assert_allclose(r.scores.numpy(), np.trapezoid(curves, axis=1), rtol=1e-5)


def test_faithfulness_correlation_equals_quantus_with_the_same_seed(setup):
    model, x, _ = setup
    a = torch.randn(4, 1, 32, 32)
    y = model(x).argmax(1)
    r = pellucid.evaluate(model, x, a, target=ClassTarget(y, kind="logit"),
                          metrics=[("faithfulness_correlation",
                                    {"nr_runs": 20, "subset_size": 50, "seed": 3})])
    np.random.seed(3)
    q = quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=50, perturb_baseline="black",
                                        disable_warnings=True, return_aggregate=False)
    ref = _q(q, model, x, y, a)
    record("faithfulness_correlation", peer("quantus", "FaithfulnessCorrelation"),
           r["faithfulness_correlation"].scores, ref, CASE)
    np.testing.assert_allclose(r["faithfulness_correlation"].scores.numpy(), ref, atol=1e-4)


def test_max_sensitivity_and_local_lipschitz_equal_quantus(setup):
    model, x, e = setup
    y = e.target.classes
    r = pellucid.evaluate(model, x, e, metrics=[("max_sensitivity", {"nr_samples": 5, "seed": 7}),
                                                ("local_lipschitz", {"nr_samples": 5, "seed": 8})])
    np.random.seed(7)
    q = quantus.MaxSensitivity(nr_samples=5, lower_bound=0.2, disable_warnings=True,
                               return_aggregate=False)
    ref = _q(q, model, x, y, e.attributions, explain_func=_explain_func)
    record("max_sensitivity", peer("quantus", "MaxSensitivity"), r["max_sensitivity"].scores, ref,
           CASE)
    np.testing.assert_allclose(r["max_sensitivity"].scores.numpy(), ref, rtol=1e-4, atol=1e-6)
    np.random.seed(8)
    q = quantus.LocalLipschitzEstimate(nr_samples=5, disable_warnings=True, return_aggregate=False)
    ref = _q(q, model, x, y, e.attributions, explain_func=_explain_func)
    record("local_lipschitz", peer("quantus", "LocalLipschitzEstimate"),
           r["local_lipschitz"].scores, ref, CASE)
    np.testing.assert_allclose(r["local_lipschitz"].scores.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_model_randomization_and_random_logit_equal_quantus(setup):
    model, x, e = setup
    y = e.target.classes
    r = pellucid.evaluate(model, x, e, metrics=[
        ("model_randomization", {"granularity": "layer", "similarity": "spearman", "progress": False}),
        ("random_logit", {"similarity": "spearman"})])
    q = quantus.MPRT(disable_warnings=True, return_last_correlation=True, abs=False, normalise=False)
    ref = _q(q, model, x, y, e.attributions, explain_func=_explain_func)
    record("model_randomization", peer("quantus", "MPRT"), r["model_randomization"].scores, ref,
           CASE)
    np.testing.assert_allclose(r["model_randomization"].scores.numpy(), ref, atol=1e-5)
    q = quantus.RandomLogit(num_classes=3, disable_warnings=True,
                            similarity_func=quantus.similarity_func.correlation_spearman)
    ref = _q(q, model, x, y, e.attributions, explain_func=_explain_func)
    record("random_logit", peer("quantus", "RandomLogit"), r["random_logit"].scores, ref, CASE)
    np.testing.assert_allclose(r["random_logit"].scores.numpy(), ref, atol=1e-5)
    steps = r["model_randomization"].extras["steps"]
    assert steps[0] == "fc" and steps[-1] == "conv1" and len(steps) == 41  # every layer, top down
    blocks = pellucid.evaluate(model, x, e, metrics=[("model_randomization", {"progress": False})])
    assert blocks["model_randomization"].extras["steps"] == [
        "fc", "layer4.1", "layer4.0", "layer3.1", "layer3.0", "layer2.1", "layer2.0", "layer1.1",
        "layer1.0", "bn1", "conv1"]


def _saliency_func(model, inputs, targets, **_):
    out = pellucid.explain(model, torch.as_tensor(inputs, dtype=torch.float32), "saliency",
                           target=torch.as_tensor(targets))
    return out.attributions.numpy()


def _gradient(model, inputs, target):
    """The signed input gradient of the target's score, summed over channels: Quantus 0.6.0's
    ``explain(method="Gradient")``."""
    x = torch.as_tensor(inputs, dtype=torch.float32).clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(target.score(out).sum(), x)
    return grad.sum(1)


def test_efficient_and_smooth_mprt_equal_quantus(setup):
    """eMPRT and sMPRT (Hedström et al. 2024) as Quantus 0.6.0 computes them: the same
    re-initialisation (every module's reset_parameters after the seed), the same noise (numpy's
    generator seeded alike, drawn in Quantus' order) and the same entropy and correlation.
    Quantus' SmoothMPRT smooths its own ``explain(method="Gradient")`` whatever ``explain_func``
    it is given; pellucid smooths the evaluated method (the paper's definition), so the comparison
    evaluates that gradient."""
    model, x, _ = setup
    sal = pellucid.explain(model, x, "saliency")
    y = sal.target.classes
    r = pellucid.evaluate(model, x, sal, metrics=[("efficient_mprt", {})])
    q = quantus.EfficientMPRT(disable_warnings=True)
    ref = _q(q, model, x, y, sal.attributions, explain_func=_saliency_func)
    record("efficient_mprt", peer("quantus", "EfficientMPRT"), r["efficient_mprt"].scores, ref, CASE)
    np.testing.assert_allclose(r["efficient_mprt"].scores.numpy(), ref, rtol=1e-4, atol=1e-6)
    # a constant map has zero entropy: no relative rise (Quantus: inf, a pass); excluded here
    flat = torch.ones(4, 32, 32)
    c = pellucid.evaluate(model, x, flat, target=sal.target, explain_fn=lambda m, i, t: flat,
                          metrics=["efficient_mprt"])["efficient_mprt"]
    assert torch.isnan(c.scores).all() and not c.extras["passed"].any()
    grad = _gradient(model, x, sal.target)
    r = pellucid.evaluate(model, x, grad, target=sal.target, explain_fn=_gradient,
                          metrics=[("smooth_mprt", {"samples": 3, "progress": False})])
    for option, ours in (("return_last_correlation", r["smooth_mprt"].scores),
                         ("return_average_correlation", r["smooth_mprt"].extras["average"])):
        np.random.seed(42)
        q = quantus.SmoothMPRT(nr_samples=3, disable_warnings=True, **{option: True})
        ref = _q(q, model, x, y, grad[:, None], explain_func=_saliency_func)
        record("smooth_mprt", peer("quantus", f"SmoothMPRT ({option})"), ours, ref, CASE)
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    steps = r["smooth_mprt"].extras["steps"]
    assert steps[0] == "conv1" and steps[-1] == "fc" and len(steps) == 41  # every layer, bottom up


def test_noisy_linear_imputation_equals_pytorch_grad_cams():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from pellucid.metrics.road import linear_impute

    torch.manual_seed(0)
    image = torch.randn(3, 40, 48)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(48), indexing="ij")
    cam = torch.exp(-((yy - 15) ** 2 + (xx - 30) ** 2) / 200.0)
    for pct in (10, 50, 90):
        keep = (cam < float(np.percentile(cam.numpy(), pct))).float()
        ref = NoisyLinearImputer(noise=0.0)(image, keep)
        mine = linear_impute(image[None], (keep == 0)[None])[0]
        assert (ref - mine).abs().max() < 1e-5


def test_road_equals_pytorch_grad_cam_without_noise():
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(1)
    model = build("resnet18", 2, 3, 4).module.eval()  # three channels: Quantus' ROAD fails here
    x = torch.randn(2, 3, 32, 32)
    cams = torch.rand(2, 32, 32)
    y = model(x).argmax(1)
    fractions = (0.2, 0.5, 0.8)
    r = pellucid.evaluate(model, x, cams, target=ClassTarget(y, kind="probability"),
                          metrics=[("road", {"fractions": fractions, "noise": 0.0})])["road"]
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in y]
    for k, p in enumerate(fractions):
        pct = round(100 * (1 - p))
        morf = PerturbationConfidenceMetric(RemoveMostRelevantFirst(pct, NoisyLinearImputer(noise=0)))
        lerf = PerturbationConfidenceMetric(RemoveLeastRelevantFirst(pct, NoisyLinearImputer(noise=0)))
        ref_m = morf(x, cams.numpy(), targets, model)
        ref_l = lerf(x, cams.numpy(), targets, model)
        clean = r.extras["clean"].numpy()
        road = peer("grad-cam", "ROAD (noise 0)")
        case = f"ResNet-18 {tuple(x.shape)}, {p:.0%} removed"
        record("road_morf", road, r.extras["morf"][:, k].numpy() - clean, ref_m, case)
        record("road_lerf", road, r.extras["lerf"][:, k].numpy() - clean, ref_l, case)
        record("road", road, r.extras["lerf"][:, k].numpy() - r.extras["morf"][:, k].numpy(),
               ref_l - ref_m, case)
        np.testing.assert_allclose(r.extras["morf"][:, k].numpy() - clean, ref_m, atol=1e-5)
        np.testing.assert_allclose(r.extras["lerf"][:, k].numpy() - clean, ref_l, atol=1e-5)
    with pytest.raises(Exception):  # noqa: B017  (Quantus 0.6.0 cannot impute 3-channel images)
        quantus.ROAD(noise=0.01, disable_warnings=True, percentages=[20, 50])(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=cams[:, None].numpy(),
            device="cpu")


def test_road_noise_is_seeded_and_small():
    torch.manual_seed(2)
    model = build("resnet18", 2, 1, 2).module.eval()
    x, a = torch.randn(2, 1, 32, 32), torch.rand(2, 32, 32)
    runs = [pellucid.evaluate(model, x, a, target=0, metrics=[("road_morf", {"seed": s})])["road_morf"]
            for s in (0, 0, 1)]
    assert torch.equal(runs[0].curves, runs[1].curves)
    assert not torch.equal(runs[0].curves, runs[2].curves)
    assert (runs[0].curves - runs[2].curves).abs().max() < 0.05


def test_confidence_change_equals_pytorch_grad_cam(setup):
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x, e = setup
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in e.target.classes]
    cams = e.attributions[:, 0].numpy()  # already min-max scaled, as pytorch-grad-cam's
    r = pellucid.evaluate(model, x, e, metrics=["average_drop", "increase_in_confidence"])
    drop = DropInConfidence()(x, cams, targets, model)  # absolute: max(0, Y - O)
    clean = r["average_drop"].extras["clean"].numpy()
    record("average_drop", peer("grad-cam", "DropInConfidence"),
           r["average_drop"].scores.numpy() * clean / 100, drop, CASE)
    record("increase_in_confidence", peer("grad-cam", "IncreaseInConfidence"),
           r["increase_in_confidence"].scores.numpy() / 100,
           IncreaseInConfidence()(x, cams, targets, model), CASE)
    np.testing.assert_allclose(r["average_drop"].scores.numpy() * clean / 100, drop, atol=1e-5)
    np.testing.assert_array_equal(r["increase_in_confidence"].scores.numpy() / 100,
                                  IncreaseInConfidence()(x, cams, targets, model))


def test_infidelity_equals_captum(setup):
    from captum.metrics import infidelity

    model, x, _ = setup
    a = torch.randn(4, 1, 32, 32)
    y = model(x).argmax(1)
    for normalize in (False, True):
        metric = pellucid.metrics.create("infidelity", n_perturb_samples=6, normalize=normalize)
        noise = metric.noise(x)  # (n, B, C, H, W), the draws pellucid uses
        calls = iter(range(1))

        def perturb(inputs, noise=noise, calls=calls):
            next(calls)  # one call with all samples expanded
            flat = noise.transpose(0, 1).reshape(-1, *x.shape[1:])  # captum repeats each sample
            return flat, inputs - flat

        ref = infidelity(model, perturb, x, a.expand_as(x), target=y, n_perturb_samples=6,
                         normalize=normalize)
        r = pellucid.evaluate(model, x, a, target=ClassTarget(y, kind="logit"),
                              metrics=[("infidelity", {"n_perturb_samples": 6, "normalize": normalize})])
        record("infidelity", peer("captum", "metrics.infidelity"), r["infidelity"].scores, ref,
               CASE + f", normalize={normalize}")
        np.testing.assert_allclose(r["infidelity"].scores.numpy(), ref.numpy(), rtol=1e-3)
