"""The seed's five systems end to end: survival regression, segmentation errors, sliding-window
volumes, per-modality importance and high-resolution maps, through ``pellucid explain`` and
``pellucid bench``, each checked against an exact reference."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import pellucid
from pellucid.bench import run_bench
from pellucid.bench.config import load_config, parse_config
from pellucid.cli import main
from pellucid.errors import ConfigError
from pellucid.models import ModelCard, build, load_model, save_model
from pellucid.models.performance import concordance_index, regression_report
from pellucid.models.sliding import SlidingWindow
from pellucid.targets import RegressionTarget, SegmentationErrorTarget, SegmentationTarget


def test_concordance_and_regression_report_by_hand():
    # pairs (0,1) ordered right, (0,2) right, (1,2) wrong -> 2/3; a prediction tie counts 1/2
    assert concordance_index([1, 2, 4], [10, 20, 15]) == pytest.approx(2 / 3)
    assert concordance_index([1, 1, 3], [10, 20, 30]) == pytest.approx((0.5 + 1 + 1) / 3)
    rep = regression_report(np.array([[1.0], [2.0], [4.0]]), np.array([[1.0], [3.0], [3.0]]), ["OS"])
    assert rep["mae"] == pytest.approx(2 / 3) and rep["rmse"] == pytest.approx(np.sqrt(2 / 3))
    assert rep["r2"] == pytest.approx(1 - 2 / (8 / 3))  # sse 2, ss_tot 16/9 + 2 * 4/9


def test_survival_phantom_follows_its_formula():
    from pellucid.data import open_dataset

    ds = open_dataset("phantom-survival", split="test", n=60, size=48)
    assert ds.task == "regression" and ds.class_names == ("OverallSurvival",)
    os_, et, ed = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        assert s["mask"][0].any()  # every survival case has a tumour
        os_.append(float(s["label"][0]))
        et.append(float((s["labels"] == 4).sum()))
        ed.append(float((s["labels"] == 2).sum()))
    assert min(os_) >= 2 and max(os_) <= 60
    assert np.corrcoef(os_, et)[0, 1] < -0.5 and np.corrcoef(os_, np.add(et, ed))[0, 1] < -0.8


@pytest.fixture(scope="module")
def survival_model(tmp_path_factory):
    """The seed-systems benchmark's survival regressor, trained as the benchmark trains it (its
    config's ``train`` spec, into ``models/`` of a run folder); the benchmark test below reuses it
    as a resumed run would."""
    from pellucid.bench.runner import prepare_model

    config = load_config("seed-systems")
    loaded, _ = prepare_model(config.models["survival-resnet18"], tmp_path_factory.mktemp("surv"),
                              config.seed)
    return loaded


def test_survival_regressor_learns_and_explains_through_the_cli(survival_model, tmp_path):
    card = survival_model.card
    assert card.task == "regression" and card.activation == "identity"
    val = card.metrics["val"]
    assert val["r2"] > 0.7 and val["c_index"] > 0.85, val
    from pellucid.data import open_dataset

    sample = open_dataset("phantom-survival", split="test", n=1, size=48)[0]
    np.save(tmp_path / "case.npy", sample["image"].numpy())
    out = tmp_path / "exp"
    main(["explain", "--model", survival_model.source, "--input", str(tmp_path / "case.npy"),
          "--method", "saliency,integratedgradients", "--reference", "30", "--modalities",
          "--out", str(out)])
    row = json.loads((out / "summary.json").read_text())[0]
    x = card.normalize(sample["image"][None])
    with torch.no_grad():
        predicted = float(survival_model.module(x)[0, 0])
    assert row["prediction"]["text"] == f"OverallSurvival = {predicted:.2f}"
    assert row["prediction"]["value"] == pytest.approx(predicted, abs=1e-5)
    target = row["methods"]["saliency"]["target"]
    assert target["type"] == "regression" and target["reference"] == 30.0
    mod = row["modality_importance"]
    # efficiency: the four modality Shapley values add up to f(all) - f(none), reference included
    assert sum(mod["shapley"].values()) == pytest.approx(mod["f_all"] - mod["f_none"], abs=1e-4)
    assert mod["f_all"] == pytest.approx(predicted - 30.0, abs=1e-4)
    assert set(row["methods"]["saliency"]["modality_share"]) == {"T1", "T1ce", "T2", "FLAIR"}
    # the default target of a regression card is the output itself; integer targets index outputs
    exp = pellucid.explain(survival_model, x, "saliency")
    assert exp.target.describe()["type"] == "regression"
    ig = pellucid.explain(survival_model, x, "integratedgradients", steps=64,
                          target=RegressionTarget(0, reference=30.0))
    with torch.no_grad():  # completeness against the zero baseline
        gap = float(survival_model.module(x)[0, 0] - survival_model.module(torch.zeros_like(x))[0, 0])
    assert float(ig.raw.sum()) == pytest.approx(gap, rel=0.05, abs=0.5)


def test_error_regions_through_the_cli(brain_unet, tmp_path, capsys):
    from pellucid.data import BrainPhantom

    sample = BrainPhantom(1, 64, seed=31)[0]
    x = brain_unet.card.normalize(sample["image"][None])
    # a hand-made truth: the top half of the predicted WT is "true", so the bottom half is FP and
    # a square outside the prediction is FN
    with torch.no_grad():
        pred = torch.sigmoid(brain_unet.module(x))[0, 0] > 0.5
    assert pred.any()
    rows = torch.nonzero(pred)[:, 0]
    middle = int(rows.float().median())
    truth = pred.clone()
    truth[middle:] = False
    free = torch.nonzero(~pred)
    y0, x0 = (int(v) for v in free[0])
    truth[y0:y0 + 3, x0:x0 + 3] |= ~pred[y0:y0 + 3, x0:x0 + 3]
    np.save(tmp_path / "case.npy", sample["image"].numpy())
    np.save(tmp_path / "truth.npy", truth.numpy().astype(np.uint8))
    for kind, expected in (("fp", pred & ~truth), ("fn", ~pred & truth)):
        bound = SegmentationErrorTarget(truth, 0, kind).bind(brain_unet.module(x))
        assert torch.equal(bound.region[0] > 0, expected)
        out = tmp_path / kind
        main(["explain", "--model", brain_unet.source, "--input", str(tmp_path / "case.npy"),
              "--method", "saliency", "--region", kind, "--truth", str(tmp_path / "truth.npy"),
              "--out", str(out)])
        saved = np.load(out / "case_saliency.npy")
        direct = pellucid.explain(brain_unet, x, "saliency", target=bound)
        assert np.allclose(saved, direct.attributions[0, 0].numpy(), atol=1e-6)
    with pytest.raises(SystemExit):
        main(["explain", "--model", brain_unet.source, "--input", str(tmp_path / "case.npy"),
              "--region", "fp", "--out", str(tmp_path / "x")])
    assert "--region fp needs --truth MASK" in capsys.readouterr().err


def test_sliding_window_through_the_cli_equals_the_wrapper(tmp_path, capsys):
    torch.manual_seed(0)
    built = build("unet", 3, 1, 1)
    card = ModelCard(arch="unet", task="segmentation", class_names=["WT"], in_channels=1,
                     spatial_dims=3, input_size=[16, 16, 16], default_layer=built.default_layer)
    folder = save_model(tmp_path / "unet3d", built.module, card)
    volume = np.random.default_rng(0).normal(size=(32, 28, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    main(["explain", "--model", str(folder), "--input", str(tmp_path / "vol.nii.gz"), "--method",
          "saliency", "--region", "all", "--sliding-window", "16,16,16", "--overlap", "0.5",
          "--out", str(tmp_path / "out")])
    saved = nib.load(str(tmp_path / "out" / "vol_saliency.nii.gz")).get_fdata()
    assert saved.shape == (32, 28, 24)  # the volume at its own size, not resized to 16^3
    from pellucid.data.transforms import zscore_nonzero

    x = zscore_nonzero(torch.from_numpy(volume)[None])[None]
    wrapped = SlidingWindow(load_model(folder).module, (16, 16, 16), overlap=0.5).eval()
    direct = pellucid.explain(wrapped, x, "saliency", target=SegmentationTarget(0, "all"))
    assert np.allclose(saved, direct.attributions[0, 0].numpy(), atol=1e-5)
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(folder), "--input", str(tmp_path / "vol.nii.gz"),
              "--sliding-window", "16,16", "--out", str(tmp_path / "bad")])
    assert "has 2 sides; the model is 3D" in capsys.readouterr().err


def test_fused_cam_default_layers_on_a_unet():
    from pellucid.explainers.fusion import default_layers

    unet = build("unet", 2, 4, 3).module.eval()
    assert default_layers(unet, torch.randn(1, 4, 64, 64)) == ["model.1", "model.0"]


def test_config_keys_for_the_seed_systems_are_checked():
    raw = load_config("seed-systems")
    assert raw.models["brain-unet-fp"].region == "fp"
    assert raw.models["brain-unet-3d-window"].sliding_window["roi_size"] == [24, 24, 24]
    base = {"datasets": {"d": {"reader": "phantom-brain"}},
            "models": {"m": {"datasets": ["d"], "path": "x"}}, "methods": ["saliency"],
            "metrics": ["pointing_game"]}
    for patch, key in (({"region": "tp"}, "models.m.region"),
                       ({"sliding_window": {"roi_size": [0, 4]}}, "models.m.sliding_window.roi_size"),
                       ({"sliding_window": {"roi_size": [8], "stride": 2}},
                        "models.m.sliding_window.stride"),
                       ({"reference": "high"}, "models.m.reference")):
        bad = json.loads(json.dumps(base))
        bad["models"]["m"].update(patch)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config(bad, "x.yaml")
    bad = json.loads(json.dumps(base))
    bad["methods"] = [{"name": "gradcam", "only_models": ["nope"]}]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.only_models"):
        parse_config(bad, "x.yaml")


def test_seed_systems_benchmark_end_to_end(survival_model, tmp_path):
    # the survival model trained once (the fixture above, from this config's spec), found in the
    # run's models/ folder as a resumed run finds it; the two U-Nets are trained here
    import shutil

    shutil.copytree(survival_model.source, tmp_path / "models" / "survival-resnet18")
    table = run_bench("seed-systems", tmp_path, progress=False)
    tasks = set(zip(table["model"], table["dataset"], strict=True))
    assert tasks == {("brain-unet", "brain"), ("brain-unet-fp", "brain"), ("brain-unet-fn", "brain"),
                     ("survival-resnet18", "survival"), ("brain-unet-3d-window", "brain-3d-large")}
    assert not table["reason"].str.startswith("error").any(), \
        table[table["reason"].str.startswith("error")][["method", "metric", "reason"]]
    perf = json.loads((tmp_path / "performance.json").read_text())
    assert perf["survival-resnet18|survival"]["report"]["c_index"] > 0.8
    # modality Shapley efficiency per case, and MSFI rows for per-channel methods only
    modality = json.loads((tmp_path / "modality.json").read_text())
    for key in ("brain-unet|brain", "survival-resnet18|survival"):
        m = modality[key]
        assert m["channels"] == ["T1", "T1ce", "T2", "FLAIR"]
        gap = np.subtract(m["f_all"], m["f_none"])
        assert np.allclose(np.sum(m["shapley"], 1), gap, rtol=1e-4, atol=1e-3)
    msfi = table[table["metric"] == "msfi"]
    assert msfi[msfi["method"] == "saliency"]["value"].notna().all()
    assert msfi[msfi["method"] == "gradcam"]["reason"].str.contains("one map").all()
    # map resolution: Grad-CAM strides follow the layer, fused CAM takes the finest layer
    stride = table[table["model"] == "brain-unet"].groupby("method")["map_stride"].first()
    assert stride["gradcam"] == 2 and stride["gradcam-stride4"] == 4 and stride["gradcam-stride8"] == 8
    assert stride["fusedcam"] == 2 and stride["saliency"] == 1
    # sliding window: gradient methods ran on the 40^3 volumes through the 24^3 network
    window = table[table["model"] == "brain-unet-3d-window"]
    assert set(window["method"]) - {"random", "centre", "edges", "prior"} == \
        {"saliency", "inputxgradient", "integratedgradients"}  # and the trivial baselines
    assert window[window["metric"] == "pointing_game"]["value"].notna().all()
    # error regions: the fp task's cases all have a non-empty false-positive region
    gallery = np.load(tmp_path / "gallery.npz")
    fp_masks = gallery["brain-unet-fp|brain::masks"]
    assert fp_masks.reshape(len(fp_masks), -1).any(1).all()
    html = (tmp_path / "report.html").read_text()
    for section in ("Per-modality importance", "Localisation against map resolution",
                    "Largest segmentation errors (false positives"):
        assert section in html
    res = pd.read_parquet(tmp_path / "results.parquet")
    assert len(res) == len(table)
