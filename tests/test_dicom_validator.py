"""Every DICOM object pellucid writes, checked by an independent validator: ``dciodvfy`` from
dicom3tools (Debian package, installed by ``make system-deps``). For each source (a CR with a
``0\\0`` PixelSpacing stored as JPEG 2000, a radiograph stored as Secondary Capture, CT, MR, an
enhanced multi-frame MR, a CT series) every object type is written and validated; an error the
source itself carries may remain, an error pellucid introduces fails the test. Every object
also parses back with highdicom's reader of its class."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pellucid.errors import PellucidError
from pellucid.io import dicom_objects as objects
from pellucid.io import read


@pytest.fixture(scope="module")
def dciodvfy():
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing (make system-deps installs dicom3tools)")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return tool


def _errors(tool: str, path: Path) -> set[str]:
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")}


def _series(ct_path: Path, folder: Path) -> Path:
    ct = pydicom.dcmread(ct_path)
    normal = np.cross(*np.reshape(np.asarray(ct.ImageOrientationPatient, float), (2, 3)))
    uid = generate_uid()
    folder.mkdir()
    for k in range(4):
        ds = copy.deepcopy(ct)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ct.ImagePositionPatient, float)
                                   + 2.5 * k * normal]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"s{k}.dcm")
    return folder


def _objects(image) -> tuple[dict, dict]:
    src = image.datasets
    shape = tuple(image.array.shape[1:])
    heat = np.random.RandomState(0).rand(*shape).astype(np.float32)
    plane = heat if len(shape) == 2 else heat[0]
    pixels = image.array[0].numpy() if len(shape) == 2 else image.array[0, 0].numpy()
    model = objects.ReportedModel("chest", "1", "0" * 64, "model.safetensors", "1" * 64)
    makers = {
        "parametric map": lambda: objects.parametric_map(src, heat, "gradcam"),
        "binary segmentation": lambda: objects.segmentation(
            src, heat > 0.5, "gradcam region", model=model, finding="Lesion", method="gradcam"),
        "fractional segmentation": lambda: objects.segmentation(
            src, heat, "gradcam", kind="fractional", model=model, finding="Lesion",
            method="gradcam"),
        "secondary capture": lambda: objects.secondary_capture(
            src[0], objects.overlay_rgb(pixels, plane, "gradcam")),
    }
    made, refused = {}, {}
    for kind, make in makers.items():
        try:
            made[kind] = make()
        except PellucidError as exc:
            refused[kind] = str(exc)
    found = [objects.Finding("Lesion", 0.7, threshold=0.4, present=True,
                             code=("SCT", "52988006", "Lesion")),
             objects.Finding("Effusion", 0.2, threshold=0.5, present=False)]
    made["structured report"] = objects.structured_report(
        src, model, found,
        {"gradcam": {"layer": "layer4"}}, made.get("parametric map"),
        made.get("binary segmentation"),
        {"gradcam": made["secondary capture"]} if "secondary capture" in made else None,
        summary="Present: Lesion. Absent: Effusion.")
    made["key object selection"] = objects.key_object_selection(
        src[:1], model, found, [made["structured report"]])
    return made, refused


# highdicom's own readers: every object pellucid writes parses back into its class
READERS = {"parametric map": lambda ds: hd.pm.ParametricMap.from_dataset(ds),
           "binary segmentation": lambda ds: hd.seg.Segmentation.from_dataset(ds),
           "fractional segmentation": lambda ds: hd.seg.Segmentation.from_dataset(ds),
           "secondary capture": lambda ds: hd.Image.from_dataset(ds),
           "structured report": lambda ds: hd.sr.Comprehensive3DSR.from_dataset(ds),
           "key object selection": lambda ds: hd.ko.KeyObjectSelectionDocument.from_dataset(ds)}


def test_dciodvfy_finds_no_error_pellucid_introduced(dciodvfy, shared_data, tmp_path):
    samples = shared_data / "dicom-samples"
    sources = {"CR": samples / "pydicom_data" / "RG1_J2KI.dcm",
               "radiograph as SC": next((samples / "torchxrayvision").glob("*.dcm")),
               "CT": samples / "pydicom" / "CT_small.dcm", "MR": samples / "pydicom" / "MR_small.dcm",
               "enhanced MR": samples / "pydicom_data" / "emri_small.dcm",
               "CT series": _series(samples / "pydicom" / "CT_small.dcm", tmp_path / "series")}
    introduced, written, inherited, unreadable = {}, [], {}, {}
    for name, path in sources.items():
        image = read(path)
        image.datasets[0].save_as(tmp_path / "source.dcm")
        own = _errors(dciodvfy, tmp_path / "source.dcm")
        inherited[name] = len(own)
        made, refused = _objects(image)
        for kind, reason in refused.items():  # refusals are one line that says why
            assert "\n" not in reason and reason, (name, kind)
        for kind, ds in made.items():
            out = tmp_path / f"{name}_{kind}.dcm".replace(" ", "_")
            ds.save_as(out)
            written.append((name, kind))
            new = _errors(dciodvfy, out) - own
            if new:
                introduced[f"{name} {kind}"] = sorted(new)
            try:
                READERS[kind](pydicom.dcmread(out))
            except Exception as exc:  # any failure to parse back is the finding
                unreadable[f"{name} {kind}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    assert introduced == {}, introduced
    assert unreadable == {}, unreadable
    kinds = {kind for _, kind in written}
    assert kinds == {"parametric map", "binary segmentation", "fractional segmentation",
                     "secondary capture", "structured report", "key object selection"}
    assert len(written) >= 29  # (the enhanced MR sample has no plane geometry: its SR only)
    print("validator errors already in the sources:", inherited)


def test_no_zero_pixel_spacing_is_copied(shared_data):
    cr = read(shared_data / "dicom-samples" / "pydicom_data" / "RG1_J2KI.dcm")
    assert [float(v) for v in cr.datasets[0].PixelSpacing] == [0.0, 0.0]  # the source says 0\0
    heat = np.random.RandomState(0).rand(*cr.array.shape[1:]).astype(np.float32)
    seg = objects.segmentation(cr.datasets, heat > 0.5, "region")
    sc = objects.secondary_capture(cr.datasets[0], objects.overlay_rgb(cr.array[0].numpy(), heat, "x"))
    for ds in (seg, sc):
        spacing = [ds.get("PixelSpacing")] + [
            g.PixelMeasuresSequence[0].get("PixelSpacing")
            for g in ds.get("SharedFunctionalGroupsSequence", []) if "PixelMeasuresSequence" in g]
        assert all(s is None or min(float(v) for v in s) > 0 for s in spacing), ds.SOPClassUID
    assert "PixelSpacing" in cr.datasets[0]  # the source record is left as read
