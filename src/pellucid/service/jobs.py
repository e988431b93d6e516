"""One explanation job of the REST service, as a worker process runs it: the upload (read within
the decode limits) through the case pipeline (:mod:`pellucid.pipeline`), with overlays, raw maps
and, for DICOM input, the DICOM objects written into the job's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pellucid.errors import ConfigError, ModelError, PellucidError
from pellucid.service.folders import ModelFolders


class ModelUnavailable(ModelError):
    """A served model whose files cannot be loaded (the operator's problem, not the request's)."""


class Models(ModelFolders):
    """The model folders under ``folder``, each loaded once on first use."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self._loaded: dict[str, Any] = {}

    def get(self, name: str):
        from pellucid.models import load_model

        if name not in self.names():
            raise ConfigError(f"unknown model {name!r}; available: {', '.join(self.names()) or 'none'}")
        if name not in self._loaded:
            try:
                self._loaded[name] = load_model(self.folder / name)
            except PellucidError as exc:
                raise ModelUnavailable(f"model {name!r} cannot be loaded ({exc})") from None
        return self._loaded[name]


def run_job(loaded, model_name: str, path: Path, methods: list[str], target: str | None,
            out: Path, outside_intended_use: bool = False, segmentation: str = "binary"
            ) -> dict[str, Any]:
    """Explain one uploaded file with ``methods`` through the case pipeline; write overlays, maps
    and (for DICOM input) the DICOM objects to ``out``; the service's answer. A multi-frame image
    for a 2D model is explained frame by frame, as ``pellucid explain`` does (:func:`_frames`)."""
    from pellucid.pipeline import CaseOptions, explain_case, read_case, write_case
    from pellucid.pipeline.frames import multiframe_for_2d

    options = CaseOptions(list(methods), target, outside_intended_use=outside_intended_use,
                          segmentation=segmentation)
    options.check()
    if multiframe_for_2d(loaded, path):
        return _frames(loaded, model_name, path, options, out)
    result = explain_case(loaded, read_case(loaded, path, options), options)
    record = write_case(result, out, dicom=True, model_name=model_name,
                        model_digest=loaded.digest(), card=loaded.card,
                        weights_file=loaded.stored())
    prediction = {k: v for k, v in record["prediction"].items() if k != "text"}
    return {"model": model_name, "prediction": prediction, "explained": record["explained"],
            "classes": record["classes"], "findings": record["findings"], "summary": record["summary"],
            "intended_use": record["intended_use"], "training_data": record["training_data"],
            "methods": [{"method": m, **entry} for m, entry in record["methods"].items()],
            "files": record["dicom_objects"], "skipped": record["skipped"]}


def _answer(record: dict[str, Any]) -> dict[str, Any]:
    """One case's part of the service's answer."""
    prediction = {k: v for k, v in record["prediction"].items() if k != "text"}
    return {"prediction": prediction, "explained": record["explained"], "classes": record["classes"],
            "findings": record["findings"], "summary": record["summary"],
            "intended_use": record["intended_use"], "training_data": record["training_data"]}


def _frames(loaded, model_name: str, path: Path, options, out: Path) -> dict[str, Any]:
    """A multi-frame image, each frame a case of its own: one answer per frame (``frames``), the
    methods of every frame (``methods``, each with its ``frame``), and the DICOM objects of the
    whole image (one Parametric Map, Segmentation and SR over the frames, the KOS)."""
    import shutil
    import tempfile

    from pellucid.pipeline import explain_case
    from pellucid.pipeline.frames import read_frames, write_frames

    # the frames' files are named after the image: "image_frame0001_gradcam.png", never after the
    # upload ("input...", which the service never serves); the copy lives outside the job folder
    with tempfile.TemporaryDirectory(prefix="pellucid-frames-") as tmp:
        image = Path(tmp) / f"image{path.suffix}"
        shutil.copyfile(path, image)
        results = [explain_case(loaded, case, options)
                   for case in read_frames(loaded, image, options)]
    record = write_frames(results, out, "image", True, model_name, loaded.digest(), loaded.card,
                          None, loaded.stored())
    frames = [{"frame": k, **_answer(r)} for k, r in enumerate(record["frames"], start=1)]
    methods = [{"method": m, "frame": k, **entry} for k, r in enumerate(record["frames"], start=1)
               for m, entry in r["methods"].items()]
    return {"model": model_name, "frames": frames, "methods": methods,
            "files": record["dicom_objects"], "skipped": record["skipped"]}
