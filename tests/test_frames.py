"""A 2D model on a multi-frame image: an enhanced MR (highdicom's legacy conversion of five MR
slices) is explained frame by frame, each frame exactly as the single image it was converted
from; the Parametric Map and the Segmentation hold one frame per source frame and reference it,
the SR states each frame's findings referencing their frame, and dciodvfy finds no error in them."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pellucid.models import ModelCard, build, load_model, save_model
from pellucid.pipeline import CaseOptions, explain_case, read_case
from pellucid.pipeline.frames import multiframe_for_2d, read_frames, write_frames


@pytest.fixture(scope="module")
def enhanced_mr(shared_data, tmp_path_factory) -> tuple[Path, list[Path]]:
    import highdicom as hd
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("frames")
    mr = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "MR_small.dcm")
    normal = np.cross(*np.reshape(np.asarray(mr.ImageOrientationPatient, float), (2, 3)))
    series, slices, files = generate_uid(), [], []
    for k in range(5):  # five slices 3 mm apart, each shifted so that every frame differs
        ds = copy.deepcopy(mr)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(v) for v in np.asarray(mr.ImagePositionPatient, float)
                                   + 3.0 * k * normal]
        ds.InstanceNumber = k + 1
        ds.PixelData = np.roll(mr.pixel_array, 5 * k, axis=1).astype(mr.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice{k}.dcm")
        slices.append(ds)
        files.append(folder / f"slice{k}.dcm")
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        slices, series_instance_uid=generate_uid(), series_number=50, sop_instance_uid=generate_uid(),
        instance_number=1)
    enhanced.save_as(folder / "enhanced.dcm")
    return folder / "enhanced.dcm", files


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    built = build("resnet18", 2, 1, 2)
    card = ModelCard(arch="resnet18", task="classification", class_names=["Lesion", "Other"],
                     in_channels=1, spatial_dims=2, input_size=[64, 64], activation="sigmoid",
                     default_layer=built.default_layer, backend=built.backend, thresholds=[0.5, 0.5],
                     name="frames-demo", version="2")
    return load_model(save_model(tmp_path_factory.mktemp("model") / "m", built.module, card))


def test_each_frame_is_explained_as_the_image_it_was(enhanced_mr, classifier, tmp_path):
    path, singles = enhanced_mr
    options = CaseOptions(["gradcam", "saliency"])
    assert multiframe_for_2d(classifier, path) and not multiframe_for_2d(classifier, singles[0])
    results = [explain_case(classifier, case, options) for case in read_frames(classifier, path, options)]
    assert len(results) == 5
    enhanced = pydicom.dcmread(path, stop_before_pixels=True)
    positions = {tuple(np.round(np.asarray(pydicom.dcmread(f).ImagePositionPatient, float), 3)): f
                 for f in singles}
    for k in range(5):  # the conversion orders the frames along the normal: match by position
        place = enhanced.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0]
        single = positions[tuple(np.round(np.asarray(place.ImagePositionPatient, float), 3))]
        alone = explain_case(classifier, read_case(classifier, single, options), options)
        for method in options.methods:
            torch.testing.assert_close(results[k].maps[method], alone.maps[method], atol=1e-6, rtol=1e-5)
        assert results[k].classes == pytest.approx(alone.classes, abs=1e-6)
    assert not torch.equal(results[0].maps["gradcam"], results[4].maps["gradcam"])


def test_objects_reference_each_frame_and_pass_the_validator(enhanced_mr, classifier, tmp_path):
    import highdicom as hd

    path, _ = enhanced_mr
    options = CaseOptions(["gradcam", "saliency"])
    results = [explain_case(classifier, case, options) for case in read_frames(classifier, path, options)]
    record = write_frames(results, tmp_path, "mf", True, "m", classifier.digest(), classifier.card)
    present = any(f["present"] for frame in record["frames"] for f in frame["findings"])
    assert record["dicom_objects"] == ["mf_parametric_map.dcm", "mf_segmentation.dcm",
                                       "mf_report_sr.dcm", *(["mf_key_objects.dcm"] if present else [])]
    assert len(record["frames"]) == 5 and all(f["methods"]["gradcam"]["map"] for f in record["frames"])
    pm = pydicom.dcmread(tmp_path / "mf_parametric_map.dcm")
    seg = pydicom.dcmread(tmp_path / "mf_segmentation.dcm")
    source = pydicom.dcmread(path)
    assert int(pm.NumberOfFrames) == 5
    stored = hd.pm.ParametricMap.from_dataset(pm).pixel_array if hasattr(hd, "pm") else pm.pixel_array
    for k in range(5):  # frame k of the PM is frame k's map, and references source frame k + 1
        np.testing.assert_allclose(np.asarray(stored[k], np.float32),
                                   results[k].maps["gradcam"][0].numpy(), atol=1e-6)
        for obj in (pm, seg):
            ref = obj.PerFrameFunctionalGroupsSequence[k].DerivationImageSequence[0] \
                .SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert int(ref.ReferencedFrameNumber) == k + 1
    sr = pydicom.dcmread(tmp_path / "mf_report_sr.dcm")
    hd.sr.Comprehensive3DSR.from_dataset(sr)

    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    groups = {}
    for item in walk(sr.ContentSequence):
        if item.ValueType == "CONTAINER" and "ContentSequence" in item:
            tracking = [str(i.TextValue) for i in item.ContentSequence
                        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "112039"]
            frames = {int(f) for i in item.ContentSequence if i.ValueType == "IMAGE"
                      for r in i.ReferencedSOPSequence
                      for f in np.atleast_1d(r.get("ReferencedFrameNumber", []))}
            if tracking:
                groups[tracking[0]] = frames
    for k in range(1, 6):
        for name in ("Lesion", "Other"):
            assert groups[f"finding {name} frame {k}"] == {k}
    texts = [str(i.TextValue) for i in walk(sr.ContentSequence) if i.ValueType == "TEXT"]
    assert any(" in frame 3 (probability " in t for t in texts)
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is missing (make system-deps installs dicom3tools)")
    for name in record["dicom_objects"]:
        out = subprocess.run([tool, str(tmp_path / name)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (name, errors)


def test_cli_explains_a_multi_frame_file_frame_by_frame(enhanced_mr, classifier, tmp_path):
    import json

    from pellucid.cli import main

    path, _ = enhanced_mr
    main(["explain", "--model", classifier.source, "--input", str(path), "--method", "gradcam",
          "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary) == 1 and len(summary[0]["frames"]) == 5
    assert (tmp_path / "out" / "enhanced_frame0003_gradcam.npy").is_file()


def test_the_service_explains_a_multi_frame_upload_frame_by_frame(enhanced_mr, classifier,
                                                                  tmp_path):
    """POST /v1/explain with the enhanced MR: one answer per frame, equal to what ``pellucid
    explain``'s path writes for it, and the whole image's Parametric Map, SEG and SR (with the KOS
    when a finding is present) to download; every one parses back with highdicom."""
    import io
    import json

    import highdicom as hd
    from fastapi.testclient import TestClient

    from pellucid.service import create_app

    path, _ = enhanced_mr
    models = tmp_path / "served"
    shutil.copytree(classifier.source, models / "frames")
    client = TestClient(create_app(models, tmp_path / "results", api_key="k"), headers={"X-API-Key": "k"})
    r = client.post("/v1/explain", files={"file": ("mf.dcm", path.read_bytes(), "application/dicom")},
                    data={"model": "frames", "methods": "gradcam"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [f["frame"] for f in body["frames"]] == [1, 2, 3, 4, 5]
    assert [m["frame"] for m in body["methods"]] == [1, 2, 3, 4, 5]
    options = CaseOptions(["gradcam"])
    results = [explain_case(classifier, case, options) for case in read_frames(classifier, path, options)]
    record = write_frames(results, tmp_path / "cli", "mf", True, "frames", classifier.digest(),
                          classifier.card, None, classifier.stored())
    assert [f["findings"] for f in body["frames"]] == \
        json.loads(json.dumps([r["findings"] for r in record["frames"]]))
    def kind(name: str) -> str:  # the object, without the file stem in front
        return name.rsplit("/", 1)[-1].split("_", 1)[1]

    names = sorted(kind(f) for f in body["files"])
    assert names == sorted(kind(n) for n in record["dicom_objects"])
    assert {"parametric_map.dcm", "segmentation.dcm", "report_sr.dcm"} <= set(names)
    readers = {"parametric_map.dcm": hd.pm.ParametricMap.from_dataset,
               "segmentation.dcm": hd.seg.Segmentation.from_dataset,
               "report_sr.dcm": hd.sr.Comprehensive3DSR.from_dataset,
               "key_objects.dcm": hd.ko.KeyObjectSelectionDocument.from_dataset}
    for url in body["files"]:
        ds = pydicom.dcmread(io.BytesIO(client.get(url).content))
        readers[kind(url)](ds)
        if ds.Modality != "KO":
            assert int(getattr(ds, "NumberOfFrames", 5)) == 5 or ds.Modality == "SR"
