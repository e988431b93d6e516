"""MONAI bundles as the bundle runs them (pellucid.models.bundle), on a bundle laid out by MONAI's
own ``init_bundle`` and trained here (tests/monai_bundle.py): the probabilities through pellucid
equal those the bundle's own inference workflow (``monai.bundle.ConfigWorkflow``, its evaluator,
sliding window, softmax, ``Invertd`` and ``SaveImaged``) writes; a map of the predicted lesion is a
NIfTI on the file's voxels with its affine and peaks inside the lesion; ``pellucid bench`` runs the
bundle end to end on a CSV of volumes to a report; what cannot be honoured is refused in one line."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pellucid.errors import PellucidError
from tests.framework_bench import framework_bench
from tests.nnunet_results import _write, sphere_case


@pytest.fixture(scope="module")
def bundle_folder():
    from tests.conftest import shared_model
    from tests.monai_bundle import NAME, make

    return shared_model("monai_bundle", make) / NAME


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A volume larger than the bundle's window on its grid (34 x 30 x 26 against 24 x 24 x 16)."""
    image, label, centre = sphere_case(7, shape=(26, 44, 50))
    folder = tmp_path_factory.mktemp("bundle-case")
    _write(image, folder / "case.nii.gz")
    return folder / "case.nii.gz", label, centre


def test_probabilities_equal_the_bundles_own_inference_workflow(bundle_folder, case, tmp_path):
    from monai.bundle import ConfigWorkflow

    from pellucid.models import load_model

    path = case[0]
    out = tmp_path / "eval"
    workflow = ConfigWorkflow(
        config_file=str(bundle_folder / "configs" / "inference.json"),
        meta_file=str(bundle_folder / "configs" / "metadata.json"), workflow_type="infer",
        logging_file=False, bundle_root=str(bundle_folder), dataset_dir=str(path.parent),
        output_dir=str(out))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = nib.load(out / "case_prob.nii.gz")
    theirs = np.moveaxis(np.asarray(written.dataobj, dtype=np.float32), -1, 0)  # (K, x, y, z)
    source = nib.load(path)
    assert theirs.shape[1:] == source.shape and np.allclose(written.affine, source.affine)

    loaded = load_model(bundle_folder)
    card = loaded.card
    assert (card.task, card.activation, card.class_names) == ("segmentation", "softmax",
                                                              ["background", "lesion"])
    settings = card.training["monai_bundle"]
    assert settings["activation_source"] == "postprocessing: Activationsd(softmax=True)"
    assert settings["inferer"]["kind"] == "SlidingWindowInferer"
    assert settings["inferer"]["roi_size"] == [24, 24, 16]
    assert settings["preprocessing"][:4] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd",
                                             "Spacingd"]
    x, context = loaded.framework.read(path)
    assert all(s > r for s, r in zip(x.shape[2:], (24, 24, 16), strict=True))  # several windows
    with torch.no_grad():
        logits = loaded.module(x)
    ours = loaded.framework.to_source(torch.softmax(logits, 1)[0], context).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4
    assert (theirs.argmax(0) == 1).sum() > 0  # the lesion is found


def test_the_map_of_the_predicted_lesion_lands_on_it_in_the_files_voxels(bundle_folder, case, tmp_path):
    """``pellucid explain --model <bundle>`` on a NIfTI file: the answer is the bundle's (voxels of
    its arg-max on the file), and the map is a NIfTI with the input's affine whose peak is in the
    planted lesion."""
    from pellucid.cli import main
    from pellucid.models import load_model

    path, label, _ = case
    # integrated gradients: the gradient's magnitude alone (saliency) peaks on the sphere's rim
    main(["explain", "--model", str(bundle_folder), "--method", "integratedgradients", "--input",
          str(path),
          "--out", str(tmp_path), "--target", "lesion"])
    record = json.loads((tmp_path / "summary.json").read_text())[0]
    loaded = load_model(bundle_folder)
    x, context = loaded.framework.read(path)
    with torch.no_grad():
        probabilities = loaded.framework.to_source(torch.softmax(loaded.module(x), 1)[0], context)
    assert record["prediction"]["voxels"] == int((probabilities.argmax(0) == 1).sum()) > 0
    written, source = nib.load(tmp_path / "case_integratedgradients.nii.gz"), nib.load(path)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    peak = np.unravel_index(int(np.argmax(written.get_fdata())), written.shape)  # (x, y, z)
    assert label[peak[2], peak[1], peak[0]] == 1, peak  # the label is (z, y, x)


