"""Talking to a PACS: DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) through
dicomweb-client, and DIMSE C-STORE through pynetdicom; and ``pull_explain_push``: fetch a study,
explain its images, store the results (Secondary Capture overlays, Segmentation, Parametric Map,
SR) back into the same study."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pellucid.errors import ConfigError, DataError, PellucidError
from pellucid.pipeline import CaseOptions, explain_case, prepare_model, read_case, write_case
from pellucid.pipeline.evidence import load_options_evidence
from pellucid.pipeline.frames import multiframe_for_2d, read_frames, write_frames

log = logging.getLogger("pellucid.pacs")


class DicomWeb:
    """A DICOMweb endpoint, e.g. ``http://127.0.0.1:8042/dicom-web`` (Orthanc), with optional
    HTTP basic authentication. ``retry=False``: a failed request fails at once (dicomweb-client
    otherwise retries for about 30 s), for a caller with a backoff of its own."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 retry: bool = True) -> None:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session, create_session_from_user_pass

        session = create_session_from_user_pass(username, password) if username else create_session()
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(url=self.url, session=session)
        if not retry:
            self.client.set_http_retry_params(retry=False)

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
        """WADO-RS: every instance of ``study`` as pydicom datasets, in the transfer syntax it is
        stored in (``transfer-syntax=*``): a PACS that cannot transcode (Orthanc and JPEG 2000)
        would otherwise answer 500; pellucid decodes JPEG, JPEG-LS, JPEG 2000 and RLE itself."""
        return list(self._call("WADO-RS", self.client.retrieve_study, study,
                               media_types=(("application/dicom", "*"),)))


def c_store(datasets: Sequence[Any], host: str, port: int, called_ae: str = "ORTHANC",
            calling_ae: str = "PELLUCID") -> list[int]:
    """DIMSE C-STORE of ``datasets`` to ``host:port``; returns the status of each (0 = success)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        syntax = ds.file_meta.TransferSyntaxUID if hasattr(ds, "file_meta") and \
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


def pull_explain_push(pacs: DicomWeb, study: str, loaded, model_name: str, options: CaseOptions,
                      out: Path) -> dict[str, Any]:
    """Fetch ``study``, explain what the model can take through the case pipeline (every option of
    ``pellucid explain`` applies): each image for a 2D model, each series (slices sorted along
    their normal, or one multi-frame instance) for a 3D model. Write each case's outputs into
    ``out`` (named by SOP or Series Instance UID) with ``summary.json``, and store the DICOM objects
    back into the study. An input the model cannot or should not take (intended use) is skipped
    with its reason. Returns {"explained": [...], "stored": [SOP Instance UIDs], "skipped": [...]}."""
    options.check()
    if loaded.card is None:
        raise ConfigError("pull-explain-push needs a model card (a zoo folder, or card.json beside "
                          "the weights) to know what the model takes")
    evidence = load_options_evidence(loaded, options)  # refused here, before anything is pulled
    instances = pacs.retrieve_study(study)
    if not instances:
        raise DataError(pacs.url, f"study {study} has no instances")
    return explain_instances(instances, loaded, model_name, options, out, pacs.store, evidence,
                             f"study {study}")


def explain_instances(instances: Sequence[Any], loaded, model_name: str, options: CaseOptions,
                      out: Path, deliver, evidence=None, study: str = "the study"
                      ) -> dict[str, Any]:
    """Explain the images among ``instances`` (one study's datasets) as :func:`pull_explain_push`
    does, handing each case's DICOM objects to ``deliver(datasets) -> stored SOP Instance UIDs``
    as soon as they are written (STOW-RS for a pull, the node's outbox for a study routed to it).
    SEG, SR, presentation states and pellucid's own objects are never taken as images."""
    import pydicom

    images = [ds for ds in instances if "PixelData" in ds
              and str(ds.get("Modality", "")) not in ("SEG", "SR", "PR")
              and str(ds.get("Manufacturer", "")) != "pellucid"]  # not pellucid's own results
    units = _units(images, loaded.card.spatial_dims)
    if options.truth is not None and len(units) != 1:
        raise ConfigError(f"--truth is the mask of one case; {study} has {len(units)}")
    model = prepare_model(loaded, options)
    digest = model.digest()  # the weights identify the model in the objects' UIDs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"explained": [], "stored": [], "skipped": []}
    records = []
    for uid, datasets in units:
        with tempfile.TemporaryDirectory() as tmp:
            for k, ds in enumerate(datasets):
                ds.save_as(Path(tmp) / f"{k:05d}.dcm", enforce_file_format=True)
            path = Path(tmp) if len(datasets) > 1 else Path(tmp) / "00000.dcm"
            try:
                if multiframe_for_2d(model, path):  # each frame a case of its own
                    results = [explain_case(model, case, options)
                               for case in read_frames(model, path, options)]
                    record = write_frames(results, out, uid, True, model_name, digest, model.card,
                                          evidence, model.stored())
                else:
                    result = explain_case(model, read_case(model, path, options), options)
                    record = write_case(result, out, stem=uid, dicom=True, model_name=model_name,
                                        model_digest=digest, card=model.card, evidence=evidence,
                                        weights_file=model.stored())
            except PellucidError as exc:
                summary["skipped"].append({"uid": uid, "reason": str(exc)})
                continue
            except Exception as exc:  # one instance's unexpected failure never stops the study
                log.warning("instance %s failed: %s", uid, type(exc).__name__)
                summary["skipped"].append({"uid": uid, "reason": f"unexpected {type(exc).__name__} "
                                           f"while explaining it (pellucid's log has the type)"})
                continue
        records.append({"uid": uid, **record})
        produced = [pydicom.dcmread(out / name) for name in record["dicom_objects"]]
        produced += [pydicom.dcmread(out / e["dicom"]) for e in record.get("methods", {}).values()
                     if "dicom" in e]
        summary["stored"] += deliver(produced)
        answers = record.get("frames", [record])
        summary["explained"].append({"uid": uid, "prediction": [a["prediction"] for a in answers]
                                     if "frames" in record else record["prediction"],
                                     "findings": " | ".join(a["summary"] for a in answers),
                                     "objects": len(produced), "skipped": record["skipped"]})
    (out / "summary.json").write_text(json.dumps(records, indent=2, default=float) + "\n")
    return summary


def _units(images: Sequence[Any], spatial_dims: int) -> list[tuple[str, list[Any]]]:
    """What one case is: an image (SOP Instance UID) for a 2D model; for a 3D model a series
    (Series Instance UID) of single-frame slices, or a multi-frame instance on its own."""
    if spatial_dims == 2:
        return [(str(ds.SOPInstanceUID), [ds]) for ds in images]
    series: dict[str, list[Any]] = {}
    units = []
    for ds in images:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            units.append((str(ds.SOPInstanceUID), [ds]))
        else:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return units + list(series.items())
