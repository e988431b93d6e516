"""``--evidence RUN``: a benchmark run of the same weights puts each method's scores (mean and
interval, beaten baseline or not, randomisation pass rate) into the case record and the SR, parsed
back with highdicom; a run of other weights, an old run without digests and an unknown model name
are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pellucid.errors import ConfigError


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    """A chest model trained for one epoch on 64 px phantoms and a bench run of it (Grad-CAM,
    saliency and the default baselines on 6 cases)."""
    from pellucid.bench import parse_config, run_bench
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, save_model, train

    root = tmp_path_factory.mktemp("evidence")
    result = train(open_dataset("phantom-chest", split="train", n=96, size=64),
                   TrainConfig(epochs=1, batch_size=32, progress=False))
    model = save_model(root / "chest", result.module, result.card)
    cfg = parse_config({
        "name": "evidence", "seed": 0, "batch_size": 3, "gallery": 0,
        "datasets": {"chest": {"reader": "phantom-chest", "cases": 6, "options": {"size": 64}}},
        "models": {"r18": {"datasets": ["chest"], "path": str(model)}},
        "methods": ["gradcam", "saliency"],
        "metrics": ["pointing_game", {"name": "deletion", "options": {"step": 256}},
                    {"name": "model_randomization", "options": {"progress": False, "depth": 1}}]})
    run_bench(cfg, root / "run", progress=False, report=False)
    return model, root / "run"


def test_evidence_lines_are_the_benchmark_statistics(benched):
    from pellucid.bench import stats
    from pellucid.bench.store import ResultStore
    from pellucid.models import load_model
    from pellucid.pipeline.evidence import load_evidence

    model, run = benched
    evidence = load_evidence(run, load_model(model), ["gradcam", "occlusion"])
    frame = ResultStore(run).table()
    summ = stats.summary(frame).set_index(["method", "metric"])
    versus = stats.against_baselines(frame).set_index(["method", "metric"])
    lines = evidence.lines("gradcam")
    for metric in ("pointing_game", "deletion"):
        row, v = summ.loc[("gradcam", metric)], versus.loc[("gradcam", metric)]
        expected = (f"chest: {metric} mean {row['mean']:.3f} (95% CI {row['ci_low']:.3f} to "
                    f"{row['ci_high']:.3f}, n {row['n']}); best trivial baseline {v['baseline']} "
                    f"{v['baseline_mean']:.3f}: {v['verdict']} (difference {v['diff']:+.3f}, 95% "
                    f"CI {v['diff_ci_low']:+.3f} to {v['diff_ci_high']:+.3f}; Holm p "
                    f"{v['p_holm']:.2g})")
        assert v["verdict"] in ("better", "not_better", "undetermined")
        assert expected in lines, lines
    rand = frame[(frame["method"] == "gradcam") & (frame["metric"] == "model_randomization")]
    rate = pd.Series([json.loads(e)["passed"] for e in rand["extra"]]).mean()
    assert f"chest: randomisation sanity check (model_randomization) passed in {rate:.0%} of " \
           f"{len(rand)} cases" in lines
    assert evidence.lines("occlusion") == [f"occlusion was not benchmarked in {run}"]


def test_evidence_in_the_sr_parses_back(benched, shared_data, tmp_path):
    import highdicom as hd
    import pydicom

    from pellucid.models import load_model
    from pellucid.pipeline import CaseOptions, explain_case, read_case, write_case
    from pellucid.pipeline.evidence import load_options_evidence

    model, run = benched
    loaded = load_model(model)
    cr = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    # a phantom model (trained without validation images: it cannot tell a patient from a
    # phantom) explains the patient's radiograph only when overridden; the evidence is stated
    options = CaseOptions(["gradcam", "saliency"], evidence=run, outside_intended_use=True)
    options.check()
    evidence = load_options_evidence(loaded, options)
    result = explain_case(loaded, read_case(loaded, cr, options), options)
    record = write_case(result, tmp_path, stem="cr", dicom=True, model_digest=loaded.digest(),
                        card=loaded.card, evidence=evidence)
    assert record["evidence"]["methods"]["gradcam"] == evidence.lines("gradcam")
    sr = pydicom.dcmread(tmp_path / "cr_report_sr.dcm")
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # a valid SR for highdicom

    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    stated: dict[str, list[str]] = {}
    for group in walk(sr.ContentSequence):
        if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
            continue
        texts = [(i.ConceptNameCodeSequence[0].CodeValue, str(i.TextValue))
                 for i in group.ContentSequence if i.ValueType == "TEXT"]
        method = next((t[12:] for c, t in texts if c == "112039" and t.startswith("explanation ")), None)
        if method:
            stated[method] = [t for c, t in texts if c == "BENCHEV"]
    assert stated == {m: evidence.lines(m) for m in ("gradcam", "saliency")}


def test_evidence_of_other_weights_is_refused(benched, tmp_path):
    import torch

    from pellucid.models import load_model, save_model
    from pellucid.pipeline.evidence import load_evidence

    model, run = benched
    loaded = load_model(model)
    with torch.no_grad():
        next(loaded.module.parameters()).add_(0.01)  # retrained: the same name, other weights
    other = load_model(save_model(tmp_path / "retrained", loaded.module, loaded.card))
    with pytest.raises(ConfigError, match=r"benchmarked with other weights .* not evidence"):
        load_evidence(run, other, ["gradcam"])
    with pytest.raises(ConfigError, match="'nope' is not a model of"):
        load_evidence(run, load_model(model), ["gradcam"], model="nope")
    old = tmp_path / "old"
    old.mkdir()
    info = json.loads((run / "run.json").read_text())
    for task in info["tasks"].values():
        task.pop("weights_sha256")
    (old / "run.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="this installation did not write the run"):
        load_evidence(old, load_model(model), ["gradcam"])
    with pytest.raises(ConfigError, match="does not record the weights"):
        load_evidence(old, load_model(model), ["gradcam"], unverified=True)
    with pytest.raises(ConfigError, match="not a pellucid bench run"):
        from pellucid.pipeline import CaseOptions

        CaseOptions(["gradcam"], evidence=Path(tmp_path / "missing")).check()


def _forge(run: Path, into: Path) -> Path:
    """The reported attack: rewrite every part's pointing_game values to 1.0 (and repeat its rows
    four times), then recompute each manifest's row count and SHA-256."""
    import hashlib
    import io
    import shutil

    forged = into / "forged"
    shutil.copytree(run, forged)
    for part in (forged / "parts").glob("*.parquet"):
        frame = pd.read_parquet(part)
        frame.loc[frame["metric"] == "pointing_game", "value"] = 1.0
        frame = pd.concat([frame] * 4, ignore_index=True)
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        part.write_bytes(buf.getvalue())
        manifest = part.with_suffix(".json")
        meta = json.loads(manifest.read_text())
        meta.update(rows=len(frame), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        manifest.write_text(json.dumps(meta))
    return forged


def test_a_forged_run_is_refused_or_marked_unverified_in_every_output(benched, tmp_path):
    from pellucid.models import load_model
    from pellucid.pipeline.evidence import UNVERIFIED, load_evidence

    model, run = benched
    loaded = load_model(model)
    honest = load_evidence(run, loaded, ["gradcam"])
    assert honest.verified and not any(UNVERIFIED in line for line in honest.lines("gradcam"))
    forged = _forge(run, tmp_path)
    with pytest.raises(ConfigError, match=r"did not write the run \(\d+ of \d+ result parts"):
        load_evidence(forged, loaded, ["gradcam"])
    marked = load_evidence(forged, loaded, ["gradcam"], unverified=True)
    assert not marked.verified and marked.as_dict()["verified"] is False
    lines = marked.lines("gradcam")
    assert lines and all(line.startswith(UNVERIFIED) for line in lines)
    assert any("pointing_game mean 1.000" in line for line in lines)  # the forged number, marked
    # a run.json edited by hand (a task's weights swapped) no longer verifies either
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(run, edited)
    (edited / "run.json").write_text((edited / "run.json").read_text() + " ")
    with pytest.raises(ConfigError, match=r"run\.json carries no valid tag"):
        load_evidence(edited, loaded, ["gradcam"])


@pytest.mark.parametrize("text", ['{"tasks": [1, 2]}', '{"tasks": {"r18|chest": "x"}}',
                                  '{"tasks": {"nobar": {}}}', '[1, 2]', '"a string"', "{not json",
                                  '{"tasks": {"r18|chest": {"weights_sha256": 5}}}', "\xff\xfe"])
def test_every_malformed_run_json_is_one_line(benched, tmp_path, text):
    import shutil

    from pellucid.errors import PellucidError
    from pellucid.models import load_model
    from pellucid.pipeline.evidence import load_evidence

    model, run = benched
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "run.json").write_bytes(text.encode("latin-1"))
    for unverified in (False, True):
        with pytest.raises(PellucidError) as info:
            load_evidence(bad, load_model(model), ["gradcam"], unverified=unverified)
        assert "\n" not in str(info.value) and "run" in str(info.value)