def test_bench_runs_a_bundle_end_to_end_to_a_report(bundle_folder, tmp_path):
    from pellucid.models import load_model

    frame = framework_bench(str(bundle_folder), tmp_path, ["saliency"],
                            ["pointing_game", "sparseness", "deletion"])
    assert set(frame["target"]) == {"lesion"} and frame["case_id"].nunique() == 3
    assert frame["value"].notna().all(), frame[frame["value"].isna()][["metric", "reason"]]
    # the benchmark's case is the bundle's: its scores are those of the bundle's preprocessing
    import pellucid
    from pellucid.pipeline.resolve import card_target

    loaded = load_model(bundle_folder)
    x, _ = loaded.framework.read(tmp_path / "data" / "c0_0000.nii.gz")
    e = pellucid.explain(loaded, x, "saliency", target=card_target(loaded.card, 1, "predicted"))
    ref = pellucid.evaluate(loaded, x, e, metrics=["deletion", "sparseness"])
    for metric in ("deletion", "sparseness"):
        row = frame[(frame["metric"] == metric) & (frame["method"] == "saliency") &
                    (frame["case_id"] == "data/c0_0000.nii.gz")].iloc[0]
        assert row["value"] == pytest.approx(ref[metric].scores[0].item(), rel=1e-4), metric
    assert (frame[frame["metric"] == "pointing_game"]["value"].isin([0.0, 1.0])).all()


