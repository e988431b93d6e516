"""Which quality metrics can be trusted (bench/trust.py): MetaQuantus' intra- and inter-consistency
scores by hand, equal to MetaQuantus' own MetaEvaluation on the same scores, and a metric blind to
the maps marked as not trusted on a benchmark's first screen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from scipy import stats as sps

from pellucid.bench.trust import consistency, iac, iec_adversary, iec_resilience
from pellucid.metrics.base import REGISTRY as METRICS
from pellucid.metrics.base import Context, Metric, MetricResult


def test_consistency_scores_by_hand():
    q_star = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])  # two methods, three pairs
    q_hat = np.array([[0.5, 0.1, 0.1], [0.2, 0.9, 0.3]])
    keep = np.array([True, True, False])
    # adversary: trained better than perturbed in (0.9 > 0.5), (0.8 > 0.1) of the 4 kept cells
    assert iec_adversary(q_star, q_hat, keep, True) == 0.5
    assert iec_adversary(q_star, q_hat, keep, False) == 0.5  # lower is better: 0.1 < 0.2, 0.2 < 0.9
    assert iec_adversary(q_star, q_hat, np.array([True, False, False]), False) == 0.5
    # resilience: the methods' order flips in pair 1 only (of the 2 kept): 2 of 4 positions kept
    assert iec_resilience(q_star, q_hat, keep) == 0.5
    q, qh = np.array([1.0, 2, 3, 4, 5, 6]), np.array([1.5, 2.7, 3.1, 4.9, 5.2, 6.8])
    every = np.ones(6, bool)
    p = sps.wilcoxon(q, qh, alternative="two-sided", zero_method="zsplit").pvalue
    assert iac(q, qh, every, adversary=False) == pytest.approx(p)
    assert iac(q, qh, every, adversary=True) == pytest.approx(1 - p)
    record = consistency({"a": q_star[0], "b": q_star[1]}, [{"a": q_hat[0], "b": q_hat[1]}], [keep],
                         [{"a": q_hat[0], "b": q_hat[1]}], [keep], True)
    assert record["IEC_NR"] == 0.5 and record["IEC_AR"] == 0.5
    assert record["separates"] is False and record["stable"] is True and record["trusted"] is False
    parts = [record[k] for k in ("IAC_NR", "IAC_AR", "IEC_NR", "IEC_AR")]
    assert record["MC"] == pytest.approx(np.mean(parts))
    # no randomised copy (a black box) or no pair whose prediction changed: the check cannot tell,
    # never "trusted"
    blind = consistency({"a": q_star[0], "b": q_star[1]}, [{"a": q_hat[0], "b": q_hat[1]}], [keep],
                        [], [], True)
    assert blind["separates"] is None and blind["stable"] is True and blind["trusted"] is None
    none_changed = consistency({"a": q_star[0], "b": q_star[1]}, [{"a": q_hat[0], "b": q_hat[1]}],
                               [keep], [{"a": q_hat[0], "b": q_hat[1]}], [np.zeros(3, bool)], True)
    assert none_changed["trusted"] is None and np.isnan(none_changed["MC"])


def test_consistency_equals_metaquantus():
    """The same quality estimates (4 methods, 12 pairs, 2 draws of each perturbation, with their
    kept pairs) through MetaQuantus 0.0.5's MetaEvaluation (run_intra_analysis,
    run_inter_analysis) and pellucid's consistency(): IAC and IEC equal, for a higher- and a
    lower-is-better metric. MetaQuantus' own example setup (its MNIST models and data, fetched from
    its authors' storage) cannot run here without a network; its scoring code is what this checks.
    One difference, kept on purpose: MetaQuantus 0.0.5 reads any non-empty ``score_direction``
    string, "higher" included, as lower-is-better; pellucid takes the metric's declared direction,
    so the lower-is-better case passes "lower" and the higher-is-better case None to MetaQuantus."""
    from metaquantus import MetaEvaluation

    rng = np.random.default_rng(7)
    methods = ["gradcam", "lrp", "occlusion", "saliency"]
    n, k = 12, 2
    q = {m: rng.random(n) for m in methods}
    nr = [{m: q[m] + rng.normal(0, 0.05, n) for m in methods} for _ in range(k)]
    ar = [{m: rng.random(n) for m in methods} for _ in range(k)]
    keep_nr = [rng.random(n) < 0.8 for _ in range(k)]
    keep_ar = [rng.random(n) < 0.6 for _ in range(k)]
    for higher, direction in ((True, None), (False, "lower")):
        suite = {"Input Resilience Test": None, "Model Adversary Test": None}
        meta = MetaEvaluation(test_suite=suite, xai_methods={m: {} for m in methods}, iterations=1,
                              nr_perturbations=k, write_to_file=False)
        meta.results_y_preds = np.zeros(n, int)
        meta.results_eval_scores = {t: dict(q) for t in suite}
        meta.results_eval_scores_perturbed = {
            "Input Resilience Test": {0: {m: np.stack([d[m] for d in nr]) for m in methods}},
            "Model Adversary Test": {0: {m: np.stack([d[m] for d in ar]) for m in methods}}}
        meta.results_indices_perturbed = {"Input Resilience Test": {0: np.stack(keep_nr)},
                                          "Model Adversary Test": {0: np.stack(keep_ar)}}
        intra = meta.run_intra_analysis()
        inter = meta.run_inter_analysis(score_direction=direction)
        ours = consistency(q, nr, keep_nr, ar, keep_ar, higher)
        theirs = {"IAC_NR": np.mean(list(intra["Input Resilience Test"].values())),
                  "IAC_AR": np.mean(list(intra["Model Adversary Test"].values())),
                  "IEC_NR": np.mean(inter["Input Resilience Test"]),
                  "IEC_AR": np.mean(inter["Model Adversary Test"])}
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), (key, higher)


@dataclass
class InputMean(Metric):
    """Throw-away quality metric blind to the map: the mean of the input."""

    name: ClassVar[str] = "input_mean"
    category: ClassVar[str] = "faithfulness"
    role: ClassVar[str] = "quality"
    higher_is_better: ClassVar[bool] = True

    def compute(self, ctx: Context) -> MetricResult:
        return MetricResult(self.name, ctx.inputs.flatten(1).mean(1).float())


@pytest.mark.slow
def test_a_metric_blind_to_the_maps_is_not_trusted(tmp_path):
    """A quality metric that never reads the map scores the trained and the randomised model's
    maps alike: it does not tell them apart (IEC_AR 0), is marked not trusted in
    metric_trust.json, on the report's first screen and in the verdict table; the energy pointing
    game, which reads the maps, is checked beside it."""
    import json

    import pandas as pd

    from pellucid.bench import parse_config, run_bench
    from tests.factories import tiny_bench

    METRICS.register(InputMean)
    try:
        raw = tiny_bench(tmp_path, "trust", ["gradcam", "saliency", "inputxgradient"],
                         ["energy_pointing_game", "input_mean"], cases=6, size=48, n_train=48)
        raw["metric_trust"] = {"cases": 6}
        run_bench(parse_config(raw), tmp_path / "run", progress=False)
    finally:
        METRICS.unregister("input_mean")
    found = json.loads((tmp_path / "run" / "metric_trust.json").read_text())
    checks = found["tasks"]["r18|chest"]["metrics"]
    assert checks["input_mean"]["IEC_AR"] == 0 and checks["input_mean"]["trusted"] is False
    assert checks["input_mean"]["methods"] == ["gradcam", "inputxgradient", "saliency"]
    assert "energy_pointing_game" in checks and checks["energy_pointing_game"]["pairs"] == 6
    html = (tmp_path / "run" / "report.html").read_text()
    assert "input_mean: did not pass the metric checks" in html
    assert "Which metrics can be trusted here" in html
    versus = pd.read_csv(tmp_path / "run" / "tables" / "against_baselines.csv")
    assert not versus.loc[versus["metric"] == "input_mean", "metric_trusted"].any()
    assert torch.isfinite(torch.tensor(checks["energy_pointing_game"]["IEC_NR"]))
