"""The command line end to end: train, layers, methods, explain (2D PNG and a 3D BraTS case)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pellucid.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pellucid.cli", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def unet3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "unet3d"
    run("train", "--arch", "unet", "--data", "phantom-brain-3d", "--size", "32", "--n-train", "8",
        "--epochs", "1", "--batch-size", "4", "--out", str(out))
    return out


def test_explain_png_writes_overlays_maps_and_summary(chest_model, tmp_path, shared_data):
    src = shared_data / "chestxray14-sample" / "images" / "00000075_000.png"
    phantom = tmp_path / "phantom.png"
    from pellucid.data import ChestPhantom

    Image.fromarray((ChestPhantom(1, 128, seed=8)[0]["image"][0].numpy() * 255).astype(np.uint8)
                    ).save(phantom)
    out = tmp_path / "exp"
    # the phantom model refuses the real radiograph unless overridden (tests/test_training_inputs.py)
    main(["explain", "--model", chest_model.source, "--method", "gradcam,scorecam", "--input",
          str(src), "--input", str(phantom), "--out", str(out), "--target", "Nodule",
          "--outside-intended-use"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2
    real, made = summary
    assert real["training_data"]["unlike_training_data"] and real["findings"] == []
    assert not made["training_data"]["unlike_training_data"] and len(made["findings"]) == 3
    for row in summary:
        assert row["explained"]["class"] == "Nodule"
        top = max(row["classes"], key=row["classes"].get)
        assert row["prediction"]["class"] == top and row["prediction"]["text"].startswith(top)
        assert set(row["methods"]) == {"gradcam", "scorecam"}
    raw = np.load(out / "00000075_000_gradcam.npy")
    assert raw.shape == (256, 256)  # back at the source resolution
    assert raw.min() >= 0 and raw.max() <= 1
    for name in ("00000075_000_gradcam.png", "phantom_scorecam.png", "grid.png"):
        assert (out / name).stat().st_size > 10_000


def test_explain_brats_case_writes_nifti_with_source_affine(unet3d, shared_data, tmp_path):
    case = shared_data / "brats-format-samples" / "TCGA-DU-7294"
    out = tmp_path / "exp3d"
    main(["explain", "--model", str(unet3d), "--method", "gradcam", "--input", str(case),
          "--out", str(out), "--target", "WT", "--region", "all",
          "--outside-intended-use"])  # a phantom model: it refuses the real volume otherwise
    written = nib.load(str(out / "TCGA-DU-7294_gradcam.nii.gz"))
    source = nib.load(str(case / "TCGA-DU-7294_fla_bet.nii.gz"))
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine)
    assert np.isfinite(np.asarray(written.dataobj)).all()


def test_layers_and_methods_listings(unet3d, capsys):
    main(["layers", str(unet3d)])  # in this process: the same commands, no interpreter start-up
    layers = capsys.readouterr().out
    assert "model.1.submodule.2" in layers and "default: model.1.submodule.2" in layers
    main(["methods"])
    methods = capsys.readouterr().out
    for name in ("gradcam", "scorecam", "ablationcam", "eigencam"):
        assert name in methods
    main(["info", str(unet3d)])
    card = json.loads(capsys.readouterr().out)
    assert card["task"] == "segmentation" and card["spatial_dims"] == 3


def test_explain_unknown_method_is_one_line(unet3d, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["explain", "--model", str(unet3d), "--method", "gradcam,nope", "--input", "x.png"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nope'" in err[0]


def test_explain_dicom_radiographs_keeps_dotted_names(chest_model, shared_data, tmp_path):
    siim = next((shared_data / "dicom-samples" / "torchxrayvision").glob("siim_*.dcm"))
    j2k = shared_data / "dicom-samples" / "pydicom_data" / "RG1_J2KI.dcm"  # JPEG 2000 coded
    out = tmp_path / "dcm"
    main(["explain", "--model", chest_model.source, "--method", "gradcam", "--input", str(siim),
          "--input", str(j2k), "--out", str(out), "--outside-intended-use"])  # a phantom model
    assert (out / f"{siim.name[:-4]}_gradcam.npy").is_file()
    raw = np.load(out / "RG1_J2KI_gradcam.npy")
    import pydicom

    assert raw.shape == pydicom.dcmread(j2k).pixel_array.shape[-2:]


def test_an_input_outside_the_intended_use_is_refused_in_one_line(chest_model, shared_data, tmp_path,
                                                                   capsys):
    ct = shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm"
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", chest_model.source, "--input", str(ct), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "outside the model's intended use: modality CT" in err
    assert not list(tmp_path.iterdir())  # nothing written
    main(["explain", "--model", chest_model.source, "--input", str(ct), "--out", str(tmp_path),
          "--outside-intended-use"])
    row = json.loads((tmp_path / "summary.json").read_text())[0]
    assert row["intended_use"]["override"] and "modality CT" in row["intended_use"]["outside"][0]


def test_without_a_model_card_no_probability_or_finding_is_claimed(tmp_path):
    """A bare module:factory has no card, so no activation and no operating point: the summary
    reports raw outputs and calls no class present or absent."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    main(["explain", "--model", "tests.factories:tiny_resnet", "--input", str(tmp_path / "x.npy"),
          "--method", "saliency", "--out", str(tmp_path / "o")])
    row = json.loads((tmp_path / "o" / "summary.json").read_text())[0]
    assert "probability" not in row["prediction"] and "logit" in row["prediction"]
    assert "no model card" in row["prediction"]["text"]
    assert [f["present"] for f in row["findings"]] == [None, None]