def test_what_cannot_be_honoured_is_refused_in_one_line(bundle_folder, case, tmp_path):
    from pellucid.models import load_model
    from pellucid.models.bundle import MonaiBundle
    from pellucid.pipeline import CaseOptions, read_case

    loaded = load_model(bundle_folder)

    def refused(call, said: str) -> None:
        with pytest.raises(PellucidError) as exc:
            call()
        assert said in str(exc.value) and "\n" not in str(exc.value), str(exc.value)

    refused(lambda: read_case(loaded, case[0], CaseOptions(["saliency"], sliding_window=[24, 24, 16])),
            "runs its own sliding window")
    png = tmp_path / "slice.png"
    png.write_bytes(b"")
    refused(lambda: read_case(loaded, png, CaseOptions(["saliency"])), "read here from a NIfTI")
    image, _, _ = sphere_case(1, shape=(26, 40, 46))
    image[3, 4, 5] = np.nan
    _write(image, tmp_path / "nan.nii.gz")
    refused(lambda: read_case(loaded, tmp_path / "nan.nii.gz", CaseOptions(["saliency"])), "finite")

    def variant(name: str, edit) -> MonaiBundle:
        folder = tmp_path / name
        shutil.copytree(bundle_folder, folder)
        config = json.loads((folder / "configs" / "inference.json").read_text())
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        edit(config, meta)
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
        (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
        return folder

    def no_activation(config, meta):  # no Activationsd, and an output format that says nothing
        config["postprocessing"]["transforms"] = config["postprocessing"]["transforms"][1:]
        meta["network_data_format"]["outputs"]["pred"]["format"] = "segmentation"

    refused(lambda: MonaiBundle(variant("no_activation", no_activation)),
            "neither the postprocessing (Activationsd) nor the output format")

    def labels_format(config, meta):  # no Activationsd, format 'labels': one class per voxel
        config["postprocessing"]["transforms"] = config["postprocessing"]["transforms"][1:]

    bundle = MonaiBundle(variant("labels", labels_format))
    assert (bundle.activation, bundle.activation_source[:13]) == ("softmax", "metadata.json")

    def other_inferer(config, meta):
        config["inferer"] = {"_target_": "SliceInferer", "roi_size": [24, 24], "spatial_dim": 2}

    refused(lambda: MonaiBundle(variant("slices", other_inferer)), "inferer SliceInferer is not supported")

    def wrong_weights(config, meta):
        config["network_def"]["channels"] = [4, 8, 16]

    refused(lambda: MonaiBundle(variant("weights", wrong_weights)), "weights do not fit")
    (tmp_path / "weights" / "models" / "model.pt").unlink()
    refused(lambda: MonaiBundle(tmp_path / "weights"), "the bundle's weights are missing")


def test_import_model_copies_the_bundle_and_refuses_a_changed_copy(bundle_folder, case, tmp_path,
                                                                   capsys):
    """``pellucid import-model <bundle> --out F``: a model folder with the bundle's copy and a card
    the user completes; it predicts as the bundle does; a changed weights file or a card that
    contradicts the bundle is refused in one line, as is an option the bundle answers itself."""
    from pellucid.cli import main
    from pellucid.models import load_model
    from pellucid.models.card import ModelCard

    out = tmp_path / "imported"
    main(["import-model", str(bundle_folder), "--out", str(out), "--name", "Sphere finder",
          "--version", "2.0"])
    imported, direct = load_model(out), load_model(bundle_folder)
    assert (imported.card.name, imported.card.version) == ("Sphere finder", "2.0")
    assert imported.card.training["weights_sha256"].keys() == {"models/model.pt"}
    x, _ = imported.framework.read(case[0])
    with torch.no_grad():
        assert torch.equal(imported.module(x), direct.module(direct.framework.read(case[0])[0]))
    with pytest.raises(SystemExit):
        main(["import-model", str(bundle_folder), "--out", str(tmp_path / "other"), "--classes", "a,b"])
    said = capsys.readouterr().err.strip()
    assert "--classes: " in said and "is read as its framework runs it" in said and "\n" not in said
    broken = tmp_path / "broken"  # weights that do not fit: refused, and nothing half-imported
    shutil.copytree(bundle_folder, broken)
    config = json.loads((broken / "configs" / "inference.json").read_text())
    config["network_def"]["channels"] = [4, 8, 16]
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        main(["import-model", str(broken), "--out", str(tmp_path / "half")])
    assert "weights do not fit" in capsys.readouterr().err
    assert not (tmp_path / "half" / "bundle").exists()
    card = ModelCard.load(out / "card.json")
    card.class_names = ["background", "tumour"]
    card.save(out / "card.json")
    with pytest.raises(PellucidError, match=r"class_names .* differs from the monai_bundle model's own"):
        load_model(out)
    weights = out / "bundle" / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(PellucidError, match="differs from the SHA-256 the model card recorded"):
        load_model(out)


FRAMEWORK_BEGIN, FRAMEWORK_END = "<!-- framework-matrix:begin -->", "<!-- framework-matrix:end -->"


def _framework_cells(name: str, loaded, x: torch.Tensor) -> dict[str, str]:
    """Each family on a framework model, as the support matrix's cells: the gradient and the
    perturbation method equal to Captum on the same inference module (the framework's sliding
    window included), the others refused in one line, and why."""

    from captum.attr import Occlusion, Saliency

    import pellucid
    from pellucid.pipeline.resolve import card_target
    from tests import peers
    from tests.test_model_libraries import FAMILIES, _close

    target = card_target(loaded.card, 1, "all")

    def score(t: torch.Tensor) -> torch.Tensor:  # summed in float64, as pellucid sums a region
        # (in float32 the sum of 38,400 logits near -2 moves occlusion's differences by 1e-2)
        return loaded.module(t)[:, 1].double().flatten(1).sum(1)

    cells = {}
    for family, method in FAMILIES.items():
        if family == "gradient":
            ours = pellucid.explain(loaded, x, method, target=target)
            _close(ours.raw, Saliency(score).attribute(x, abs=True), name, method,
                   peers.peer("captum", "Saliency"))
            cells[family] = "= Captum (through the framework's inference)"
        elif family == "perturbation":
            # windows that tile the grid exactly (Captum leaves an uncovered remainder its own way)
            window = tuple(max(d for d in range(1, s // 2 + 1) if s % d == 0) for s in x.shape[2:])
            ours = pellucid.explain(loaded, x, method, target=target, window=window, stride=window)
            ref = Occlusion(score).attribute(x, sliding_window_shapes=(x.shape[1], *window),
                                             strides=(x.shape[1], *window), baselines=0.0)
            _close(ours.raw, ref, name, method, peers.peer("captum", "Occlusion"))
            cells[family] = "= Captum (through the framework's inference)"
        else:
            with pytest.raises(PellucidError) as caught:
                pellucid.explain(loaded, x, method, target=target)
            said = str(caught.value)
            assert "\n" not in said
            if family == "attention":
                assert "attention" in said, said
                cells[family] = "refused: no self-attention"
            else:
                assert "more than once" in said or "no layer runs once per forward pass" in said, said
                cells[family] = "refused: each layer runs once per window (and mirroring)"
    return cells


def test_framework_rows_of_the_support_matrix(bundle_folder, case):
    """The rows of docs/models.md's framework matrix, computed: an nnU-Net fold and the bundle."""
    import os

    from pellucid.models import load_model
    from tests.conftest import shared_model
    from tests.nnunet_results import DATASET
    from tests.nnunet_results import make as make_nnunet
    from tests.test_model_libraries import FAMILIES, ROOT

    nnunet = shared_model("nnunet", make_nnunet) / "nnUNet_results" / DATASET / \
        "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    rows = {}
    for name, library, folder in (("nnU-Net v2 results folder (fold 0, mirrored)", "nnunetv2", nnunet),
                                  ("MONAI bundle (sliding window)", "monai.bundle", bundle_folder)):
        loaded = load_model(folder)
        image, _, _ = sphere_case(3, shape=(24, 40, 40))
        path = case[0].parent / f"matrix_{library}_0000.nii.gz"
        _write(image, path)
        x, _ = loaded.framework.read(path)
        rows[name] = (library, _framework_cells(name, loaded, x))
    head = "| model | library | " + " | ".join(f"{f} (`{m}`)" for f, m in FAMILIES.items()) + " |"
    lines = [head, "|" + "---|" * (len(FAMILIES) + 2)]
    lines += [f"| {n} | {lib} | " + " | ".join(c[f] for f in FAMILIES) + " |"
              for n, (lib, c) in rows.items()]
    table = "\n".join(lines)
    doc_path = ROOT / "docs" / "models.md"
    doc = doc_path.read_text()
    start, stop = doc.index(FRAMEWORK_BEGIN) + len(FRAMEWORK_BEGIN), doc.index(FRAMEWORK_END)
    if os.environ.get("PELLUCID_WRITE_DOCS") == "1":
        doc_path.write_text(doc[:start] + "\n" + table + "\n" + doc[stop:])
    else:
        assert doc[start:stop].strip() == table, "docs/models.md's framework matrix differs from " \
                                                 "this test's results; rewrite it with PELLUCID_WRITE_DOCS=1"


def _ct_series(shared_data, image: np.ndarray, folder) -> None:
    """``image`` (z, y, x) as a CT series on the geometry tests/nnunet_results.py writes NIfTI with
    (origin (-20, 10, 5) mm LPS, 1 x 1 mm pixels, 2 mm slices), one file per slice."""
    import copy

    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    folder.mkdir()
    series = generate_uid()
    for k in range(image.shape[0]):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, 10.0, 5.0 + 2.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns = image.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.InstanceNumber = k + 1
        ds.PixelData = image[k].astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm")


def test_a_dicom_series_is_explained_as_the_same_volume_in_nifti_and_gets_dicom_objects(
        bundle_folder, shared_data, tmp_path):
    """The same CT volume as a DICOM series and as a NIfTI file (another voxel order, the same
    world): the bundle (which reorients) predicts the same voxels on both, the map of the DICOM
    input lands on the lesion in the series' own voxels, and the DICOM objects are written on
    the series. nnU-Net, which does not reorient, refuses a series in one line."""
    import pydicom

    from pellucid.cli import main
    from pellucid.pipeline import CaseOptions, read_case

    image, label, _ = sphere_case(11, shape=(24, 40, 40))
    image = np.rint(image)  # the series stores whole HU
    _ct_series(shared_data, image, tmp_path / "series")
    _write(image, tmp_path / "same_0000.nii.gz")
    main(["explain", "--model", str(bundle_folder), "--method", "integratedgradients", "--input",
          str(tmp_path / "series"), "--out", str(tmp_path / "out"), "--target", "lesion", "--dicom"])
    main(["explain", "--model", str(bundle_folder), "--method", "integratedgradients", "--input",
          str(tmp_path / "same_0000.nii.gz"), "--out", str(tmp_path / "nifti"), "--target", "lesion"])
    from_series = json.loads((tmp_path / "out" / "summary.json").read_text())[0]["prediction"]
    from_nifti = json.loads((tmp_path / "nifti" / "summary.json").read_text())[0]["prediction"]
    assert from_series["voxels"] == from_nifti["voxels"] > 0
    written = nib.load(tmp_path / "out" / "series_integratedgradients.nii.gz")
    assert written.shape == label.shape  # (slice, row, column): the series' own voxels
    peak = np.unravel_index(int(np.argmax(written.get_fdata())), written.shape)
    assert label[peak] == 1, peak
    objects = [pydicom.dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")]
    kinds = {str(ds.Modality) for ds in objects}
    assert {"SEG", "SR"} <= kinds, kinds
    series_uid = pydicom.dcmread(tmp_path / "series" / "slice000.dcm").SeriesInstanceUID
    seg = next(ds for ds in objects if ds.Modality == "SEG")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid

    from pellucid.models import load_model
    from tests.conftest import shared_model
    from tests.nnunet_results import DATASET
    from tests.nnunet_results import make as make_nnunet

    nnunet = load_model(shared_model("nnunet", make_nnunet) / "nnUNet_results" / DATASET /
                        "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0")
    with pytest.raises(PellucidError) as exc:
        read_case(nnunet, tmp_path / "series", CaseOptions(["saliency"]))
    assert "nnU-Net does not reorient images" in str(exc.value) and "\n" not in str(exc.value)


def test_the_node_takes_a_bundle_that_reorients_and_refuses_nnunet_before_it_starts(
        bundle_folder, shared_data, tmp_path):
    """A study routed to the node is explained by :func:`pellucid.pacs.explain_instances` (as the
    node's workers run it): a CT series and a bundle route give a SEG and an SR on the series. A
    route to an nnU-Net model (no reorientation: it knows only its training files' voxel order)
    is refused in one line when the configuration is checked."""
    import pydicom

    from pellucid.errors import ConfigError
    from pellucid.models import load_model
    from pellucid.node.routing import Route, check_route
    from pellucid.pacs import explain_instances
    from tests.conftest import shared_model
    from tests.nnunet_results import DATASET
    from tests.nnunet_results import make as make_nnunet

    check_route(Route("ct", str(bundle_folder), ["saliency"], ["pacs"]), "node.json: routes[0]")
    image, _, _ = sphere_case(12, shape=(24, 40, 40))
    _ct_series(shared_data, np.rint(image), tmp_path / "series")
    instances = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").glob("*.dcm"))]
    delivered: list = []

    def deliver(datasets):
        delivered.extend(datasets)
        return [str(ds.SOPInstanceUID) for ds in datasets]

    from pellucid.pipeline import CaseOptions

    summary = explain_instances(instances, load_model(bundle_folder), "sphere", CaseOptions(["saliency"]),
                                tmp_path / "out", deliver)
    assert not summary["skipped"], summary["skipped"]
    assert {"SEG", "SR"} <= {str(ds.Modality) for ds in delivered}
    nnunet = shared_model("nnunet", make_nnunet) / "nnUNet_results" / DATASET / \
        "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    with pytest.raises(ConfigError) as exc:
        check_route(Route("ct", str(nnunet), ["saliency"], ["pacs"]), "node.json: routes[0]")
    said = str(exc.value)
    assert said.startswith("node.json: routes[0].model: the node receives DICOM, and ")
    assert "nnU-Net does not reorient images" in said and "\n" not in said


def test_the_service_serves_an_imported_bundle(bundle_folder, case, tmp_path):
    """A bundle imported into the service's model folder is listed and answers an upload through
    the same job the REST service runs (:func:`pellucid.service.jobs.run_job`)."""
    from pellucid.cli import main
    from pellucid.service.jobs import Models, run_job

    main(["import-model", str(bundle_folder), "--out", str(tmp_path / "models" / "sphere")])
    models = Models(tmp_path / "models")
    assert models.names() == ["sphere"]
    upload = tmp_path / "input.nii.gz"
    upload.write_bytes(case[0].read_bytes())
    answer = run_job(models.get("sphere"), "sphere", upload, ["saliency"], "lesion", tmp_path / "job")
    assert answer["prediction"]["class"] == "lesion" and answer["prediction"]["voxels"] > 0
    assert [m["method"] for m in answer["methods"]] == ["saliency"]
