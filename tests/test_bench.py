"""The benchmark runner: configuration errors, skipped metrics, kill-and-resume, Ray against
local, the statistics, and report.html rendered by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pellucid.bench import parse_config, run_bench
from pellucid.bench import stats as bstats
from pellucid.errors import ConfigError, DataError

VALUE_COLUMNS = ["dataset", "model", "case_id", "target", "method", "metric", "value", "reason"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A ResNet-18 trained for one epoch on 64 px chest phantoms, saved as a zoo folder."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, save_model, train

    ds = open_dataset("phantom-chest", split="train", n=96, size=64)
    result = train(ds, TrainConfig(epochs=1, batch_size=32, progress=False))
    return save_model(tmp_path_factory.mktemp("bench") / "chest", result.module, result.card)


def _config(model: Path, methods=("gradcam", "saliency"), cases: int = 4, **extra) -> dict:
    cfg = {
        "name": "tiny", "seed": 0, "batch_size": 2, "gallery": 2,
        "datasets": {"chest": {"reader": "phantom-chest", "cases": cases, "options": {"size": 64}}},
        "models": {"r18": {"datasets": ["chest"], "path": str(model)}},
        "methods": list(methods),
        "metrics": ["pointing_game", {"name": "deletion", "options": {"step": 256}},
                    "sparseness", "box_accuracy",
                    {"name": "model_randomization", "options": {"progress": False, "depth": 1}}],
        "baselines": False,  # the tests of the runner's mechanics; the baselines have their own
    }
    cfg.update(extra)
    return cfg


def _values(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[VALUE_COLUMNS].sort_values(VALUE_COLUMNS[:6]).reset_index(drop=True)


def test_config_errors_name_the_key(tiny_model):
    good = _config(tiny_model)
    parse_config(good, "good.yaml")
    cases = [
        ({"methods": ["gradcam", "gradcm"]}, r"bad.yaml: methods\[1\].name: unknown method 'gradcm'"),
        ({"metrics": [{"name": "pointing"}]}, r"metrics\[0\].name: unknown metric 'pointing'"),
        ({"datasets": {"chest": {"reader": "phantom-chest", "casess": 3}}},
         r"datasets.chest.casess: unknown key"),
        ({"models": {"r18": {"datasets": ["lungs"], "path": "x"}}},
         r"models.r18.datasets: unknown dataset 'lungs'"),
        ({"models": {"r18": {"datasets": ["chest"]}}}, r"models.r18: give 'path'"),
        ({"metrics": [{"name": "deletion", "skip_methods": ["lime"]}]},
         r"metrics\[0\].skip_methods: 'lime' is not a configured method"),
        ({"batch_size": 0}, r"batch_size: must be an integer >= 1"),
        ({"colour": "red"}, r"bad.yaml: colour: unknown key"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_config({**good, **change}, "bad.yaml")


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_model):
    cfg = _config(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere.*no saved model"):
        run_bench(parse_config(cfg), tmp_path / "out", progress=False, report=False)


def test_metric_without_masks_is_skipped_with_a_reason(tmp_path, tiny_model):
    from PIL import Image

    from pellucid.data import ChestPhantom

    ds = ChestPhantom(8, 64, seed=3)
    for i in range(8):
        folder = tmp_path / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        img = (ds[i]["image"][0].numpy() * 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
    cfg = _config(tiny_model, methods=("gradcam",))
    cfg["datasets"] = {"pngs": {"reader": "folder", "root": str(tmp_path / "images"), "split": "all",
                                "cases": 3, "require": "any"}}
    cfg["models"]["r18"]["datasets"] = ["pngs"]
    cfg["models"]["r18"]["targets"] = "predicted"
    table = run_bench(parse_config(cfg), tmp_path / "out", progress=False, report=False)
    pg = table[table["metric"] == "pointing_game"]
    assert pg["value"].isna().all() and (pg["reason"] == "the dataset has no ground-truth masks").all()
    assert table[table["metric"] == "sparseness"]["value"].notna().all()
    boxes = table[table["metric"] == "box_accuracy"]
    assert (boxes["reason"] == "the dataset has no ground-truth boxes").all()


def test_tidy_table_and_resume_skips_finished_units(tmp_path, tiny_model):
    cfg = parse_config(_config(tiny_model))
    first = run_bench(cfg, tmp_path / "out", progress=False, report=False)
    # 4 cases -> (case, positive finding) pairs x 2 methods x 5 metrics
    pairs = first[["case_id", "target"]].drop_duplicates()
    assert len(first) == len(pairs) * 2 * 5
    assert {"explain_seconds", "forwards_per_case", "metric_seconds", "seed", "curve"} <= set(first)
    parts = sorted((tmp_path / "out" / "parts").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    again = run_bench(cfg, tmp_path / "out", progress=False, report=False)
    assert [p.stat().st_mtime_ns for p in parts] == stamps  # nothing recomputed
    pd.testing.assert_frame_equal(_values(first), _values(again))
    run = yaml.safe_load((tmp_path / "out" / "run.json").read_text())
    assert run["config_hash"] == cfg.digest() and run["versions"]["torch"]
    assert (tmp_path / "out" / "results.csv").is_file()


def test_metric_work_shared_between_methods_changes_no_value(tmp_path, tiny_model, monkeypatch):
    """Units of two methods on the same cases share faithfulness correlation's perturbed forwards
    and the clean forward (pellucid.bench.units.shared_metric_work); without sharing, every value
    is the same."""
    from pellucid.bench import units

    metrics = [{"name": "faithfulness_correlation", "options": {"nr_runs": 8, "subset_size": 64}},
               {"name": "deletion", "options": {"step": 256}}]
    cfg = parse_config(_config(tiny_model, cases=2, metrics=metrics, cache=False))
    shared = run_bench(cfg, tmp_path / "shared", progress=False, report=False)
    calls: list = []
    monkeypatch.setattr(units, "shared_metric_work", lambda unit: calls.append(unit) or {})
    alone = run_bench(cfg, tmp_path / "alone", progress=False, report=False)
    assert len(calls) >= 2  # at least one unit per method ran through it
    assert shared["value"].notna().all()
    pd.testing.assert_frame_equal(_values(shared), _values(alone))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, backend,
                                                                  monkeypatch):
    """Bit-identical under ``auto`` too: the backend each model and shape got is recorded in the
    run (backends.json) when first decided and reused by the resumed run."""
    # perturbation methods among them (their seeded draws must resume identically), at sizes
    # that keep a unit about a second: 9 occlusion windows, 50 LIME samples
    methods = ("gradcam", "saliency", {"name": "occlusion", "options": {"window": 32, "stride": 16}},
               {"name": "lime", "options": {"samples": 50}})
    cfg = _config(tiny_model, methods=methods, cases=4, cache=False)  # 8 units of about a second
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("PELLUCID_THREADS", "1")
    monkeypatch.setenv("PELLUCID_BACKEND", backend)
    monkeypatch.setenv("PELLUCID_CACHE", str(tmp_path / "cache"))
    env = dict(os.environ, PELLUCID_THREADS="1")
    cmd = [sys.executable, "-m", "pellucid.cli", "bench", str(path), "--out", str(tmp_path / "killed"),
           "--no-report"]
    log = tmp_path / "killed.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    parts = tmp_path / "killed" / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 3:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.parquet")))
    for part in parts.glob("*.parquet"):  # every part that exists is whole
        pd.read_parquet(part)
    stale = parts / ".tmp-killed.parquet.partial"  # what a writer killed mid-file leaves
    stale.write_bytes(b"")
    resumed = run_bench(parse_config(cfg), tmp_path / "killed", progress=False, report=False)
    whole = run_bench(parse_config(cfg), tmp_path / "whole", progress=False, report=False)
    assert 3 <= done < whole["unit"].nunique(), done  # killed mid-run
    assert not stale.exists()
    pd.testing.assert_frame_equal(_values(resumed), _values(whole), check_exact=True)
    if backend == "auto":
        recorded = json.loads((tmp_path / "killed" / "backends.json").read_text())
        backends = {v for k, v in recorded.items() if not k.endswith("|batch")}
        assert backends and backends <= {"torch", "onnxruntime", "openvino"}
        assert len(backends) == 1  # the benchmarked model only: randomised copies stay in torch


def test_ray_gives_the_same_table_as_local(tmp_path, tiny_model):
    cfg = parse_config(_config(tiny_model, cases=3))
    local = run_bench(cfg, tmp_path / "local", progress=False, report=False)
    ray_table = run_bench(cfg, tmp_path / "ray", executor="ray", progress=False, report=False)
    pd.testing.assert_frame_equal(_values(local), _values(ray_table), atol=1e-5)


def test_statistics_by_hand():
    assert bstats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rows = []
    rng = np.random.RandomState(0)
    for case in range(8):
        for method, shift in (("a", 0.0), ("b", 0.5), ("c", 1.0)):
            rows.append({"dataset": "d", "model": "m", "case_id": str(case), "target": "t",
                         "method": method, "metric": "score", "category": "faithfulness",
                         "higher_is_better": True, "value": shift + rng.rand() * 0.1,
                         "explain_seconds": {"a": 0.1, "b": 1.0, "c": 0.5}[method],
                         "forwards_per_case": 1.0})
    frame = pd.DataFrame(rows)
    summ = bstats.summary(frame)
    assert summ.set_index("method")["n"].tolist() == [8, 8, 8]
    avg = bstats.ranks(summ).set_index("method")["average_rank"]
    assert avg.to_dict() == {"c": 1.0, "b": 2.0, "a": 3.0}
    tests, pairs = bstats.friedman(frame)
    from scipy.stats import friedmanchisquare

    wide = frame.pivot(index="case_id", columns="method", values="value")
    assert tests["p_value"].iloc[0] == pytest.approx(friedmanchisquare(*[wide[m] for m in "abc"]).pvalue)
    assert len(pairs) == 2 and set(pairs["control"]) == {"c"} and (pairs["p_holm"] >= pairs["p_value"]).all()
    costq = bstats.cost_quality(frame, bstats.ranks(summ)).set_index("method")
    assert costq.loc["c", "pareto"] and costq.loc["a", "pareto"] and not costq.loc["b", "pareto"]
    rec = bstats.recommendations(bstats.cost_quality(frame, bstats.ranks(summ)))[0]
    assert (rec["best"] == "c" and rec["budgets"][0] == {"budget": 0.05, "method": "a", "rank": 3.0,
                                                        "seconds": 0.1, "better": 0}) \
        or rec["budgets"][0]["method"] == "c"


def test_against_baselines_by_hand():
    """Method a is better than every baseline, b equals the centre prior up to noise: a beats it, b
    does not; the p-value is scipy's one-sided Wilcoxon, Holm-adjusted; the verdict says so in
    words and the recommendation (never a baseline) carries the caveat."""
    from scipy.stats import wilcoxon

    rng = np.random.RandomState(1)
    rows = []
    for case in range(12):
        centre = 0.5 + rng.rand() * 0.2
        values = {"a": centre + 0.3 + rng.rand() * 0.05, "b": centre + rng.normal(0, 0.02),
                  "centre": centre, "random": 0.1 + rng.rand() * 0.05}
        for method, value in values.items():
            rows.append({"dataset": "d", "model": "m", "case_id": str(case), "target": "t",
                         "method": method, "metric": "pointing_game", "category": "localization",
                         "higher_is_better": True, "value": value,
                         "family": "baseline" if method in ("centre", "random") else "cam",
                         "explain_seconds": 0.1, "forwards_per_case": 1.0})
    frame = pd.DataFrame(rows)
    assert bstats.baseline_methods(frame) == {"centre", "random"}
    versus = bstats.against_baselines(frame).set_index("method")
    assert set(versus["baseline"]) == {"centre"}  # the best baseline on this metric
    wide = frame.pivot(index="case_id", columns="method", values="value")
    raw = [wilcoxon(wide[m] - wide["centre"], alternative="greater").pvalue for m in ("a", "b")]
    assert versus.loc[["a", "b"], "p_value"].tolist() == pytest.approx(raw)
    assert versus.loc[["a", "b"], "p_holm"].tolist() == pytest.approx(bstats.holm(raw))
    assert versus.loc["a", "verdict"] == "better"
    # b's advantage is about zero: its interval spans zero, so with no meaningful size given the
    # data cannot call it; told that 0.05 is the smallest advantage that matters, they can
    assert versus.loc["b", "verdict"] == "undetermined" and versus.loc["b", "diff_ci_low"] < 0
    for column in ("p_holm", "min_attainable_p_holm", "diff", "diff_ci_low", "diff_ci_high"):
        assert column in versus
    assert versus.loc["a", "min_attainable_p_holm"] == pytest.approx(2 * 0.5 ** 12)
    d = (wide["a"] - wide["centre"]).to_numpy()
    assert versus.loc["a", "diff"] == pytest.approx(d.mean())
    assert versus.loc["a", "diff_ci_low"] == pytest.approx(bstats.bootstrap_mean_ci(d)[0])
    assert bstats.baseline_verdicts(versus.reset_index()) == [
        "On pointing_game, these cases cannot tell whether b is better than the centre baseline."]
    strict = bstats.against_baselines(frame, min_effect={"pointing_game": 0.05}).set_index("method")
    assert strict.loc["b", "verdict"] == "not_better" and strict.loc["a", "verdict"] == "better"
    assert bstats.baseline_verdicts(strict.reset_index()) == \
        ["On pointing_game, b is not better than the centre baseline."]
    summ = bstats.summary(frame)
    costq = bstats.cost_quality(frame, bstats.ranks(summ))
    rec = bstats.recommendations(costq, versus=versus.reset_index(), baselines={"centre", "random"})[0]
    assert rec["best"] == "a" and rec["caveats"] == [] and rec["verdicts"]["better"] == 1
    frame.loc[frame["method"] == "a", "value"] = frame.loc[frame["method"] == "centre", "value"].to_numpy()
    versus = bstats.against_baselines(frame, min_effect=0.05)
    assert not (versus["verdict"] == "better").any()
    assert bstats.baseline_verdicts(versus) == \
        ["No method is better than the centre baseline on pointing_game."]
    rec = bstats.recommendations(bstats.cost_quality(frame, bstats.ranks(bstats.summary(frame))),
                                 versus=versus, baselines={"centre", "random"})[0]
    assert rec["best"] in ("a", "b") and rec["caveats"] and "centre" in rec["caveats"][0]


def _six_case_frame(cases: int, methods: int = 20) -> pd.DataFrame:
    """``methods`` methods each clearly ahead of the centre baseline on every one of ``cases``
    cases, plus a property metric (sparseness) on which the constant centre map wins."""
    rng = np.random.RandomState(3)
    rows = []
    for case in range(cases):
        for i in range(methods + 2):
            method = "centre" if i == methods else "random" if i == methods + 1 else f"m{i}"
            base = {"centre": 0.3, "random": 0.1}.get(method, 0.9)
            for metric, category, value in (("auprc", "localization",
                                             base + rng.rand() * 0.05),
                                            ("sparseness", "complexity", rng.rand())):
                rows.append({"dataset": "d", "model": "m", "case_id": str(case), "target": "t",
                             "method": method, "metric": metric, "metric_name": metric,
                             "category": category, "higher_is_better": True, "value": value,
                             "family": "baseline" if method in ("centre", "random") else "cam",
                             "explain_seconds": 0.1, "forwards_per_case": 1.0})
    return pd.DataFrame(rows)


def test_six_cases_cannot_tell_and_a_property_metric_gets_no_verdict():
    """Six cases, 20 methods: the smallest one-sided Wilcoxon p on 6 pairs is 1/64 and Holm over 20
    methods makes it 0.31, so even methods ahead on every case are undetermined, not "not better";
    with 24 cases the same advantage is called better. Sparseness (a property) gets no verdict and
    no rank."""
    versus = bstats.against_baselines(_six_case_frame(6))
    assert set(versus["metric"]) == {"auprc"}  # never the property metric
    assert (versus["verdict"] == "undetermined").all() and len(versus) == 20
    assert versus["min_attainable_p_holm"].iloc[0] == pytest.approx(min(1.0, 20 / 64))
    assert (versus["diff_ci_low"] > 0).all()  # ahead on every case, and still undetermined
    assert (versus["cases_to_settle"] > 6).all()
    assert bstats.baseline_verdicts(versus)[0].startswith("On auprc, these cases cannot tell")
    settled = bstats.against_baselines(_six_case_frame(24))
    assert (settled["verdict"] == "better").all()
    frame = _six_case_frame(6)
    avg = bstats.ranks(bstats.summary(frame))
    assert set(avg["metrics"]) == {1}  # ranked on the quality metric only
    assert bstats.metric_roles(frame) == {"auprc": "quality", "sparseness": "property"}


def test_baselines_are_in_every_benchmark_unless_turned_off(tiny_model):
    names = [m.name for m in parse_config(_config(tiny_model, baselines=True)).methods]
    assert names == ["gradcam", "saliency", "random", "centre", "edges", "prior"]
    cfg = _config(tiny_model)
    del cfg["baselines"]  # the default
    assert [m.name for m in parse_config(cfg).methods][-4:] == ["random", "centre", "edges", "prior"]
    assert [m.name for m in parse_config(_config(tiny_model, baselines=["centre"])).methods] == \
        ["gradcam", "saliency", "centre"]
    with pytest.raises(ConfigError, match="baselines: give true, false or a list"):
        parse_config(_config(tiny_model, baselines=["gradcam"]))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_is_self_contained_and_renders_in_chromium(tmp_path, tiny_model):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make system-deps installs it)")
        pytest.skip("chromium is not installed")
    cfg = parse_config(_config(tiny_model, cases=4, baselines=True))
    run_bench(cfg, tmp_path / "out", progress=False)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Against trivial baselines" in html and "(baseline)" in html
    versus = pd.read_csv(tmp_path / "out" / "tables" / "against_baselines.csv")
    assert set(versus["method"]) == {"gradcam", "saliency"}  # the baselines are what is compared to
    assert set(versus["baseline"]) <= {"random", "centre", "edges", "prior"}
    # two methods compared: the smallest Holm-adjusted p is 2 x 2^-pairs (a case may give several
    # pairs); where it is not below 0.05 nothing can be called
    assert versus["verdict"].isin(["better", "not_better", "undetermined"]).all()
    assert versus["min_attainable_p_holm"].tolist() == pytest.approx(
        [min(1.0, 2 * 0.5 ** b) for b in versus["blocks"]])
    assert (versus.loc[versus["min_attainable_p_holm"] >= 0.05, "verdict"] == "undetermined").all()
    assert "4 cases" in html and html.count("<li>") >= 3  # the count and the three sentences
    from pellucid.bench.card import write_cards

    written = write_cards(tmp_path / "out")
    card = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert card["task"]["cases"] == 4 and sum(card["verdict_counts"].values()) == len(versus)
    if not (versus["verdict"] == "better").any():
        assert card["recommended"] == []  # nothing shown better: nothing recommended
    assert any("CLAIM" in c["item"] for c in card["checklist"])
    assert any("13(3)(d)" in c["item"] for c in card["checklist"])
    markdown = next(p for p in written if p.suffix == ".md").read_text()
    assert markdown.startswith("# Explanation card: r18 on chest") and "## The answer" in markdown
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    sanity = results[results["metric"] == "model_randomization"]
    on_baselines = sanity[sanity["method"].isin(["random", "centre", "edges", "prior"])]
    assert len(on_baselines) and on_baselines["value"].isna().all()  # never run on a baseline
    assert on_baselines["reason"].str.startswith("a trivial baseline does not depend on the model").all()
    assert sanity[sanity["method"] == "gradcam"]["value"].notna().all()
    prior = results[(results["method"] == "prior") & (results["metric"] == "pointing_game")]
    assert prior["value"].notna().all()  # the phantoms' training split gives the prior
    for sentence in bstats.baseline_verdicts(versus):
        assert sentence in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside
    images = html.count('src="data:image/png;base64,')
    assert images >= 4  # metric charts, curves, gallery, best/worst, randomisation
    for section in ("Recommendations", "Model performance", "Leaderboard", "Gallery",
                    "Randomisation sanity check", "Compute cost"):
        assert section in html
    for ext in ("csv", "md", "tex"):
        assert (tmp_path / "out" / "tables" / f"leaderboard.{ext}").is_file()
    cost = pd.read_csv(tmp_path / "out" / "tables" / "cost.csv").set_index("method")
    assert "work (MACs / full forwards)" in html  # a full forward on every input: 1
    assert cost.loc[["gradcam", "saliency"], "work_ratio"].tolist() == pytest.approx([1.0, 1.0])
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1280,2400",
                    (tmp_path / "out" / "report.html").as_uri()],
                   check=True, timeout=120, capture_output=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1280)
    _first_screen_says_what_to_use(tmp_path / "out" / "report.html", browser)
    assert pixels.std() > 20  # text, tables and figures, not a blank page
    assert torch.tensor(pixels < 128).float().mean() > 0.01


def test_shared_samples_short_run_end_to_end(shared_data, tmp_path):
    """The real-data configuration, shortened: ChestX-ray14 with NIH boxes and LGG FLAIR masks."""
    from pellucid.bench import load_config

    table = run_bench(load_config("shared-short"), tmp_path / "out", progress=False)
    assert set(table["dataset"]) == {"cxr14", "lgg"}
    cxr = table[table["dataset"] == "cxr14"]
    # the benchmark's split is "all": no training split left to average a prior over, and its rows
    # say so; every other method has values
    prior = cxr[cxr["method"] == "prior"]
    assert prior["reason"].str.contains("prior: no ground truth").all()
    cxr = cxr[cxr["method"] != "prior"]
    assert cxr[cxr["metric"] == "box_accuracy"]["value"].notna().all()  # only boxed findings kept
    assert cxr[cxr["metric"] == "pointing_game"]["value"].notna().all()
    lgg = table[table["dataset"] == "lgg"]
    assert lgg[lgg["metric"] == "box_accuracy"]["reason"].str.contains("no ground-truth boxes").all()
    assert lgg[lgg["metric"] == "energy_pointing_game"]["value"].between(0, 1).all()
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000


def _user_csv(folder: Path, n: int = 60) -> Path:
    """Chest phantoms written as a user's data: PNG images, one mask PNG each, a CSV with the
    single finding of each image, its mask and its box (the mask's bounding box, in pixels)."""
    from PIL import Image

    from pellucid.data import open_dataset

    folder.mkdir()
    ds = open_dataset("phantom-chest", split="test", n=4 * n, size=64)
    rows = ["path,label,mask,x0,y0,x1,y1"]
    for i in range(len(ds)):
        s = ds[i]
        present = torch.nonzero(s["label"] > 0).flatten().tolist()
        if len(present) != 1:
            continue
        k = present[0]
        mask = s["mask"][k].numpy() > 0
        Image.fromarray((s["image"][0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i}_mask.png")
        ys, xs = np.nonzero(mask)
        rows.append(f"{i}.png,{ds.class_names[k]},{i}_mask.png,{xs.min()},{ys.min()},"
                    f"{xs.max() + 1},{ys.max() + 1}")
        if len(rows) > n:
            break
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_a_users_csv_boxes_and_masks_feed_every_localisation_metric(tmp_path, tiny_model):
    """A 3-class CSV dataset with a mask column (one mask per image) no longer crashes on class 2,
    and one with boxes only no longer leaves every localisation row NaN: the boxes become masks
    exactly as ``pellucid.evaluate(boxes=...)`` makes them, and the values equal evaluate's."""
    import pellucid

    csv_file = _user_csv(tmp_path / "data")
    boxes_only = tmp_path / "data" / "boxes.csv"
    lines = csv_file.read_text().splitlines()
    boxes_only.write_text("\n".join(",".join(c for j, c in enumerate(line.split(",")) if j != 2)
                                    for line in lines) + "\n")
    metrics = ["pointing_game", "energy_pointing_game", "iou"]
    for source, name in ((csv_file, "masks"), (boxes_only, "boxes")):
        cfg = parse_config(_config(tiny_model, methods=("gradcam",), cases=8) | {
            "datasets": {"user": {"reader": "csv", "root": str(source), "cases": 12,
                                  "options": {"size": 64, "class_names":
                                              ["Cardiomegaly", "Nodule", "Consolidation"]}}},
            "models": {"r18": {"datasets": ["user"], "path": str(tiny_model)}},
            "metrics": metrics})
        frame = run_bench(cfg, tmp_path / f"run-{name}", progress=False, report=False)
        assert frame["value"].notna().all(), frame[frame["value"].isna()][["metric", "reason"]]
        assert "Consolidation" in set(frame["target"])  # class 2 of a one-channel mask
        from pellucid.data import open_dataset
        from pellucid.models import load_model

        ds = open_dataset("csv", root=str(source), split="test", size=64,
                          class_names=["Cardiomegaly", "Nodule", "Consolidation"])
        model = load_model(tiny_model)
        by_case = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
        for row in frame[frame["metric"] == "energy_pointing_game"].itertuples():
            sample = by_case[row.case_id]
            k = model.card.class_names.index(row.target)
            x = model.card.normalize(sample["image"][None].float())
            e = pellucid.explain(model, x, "gradcam", target=k)
            gt = {"masks": sample["mask"][None]} if name == "masks" else \
                {"boxes": [sample["boxes"][sample["box_labels"] == k]]}
            ref = pellucid.evaluate(model, x, e, metrics=["energy_pointing_game"], **gt)
            assert row.value == pytest.approx(ref["energy_pointing_game"].scores[0].item(), abs=1e-5)


def _first_screen_says_what_to_use(report: Path, browser: str) -> None:
    """What a person sees before scrolling (1280 x 900): the at-a-glance section with the case
    count, the verdict figure and the three sentences naming a method; a click enlarges a figure."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.goto(report.as_uri())
        first = page.evaluate("""() => Array.from(document.querySelectorAll("h2, h3, p, li, td, th"))
            .filter(e => e.getBoundingClientRect().top < window.innerHeight)
            .map(e => e.innerText).join("\\n")""")
        assert "At a glance: what to use, and how sure that is" in first
        assert re.search(r"\d+ cases", first), first
        assert any(m in first for m in ("gradcam", "saliency"))  # a method is named on screen
        figure = page.locator("img.glance-figure").first
        assert figure.bounding_box()["y"] < 900  # the verdict figure is on the first screen
        figure.click()
        assert "zoomed" in (figure.get_attribute("class") or "")
        chromium.close()


DEMO_METHODS = ("gradcam", "gradcampp", "scorecam", "lrp", "integratedgradients", "kernelshap",
                "occlusion")
DEMO_METRICS = (("pointing_game", "localization", True), ("auprc", "localization", True),
                ("deletion", "faithfulness", False), ("model_randomization", "randomization", False),
                ("cost", "cost", False))


def _demo_shaped_frame(cases: int = 24) -> pd.DataFrame:
    """A result table of the demo's shape (three tasks, its methods and metrics, the four
    baselines, 24 cases), with values drawn so that every verdict occurs."""
    rng = np.random.RandomState(5)
    rows = []
    tasks = (("chest", "chest-resnet18"), ("brain", "brain-unet"), ("brain-3d", "brain-unet-3d"))
    for dataset, model in tasks:
        for i, method in enumerate((*DEMO_METHODS, "random", "centre", "edges", "prior")):
            family = "baseline" if i >= len(DEMO_METHODS) else "cam"
            for case in range(cases):
                for metric, category, higher in DEMO_METRICS:
                    value = rng.rand() * 0.3 + (0.5 if i < 3 else 0.2 if i < len(DEMO_METHODS) else 0.35)
                    extra = json.dumps({"passed": bool(rng.rand() < 0.8)}) \
                        if metric == "model_randomization" else ""
                    rows.append({"dataset": dataset, "model": model, "method": method,
                                 "family": family, "metric": metric, "metric_name": metric,
                                 "category": category, "higher_is_better": higher, "value": value,
                                 "case_id": f"c{case}", "target": "t", "reason": "",
                                 "explain_seconds": 0.01 * (i + 1), "forwards_per_case": 1.0,
                                 "backward_passes": 1, "peak_memory_bytes": float("nan"),
                                 "unit": f"{model}-{method}", "curve": None, "extra": extra,
                                 "map_stride": 1.0})
    return pd.DataFrame(rows)


def test_the_first_screen_fits_one_viewport_per_task(tmp_path):
    """Each task's first section (case count, verdict figure, sanity checks, three sentences) of a
    demo-shaped run fits one 1400 x 900 Chromium viewport, measured in the rendered page."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make system-deps installs it)")
        pytest.skip("chromium is not installed")
    from pellucid.bench.report import write_report

    out = tmp_path / "run"
    (out / "parts").mkdir(parents=True)
    html = write_report(out, _demo_shaped_frame()).read_text()
    assert html.count('class="glance-task"') == 3 and "24 cases" in html
    probe = """<script>window.addEventListener("load", () => {
      const boxes = [...document.querySelectorAll(".glance-task")].map(e => e.getBoundingClientRect());
      const out = document.createElement("pre"); out.id = "sizes";
      out.textContent = JSON.stringify(boxes.map(b => [Math.ceil(b.width), Math.ceil(b.height)]));
      document.body.appendChild(out); });</script></body>"""
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         check=True, timeout=120, capture_output=True, text=True).stdout
    found = re.search(r'<pre id="sizes">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    sizes = json.loads(found.group(1))
    assert len(sizes) == 3
    for width, height in sizes:
        assert width <= 1400 and 200 < height <= 900, sizes


def test_a_tampered_verdict_setting_is_named_and_the_default_used(capsys):
    """run.json's verdict settings are what the report, the cards and the evidence share; one a
    configuration could not have given is named in one warning and the default is used."""
    from pellucid.bench.answers import verdict_settings

    assert verdict_settings({"verdict": {"alpha": 0.01, "min_effect": {"deletion": 0.02}}}) == \
        (0.01, {"deletion": 0.02})
    assert verdict_settings({}) == (0.05, None)
    assert verdict_settings({"verdict": {"alpha": "0.5", "min_effect": -1}}) == (0.05, None)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: run.json verdict.alpha '0.5' is not in (0, 0.5]; 0.05 is used",
                   "warning: run.json verdict.min_effect -1 is not a number >= 0 or one per metric; "
                   "0 is used"]


