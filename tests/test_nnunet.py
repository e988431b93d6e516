"""nnU-Net v2 results folders as nnU-Net runs them (pellucid.models.nnunet), on a results folder
nnU-Net planned, preprocessed and trained here (tests/nnunet_results.py): the logits equal those of
nnU-Net's own ``nnUNetPredictor`` for one fold and for the ensemble of two, through its sliding
window with Gaussian weights and test-time mirroring; the probabilities taken back to the file's
geometry equal nnU-Net's export; a map of the predicted lesion is written on the file's voxels with
its affine and peaks inside the lesion; what cannot be honoured is refused in one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pellucid.errors import PellucidError
from tests.nnunet_results import DATASET, _write, sphere_case


@pytest.fixture(scope="module")
def results_folder():
    from tests.conftest import shared_model
    from tests.nnunet_results import make

    root = shared_model("nnunet", make)
    return root / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A volume larger than the patch (26 x 40 x 46 against 24 x 40 x 40: 4 tiles, overlapping)."""
    image, label, centre = sphere_case(99, shape=(26, 40, 46))
    path = tmp_path_factory.mktemp("nnunet") / "case_0000.nii.gz"
    _write(image, path)
    return path, label, centre


@pytest.mark.parametrize(("folds", "mirroring"), [(["0"], True), (None, False)],
                         ids=["fold 0 mirrored", "ensemble of folds 0 and 1"])
def test_logits_and_probabilities_equal_nnunets_own_predictor(results_folder, case, folds, mirroring):
    from pellucid.models.nnunet import NnUNetResults

    results = NnUNetResults(results_folder, folds, mirroring=mirroring)
    pre = results.preprocess([case[0]])
    module = results.module()
    assert len(module.folds) == (1 if folds else 2)
    assert module.mirror_axes == ((0, 1, 2) if mirroring else ())
    data = torch.from_numpy(pre.data)
    padded = tuple(max(s, p) for s, p in zip(data.shape[1:], module.patch_size, strict=True))
    assert len(results.predictor._internal_get_sliding_window_slicers(padded)) > 1  # tiles
    with torch.no_grad():
        ours = module(data[None])[0]
    theirs = results.predictor.predict_logits_from_preprocessed_data(data).float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    # nnU-Net's export of its logits (resample, un-crop, transpose) against ours taken back
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape as export,
    )

    seg, probabilities = export(theirs, results.plans, results.configuration, results.labels,
                                pre.properties, return_probabilities=True)
    back = results.to_original(torch.softmax(ours, 0).numpy(), pre.properties)
    assert np.abs(back - probabilities).max() <= 1e-4
    assert (back.argmax(0) == seg).all()


def test_the_map_of_the_predicted_lesion_lands_on_it_in_the_files_voxels(results_folder, case, tmp_path):
    """``pellucid explain --model <results>/fold_0`` on a NIfTI file: the card records what came
    from nnU-Net, the prediction is nnU-Net's, and the saliency map is a NIfTI with the input's
    affine and shape whose peak is inside the planted lesion."""
    from pellucid.cli import main
    from pellucid.models import load_model
    from pellucid.models.nnunet import NnUNetResults

    path, label, _ = case
    loaded = load_model(results_folder / "fold_0")
    settings = loaded.card.training["nnunet"]
    assert settings["normalization"] == ["CTNormalization"] and settings["patch_size"] == [24, 40, 40]
    assert settings["mirroring_axes"] == [0, 1, 2] and settings["folds"] == ["0"]
    assert loaded.stored()[0] == "checkpoint_final.pth"
    main(["explain", "--model", str(results_folder / "fold_0"), "--method", "saliency", "--input",
          str(path), "--out", str(tmp_path), "--target", "lesion"])
    record = json.loads((tmp_path / "summary.json").read_text())[0]
    results = NnUNetResults(results_folder, ["0"])
    pre = results.preprocess([path])
    seg = results.predictor.predict_single_npy_array(pre.original, {"spacing": pre.properties["spacing"]})
    assert record["prediction"]["voxels"] == int((seg == 1).sum()) > 0  # nnU-Net's own answer
    written, source = nib.load(tmp_path / "case_0000_saliency.nii.gz"), nib.load(path)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    peak = np.unravel_index(int(np.argmax(written.get_fdata())), written.shape)  # (x, y, z)
    assert label[peak[2], peak[1], peak[0]] == 1, peak  # the label is (z, y, x)


