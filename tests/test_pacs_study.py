"""One study, several instances, through ``pull_explain_push`` with an in-memory PACS: an oblique
PatientOrientation (L\\PF, valid DICOM that highdicom's writer does not take) gets its overlay, an
instance refused by the model is listed with its reason, an unexpected failure of one instance is
listed and the rest of the study is still explained and stored."""

from __future__ import annotations

import json

import pydicom

from pellucid.pacs import pull_explain_push
from pellucid.pipeline import CaseOptions
from tests.factories import phantom_dicom


class MemoryPacs:
    """What pull_explain_push asks of a PACS: the study's instances and a store."""

    url = "memory://pacs"

    def __init__(self, datasets):
        self.datasets, self.stored = list(datasets), []

    def retrieve_study(self, study):
        return [ds for ds in self.datasets if str(ds.StudyInstanceUID) == study]

    def store(self, datasets):
        self.stored += list(datasets)
        return [str(ds.SOPInstanceUID) for ds in datasets]


def test_one_bad_instance_never_stops_the_study(chest_model, shared_data, tmp_path, monkeypatch):
    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    oblique = pydicom.dcmread(phantom_dicom(real, tmp_path / "a.dcm", seed=1))
    oblique.PatientOrientation = ["L", "PF"]
    failing = pydicom.dcmread(phantom_dicom(real, tmp_path / "b.dcm", seed=2))
    plain = pydicom.dcmread(phantom_dicom(real, tmp_path / "c.dcm", seed=3))
    patient = pydicom.dcmread(real)  # the real radiograph: the phantom model refuses it
    study = str(patient.StudyInstanceUID)
    pacs = MemoryPacs([oblique, failing, plain, patient])

    import pellucid.pacs as module

    original = module.explain_case

    def explain_case(model, case, options):
        if case.item.source.datasets[0].SOPInstanceUID == failing.SOPInstanceUID:
            raise ValueError("a library failed on this instance")
        return original(model, case, options)

    monkeypatch.setattr(module, "explain_case", explain_case)
    summary = pull_explain_push(pacs, study, chest_model, "chest", CaseOptions(["gradcam"]),
                                tmp_path / "out")
    json.dumps(summary)  # one JSON document
    explained = {e["uid"] for e in summary["explained"]}
    assert explained == {str(oblique.SOPInstanceUID), str(plain.SOPInstanceUID)}
    skipped = {s["uid"]: s["reason"] for s in summary["skipped"]}
    assert "unlike the synthetic images" in skipped[str(patient.SOPInstanceUID)]
    assert skipped[str(failing.SOPInstanceUID)].startswith("unexpected ValueError")
    assert "library failed" not in skipped[str(failing.SOPInstanceUID)]  # no message, no data
    overlays = [ds for ds in pacs.stored if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
                and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == oblique.SOPInstanceUID]
    assert len(overlays) == 1 and list(overlays[0].PatientOrientation) == ["L", "PF"]
    assert {str(ds.Modality) for ds in pacs.stored} >= {"SEG", "SR"}


def test_an_orientation_of_other_letters_skips_the_overlay_with_its_reason(chest_model,
                                                                          shared_data, tmp_path):
    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    odd = pydicom.dcmread(phantom_dicom(real, tmp_path / "a.dcm", seed=1))
    odd.PatientOrientation = ["L", "X"]
    pacs = MemoryPacs([odd])
    summary = pull_explain_push(pacs, str(odd.StudyInstanceUID), chest_model, "chest",
                                CaseOptions(["gradcam"]), tmp_path / "out")
    record = json.loads((tmp_path / "out" / "summary.json").read_text())[0]
    reasons = [s["reason"] for s in record["skipped"] if s["object"] == "gradcam secondary capture"]
    assert reasons and "PatientOrientation L / X" in reasons[0]
    assert summary["explained"] and {str(ds.Modality) for ds in pacs.stored} >= {"SR"}
    assert not any(ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage for ds in pacs.stored)


def test_uids_follow_the_content_and_only_the_content(chest_model, shared_data, tmp_path):
    """The same content gives the same UIDs; another method list or a recalibrated card gives
    another SR (the maps' objects stay)."""
    import dataclasses

    from pellucid.models.store import LoadedModel
    from pellucid.pipeline import explain_case, read_case, write_case

    real = next((shared_data / "dicom-samples" / "torchxrayvision").glob("*.dcm"))
    path = phantom_dicom(real, tmp_path / "cr.dcm", seed=6)

    def uids(loaded, methods, folder, override=False):
        options = CaseOptions(methods, outside_intended_use=override)
        record = write_case(explain_case(loaded, read_case(loaded, path, options), options),
                            tmp_path / folder, dicom=True, model_name="chest",
                            model_digest=loaded.digest(), card=loaded.card)
        out = {name: str(pydicom.dcmread(tmp_path / folder / name).SOPInstanceUID)
               for name in record["dicom_objects"]}
        out["sc"] = str(pydicom.dcmread(tmp_path / folder / record["methods"][methods[0]]["dicom"]
                                        ).SOPInstanceUID)
        return out

    first = uids(chest_model, ["gradcam"], "a")
    assert uids(chest_model, ["gradcam"], "b") == first  # the same content: the same instances
    more = uids(chest_model, ["gradcam", "saliency"], "c")
    assert more["segmentation.dcm"] == first["segmentation.dcm"] and more["sc"] == first["sc"]
    assert more["report_sr.dcm"] != first["report_sr.dcm"]
    card = dataclasses.replace(chest_model.card,
                               thresholds=[min(1.0, t + 0.05) for t in chest_model.card.thresholds])
    recalibrated = uids(LoadedModel(chest_model.module, card, "chest"), ["gradcam"], "d")
    assert recalibrated["report_sr.dcm"] != first["report_sr.dcm"]
    # an override with nothing outside the intended use changes no object: the same instances
    assert uids(chest_model, ["gradcam"], "e", override=True) == first
