"""Clinical input and output: every shared DICOM sample reads; series, Modality LUT, MONOCHROME1
and VOI; NIfTI affines; bad files; and round trips of the DICOM objects pellucid writes."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from pellucid.errors import ConfigError, DataError
from pellucid.io import dicom_objects as objects
from pellucid.io import read


def _samples(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom-samples").rglob("*.dcm"))


def test_every_shared_dicom_sample_reads(shared_data):
    files = _samples(shared_data)
    assert len(files) >= 20
    for path in files:
        image = read(path)
        ds = image.datasets[0]
        assert image.array.ndim in (3, 4) and torch.isfinite(image.array).all(), path.name
        assert len(image.spacing) == image.array.ndim - 1
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            assert image.array.shape[1] == int(ds.NumberOfFrames)
    # compressed syntaxes decode to the same pixels as the uncompressed original
    base = shared_data / "dicom-samples" / "pydicom"
    ref = read(base / "MR_small.dcm").array
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert torch.equal(read(base / name).array, ref), name


def test_modality_lut_monochrome1_and_voi(shared_data, tmp_path):
    src = shared_data / "dicom-samples" / "pydicom" / "MR_small.dcm"
    ds = pydicom.dcmread(src)
    raw = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.save_as(tmp_path / "rescaled.dcm")
    assert np.array_equal(read(tmp_path / "rescaled.dcm").array[0].numpy(), raw * 2 - 10)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted = read(tmp_path / "mono1.dcm").array[0].numpy()
    values = raw * 2 - 10
    assert np.array_equal(inverted, values.max() + values.min() - values)
    ct = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    ct.WindowCenter, ct.WindowWidth = 40, 400
    ct.save_as(tmp_path / "windowed.dcm")
    windowed = read(tmp_path / "windowed.dcm", voi=True).array
    assert windowed.max() > windowed.min()
    assert not torch.equal(windowed, read(tmp_path / "windowed.dcm").array)


def _series(shared_data: Path, folder: Path, n: int = 4) -> list[pydicom.Dataset]:
    """A CT series of ``n`` slices made from CT_small, written in shuffled order."""
    base = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    pixels = base.pixel_array.copy()
    series_uid = pydicom.uid.generate_uid()
    folder.mkdir()
    out = []
    for k in [2, 0, 3, 1][:n]:
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + 2.5 * k]
        ds.InstanceNumber = k + 1
        ds.PixelData = (pixels + 100 * k).astype(pixels.dtype).tobytes()
        ds.save_as(folder / f"slice{k}.dcm")
        out.append(ds)
    return out


def test_series_folder_is_sorted_by_position(shared_data, tmp_path):
    _series(shared_data, tmp_path / "series")
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")
    image = read(tmp_path / "series")
    assert image.array.shape == (1, 4, 128, 128)
    firsts = [int(ds.InstanceNumber) for ds in image.datasets]
    assert firsts == [1, 2, 3, 4]
    assert image.spacing[0] == pytest.approx(2.5)
    assert image.affine[2, 0] == pytest.approx(2.5) and image.affine[2, 3] == pytest.approx(-75.7)
    means = image.array[0].flatten(1).mean(1)
    assert (means[1:] > means[:-1]).all()  # the slices' offsets 0, 100, 200, 300 in order


def test_nifti_and_png(tmp_path):
    import nibabel as nib
    from PIL import Image

    affine = np.diag([0.9, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10, -20, 30]
    data = np.random.RandomState(0).rand(6, 7, 5).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    image = read(tmp_path / "v.nii.gz")
    assert np.allclose(image.affine, affine) and image.array.shape == (1, 6, 7, 5)
    assert image.spacing == pytest.approx((0.9, 0.8, 2.0))
    Image.fromarray((data[:, :, 0] * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert read(tmp_path / "a.png").array.shape == (1, 6, 7)


def test_bad_files_give_one_clear_error(shared_data, tmp_path):
    (tmp_path / "note.dcm").write_text("hello")
    with pytest.raises(DataError, match=r"note\.dcm.*not a DICOM file"):
        read(tmp_path / "note.dcm")
    whole = (shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) - 20000])
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read(tmp_path / "cut.dcm")
    with pytest.raises(DataError, match="no such file"):
        read(tmp_path / "missing.dcm")


def _reread(obj) -> pydicom.Dataset:
    buf = io.BytesIO()
    obj.save_as(buf)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _references(ds: pydicom.Dataset) -> set[str]:
    found = set()
    for item in ds.get("ReferencedSeriesSequence", []):
        for ref in item.get("ReferencedInstanceSequence", []):
            found.add(str(ref.ReferencedSOPInstanceUID))
    for ref in ds.get("SourceImageSequence", []):
        found.add(str(ref.ReferencedSOPInstanceUID))
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        for der in group.get("DerivationImageSequence", []):
            for ref in der.get("SourceImageSequence", []):
                found.add(str(ref.ReferencedSOPInstanceUID))
    return found


def _common_checks(obj: pydicom.Dataset, source: list[pydicom.Dataset]) -> None:
    assert obj.StudyInstanceUID == source[0].StudyInstanceUID
    assert obj.SeriesInstanceUID != source[0].SeriesInstanceUID
    assert obj.Manufacturer == "pellucid"
    if "FrameOfReferenceUID" in source[0] and "FrameOfReferenceUID" in obj:
        assert obj.FrameOfReferenceUID == source[0].FrameOfReferenceUID


def test_parametric_map_and_segmentations_round_trip(shared_data, tmp_path):
    _series(shared_data, tmp_path / "series")
    image = read(tmp_path / "series")
    source = image.datasets
    heat = np.random.RandomState(1).rand(4, 128, 128).astype(np.float32)
    pm = _reread(objects.parametric_map(source, heat, "gradcam"))
    _common_checks(pm, source)
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    order = _frame_sources(pm)
    expected = np.stack([heat[[str(d.SOPInstanceUID) for d in source].index(uid)] for uid in order])
    assert np.array_equal(np.asarray(pm.pixel_array, np.float32), expected)  # exact floats
    assert {str(ds.SOPInstanceUID) for ds in source} <= _references(pm)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0

    mask = heat > 0.6
    seg_ds = _reread(objects.segmentation(source, mask, "gradcam region"))
    _common_checks(seg_ds, source)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.SegmentSequence[0].SegmentLabel == "gradcam region"
    got = np.asarray(seg_ds.pixel_array).astype(bool)
    order = _frame_sources(seg_ds)
    expected = np.stack([mask[[str(d.SOPInstanceUID) for d in source].index(uid)] for uid in order])
    assert np.array_equal(got, expected)
    assert {str(ds.SOPInstanceUID) for ds in source} <= _references(seg_ds)
    frac_ds = _reread(objects.segmentation(source, heat, "gradcam", kind="fractional"))
    values = np.asarray(frac_ds.pixel_array, np.float32) / float(frac_ds.MaximumFractionalValue)
    order = _frame_sources(frac_ds)
    expected = np.stack([heat[[str(d.SOPInstanceUID) for d in source].index(uid)] for uid in order])
    assert np.abs(values - expected).max() <= 0.5 / 255 + 1e-6  # within one 8-bit step, rounded


def _frame_sources(ds: pydicom.Dataset) -> list[str]:
    """The source image of every frame, in frame order."""
    return [str(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for g in ds.PerFrameFunctionalGroupsSequence]


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    obj.save_as(buf)
    return buf.getvalue()


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_secondary_capture_and_structured_report_on_a_real_cr(shared_data):
    path = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    image = read(path)
    source = image.datasets
    heat = np.zeros((1024, 1024), np.float32)
    heat[300:500, 400:700] = 1.0
    with pytest.raises(ConfigError, match="Frame of Reference"):
        objects.parametric_map(source, heat, "gradcam")  # a CR has none: a clear refusal
    rgb = objects.overlay_rgb(image.array[0].numpy(), heat, "gradcam: Pneumothorax 0.87")
    sc = _reread(objects.secondary_capture(source[0], rgb))
    _common_checks(sc, source)
    assert sc.PhotometricInterpretation == "RGB"
    assert np.array_equal(sc.pixel_array, rgb)
    assert tuple(sc.PatientOrientation) == ("L", "F")
    # the legend and caption are outside the image: the canvas grows, no image pixel is covered
    assert rgb.shape[0] > 1024 and rgb.shape[1] > 1024
    assert sc.BurnedInAnnotation == "YES" and objects.RESEARCH_NOTICE in str(sc.ImageComments)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source[0].SOPInstanceUID
    small = objects.overlay_rgb(np.zeros((64, 64)), np.random.RandomState(0).rand(64, 64),
                                "gradcam: Lesion p=0.70; explaining Effusion p=0.20")
    assert small.shape[1] >= 360 and small.shape[0] > 64  # a wrapped, readable caption
    seg_obj = objects.segmentation(source, heat > 0.5, "gradcam region")
    saliency_sc = objects.secondary_capture(source[0], rgb, 911)
    found = [objects.Finding("Pneumothorax", 0.87, threshold=0.42, present=True,
                             code=("SCT", "36118008", "Pneumothorax")),
             objects.Finding("Effusion", 0.12, threshold=0.35, present=False)]
    sr = _reread(objects.structured_report(
        source, objects.ReportedModel("chest-resnet18", "0.1.0", "ab" * 32), found,
        {"gradcam": {"layer": "layer4"}, "saliency": {"channel_reduce": "max_abs"}}, None, seg_obj,
        {"gradcam": sc, "saliency": saliency_sc}, summary="Present: Pneumothorax. Absent: Effusion.",
        regions={"gradcam": objects.ExplainedRegion.of(heat),
                 "saliency": objects.ExplainedRegion.of(np.pad(heat[:900], ((124, 0), (0, 0))))},
        explained="Pneumothorax"))
    _common_checks(sr, source)
    # parsed back with highdicom: a group per finding with its score, threshold and presence
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert parsed.SOPInstanceUID == sr.SOPInstanceUID
    items = list(_walk(sr.ContentSequence))
    by_finding: dict[str, dict] = {}
    current = None
    for item in items:
        if item.ValueType == "TEXT" and str(item.TextValue).startswith("finding "):
            current = by_finding.setdefault(str(item.TextValue)[8:], {})
        elif current is not None and item.ValueType == "NUM":
            current[item.ConceptNameCodeSequence[0].CodeMeaning] = float(
                item.MeasuredValueSequence[0].NumericValue)
        elif current is not None and item.ValueType == "CODE" and \
                item.ConceptNameCodeSequence[0].CodeMeaning == "Presence":
            current["present"] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "TEXT" and str(item.TextValue).startswith("explanation "):
            current = None
    assert by_finding == {"Pneumothorax": {"Probability": 0.87, "Operating threshold": 0.42,
                                           "present": "Present"},
                          "Effusion": {"Probability": 0.12, "Operating threshold": 0.35,
                                       "present": "Absent"}}, by_finding
    codes = {(i.ConceptCodeSequence[0].CodingSchemeDesignator, i.ConceptCodeSequence[0].CodeValue)
             for i in items if i.ValueType == "CODE"}
    assert ("SCT", "36118008") in codes  # the card's SNOMED CT code for the finding
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert "pellucid gradcam" in texts and "pellucid saliency" in texts  # every method
    assert "layer: layer4" in texts and "channel_reduce: max_abs" in texts  # with its parameters
    assert "chest-resnet18" in texts and "0.1.0" in texts
    assert f"weights state-dict sha256: {'ab' * 32}" in texts
    assert "summary: Present: Pneumothorax. Absent: Effusion." in texts
    assert objects.RESEARCH_NOTICE in texts
    referenced = {str(r.ReferencedSOPInstanceUID) for i in items
                  for r in i.get("ReferencedSOPSequence", [])}
    assert {str(sc.SOPInstanceUID), str(saliency_sc.SOPInstanceUID), str(seg_obj.SOPInstanceUID),
            str(source[0].SOPInstanceUID)} <= referenced  # every overlay, the SEG, the image
    # image-level findings (TID 1501: the score inferred from the image's edges, no region of
    # their own); each method a planar ROI group (what a viewer lists) around its explained
    # region, whose share is inferred from the box, a Comment each naming every finding
    boxes = [[float(v) for v in i.GraphicData] for i in items if i.ValueType == "SCOORD"]
    whole, gradcam_box = [0, 0, 1024, 0, 1024, 1024, 0, 1024, 0, 0], [400, 300, 700, 300, 700, 500,
                                                                        400, 500, 400, 300]
    assert boxes.count(gradcam_box) == 2 and boxes.count(whole) == 2  # group region + NUM's; scores
    comments = [str(i.TextValue) for i in items if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == [
        "Pneumothorax present (probability 0.87, threshold 0.42); model chest-resnet18 0.1.0",
        "Effusion absent (probability 0.12, threshold 0.35); model chest-resnet18 0.1.0",
        "Pneumothorax present (probability 0.87, threshold 0.42); explained by gradcam; "
        "model chest-resnet18 0.1.0; other findings: Effusion absent (probability 0.12, threshold 0.35)",
        "Pneumothorax present (probability 0.87, threshold 0.42); explained by saliency; "
        "model chest-resnet18 0.1.0; other findings: Effusion absent (probability 0.12, threshold 0.35)"
    ], comments
    shares = [float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM"
              and i.ConceptNameCodeSequence[0].CodeValue == "MAPSHARE"]
    assert shares == [100.0, 100.0]  # all of each map's mass lies in its box
    templates = [str(i.ContentTemplateSequence[0].TemplateIdentifier) for i in items
                 if "ContentTemplateSequence" in i and i.ValueType == "CONTAINER"]
    assert templates.count("1501") == 2 and templates.count("1410") == 2  # parsed back below
    assert len(parsed.content.get_planar_roi_measurement_groups()) == 2
    assert len(parsed.content.get_image_measurement_groups()) == 2
    evidence = {str(ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert referenced - {str(source[0].SOPInstanceUID)} <= evidence


def test_a_dicom_series_folder_is_explained_with_its_affine_in_ras(shared_data, tmp_path):
    """A series folder (files shuffled on disk) goes through the same pipeline as any input; the map
    is written as NIfTI whose affine is the series' LPS affine with x and y negated (RAS)."""
    import nibabel as nib
    from pydicom.uid import generate_uid

    from pellucid.cli import main
    from pellucid.models import ModelCard, build, save_model

    ct = pydicom.dcmread(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm")
    folder = tmp_path / "series"
    folder.mkdir()
    series, normal = generate_uid(), np.cross(*np.reshape(np.asarray(ct.ImageOrientationPatient, float),
                                                          (2, 3)))
    for k in (3, 0, 5, 1, 4, 2):  # written out of order
        ds = copy.deepcopy(ct)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(v) for v in np.asarray(ct.ImagePositionPatient, float)
                                   + 2.5 * k * normal]
        ds.InstanceNumber = 6 - k
        ds.save_as(folder / f"slice{k}.dcm")
    torch.manual_seed(0)
    built = build("unet", 3, 1, 1)
    card = ModelCard(arch="unet", task="segmentation", class_names=["WT"], in_channels=1,
                     spatial_dims=3, input_size=[16, 32, 32], default_layer=built.default_layer)
    model = save_model(tmp_path / "unet3d", built.module, card)
    main(["explain", "--model", str(model), "--input", str(folder), "--method", "saliency",
          "--region", "all", "--out", str(tmp_path / "out")])
    saved = nib.load(tmp_path / "out" / "series_saliency.nii.gz")
    assert saved.shape == (6, 128, 128)  # (slice, row, column) at the source size
    lps = read(folder).affine
    assert np.allclose(saved.affine, np.diag([-1, -1, 1, 1]) @ lps)
    first = np.asarray(ct.ImagePositionPatient, float)  # the lowest slice along the normal
    assert np.allclose(saved.affine @ [0, 0, 0, 1], [-first[0], -first[1], first[2], 1])
    assert np.allclose(np.linalg.norm(saved.affine[:3, 0]), 2.5)


