"""The REST service end to end: a real CR radiograph and a PNG through POST /v1/explain, the
produced DICOM objects downloaded and parsed, and every kind of bad request answered cleanly."""

from __future__ import annotations

import io
import logging
import shutil

import pydicom
import pytest
from fastapi.testclient import TestClient

from pellucid.service import create_app


@pytest.fixture(scope="module")
def service(chest_model, tmp_path_factory):
    models = tmp_path_factory.mktemp("served")
    shutil.copytree(chest_model.source, models / "chest")
    app = create_app(models, tmp_path_factory.mktemp("results"), api_key="s3cret",
                     max_upload_mb=8)
    return TestClient(app, headers={"X-API-Key": "s3cret"})


def _cr(shared_data):
    return next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))


def test_health_models_and_docs(service):
    assert service.get("/health").json()["status"] == "ok"
    listed = service.get("/v1/models").json()
    assert listed["models"][0]["name"] == "chest" and "gradcam" in listed["methods"]
    assert "/v1/explain" in service.get("/openapi.json").json()["paths"]


def _radiographs(shared_data) -> list:
    """Every CR radiograph among the shared DICOM samples."""
    return sorted(p for p in (shared_data / "dicom-samples").rglob("*.dcm")
                  if pydicom.dcmread(p, stop_before_pixels=True).get("Modality") == "CR")


def _texts(item) -> list[str]:
    """Every TEXT value of an SR content tree."""
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found += _texts(child)
    return found


def test_every_cr_sample_through_the_service(service, shared_data, tmp_path):
    """The chest model was trained on phantoms: every real radiograph is refused (422), the
    extremity radiograph first for its body part, the chest ones as unlike the synthetic training
    images; overridden, each is explained, every object says so and no finding is stated. The
    same files with a phantom's pixels are answered as inside the intended use."""
    from tests.factories import phantom_dicom

    files = _radiographs(shared_data)
    assert len(files) >= 3
    for path in files:
        part = str(pydicom.dcmread(path, stop_before_pixels=True).get("BodyPartExamined", ""))
        r = service.post("/v1/explain", files={"file": ("x.dcm", path.read_bytes(), "application/dicom")},
                         data={"model": "chest", "methods": "gradcam"})
        assert r.status_code == 422, (path.name, r.text)
        if part != "CHEST":
            assert f"body part {part}; the model is for CHEST" in r.json()["detail"]
        else:
            assert "unlike the synthetic images the model was trained on" in r.json()["detail"]
        r = service.post("/v1/explain",
                         files={"file": ("x.dcm", path.read_bytes(), "application/dicom")},
                         data={"model": "chest", "methods": "gradcam", "outside_intended_use": "true"})
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert body["intended_use"]["override"] and body["intended_use"]["outside"]
        assert body["training_data"]["unlike_training_data"] and body["findings"] == []
        for url in [body["methods"][0]["dicom"], *body["files"]]:
            ds = pydicom.dcmread(io.BytesIO(service.get(url).content))
            text = str(ds.get("ImageComments", "")) + " ".join(_texts(ds))
            assert "OUTSIDE THE MODEL'S INTENDED USE" in text, url
        if part != "CHEST":
            continue
        phantom = phantom_dicom(path, tmp_path / f"{path.stem}.dcm")
        r = service.post("/v1/explain",
                         files={"file": ("x.dcm", phantom.read_bytes(), "application/dicom")},
                         data={"model": "chest", "methods": "gradcam"})
        assert r.status_code == 200, (path.name, r.text)
        body = r.json()
        assert body["methods"][0]["dicom"] and len(body["files"]) >= 2, path.name
        assert body["intended_use"] == {"outside": [], "not_checked": [], "override": False}
        assert len(body["findings"]) == 3 and not body["training_data"]["unlike_training_data"]


def test_a_ct_slice_is_outside_the_chest_models_intended_use(service, shared_data):
    ct = shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm"
    r = service.post("/v1/explain", files={"file": ("x.dcm", ct.read_bytes(), "application/dicom")},
                     data={"model": "chest", "methods": "gradcam"})
    assert r.status_code == 422
    assert "modality CT; the model is for CR, DX" in r.json()["detail"]
    r = service.post("/v1/explain", files={"file": ("x.dcm", ct.read_bytes(), "application/dicom")},
                     data={"model": "chest", "methods": "gradcam", "outside_intended_use": "maybe"})
    assert r.status_code == 400 and "outside_intended_use" in r.json()["detail"]