def _commands(group, prefix=()):
    """Every command path of the click group behind the typer app."""
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        if hasattr(command, "commands"):
            yield from _commands(command, path)
        else:
            yield path, command


def test_every_command_line_mistake_is_one_line(capsys):
    """For every subcommand: an unknown option, a misspelt one and a misspelt command each print
    one `error:` line with the usage (and the closest valid spelling where there is one) and exit
    with status 2; never a traceback."""
    import typer.main

    from pellucid import cli

    group = typer.main.get_command(cli.app)
    swept = 0
    for path, command in _commands(group):
        options = [o for p in command.params for o in p.opts if o.startswith("--") and len(o) > 5]
        tries = [[*path, "--no-such-option-at-all"]]
        if options:
            wrong = options[0][:-1] + options[0][-1] * 2  # one letter doubled at the end
            tries.append([*path, wrong])
        for argv in tries:
            with pytest.raises(SystemExit) as stop:
                cli.main(argv)
            err = capsys.readouterr().err.strip()
            assert stop.value.code == 2, (argv, err)
            assert len(err.splitlines()) == 1 and err.startswith("error: "), (argv, err)
            assert f"Usage: pellucid {' '.join(path)}" in err, (argv, err)
            if argv[-1] != "--no-such-option-at-all":
                assert f"Did you mean {options[0]}" in err, (argv, err)
        swept += 1
    assert swept >= 15
    with pytest.raises(SystemExit) as stop:
        cli.main(["explian"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "Did you mean 'explain'?" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        cli.main(["review", "craete"])
    assert "Did you mean 'create'?" in capsys.readouterr().err


def test_every_help_page_renders_its_text_as_written(capsys):
    """Rich turns ``:name:`` into an emoji ("module:factory: ..." became "module" and a factory
    emoji); no help page may hold one, and every page names module:factory as written."""
    import contextlib

    import typer.main

    from pellucid import cli

    group = typer.main.get_command(cli.app)
    for path, _command in [((), group), *_commands(group)]:
        with contextlib.suppress(SystemExit):
            cli.main([*path, "--help"])
        text = capsys.readouterr().out
        emoji = [ch for ch in text if ord(ch) >= 0x1F000 or 0x2600 <= ord(ch) < 0x2800]
        assert not emoji, (path, emoji)
    with contextlib.suppress(SystemExit):
        cli.main(["import-model", "--help"])
    assert "module:factory" in capsys.readouterr().out


def test_explain_dicom_input_writes_the_dicom_objects_with_dicom(chest_model, shared_data,
                                                                 tmp_path, capsys):
    """``--dicom``: the objects ``--pacs`` stores, written beside the maps (the SR parsed back by
    highdicom); the same command again writes the same instances (UIDs from the content)."""
    import highdicom as hd
    import pydicom

    from tests.factories import phantom_dicom

    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    cr = phantom_dicom(real, tmp_path / "cr.dcm", seed=3)
    uids = []
    for run in ("a", "b"):
        main(["explain", "--model", chest_model.source, "--method", "gradcam,saliency", "--input",
              str(cr), "--out", str(tmp_path / run), "--dicom"])
        row = json.loads((tmp_path / run / "summary.json").read_text())[0]
        flagged = ["cr_key_objects.dcm"] if any(f["present"] for f in row["findings"]) else []
        assert sorted(row["dicom_objects"]) == sorted(["cr_report_sr.dcm", "cr_segmentation.dcm",
                                                       *flagged]), row
        files = row["dicom_objects"] + [row["methods"][m]["dicom"] for m in ("gradcam", "saliency")]
        uids.append(sorted(str(pydicom.dcmread(tmp_path / run / f).SOPInstanceUID) for f in files))
    sr = hd.sr.srread(tmp_path / "a" / "cr_report_sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    seg = hd.seg.segread(tmp_path / "a" / "cr_segmentation.dcm")  # highdicom reads it back
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 1
    assert uids[0] == uids[1]
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", chest_model.source, "--pacs", "http://127.0.0.1:1",
              "--study", "1.2", "--dicom", "--out", str(tmp_path / "c")])
    assert exc.value.code == 2 and "--dicom goes with --input" in capsys.readouterr().err
    # --dicom on a file that is not DICOM: said in the record, not silently left out
    from PIL import Image

    from pellucid.data import ChestPhantom

    image = ChestPhantom(1, 128, seed=5)[0]["image"][0].numpy()
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "phantom.png")
    main(["explain", "--model", chest_model.source, "--input", str(tmp_path / "phantom.png"),
          "--out", str(tmp_path / "png"), "--dicom"])
    row = json.loads((tmp_path / "png" / "summary.json").read_text())[0]
    assert row["dicom_objects"] == [] and {"object": "DICOM objects",
                                           "reason": "--dicom: the input is not DICOM"} in row["skipped"]
    capsys.readouterr()
    # a Segmentation or an SR is never explained as if it were an image, override or not
    for name, what in (("cr_segmentation.dcm", "a Segmentation (Modality SEG)"),
                       ("cr_report_sr.dcm", "has no pixel data")):
        with pytest.raises(SystemExit) as exc:
            main(["explain", "--model", chest_model.source, "--input", str(tmp_path / "a" / name),
                  "--out", str(tmp_path / "d"), "--outside-intended-use"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, err


@pytest.mark.parametrize(("argv", "env", "expected"), [
    ([], None, "torch"),  # the demo's default: its small models ran fastest in torch
    ([], "auto", "auto"),  # $PELLUCID_BACKEND is kept
    (["--backend", "onnxruntime"], "auto", "onnxruntime"),  # the option wins
])
def test_the_demo_runs_in_torch_unless_told(monkeypatch, tmp_path, argv, env, expected):
    import pellucid.demo
    from pellucid.inference import set_backend
    from pellucid.inference.settings import backend_setting

    seen = []
    monkeypatch.setattr(pellucid.demo, "run_demo", lambda *a, **k: seen.append(backend_setting()))
    if env is None:
        monkeypatch.delenv("PELLUCID_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PELLUCID_BACKEND", env)
    try:
        main(["demo", "--out", str(tmp_path / "out"), *argv])
    finally:
        set_backend(None)
    assert seen == [expected]


def test_a_fractional_segmentation_holds_the_scaled_map(chest_model, shared_data, tmp_path, capsys):
    """``--segmentation fractional``: the SEG of the first method is FRACTIONAL, its values the map
    scaled to [0, 1] (8 bits: within 1/255), and it says the value is not a probability; it and
    the SR that references it are other instances than the binary run's (other content)."""
    import highdicom as hd
    import pydicom

    from tests.factories import phantom_dicom

    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    cr = phantom_dicom(real, tmp_path / "cr.dcm", seed=3)
    for kind in ("binary", "fractional"):
        main(["explain", "--model", chest_model.source, "--method", "gradcam", "--input", str(cr),
              "--out", str(tmp_path / kind), "--dicom", "--segmentation", kind])
    seg = hd.seg.segread(tmp_path / "fractional" / "cr_segmentation.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
    assert "not a probability" in seg.SegmentSequence[0].SegmentDescription
    heat = np.load(tmp_path / "fractional" / "cr_gradcam.npy")
    scaled = (heat - heat.min()) / (heat.max() - heat.min())
    stored = seg.get_segment_mask(1, rescale_fractional=True) if hasattr(seg, "get_segment_mask") \
        else seg.pixel_array.astype(np.float32) / float(seg.MaximumFractionalValue)
    np.testing.assert_allclose(np.squeeze(stored), scaled, atol=1 / 255 + 1e-6)
    binary = hd.seg.segread(tmp_path / "binary" / "cr_segmentation.dcm")
    assert binary.SegmentationType == "BINARY"
    for name in ("cr_segmentation.dcm", "cr_report_sr.dcm"):
        a, b = (pydicom.dcmread(tmp_path / k / name).SOPInstanceUID for k in ("binary", "fractional"))
        assert a != b, name
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", chest_model.source, "--input", str(cr), "--out",
              str(tmp_path / "x"), "--segmentation", "soft"])
    assert exc.value.code == 2
    assert "--segmentation must be binary or fractional, got 'soft'" in capsys.readouterr().err