def test_an_empty_map_stores_no_region_and_the_sr_says_so(shared_data, tmp_path):
    """A model whose output ignores the image: saliency is all zero. No PM, SEG or overlay is
    stored as if it were a finding; the SR is written and says the map was empty."""
    from pellucid.models import ModelCard
    from pellucid.models.store import LoadedModel
    from pellucid.pipeline import CaseOptions, explain_case, read_case, write_case

    class Blind(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([0.5, -0.5]))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 2) + 0 * x.mean((1, 2, 3))[:, None]

    card = ModelCard(arch="blind", task="classification", class_names=["A", "B"], in_channels=1,
                     spatial_dims=2, input_size=[32, 32], activation="softmax")
    loaded = LoadedModel(Blind().eval(), card, "blind")
    options = CaseOptions(["saliency"])
    ct = shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm"
    result = explain_case(loaded, read_case(loaded, ct, options), options)
    record = write_case(result, tmp_path, dicom=True, model_name="blind", model_digest=loaded.digest())
    assert record["methods"]["saliency"]["empty"]
    assert record["dicom_objects"] == ["report_sr.dcm"]  # (no card: no finding present, no KOS)
    assert {s["object"] for s in record["skipped"]} == {"parametric map", "segmentation",
                                                        "saliency secondary capture",
                                                        "key object selection"}
    sr = pydicom.dcmread(tmp_path / "report_sr.dcm")

    def texts(item):
        found = [str(item.TextValue)] if "TextValue" in item else []
        for child in item.get("ContentSequence", []):
            found += texts(child)
        return found

    assert any("explanation map is empty" in t for t in texts(sr))