def test_real_cr_end_to_end(service, shared_data, caplog, tmp_path):
    """A real CR file's header with a phantom's pixels (the phantom model refuses the real image)."""
    from tests.factories import phantom_dicom

    path = phantom_dicom(_cr(shared_data), tmp_path / "cr.dcm")
    source = pydicom.dcmread(path)
    with caplog.at_level(logging.INFO, logger="pellucid.service"):
        r = service.post("/v1/explain", files={"file": ("x.dcm", path.read_bytes(), "application/dicom")},
                         data={"model": "chest", "methods": "gradcam,saliency"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction"]["class"] in body["classes"]
    assert 0 <= body["prediction"]["probability"] <= 1
    assert [m["method"] for m in body["methods"]] == ["gradcam", "saliency"]
    for m in body["methods"]:
        png = service.get(m["overlay"])
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        sc = pydicom.dcmread(io.BytesIO(service.get(m["dicom"]).content))
        assert sc.Modality == "OT" or sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.StudyInstanceUID == source.StudyInstanceUID
    names = {f.rsplit("/", 1)[1] for f in body["files"]}
    flagged = {"key_objects.dcm"} if any(f["present"] for f in body["findings"]) else set()
    # a CR has no frame of reference: no PM; a finding present: a KOS
    assert names == {"segmentation.dcm", "report_sr.dcm"} | flagged
    assert any(s["object"] == "parametric map" for s in body["skipped"])
    for f in body["files"]:
        ds = pydicom.dcmread(io.BytesIO(service.get(f).content))
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.Manufacturer == "pellucid"
    logs = caplog.text
    for value in (str(source.PatientName), str(source.PatientID), path.name):
        if value:
            assert value not in logs


def test_a_fractional_segmentation_on_request(service, shared_data, tmp_path):
    """``segmentation=fractional``: the SEG is FRACTIONAL (the map scaled to [0, 1]); any other
    value than binary or fractional is a 400 that names the field."""
    from tests.factories import phantom_dicom

    data = phantom_dicom(_cr(shared_data), tmp_path / "cr.dcm").read_bytes()
    r = service.post("/v1/explain", files={"file": ("x.dcm", data, "application/dicom")},
                     data={"model": "chest", "methods": "gradcam", "segmentation": "fractional"})
    assert r.status_code == 200, r.text
    seg = next(f for f in r.json()["files"] if f.endswith("segmentation.dcm"))
    ds = pydicom.dcmread(io.BytesIO(service.get(seg).content))
    assert ds.SegmentationType == "FRACTIONAL" and ds.MaximumFractionalValue == 255
    assert "not a probability" in ds.SegmentSequence[0].SegmentDescription
    r = service.post("/v1/explain", files={"file": ("x.dcm", data, "application/dicom")},
                     data={"model": "chest", "methods": "gradcam", "segmentation": "soft"})
    assert r.status_code == 400 and r.json()["detail"] == "segmentation: give binary or fractional"


def test_png_upload(service, tmp_path):
    import numpy as np
    from PIL import Image

    from pellucid.data import ChestPhantom

    buf = io.BytesIO()
    image = ChestPhantom(1, 128, seed=4)[0]["image"][0].numpy()
    Image.fromarray((image * 255).astype(np.uint8)).save(buf, format="PNG")
    r = service.post("/v1/explain", files={"file": ("a.png", buf.getvalue(), "image/png")},
                     data={"model": "chest", "methods": "gradcam"})
    assert r.status_code == 200, r.text
    assert r.json()["files"] == []  # no DICOM source: overlays and maps only
    flat = io.BytesIO()
    Image.new("L", (128, 128), 90).save(flat, format="PNG")  # a grey square is no phantom
    r = service.post("/v1/explain", files={"file": ("a.png", flat.getvalue(), "image/png")},
                     data={"model": "chest", "methods": "gradcam"})
    assert r.status_code == 422 and "unlike the synthetic images" in r.json()["detail"]


def test_bad_requests_are_answered_and_the_server_stays_up(service, shared_data, tmp_path):
    ok = {"model": "chest", "methods": "gradcam"}
    r = service.post("/v1/explain", files={"file": ("a.txt", b"hello world", "text/plain")}, data=ok)
    assert r.status_code == 400 and "not a DICOM" in r.json()["detail"]
    big = b"\x00" * (9 * 2**20)
    r = service.post("/v1/explain", files={"file": ("big.dcm", big, "application/dicom")}, data=ok)
    assert r.status_code == 413
    r = service.post("/v1/explain", json={"file": "x"})
    assert r.status_code == 415
    whole = _cr(shared_data).read_bytes()
    r = service.post("/v1/explain", files={"file": ("cut.dcm", whole[:4000], "application/dicom")},
                     data=ok)
    assert r.status_code == 400 and "Traceback" not in r.text and "cut.dcm" not in r.text
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    vol = (tmp_path / "v.nii.gz").read_bytes()
    r = service.post("/v1/explain", files={"file": ("v.nii.gz", vol, "application/gzip")}, data=ok)
    assert r.status_code == 422 and "2D model" in r.json()["detail"]
    r = service.post("/v1/explain", files={"file": ("x.dcm", whole, "application/dicom")},
                     data={"model": "lungs", "methods": "gradcam"})
    assert r.status_code == 400 and "unknown model 'lungs'" in r.json()["detail"]
    r = service.post("/v1/explain", files={"file": ("x.dcm", whole, "application/dicom")},
                     data={"model": "chest", "methods": "gradcm"})
    assert r.status_code == 400 and "unknown method" in r.json()["detail"]
    bare = TestClient(service.app)
    assert bare.get("/v1/models").status_code == 401
    assert service.get("/health").status_code == 200
