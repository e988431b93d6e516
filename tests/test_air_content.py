"""IHE AI Results (AIR) content, one test per item the Evidence Creator's objects carry: the model
as the algorithm with the SHA-256 of its weights file as stored, tracking UIDs that are the same
for the same content, the explanation region coded as what it is (never a finding), and the Key
Object Selection of the images with findings. Checked on objects the case pipeline writes for a
radiograph laid out like a hospital's (a real file's header, a phantom's pixels)."""

from __future__ import annotations

import hashlib

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pellucid.errors import ConfigError
from pellucid.io import dicom_objects as objects


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _description(kos) -> str:
    """The KOS's Key Object Description (DCM 113012)."""
    return next(str(item.TextValue) for item in kos.ContentSequence
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "113012")


@pytest.fixture(scope="module")
def written(chest_model, shared_data, tmp_path_factory):
    """The pipeline's DICOM objects for one radiograph, written twice into two folders."""
    from pellucid.pipeline import CaseOptions, explain_case, read_case, write_case
    from tests.factories import phantom_dicom

    tmp = tmp_path_factory.mktemp("air")
    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    cr = phantom_dicom(real, tmp / "cr.dcm", seed=2)
    options = CaseOptions(["gradcam", "saliency"])
    records = []
    for run in ("a", "b"):
        result = explain_case(chest_model, read_case(chest_model, cr, options), options)
        records.append(write_case(result, tmp / run, dicom=True, model_name="chest",
                                  model_digest=chest_model.digest(), card=chest_model.card,
                                  weights_file=chest_model.stored()))
    return tmp, records, cr


def test_the_sr_names_the_model_and_the_sha256_of_its_weights_file_as_stored(chest_model, written):
    """The algorithm of every finding is the model (its card's name and version), and its
    parameters give the SHA-256 an auditor gets from ``sha256sum model.safetensors``."""
    tmp = written[0]
    stored = chest_model.weights_file
    assert stored is not None and stored.name == "model.safetensors"
    expected = hashlib.sha256(stored.read_bytes()).hexdigest()  # what sha256sum prints
    assert chest_model.stored() == ("model.safetensors", expected)
    sr = pydicom.dcmread(tmp / "a" / "report_sr.dcm")
    names, parameters = set(), set()
    for item in _walk(sr.ContentSequence):
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if meaning == "Algorithm Name":
            names.add(str(item.TextValue))
        elif meaning == "Algorithm Parameters":
            parameters.add(str(item.TextValue))
    assert (chest_model.card.name or "chest") in names  # the card's name, else the one given
    assert f"weights file sha256: {expected} (model.safetensors)" in parameters
    assert f"weights state-dict sha256: {chest_model.digest()}" in parameters


def test_the_same_content_has_the_same_uids_tracking_and_observer_included(written):
    """Two runs on the same image, model and methods: the same SOP Instance UIDs, and inside the
    SR the same tracking UIDs and device observer UID (no random UID inside a stable instance)."""
    tmp, records, _ = written
    assert records[0]["dicom_objects"] == records[1]["dicom_objects"]

    def uids(run: str, name: str) -> list[str]:
        ds = pydicom.dcmread(tmp / run / name)
        inside = [str(item.UID) for item in _walk(ds.get("ContentSequence", [])) if "UID" in item]
        return [str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), *inside]

    for name in records[0]["dicom_objects"]:
        assert uids("a", name) == uids("b", name), name
    inside = uids("a", "report_sr.dcm")[2:]  # the observer's and one tracking UID per group
    assert len(set(inside)) >= 4


def test_the_seg_codes_an_explanation_region_of_the_model_for_its_finding(chest_model, written):
    """The segment is "explanation region of <model> <version> for <finding> (<method>)", coded
    99PELLUCID EXPLREG (not SNOMED CT Lesion); its algorithm is the model, pellucid its source;
    highdicom parses the radiograph SEG back (its Pixel Measures: the Pixel Spacing OHIF needs and
    a nominal 1 mm Slice Thickness, which highdicom's reader needs)."""
    tmp, records, _ = written
    seg = hd.seg.segread(tmp / "a" / "segmentation.dcm")
    segment = seg.SegmentSequence[0]
    card, explained = chest_model.card, records[0]["explained"]["class"]
    name, version = card.name or "chest", f" {card.version}" if card.version else ""
    sentence = f"explanation region of {name}{version} for {explained} (gradcam)"
    assert segment.SegmentDescription == sentence
    assert segment.SegmentLabel == sentence[:64]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "EXPLREG"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99PELLUCID"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "EXPLAIN"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == name
    assert algorithm.AlgorithmVersion == (card.version or "unversioned")
    assert str(algorithm.AlgorithmSource).startswith("pellucid ")
    assert f"weights file sha256={chest_model.stored()[1]}" in str(algorithm.AlgorithmParameters)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 1 and len(measures.PixelSpacing) == 2
    assert "FrameOfReferenceUID" not in seg  # (so the thickness places nothing in patient space)


