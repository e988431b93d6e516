"""Talking to a PACS: DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) through
dicomweb-client, and DIMSE C-STORE through pynetdicom; and ``pull_explain_push``: fetch a study,
explain its images, store the results (Secondary Capture overlays, Segmentation, Parametric Map,
SR) back into the same study."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pellucid.errors import ConfigError, DataError


class DicomWeb:
    """A DICOMweb endpoint, e.g. ``http://127.0.0.1:8042/dicom-web`` (Orthanc), with optional
    HTTP basic authentication."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        session = create_session_from_user_pass(username, password) if username else create_session()
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(url=self.url, session=session)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # requests/HTTP errors of many kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(self.url, f"{what} failed ({first})") from None

    def store(self, datasets: Sequence[Any]) -> list[str]:
        """STOW-RS: store ``datasets``; returns the stored SOP Instance UIDs (failures raise)."""
        response = self._call("STOW-RS", self.client.store_instances, list(datasets))
        failed = response.get("FailedSOPSequence", []) if response is not None else []
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise DataError(self.url, f"STOW-RS refused {len(failed)} object(s) (reasons {reasons})")
        return [str(ds.SOPInstanceUID) for ds in datasets]

    def instances(self, study: str | None = None) -> list[dict[str, str]]:
        """QIDO-RS: every instance (of one study), with its study, series, SOP UIDs and modality."""
        kwargs = {"study_instance_uid": study} if study else {}
        found = self._call("QIDO-RS", self.client.search_for_instances, **kwargs)

        def value(item: dict, tag: str) -> str:
            v = item.get(tag, {}).get("Value", [""])
            return str(v[0]) if v else ""

        return [{"study": value(i, "0020000D"), "series": value(i, "0020000E"),
                 "sop_instance": value(i, "00080018"), "sop_class": value(i, "00080016"),
                 "modality": value(i, "00080060")} for i in found]

    def retrieve_study(self, study: str) -> list[Any]:
        """WADO-RS: every instance of ``study`` as pydicom datasets."""
        return list(self._call("WADO-RS", self.client.retrieve_study, study))


def c_store(datasets: Sequence[Any], host: str, port: int, called_ae: str = "ORTHANC",
            calling_ae: str = "PELLUCID") -> list[int]:
    """DIMSE C-STORE of ``datasets`` to ``host:port``; returns the status of each (0 = success)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        syntax = ds.file_meta.TransferSyntaxUID if "file_meta" in ds and \
            "TransferSyntaxUID" in ds.file_meta else "1.2.840.10008.1.2.1"
        ae.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise DataError(f"{host}:{port}", f"C-STORE: association with {called_ae} was not accepted")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def pull_explain_push(pacs: DicomWeb, study: str, loaded, model_name: str, methods: Sequence[str],
                      target: str | None = None) -> dict[str, Any]:
    """Fetch ``study``, explain every image the model can take, store the results back; returns
    {"explained": [...], "stored": [SOP Instance UIDs], "skipped": [...]}."""
    import pydicom

    from pellucid.service.jobs import run_job

    if loaded.card is None or loaded.card.spatial_dims != 2:
        raise ConfigError("pull-explain-push explains 2D images with a 2D model (card needed)")
    instances = pacs.retrieve_study(study)
    if not instances:
        raise DataError(pacs.url, f"study {study} has no instances")
    summary: dict[str, Any] = {"explained": [], "stored": [], "skipped": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, ds in enumerate(instances):
            if "PixelData" not in ds or str(ds.get("Modality", "")) in ("SEG", "SR", "PR") \
                    or str(ds.get("Manufacturer", "")) == "pellucid":
                continue  # not an image, or one of pellucid's own results
            folder = Path(tmp) / f"i{k}"
            folder.mkdir()
            path = folder / "input.dcm"
            ds.save_as(path, enforce_file_format=True)
            try:
                answer = run_job(loaded, model_name, path, list(methods), target, folder)
            except (DataError, ConfigError) as exc:
                summary["skipped"].append({"sop_instance": str(ds.SOPInstanceUID), "reason": str(exc)})
                continue
            produced = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm")) if p.name != "input.dcm"]
            summary["stored"] += pacs.store(produced)
            summary["explained"].append({"sop_instance": str(ds.SOPInstanceUID),
                                         "prediction": answer["prediction"],
                                         "objects": len(produced), "skipped": answer["skipped"]})
    return summary