def _presence(sr) -> dict[str, str]:
    """finding name -> Present / Absent, read from the SR's content tree."""
    found, current = {}, None
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "TEXT" and str(item.TextValue).startswith("finding "):
            current = str(item.TextValue)[8:]
        elif current and item.ValueType == "CODE" and \
                item.ConceptNameCodeSequence[0].CodeMeaning == "Presence":
            found[current] = item.ConceptCodeSequence[0].CodeMeaning
    return found


def test_the_report_states_only_findings_the_model_made(chest_model, shared_data, tmp_path):
    """On a chest CR file (a real one's header, a phantom's pixels: the phantom model refuses the
    real image) a class is Present exactly when its probability reaches the card's operating
    threshold (chosen on validation); without thresholds a multi-label model's classes are neither
    Present nor Absent, and the summary says they were not judged. The real radiograph itself,
    overridden, gets an SR that states no finding and says why."""
    import dataclasses

    from pellucid.models.store import LoadedModel
    from pellucid.pipeline import CaseOptions, explain_case, read_case, write_case
    from tests.factories import phantom_dicom

    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    cr = phantom_dicom(real, tmp_path / "phantom.dcm")
    card = chest_model.card
    assert card.activation == "sigmoid" and len(card.thresholds) == len(card.class_names)
    options = CaseOptions(["gradcam", "saliency"])
    result = explain_case(chest_model, read_case(chest_model, cr, options), options)
    record = write_case(result, tmp_path / "a", dicom=True, model_name="chest",
                        model_digest=chest_model.digest(), card=card)
    expected = {n: ("Present" if result.classes[n] >= t else "Absent")
                for n, t in zip(card.class_names, card.thresholds, strict=True)}
    assert {f["name"]: f["present"] for f in record["findings"]} == \
        {n: v == "Present" for n, v in expected.items()}
    sr = pydicom.dcmread(tmp_path / "a" / "report_sr.dcm")
    assert _presence(sr) == expected
    blind = LoadedModel(chest_model.module, dataclasses.replace(card, thresholds=[]), "chest")
    record = write_case(explain_case(blind, read_case(blind, cr, options), options), tmp_path / "b",
                        dicom=True, model_name="chest", model_digest="0", card=blind.card)
    assert all(f["present"] is None for f in record["findings"])
    assert record["summary"].startswith("Not judged (no operating threshold in the model card)")
    assert _presence(pydicom.dcmread(tmp_path / "b" / "report_sr.dcm")) == {}
    overridden = CaseOptions(["gradcam"], outside_intended_use=True)
    record = write_case(explain_case(chest_model, read_case(chest_model, real, overridden),
                                     overridden), tmp_path / "c", dicom=True, model_name="chest",
                        model_digest=chest_model.digest(), card=card)
    assert record["findings"] == [] and record["training_data"]["unlike_training_data"]
    sr = pydicom.dcmread(tmp_path / "c" / "report_sr.dcm")
    assert _presence(sr) == {}
    texts = [str(item.get("TextValue", "")) for item in _walk(sr.ContentSequence)]
    assert any(t.startswith("INPUT UNLIKE THE TRAINING DATA") for t in texts), texts


def test_built_in_finding_codes_are_dicoms_own_snomed_codes():
    """Every standard code pellucid's readers declare is the one DICOM's code tables (as pydicom
    ships them) give under that meaning (the chest phantoms declare the codes their findings have
    in patients; a model trained on them does not carry them: tests/test_training_inputs.py), and
    an SR codes a finding with them."""
    from pydicom.sr.codedict import codes

    from pellucid.data import open_dataset
    from pellucid.data.base import CHEST_FINDING_CODES
    from pellucid.models.train import subset

    for name, (scheme, value, meaning) in CHEST_FINDING_CODES.items():
        standard = getattr(codes.SCT, meaning.title().replace(" ", ""))
        assert (scheme, value, meaning) == ("SCT", standard.value, standard.meaning), name
    ds = subset(open_dataset("phantom-chest", split="train", n=8, size=32), 4)
    assert ds.finding_codes["Nodule"] == ["SCT", "27925004", "Nodule"]
    found = objects.Finding("Nodule", 0.7, threshold=0.5, present=True,
                            code=tuple(CHEST_FINDING_CODES["Nodule"]))
    assert found.concept().value == "27925004" and found.concept().scheme_designator == "SCT"
