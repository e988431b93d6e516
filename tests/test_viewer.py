"""What a radiologist sees: the OHIF viewer (npm ``@ohif/app``, pinned, unpacked by ``make viewer``)
in Chromium, reading the test Orthanc after pull-explain-push stored pellucid's objects for a CT
slice and a chest radiograph. Asserted on the viewport's pixels (the image is not blank; the
Parametric Map, the SEG and the overlay bring colour into it) and on the measurement panel's text
(the SR's findings with their probabilities, the methods and the model). The screenshots are kept
in ``build/test-artifacts/ohif`` (``PELLUCID_ARTIFACTS`` moves them) and shown in
docs/clinical-integration.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pacs import PASSWORD, URL, USER, _in_ns, _zoo, orthanc  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
DIST = Path(os.environ.get("PELLUCID_OHIF_DIST", ROOT / ".viewer" / f"ohif-{OHIF_VERSION}" / "dist"))
ARTIFACTS = Path(os.environ.get("PELLUCID_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "ohif"
HELPER = Path(__file__).with_name("ohif_viewer.py")
PORT = 8099


@pytest.fixture(scope="module")
def ohif(orthanc):  # noqa: F811 - the imported fixture
    missing = [what for what, ok in (("the OHIF viewer (make viewer)", (DIST / "index.html").is_file()),
                                     ("chromium", shutil.which("chromium") is not None)) if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"viewer test needs {', '.join(missing)}")
        pytest.skip(f"viewer test needs {', '.join(missing)}")
    proc = subprocess.Popen(["ip", "netns", "exec", orthanc, sys.executable, str(HELPER), "serve",
                             str(DIST), str(PORT), URL, USER, PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _in_ns(orthanc, f"""
            import json, time, urllib.request
            for _ in range(100):
                try:
                    urllib.request.urlopen("http://127.0.0.1:{PORT}/app-config.js", timeout=1).read()
                    break
                except Exception:
                    time.sleep(0.1)
            print(json.dumps({{"up": True}}))
        """, timeout=60)
        yield f"http://127.0.0.1:{PORT}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _store(orthanc, path: Path) -> str:  # noqa: F811
    return _in_ns(orthanc, f"""
        import json, pydicom
        from pellucid.pacs import DicomWeb
        ds = pydicom.dcmread("{path}")
        DicomWeb("{URL}", "{USER}", "{PASSWORD}").store([ds])
        print(json.dumps({{"study": str(ds.StudyInstanceUID)}}))
    """)["study"]


def _explain(orthanc, study: str, model: str, methods: str, out: Path) -> None:  # noqa: F811
    cmd = ["ip", "netns", "exec", orthanc, sys.executable, "-m", "pellucid.cli", "explain", "--pacs",
           URL, "--study", study, "--model", model, "--method", methods, "--out", str(out)]
    env = dict(os.environ, PELLUCID_PACS_USER=USER, PELLUCID_PACS_PASSWORD=PASSWORD)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def _look(orthanc, viewer: str, study: str, name: str, *steps: str) -> dict:  # noqa: F811
    cmd = ["ip", "netns", "exec", orthanc, sys.executable, str(HELPER), "look", viewer, study,
           str(ARTIFACTS / name), *steps]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    return {s["step"]: s for s in seen["steps"]} | {"errors": seen["errors"],
                                                    "trouble": seen["trouble"]}


def _ct_model(folder: Path) -> str:
    """A 2D CT classifier (random weights: what is checked is what the viewer shows of its
    answer) with operating thresholds, a name and a version in its card."""
    model = _zoo(folder, "resnet18", "classification", ["Nodule", "Mass"], size=128)
    card = json.loads((model / "card.json").read_text())
    card.update(thresholds=[0.5, 0.5], name="ct-nodule-demo", version="1.0")
    (model / "card.json").write_text(json.dumps(card))
    return str(model)


def test_ohif_shows_the_map_segment_overlay_and_report_of_a_ct_and_a_radiograph(
        orthanc, ohif, shared_data, chest_model, tmp_path):  # noqa: F811
    from tests.factories import phantom_dicom

    ct = _store(orthanc, shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    # the chest model was trained on phantoms and refuses the real radiograph: the radiograph's
    # file with a phantom's pixels (tests/test_training_inputs.py)
    cr = _store(orthanc, phantom_dicom(next((shared_data / "dicom-samples" / "torchxrayvision"
                                              ).glob("*.dcm")), tmp_path / "cr.dcm"))
    _explain(orthanc, ct, _ct_model(tmp_path / "ct"), "gradcam,saliency", tmp_path / "ct-out")
    _explain(orthanc, cr, chest_model.source, "gradcam", tmp_path / "cr-out")
    record = json.loads((tmp_path / "ct-out" / "summary.json").read_text())[0]
    # the overlay before the Parametric Map: OHIF keeps a viewport's window when the next series
    # is dropped into it, and the map's window would wash out the overlay's colours
    # (series?: OHIF asks before it opens a SEG or tracks an SR's measurements)
    ct_seen = _look(orthanc, ohif, ct, "ct", "image", "series:pellucid gradcam overlay",
                    "series?:pellucid gradcam region", "series:pellucid gradcam map",
                    "series?:pellucid explanation report", "measurements")
    cr_seen = _look(orthanc, ohif, cr, "radiograph", "image", "series?:pellucid gradcam region",
                    "series:pellucid gradcam overlay", "series?:pellucid explanation report",
                    "measurements")
    for seen in (ct_seen, cr_seen):
        assert not seen["errors"], seen["errors"]  # no uncaught error in the viewer
        image = seen["image"]
        assert image["grey_std"] > 10 and image["coloured"] < 0.01  # the grey image, not blank
        # the SEG overlays the image (on the radiograph too), the overlay is shown in colour
        assert seen["series:pellucid gradcam region"]["coloured"] > 0.02, seen
        assert seen["series:pellucid gradcam overlay"]["coloured"] > 0.05, seen
    pm = ct_seen["series:pellucid gradcam map"]  # the PM's colour map over the CT
    assert pm["coloured"] > 0.2, (pm["coloured"], pm["screenshot"], ct_seen["trouble"][-20:])
    panel = ct_seen["measurements"]["text"]
    # a finding is an image-level group, which OHIF 3.13 does not list: one row per method, with
    # its region, names the explained finding and then every other finding as the SR states it
    assert "Measurements (2)" in panel, panel
    words = {f["name"]: f"{f['name']} {'present' if f['present'] else 'absent'} (probability "
                        f"{f['score']:.2f}, threshold 0.50)" for f in record["findings"]}
    explained = record["explained"]["class"]
    others = ", ".join(w for name, w in words.items() if name != explained)
    for method in ("gradcam", "saliency"):
        assert f"{words[explained]}; explained by {method}; model ct-nodule-demo 1.0; other " \
               f"findings: {others}" in panel, panel
    cr_record = json.loads((tmp_path / "cr-out" / "summary.json").read_text())[0]
    cr_panel = cr_seen["measurements"]["text"]
    assert "Measurements (1)" in cr_panel, cr_panel
    assert f"{cr_record['explained']['class']} " in cr_panel and "explained by gradcam" in cr_panel
    for f in cr_record["findings"]:
        assert f"{f['name']} {'present' if f['present'] else 'absent'} (probability" in cr_panel
