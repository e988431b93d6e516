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
from pathlib import Path

import pytest

USER, PASSWORD = "pellucid", "not-a-real-secret"
URL = "http://127.0.0.1:8042/dicom-web"


def _in_ns(ns: str, code: str, timeout: int = 300) -> dict:
    """Run Python ``code`` inside the namespace; it prints one JSON line as its last output."""
    # the environment as it is (an xdist worker's thread share among it): a CLI run here must
    # compute with the threads of the in-process runs it is compared with, bit for bit
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=timeout)
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
    sr = objects.structured_report(ct, objects.ReportedModel("m", "1", "0" * 64),
                                   [objects.Finding("Lesion", 0.7, present=True)], {{"gradcam": {{}}}},
                                   pm, seg)
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
             objects.structured_report(ct, objects.ReportedModel("m", "1", "0" * 64),
                                       [objects.Finding("Lesion", 0.6, present=True)],
                                       {{"occlusion": {{}}}})]
    status = c_store([ct[0]] + again, "127.0.0.1", 4242)
    pacs = DicomWeb("{URL}", "{USER}", "{PASSWORD}")
    found = {{i["sop_instance"] for i in pacs.instances(str(ct[0].StudyInstanceUID))}}
    print(json.dumps({{"status": status, "ok": all(str(d.SOPInstanceUID) in found for d in again)}}))
    """)
    assert out["status"] == [0] * 5 and out["ok"]


def test_the_pacs_tutorial_runs_as_written(orthanc, shared_data, chest_model, tmp_path):
    """docs/tutorial-pacs.md's commands, as one bash script in the PACS's namespace: a radiograph
    uploaded, its study found by QIDO-RS, pulled, explained and the results pushed back."""
    import re

    cr = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    shutil.copyfile(cr, tmp_path / "chest.dcm")
    (tmp_path / "pacs-password.txt").write_text(PASSWORD + "\n")
    (tmp_path / "demo_out" / "models").mkdir(parents=True)
    (tmp_path / "demo_out" / "models" / "chest-resnet18").symlink_to(chest_model.source)
    page = (Path(__file__).resolve().parents[1] / "docs" / "tutorial-pacs.md").read_text()
    script = "set -euo pipefail\n" + "".join(re.findall(r"```bash\n(.*?)```", page, flags=re.S))
    assert "pellucid explain" in script and f"PELLUCID_PACS_USER={USER}" in script
    bin_dir = Path(sys.executable).parent  # `pellucid` and `python3` of this environment
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("PELLUCID_PACS_PASSWORD", None)
    result = subprocess.run(["ip", "netns", "exec", orthanc, "bash", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    import pydicom

    source = pydicom.dcmread(cr, stop_before_pixels=True)
    for key in ("PatientName", "PatientID", "ReferringPhysicianName", "PatientBirthDate"):
        value = str(source.get(key, "") or "")
        if len(value) >= 3:  # nothing from the DICOM header reaches the console
            assert value not in result.stdout + result.stderr, key
    assert PASSWORD not in result.stdout + result.stderr
    # the page's last command: the study's SOP classes with their counts
    counts = {line.split()[1]: int(line.split()[0]) for line in result.stdout.splitlines()
              if re.fullmatch(r"\s*\d+ [\d.]+", line)}
    study = str(source.StudyInstanceUID)
    out = _in_ns(orthanc, f"""
        import json
        from pellucid.pacs import DicomWeb
        print(json.dumps(DicomWeb("{URL}", "{USER}", "{PASSWORD}").instances("{study}")))
    """)
    classes = sorted(i["sop_class"] for i in out)
    assert counts == {c: classes.count(c) for c in set(classes)}, (counts, classes)
    # the radiograph, one overlay per method, the segmentation and the SR (a CR has no frame of
    # reference, so no Parametric Map); the SIIM radiograph is itself stored as Secondary Capture
    assert classes.count("1.2.840.10008.5.1.4.1.1.7") == 3, classes
    assert classes.count("1.2.840.10008.5.1.4.1.1.66.4") == 1, classes  # Segmentation
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1, classes  # Comprehensive 3D SR
    assert len(out) == 5, classes
    assert (tmp_path / "round_trip").is_dir()


# ------------------------------------------------ --pacs honours every option of `pellucid explain`

def _zoo(folder, arch, task, classes, channels=1, size=64, activation="sigmoid", names=()):
    """A randomly initialised 2D model saved as a zoo folder (what is tested is the plumbing)."""
    import torch

    from pellucid.models import ModelCard, build, save_model

    torch.manual_seed(0)
    built = build(arch, 2, channels, len(classes))
    card = ModelCard(arch=arch, task=task, class_names=list(classes), in_channels=channels,
                     spatial_dims=2, input_size=[size, size], activation=activation,
                     channel_names=list(names), default_layer=built.default_layer,
                     backend=built.backend)
    return save_model(folder, built.module, card)


def _cases(tmp_path, chest_model, ct_file):
    """(name, model arguments, option arguments, map file stem) for every option of `explain`;
    the first run of each model is its baseline."""
    import numpy as np
    import torch

    from pellucid.models import load_model
    from pellucid.pipeline import CaseOptions, read_case
    from pellucid.targets import SegmentationErrorTarget

    seg = _zoo(tmp_path / "seg", "unet", "segmentation", ["WT"])
    reg = _zoo(tmp_path / "reg", "resnet18", "regression", ["OS"], channels=2, activation="identity",
               names=("T1", "T2"))
    weights = tmp_path / "factory" / "weights.pt"
    weights.parent.mkdir()
    from tests.factories import tiny_resnet

    torch.manual_seed(1)
    torch.save(tiny_resnet().state_dict(), weights)
    card = load_model(chest_model.source).card
    import dataclasses

    dataclasses.replace(card, class_names=["A", "B"], input_size=[64, 64], finding_codes={},
                        default_layer="layer4").save(weights.parent / "card.json")
    # a ground truth for the error regions: a square; fp or fn, whichever the model makes
    loaded = load_model(seg)
    case = read_case(loaded, ct_file, CaseOptions(["saliency"]))
    truth = np.zeros((64, 64), np.uint8)
    truth[16:40, 16:40] = 1
    np.save(tmp_path / "truth.npy", truth)
    with torch.no_grad():
        out = loaded.module(case.x)
    kind = "fp" if SegmentationErrorTarget(torch.from_numpy(truth > 0), 0, "fp").bind(out).region.any() \
        else "fn"
    # the chest model is for radiographs: explaining the CT slice is an override, recorded
    chest, methods = [chest_model.source, "--outside-intended-use"], ["--method", "gradcam,saliency"]
    return [
        ("chest", ["--model", *chest], methods),
        ("target", ["--model", *chest], [*methods, "--target", card.class_names[1]]),
        ("layer", ["--model", *chest], [*methods, "--layer", "layer3"]),
        ("precision", ["--model", *chest], [*methods, "--precision", "bf16"]),
        ("seg", ["--model", str(seg)], ["--method", "saliency"]),
        ("region", ["--model", str(seg)], ["--method", "saliency", "--region", "all"]),
        ("truth", ["--model", str(seg)], ["--method", "saliency", "--region", kind, "--truth",
                                          str(tmp_path / "truth.npy")]),
        ("window", ["--model", str(seg)], ["--method", "saliency", "--sliding-window", "32,32"]),
        ("overlap", ["--model", str(seg)], ["--method", "saliency", "--sliding-window", "32,32",
                                            "--overlap", "0.6"]),
        ("reg", ["--model", str(reg)], ["--method", "saliency"]),
        ("reference", ["--model", str(reg)], ["--method", "saliency", "--reference", "30"]),
        ("modalities", ["--model", str(reg)], ["--method", "saliency", "--modalities"]),
        ("weights", ["--model", "tests.factories:tiny_resnet", "--weights", str(weights),
                     "--outside-intended-use"],
         ["--method", "gradcam,saliency"]),
    ]


@pytest.fixture()
def precision_restored(monkeypatch):
    """``--precision`` run in this process sets it for the process: put fp32 back afterwards."""
    from pellucid.runtime import set_precision

    monkeypatch.setenv("PELLUCID_PRECISION", "fp32")  # recorded, so the teardown restores it
    yield
    set_precision(None)


def test_pacs_honours_every_explain_option(orthanc, shared_data, chest_model, tmp_path,
                                           precision_restored):
    """Each option of ``pellucid explain`` run on a PACS study gives the same maps and summary as the
    same option on the file, and differs from the run without it (so neither path ignores it)."""
    import numpy as np

    from pellucid.cli import main

    ct_file = tmp_path / "ct.dcm"
    study = _in_ns(orthanc, f"""
        import json, pydicom
        from pydicom.uid import generate_uid
        from pellucid.pacs import DicomWeb
        ds = pydicom.dcmread("{shared_data / 'dicom-samples' / 'pydicom' / 'CT_small.dcm'}")
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, key, generate_uid())
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as("{ct_file}")
        DicomWeb("{URL}", "{USER}", "{PASSWORD}").store([ds])
        print(json.dumps({{"study": str(ds.StudyInstanceUID), "sop": str(ds.SOPInstanceUID)}}))
    """)
    cases = _cases(tmp_path, chest_model, ct_file)
    runs = [[*model, *opts, "--out", str(tmp_path / "pacs" / name), "--pacs", URL, "--study",
             study["study"]] for name, model, opts in cases]
    done = _in_ns(orthanc, f"""
        import contextlib, io, json, os, sys
        os.environ.update(PELLUCID_PACS_USER="{USER}", PELLUCID_PACS_PASSWORD="{PASSWORD}")
        sys.path.insert(0, "{Path(__file__).resolve().parents[1]}")
        from pellucid.cli import main
        codes = []
        for args in {runs!r}:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    main(["explain", *args])
                codes.append("ok")
            except SystemExit as exc:
                codes.append(f"exit {{exc.code}}: {{err.getvalue()[-300:]}}")
        print(json.dumps({{"codes": codes}}))
    """, timeout=900)
    failed = [(c[0], code) for c, code in zip(cases, done["codes"], strict=True) if code != "ok"]
    assert failed == []
    baseline = {}
    for name, model, opts in cases:
        main(["explain", *model, *opts, "--out", str(tmp_path / "files" / name), "--input", str(ct_file)])
        pacs_rows = json.loads((tmp_path / "pacs" / name / "summary.json").read_text())
        file_rows = json.loads((tmp_path / "files" / name / "summary.json").read_text())
        assert len(pacs_rows) == 1 and pacs_rows[0]["uid"] == study["sop"], name
        pacs_row, file_row = pacs_rows[0], file_rows[0]
        for key in ("prediction", "explained", "modality_importance"):
            assert pacs_row.get(key) == file_row.get(key), (name, key)
        # the probabilities to float rounding: on one thread per xdist worker the two paths
        # differed by 1.2e-7 (0.50672358 against 0.50672370), as maps may within atol below
        classes = pacs_row.get("classes") or {}
        assert classes.keys() == (file_row.get("classes") or {}).keys(), name
        for cls, p in classes.items():
            assert p == pytest.approx(file_row["classes"][cls], rel=1e-5, abs=1e-6), (name, cls)
        maps = {}
        for method, entry in pacs_row["methods"].items():
            assert entry["target"] == file_row["methods"][method]["target"], (name, method)
            assert entry["layer"] == file_row["methods"][method]["layer"], (name, method)
            got = np.load(tmp_path / "pacs" / name / entry["map"])
            want = np.load(tmp_path / "files" / name / file_row["methods"][method]["map"])
            assert np.allclose(got, want, atol=1e-6), (name, method)
            maps[method] = got
        assert pacs_row["dicom_objects"], name  # and the objects went back to the study
        assert pacs_row["intended_use"]["override"] == ("--outside-intended-use" in model), name
        family = {"chest": "chest", "seg": "seg", "reg": "reg", "weights": None}.get(name)
        if family is not None or name == "weights":
            baseline[name] = (pacs_row, maps)
            continue
        base_name = {"target": "chest", "layer": "chest", "precision": "chest", "region": "seg",
                     "truth": "seg", "window": "seg", "overlap": "window", "reference": "reg",
                     "modalities": "reg"}[name]
        base_row, base_maps = baseline[base_name]
        if name == "reference":  # a gradient does not move with the reference; the target does
            assert pacs_row["methods"]["saliency"]["target"]["reference"] == 30.0
            assert base_row["methods"]["saliency"]["target"]["reference"] == 0.0
        elif name == "modalities":
            shap = pacs_row["modality_importance"]["shapley"]
            assert set(shap) == {"T1", "T2"} and "modality_importance" not in base_row
            assert sum(shap.values()) == pytest.approx(pacs_row["modality_importance"]["f_all"]
                                                       - pacs_row["modality_importance"]["f_none"],
                                                       abs=1e-4)
        elif name == "target":
            assert pacs_row["explained"]["index"] == 1
            assert not np.allclose(maps["saliency"], base_maps["saliency"])
        elif name == "layer":
            assert pacs_row["methods"]["gradcam"]["layer"] == "layer3"
            assert not np.allclose(maps["gradcam"], base_maps["gradcam"])
        else:
            method = next(iter(maps))
            assert not np.allclose(maps[method], base_maps[method]), name
        if name == "window":
            baseline["window"] = (pacs_row, maps)
    # the factory's weights and card were used: its two classes, not the chest model's
    assert set(baseline["weights"][0]["classes"]) == {"A", "B"}


def test_pacs_refuses_options_it_cannot_honour(tmp_path, capsys):
    from pellucid.cli import main

    for args, line in (
            (["--input", "x.dcm", "--pacs", URL, "--study", "1.2"], "not both"),
            (["--pacs", URL], "--pacs needs --study"),
            (["--study", "1.2", "--input", "x.dcm"], "--study goes with --pacs"),
            (["--pacs", URL, "--study", "1.2", "--truth", "m.npy"], "--truth is the ground truth"),
            (["--pacs", URL, "--study", "1.2", "--overlap", "0.5"], "--overlap goes with"),
            (["--pacs", URL, "--study", "1.2", "--region", "fp"], "--region fp needs --truth")):
        with pytest.raises(SystemExit) as exc:
            main(["explain", "--model", "nowhere", "--out", str(tmp_path / "o"), *args])
        assert exc.value.code == 2
        assert line in capsys.readouterr().err, args


def test_a_jpeg2000_study_is_pulled_explained_and_a_rerun_adds_nothing(orthanc, shared_data,
                                                                      chest_model, tmp_path):
    """A chest CR stored as JPEG 2000 (which Orthanc cannot transcode) is pulled as stored and
    decoded here; running the same model and methods again stores the same instances (the UIDs
    derive from source, model weights, method and object), so the study does not grow."""
    cr = shared_data / "dicom-samples" / "pydicom_data" / "RG1_J2KI.dcm"
    out = _in_ns(orthanc, f"""
        import json, pydicom
        from pydicom.uid import generate_uid
        from pellucid.pacs import DicomWeb
        ds = pydicom.dcmread("{cr}")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Zyxwvut^Qponmlk", "PID-778899", "ACC-5566"
        DicomWeb("{URL}", "{USER}", "{PASSWORD}").store([ds])
        print(json.dumps({{"study": str(ds.StudyInstanceUID),
                          "syntax": str(ds.file_meta.TransferSyntaxUID)}}))
    """)
    assert out["syntax"].startswith("1.2.840.10008.1.2.4.9")  # JPEG 2000
    env = dict(os.environ, PELLUCID_PACS_USER=USER, PELLUCID_PACS_PASSWORD=PASSWORD)
    counts = []
    for run in range(2):
        cmd = ["ip", "netns", "exec", orthanc, sys.executable, "-m", "pellucid.cli", "explain",
               "--pacs", URL, "--study", out["study"], "--model", chest_model.source, "--method",
               "gradcam,saliency", "--out", str(tmp_path / f"run{run}"),
               "--outside-intended-use"]  # a phantom model and a patient's radiograph
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        # no patient data in the console, the file names or any output but the DICOM objects
        readable = [p.name for p in (tmp_path / f"run{run}").iterdir()] + [
            p.read_text(errors="replace") for p in (tmp_path / f"run{run}").iterdir()
            if p.suffix in (".json", ".txt")]
        for value in ("Zyxwvut", "Qponmlk", "PID-778899", "ACC-5566"):
            assert value not in result.stdout + result.stderr + " ".join(readable), value
        summary = json.loads((tmp_path / f"run{run}" / "summary.json").read_text())
        assert len(summary) == 1 and summary[0]["dicom_objects"], summary
        printed = json.loads(result.stdout)  # stdout is one JSON document, unwrapped
        assert [e["uid"] for e in printed["explained"]] == [summary[0]["uid"]]
        assert printed["explained"][0]["findings"].startswith("INPUT UNLIKE THE TRAINING DATA")
        assert summary[0]["findings"] == [] and summary[0]["training_data"]["unlike_training_data"]
        listed = _in_ns(orthanc, f"""
            import json
            from pellucid.pacs import DicomWeb
            print(json.dumps(DicomWeb("{URL}", "{USER}", "{PASSWORD}").instances("{out['study']}")))
        """)
        counts.append(sorted(i["sop_instance"] for i in listed))
    assert len(counts[0]) == 1 + 2 + 2  # the CR, two overlays, SEG and SR (no frame of reference: no PM)
    assert counts[1] == counts[0]  # the re-run stored the same instances again: nothing new
    series = [i["series"] for i in listed]
    assert len(set(series)) == len(series)  # every object its own series


def test_a_ct_series_is_explained_as_a_volume_by_a_3d_model(orthanc, shared_data, tmp_path):
    """A 3D model on a PACS study: the series' slices (stored out of order) are one case; the
    Parametric Map and Segmentation have one frame per slice and go back into the study with the SR."""
    import copy

    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    from pellucid.models import ModelCard, build, save_model

    ct = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    normal = np.cross(*np.reshape(np.asarray(ct.ImageOrientationPatient, float), (2, 3)))
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for k in (2, 0, 3, 1):
        ds = copy.deepcopy(ct)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ct.ImagePositionPatient, float)
                                   + 2.5 * k * normal]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"{k}.dcm")
    import torch

    torch.manual_seed(0)
    built = build("unet", 3, 1, 1)
    card = ModelCard(arch="unet", task="segmentation", class_names=["lesion"], in_channels=1,
                     spatial_dims=3, input_size=[16, 32, 32], default_layer=built.default_layer)
    model = save_model(tmp_path / "unet3d", built.module, card)
    _in_ns(orthanc, f"""
        import json, pydicom
        from pathlib import Path
        from pellucid.pacs import DicomWeb
        DicomWeb("{URL}", "{USER}", "{PASSWORD}").store(
            [pydicom.dcmread(p) for p in sorted(Path("{folder}").glob("*.dcm"))])
        print(json.dumps({{"ok": True}}))
    """)
    env = dict(os.environ, PELLUCID_PACS_USER=USER, PELLUCID_PACS_PASSWORD=PASSWORD)
    cmd = ["ip", "netns", "exec", orthanc, sys.executable, "-m", "pellucid.cli", "explain",
           "--pacs", URL, "--study", study, "--model", str(model), "--method", "saliency",
           "--region", "all", "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["uid"] for r in rows] == [series]  # one case: the series
    flagged = [f"{series}_key_objects.dcm"] if any(f["present"] for f in rows[0]["findings"]) else []
    assert rows[0]["dicom_objects"] == [f"{series}_parametric_map.dcm", f"{series}_segmentation.dcm",
                                        f"{series}_report_sr.dcm", *flagged]
    pm = pydicom.dcmread(tmp_path / "out" / f"{series}_parametric_map.dcm")
    assert int(pm.NumberOfFrames) == 4 and (int(pm.Rows), int(pm.Columns)) == (128, 128)
    listed = _in_ns(orthanc, f"""
        import json
        from pellucid.pacs import DicomWeb
        print(json.dumps(DicomWeb("{URL}", "{USER}", "{PASSWORD}").instances("{study}")))
    """)
    classes = sorted(i["sop_class"] for i in listed)
    assert classes.count("1.2.840.10008.5.1.4.1.1.2") == 4  # the CT slices
    assert {"1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4",
            "1.2.840.10008.5.1.4.1.1.88.34"} <= set(classes)  # PM, SEG, SR
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.59") == len(flagged)  # the KOS