def test_a_key_object_selection_flags_the_images_with_findings(chest_model, written):
    """A finding present: a KOS (Of Interest) referencing the radiograph and the SR, SEG and PM made
    from it, its description naming the model and the present findings; none present: no KOS,
    and the record says why."""
    tmp, records, cr = written
    record = records[0]
    present = [f["name"] for f in record["findings"] if f["present"]]
    if not present:
        assert "key_objects.dcm" not in record["dicom_objects"]
        assert {"object": "key object selection",
                "reason": "no finding present: no image to flag"} in record["skipped"]
        return
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(tmp / "a" / "key_objects.dcm"))
    assert kos.ContentSequence and kos.ConceptNameCodeSequence[0].CodeValue == "113000"
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in kos.ContentSequence if "ReferencedSOPSequence" in item}
    derived = {str(pydicom.dcmread(tmp / "a" / name).SOPInstanceUID)
               for name in record["dicom_objects"] if name != "key_objects.dcm"}
    assert referenced == {str(pydicom.dcmread(cr).SOPInstanceUID)} | derived
    text = _description(kos)
    assert text.startswith(f"images with findings of {chest_model.card.name or 'chest'}")
    for name in present:
        assert name in text


def test_no_key_object_selection_without_a_present_finding(shared_data):
    """The KOS builder itself: absent and unjudged findings select nothing (one-line refusal);
    a present one selects the image, and the description lists only the present findings."""
    from pellucid.io import read

    source = read(shared_data / "dicom-samples" / "pydicom" / "CT_small.dcm").datasets
    model = objects.ReportedModel("ct-model", "2", "0" * 64, "model.onnx", "f" * 64)
    absent = [objects.Finding("Nodule", 0.2, threshold=0.5, present=False),
              objects.Finding("Mass", 0.4, present=None)]
    with pytest.raises(ConfigError, match="no finding is present"):
        objects.key_object_selection(source, model, absent)
    kos = objects.key_object_selection(
        source, model, [*absent, objects.Finding("Effusion", 0.9, threshold=0.5, present=True)],
        uid_seed="x")
    again = objects.key_object_selection(
        source, model, [*absent, objects.Finding("Effusion", 0.9, threshold=0.5, present=True)],
        uid_seed="x")
    assert kos.SOPInstanceUID == again.SOPInstanceUID and kos.SOPClassUID == \
        "1.2.840.10008.5.1.4.1.1.88.59"
    text = _description(kos)
    assert text.startswith("images with findings of ct-model 2: Effusion.")
    assert "Nodule" not in text and "Mass" not in text
    assert np.array_equal([str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                           for i in kos.ContentSequence if "ReferencedSOPSequence" in i],
                          [str(source[0].SOPInstanceUID)])


def test_findings_are_image_level_groups_and_regions_belong_to_explanations(written):
    """AIR's image-level qualitative evaluations: each finding is a TID 1501 group with no region
    of its own (its score inferred from the image's edges only), Present / Absent as a CODE; each
    method is a TID 1410 group whose region is the explained box, and its Comment names every
    finding (what OHIF 3.13, which lists only groups with a region, shows)."""
    tmp, records, cr = written
    source = pydicom.dcmread(cr)
    sr = pydicom.dcmread(tmp / "a" / "report_sr.dcm")
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    groups = {}
    for group in measurements.ContentSequence:
        items = list(group.ContentSequence)
        tracking = next(str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        groups[tracking] = (str(group.ContentTemplateSequence[0].TemplateIdentifier), items)
    record = records[0]
    edges = [0, 0, int(source.Columns), 0, int(source.Columns), int(source.Rows), 0, int(source.Rows), 0, 0]
    for f in record["findings"]:
        template, items = groups[f"finding {f['name']}"]
        assert template == "1501"
        assert not any(i.ValueType == "SCOORD" for i in items)  # no region of the finding
        presence = next(i for i in items if i.ValueType == "CODE"
                        and i.ConceptNameCodeSequence[0].CodeValue == "705057003")
        assert presence.ConceptCodeSequence[0].CodeMeaning == ("Present" if f["present"] else "Absent")
        score = next(i for i in items if i.ValueType == "NUM")
        assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(f["score"], abs=1e-6)
        inferred = [c for c in score.get("ContentSequence", []) if c.ValueType == "SCOORD"]
        assert [list(np.round(c.GraphicData, 3)) for c in inferred] == [edges]
    explained = record["explained"]["class"]
    for method in ("gradcam", "saliency"):
        template, items = groups[f"explanation {method}"]
        assert template == "1410"
        region = next(i for i in items if i.ValueType == "SCOORD")
        box = np.asarray(region.GraphicData).reshape(-1, 2)
        assert box.min() >= 0 and box[:, 0].max() <= source.Columns and box[:, 1].max() <= source.Rows
        assert (box.max(0) - box.min(0)).prod() < 0.99 * source.Columns * source.Rows  # not the image
        comment = next(str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121106")
        assert comment.startswith(f"{explained} ") and f"explained by {method}" in comment
        for f in record["findings"]:
            verdict = "present" if f["present"] else "absent"
            assert f"{f['name']} {verdict} (probability {f['score']:.2f}" in comment


def test_a_comment_too_long_for_every_finding_lists_whole_findings_and_counts_the_rest():
    """A Comment holds 1024 characters: findings that do not fit are counted, never cut inside
    (a probability cut after one digit would state another value)."""
    others = [f"Finding{k} absent (probability 0.{k:02d}, threshold 0.50)" for k in range(40)]
    head = "Lesion present (probability 0.91, threshold 0.50); explained by gradcam; model m 1"
    text = objects._listed(head, others)
    assert len(head) + len(text) <= 1024
    shown = [n for n in range(1, 40) if text == f"; other findings: {', '.join(others[:n])}, "
                                                 f"and {40 - n} more (the image-level groups)"]
    assert len(shown) == 1, text  # whole findings, in order, then the count of the rest
    assert objects._listed(head, others[:2]) == f"; other findings: {others[0]}, {others[1]}"
