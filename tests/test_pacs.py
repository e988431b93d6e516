"""A real PACS: Orthanc (Debian packages orthanc + orthanc-dicomweb) started by the fixture in a
private network namespace that has only loopback (Orthanc binds every interface whatever its
configuration says), with a temporary storage folder and HTTP authentication. The clients run in
the same namespace. Every object type goes in by STOW-RS and by C-STORE and QIDO finds it; the
pull-explain-push command works against it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

USER, PASSWORD = "pellucid", "not-a-real-secret"
URL = "http://127.0.0.1:8042/dicom-web"


def _in_ns(ns: str, code: str, timeout: int = 300) -> dict:
    """Run Python ``code`` inside the namespace; it prints one JSON line as its last output."""
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PELLUCID_THREADS="2"))
    if result.returncode != 0:
        raise AssertionError(f"in-namespace code failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    missing = [t for t in ("Orthanc", "ip") if shutil.which(t) is None]
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    if missing or not plugin.is_file() or os.geteuid() != 0:
        reason = f"Orthanc test needs root, {missing or ''} {'' if plugin.is_file() else plugin}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (make system-deps installs them)")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("orthanc")
    config = {"Name": "pellucid-test", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": 8042, "DicomPort": 4242,
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(plugin)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomCheckCalledAet": False,
              "DicomAlwaysAllowStore": True, "StableAge": 1, "HttpServerEnabled": True}
    (root / "orthanc.json").write_text(json.dumps(config))
    ns = f"pellucid-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        log = (root / "orthanc.log").open("w")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "Orthanc", str(root / "orthanc.json")],
                                stdout=log, stderr=subprocess.STDOUT)
        _in_ns(ns, f"""
            import json, time, urllib.request, base64
            auth = base64.b64encode(b"{USER}:{PASSWORD}").decode()
            for _ in range(300):
                try:
                    req = urllib.request.Request("http://127.0.0.1:8042/system",
                                                 headers={{"Authorization": "Basic " + auth}})
                    urllib.request.urlopen(req, timeout=1).read()
                    break
                except Exception:
                    time.sleep(0.1)
            else:
                raise SystemExit("Orthanc did not come up")
            print(json.dumps({{"up": True}}))
        """, timeout=60)
        yield ns
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["ip", "netns", "delete", ns], check=False)


OBJECTS = """
    import json, pydicom, numpy as np
    from pathlib import Path
    from pellucid.io import read, dicom_objects as objects
    ct = read(Path("{data}") / "dicom-samples" / "pydicom" / "CT_small.dcm").datasets
    heat = np.random.RandomState(0).rand(128, 128).astype(np.float32)
    pm = objects.parametric_map(ct, heat, "gradcam")
    seg = objects.segmentation(ct, heat > 0.5, "gradcam region")
    frac = objects.segmentation(ct, heat, "gradcam", kind="fractional")
    sc = objects.secondary_capture(ct[0], objects.overlay_rgb(ct[0].pixel_array, heat, "gradcam"))
    sr = objects.structured_report(ct, "m", "1", "Lesion", 0.7, "gradcam", pm, seg)
    made = [ct[0], pm, seg, frac, sc, sr]
"""


def test_every_object_type_by_stow_and_qido(orthanc, shared_data):
    out = _in_ns(orthanc, OBJECTS.format(data=shared_data) + f"""
    from pellucid.pacs import DicomWeb
    pacs = DicomWeb("{URL}", "{USER}", "{PASSWORD}")
    stored = pacs.store(made)
    found = {{i["sop_instance"]: i["sop_class"] for i in pacs.instances(str(ct[0].StudyInstanceUID))}}
    print(json.dumps({{"stored": stored, "found": found,
                      "classes": [str(d.SOPClassUID) for d in made]}}))
    """)
    assert set(out["stored"]) <= set(out["found"])
    assert set(out["classes"]) <= set(out["found"].values())  # CT, PM, SEG, SC, SR


def test_every_object_type_by_c_store(orthanc, shared_data):
    out = _in_ns(orthanc, OBJECTS.format(data=shared_data) + f"""
    from pellucid.pacs import DicomWeb, c_store
    again = [  # new objects (new UIDs), so C-STORE does not re-store the STOW test's
             objects.parametric_map(ct, heat, "occlusion"), objects.segmentation(ct, heat > 0.3, "r"),
             objects.secondary_capture(ct[0], objects.overlay_rgb(ct[0].pixel_array, heat, "x")),
             objects.structured_report(ct, "m", "1", "Lesion", 0.6, "occlusion")]
    status = c_store([ct[0]] + again, "127.0.0.1", 4242)
    pacs = DicomWeb("{URL}", "{USER}", "{PASSWORD}")
    found = {{i["sop_instance"] for i in pacs.instances(str(ct[0].StudyInstanceUID))}}
    print(json.dumps({{"status": status, "ok": all(str(d.SOPInstanceUID) in found for d in again)}}))
    """)
    assert out["status"] == [0] * 5 and out["ok"]


def test_pull_explain_push_command(orthanc, shared_data, chest_model, tmp_path):
    cr = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    study = _in_ns(orthanc, f"""
        import json, pydicom
        from pellucid.pacs import DicomWeb
        ds = pydicom.dcmread("{cr}")
        DicomWeb("{URL}", "{USER}", "{PASSWORD}").store([ds])
        print(json.dumps({{"study": str(ds.StudyInstanceUID)}}))
    """)["study"]
    cmd = ["ip", "netns", "exec", orthanc, sys.executable, "-m", "pellucid.cli", "explain",
           "--pacs", URL, "--study", study, "--model", chest_model.source, "--method",
           "gradcam,saliency"]
    env = dict(os.environ, PELLUCID_PACS_USER=USER, PELLUCID_PACS_PASSWORD=PASSWORD)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    import pydicom

    source = pydicom.dcmread(cr, stop_before_pixels=True)
    for key in ("PatientName", "PatientID", "ReferringPhysicianName", "PatientBirthDate"):
        value = str(source.get(key, "") or "")
        if len(value) >= 3:  # nothing from the DICOM header reaches the console
            assert value not in result.stdout + result.stderr, key
    time.sleep(0.2)
    out = _in_ns(orthanc, f"""
        import json
        from pellucid.pacs import DicomWeb
        print(json.dumps(DicomWeb("{URL}", "{USER}", "{PASSWORD}").instances("{study}")))
    """)
    classes = sorted(i["sop_class"] for i in out)
    # the radiograph, one overlay per method, the segmentation and the SR (a CR has no frame of
    # reference, so no Parametric Map)
    # the SIIM radiograph is itself stored as Secondary Capture: 1 + 2 overlays
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 3, classes
    assert classes.count("1.2.840.10008.5.1.4.1.1.66.4") == 1, classes  # Segmentation
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1, classes  # Comprehensive 3D SR
    assert len(out) == 5, classes