def test_what_cannot_be_honoured_is_refused_in_one_line(results_folder, case, tmp_path):
    from pellucid.models import load_model
    from pellucid.models.nnunet import NnUNetResults
    from pellucid.pipeline import CaseOptions, read_case

    loaded = load_model(results_folder)  # both folds: the ensemble
    for options, said in ((CaseOptions(["saliency"], sliding_window=[24, 40, 40]),
                           "runs its own sliding window"),):
        with pytest.raises(PellucidError) as exc:
            read_case(loaded, case[0], options)
        assert said in str(exc.value) and "\n" not in str(exc.value)
    other = tmp_path / "case.nrrd"
    other.write_bytes(b"")
    with pytest.raises(PellucidError, match=r"reads \.nii\.gz files"):
        read_case(loaded, other, CaseOptions(["saliency"]))
    image, _, _ = sphere_case(1, shape=(26, 40, 46))
    image[3, 4, 5] = np.nan  # a NaN voxel: refused, never explained
    _write(image, tmp_path / "nan_0000.nii.gz")
    with pytest.raises(PellucidError, match=r"not finite|non-finite"):
        read_case(loaded, tmp_path / "nan_0000.nii.gz", CaseOptions(["saliency"]))
    with pytest.raises(PellucidError, match=r"fold\(s\) 3 have no checkpoint_final.pth"):
        NnUNetResults(results_folder, ["3"])
    # a CAM hooks a layer that runs once per tile and mirroring: refused, never one tile's map
    # (the default layer: none qualifies; a layer named: it runs more than once)
    import pellucid

    fold = load_model(results_folder / "fold_0")
    one = read_case(fold, case[0], CaseOptions(["gradcam"]))
    with pytest.raises(PellucidError, match="no layer runs once per forward pass"):
        pellucid.explain(fold, one.x, "gradcam", target=one.target, check_inputs=False)
    with pytest.raises(PellucidError, match="runs more than once in one forward pass"):
        pellucid.explain(fold, one.x, "gradcam", target=one.target, check_inputs=False,
                         layer="folds.0.decoder.stages.2")
    # LRP's rules keep one run's input per layer: refused at the layer's second run
    with pytest.raises(PellucidError, match=r"lrp: layer folds\.0\.encoder\.\S+ runs more than once"):
        pellucid.explain(fold, one.x, "lrp", target=one.target, check_inputs=False)


def test_bench_runs_the_results_folder_end_to_end_to_a_report(results_folder, tmp_path):
    """``pellucid bench`` with ``path:`` a fold of the results folder, on a CSV of volumes and
    label files: each case is nnU-Net's preprocessing of its file, the label file is taken onto
    nnU-Net's grid by nnU-Net's own preprocessing, the target is the predicted lesion."""
    import pellucid
    from pellucid.models import load_model
    from pellucid.pipeline.resolve import card_target
    from tests.framework_bench import framework_bench

    frame = framework_bench(str(results_folder / "fold_0"), tmp_path, ["saliency"],
                            ["pointing_game", "sparseness"])
    assert set(frame["target"]) == {"lesion"} and frame["case_id"].nunique() == 3
    assert frame["value"].notna().all(), frame[frame["value"].isna()][["metric", "reason"]]
    loaded = load_model(results_folder / "fold_0")
    path = tmp_path / "data" / "c0_0000.nii.gz"
    x, case = loaded.framework.read(path)
    truth = loaded.framework.read_truth(tmp_path / "data" / "c0_seg.nii.gz", path, case)
    e = pellucid.explain(loaded, x, "saliency", target=card_target(loaded.card, 1, "predicted"))
    ref = pellucid.evaluate(loaded, x, e, metrics=["pointing_game", "sparseness"],
                            masks=(truth == 1)[None])
    for metric in ("pointing_game", "sparseness"):
        row = frame[(frame["metric"] == metric) & (frame["case_id"] == "data/c0_0000.nii.gz")].iloc[0]
        assert row["value"] == pytest.approx(ref[metric].scores[0].item(), rel=1e-4), metric


def test_import_model_copies_a_fold_and_predicts_as_nnunet(results_folder, case, tmp_path):
    """``pellucid import-model <results>/fold_0 --out F`` copies plans, dataset and the fold's
    final checkpoint; the imported model's logits are the results folder's own."""
    from pellucid.cli import main
    from pellucid.models import load_model

    out = tmp_path / "imported"
    main(["import-model", str(results_folder / "fold_0"), "--out", str(out), "--version", "1.1"])
    assert sorted(p.relative_to(out).as_posix() for p in (out / "nnunet").rglob("*") if p.is_file()) \
        == ["nnunet/dataset.json", "nnunet/dataset_fingerprint.json",
           "nnunet/fold_0/checkpoint_final.pth", "nnunet/plans.json"]
    imported, direct = load_model(out), load_model(results_folder / "fold_0")
    assert imported.card.version == "1.1" and imported.card.training["nnunet"]["folds"] == ["0"]
    x, _ = imported.framework.read(case[0])
    with torch.no_grad():
        assert torch.equal(imported.module(x), direct.module(x))