def test_cases_follow_the_readers_order_unless_shuffled(tmp_path, tiny_model):
    """A CSV sorted by label gives its first class only in file order; ``shuffle: true`` draws
    the cases in a seeded random order: several classes, the same cases for the same seed."""
    from pellucid.bench.runner import prepare_cases
    from pellucid.models import load_model

    csv_file = _user_csv(tmp_path / "data", n=40)
    header, *rows = csv_file.read_text().splitlines()
    csv_file.write_text("\n".join([header, *sorted(rows, key=lambda r: r.split(",")[1])]) + "\n")
    loaded = load_model(tiny_model)
    names = ["Cardiomegaly", "Nodule", "Consolidation"]

    def chosen(shuffle: bool, seed: int = 0) -> tuple[list[str], list[str]]:
        cfg = parse_config(_config(tiny_model, cases=6) | {
            "datasets": {"user": {"reader": "csv", "root": str(csv_file), "cases": 6,
                                  "split": "all", "shuffle": shuffle,
                                  "options": {"size": 64, "class_names": names}}},
            "models": {"r18": {"datasets": ["user"], "path": str(tiny_model)}}})
        cases = prepare_cases(cfg.datasets["user"], cfg.models["r18"], loaded, seed=seed)
        return cases.case_ids, cases.target_names

    _, targets = chosen(False)
    assert len(set(targets)) == 1  # the file's first class, as the docs warn
    ids_a, targets_a = chosen(True, seed=0)
    assert len(set(targets_a)) > 1 and chosen(True, seed=0)[0] == ids_a
    assert chosen(True, seed=1)[0] != ids_a
    with pytest.raises(ConfigError, match=r"datasets\.user\.shuffle: must be true or false"):
        parse_config(_config(tiny_model) | {"datasets": {"user": {
            "reader": "csv", "root": str(csv_file), "shuffle": "yes"}},
            "models": {"r18": {"datasets": ["user"], "path": str(tiny_model)}}})
