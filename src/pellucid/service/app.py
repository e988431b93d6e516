"""The REST service (FastAPI): ``POST /v1/explain`` takes one DICOM, NIfTI or PNG/JPEG/TIFF file
(multipart form field ``file``) with a model name, methods and an optional target, and answers JSON:
the prediction, every class's probability, a summary per method, and links to the PNG overlays,
raw maps and, for DICOM input, the DICOM objects (Secondary Capture overlay per method,
Segmentation, Parametric Map where the source has a frame of reference, and the SR).
``GET /v1/models`` lists the models, ``GET /health`` answers, ``/docs`` serves the OpenAPI docs.

Bad input gets a status and a one-line reason, never a traceback: not an image (400), too large
(413), not multipart (415), an image the model cannot take (422). An optional API key is checked on
``X-API-Key``. Logs carry the job id, sizes, model and methods, never file names or DICOM header
values.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from pellucid.errors import ConfigError, DataError, ModelError, PellucidError

log = logging.getLogger("pellucid.service")
SUFFIXES = {"dicom": ".dcm", "nifti": ".nii.gz", "png": ".png", "jpeg": ".jpg", "tiff": ".tif"}


def sniff(head: bytes) -> str | None:
    """The file type from its first bytes: dicom, nifti, png, jpeg, tiff or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: a .nii.gz (the reader checks it)
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return None


class Models:
    """The models of a folder (each sub-folder with a card.json), loaded once on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.folder.glob("*/card.json"))

    def get(self, name: str):
        from pellucid.models import load_model

        if name not in self.names():
            raise ConfigError(f"unknown model {name!r}; available: {', '.join(self.names()) or 'none'}")
        if name not in self._loaded:
            self._loaded[name] = load_model(self.folder / name)
        return self._loaded[name]


def _probabilities(loaded, output: torch.Tensor) -> dict[str, float]:
    card = loaded.card
    names = card.class_names
    if output.ndim > 2:
        act = torch.sigmoid(output) if card.activation == "sigmoid" else torch.softmax(output, 1)
        return {n: float((act[0, k] > 0.5).float().mean()) for k, n in enumerate(names)}
    probs = torch.sigmoid(output[0]) if card.activation == "sigmoid" else torch.softmax(output[0], 0)
    return {n: float(p) for n, p in zip(names, probs, strict=True)}


def run_job(loaded, model_name: str, path: Path, methods: list[str], target: str | None,
            out: Path) -> dict[str, Any]:
    """Explain one input file with ``methods``; write overlays, maps and DICOM objects to ``out``."""
    import pellucid
    from pellucid import viz
    from pellucid.data.inputs import load_input
    from pellucid.explain_files import resolve_target
    from pellucid.explainers.base import upsample

    card = loaded.card
    item = load_input(path, card.in_channels, card.input_size, card.spatial_dims)
    x = card.normalize(item.image[None])
    tgt = resolve_target(loaded, target)
    result: dict[str, Any] = {"model": model_name, "methods": [], "files": [], "skipped": []}
    first_map = None
    for method in methods:
        exp = pellucid.explain(loaded, x, method, target=tgt)
        explained = int(exp.target.classes[0])
        if "classes" not in result:
            probs = _probabilities(loaded, exp.output)
            result["classes"] = probs
            name = card.class_names[explained]
            result["prediction"] = {"class": name, "index": explained, "probability": probs[name]}
        att = upsample(exp.attributions, tuple(item.original.shape[1:]), "linear")[0, 0]
        heat = att.cpu().numpy().astype(np.float32)
        first_map = heat if first_map is None else first_map
        stem = f"{method}"
        fig = viz.overlay(item.original, att[None], title=f"{method} | {result['prediction']['class']}"
                          f" p={result['prediction']['probability']:.2f}")
        viz.save(fig, out / f"{stem}.png")
        if item.affine is not None and heat.ndim == 3:  # a volume: NIfTI with the source affine
            import nibabel as nib

            nib.save(nib.Nifti1Image(heat, item.affine), str(out / f"{stem}.nii.gz"))
            map_name = f"{stem}.nii.gz"
        else:
            np.save(out / f"{stem}.npy", heat)
            map_name = f"{stem}.npy"
        entry = {"method": method, "seconds": round(exp.cost.seconds, 4),
                 "forward_passes": exp.cost.forward_passes, "backward_passes": exp.cost.backward_passes,
                 "layer": exp.layer, "overlay": f"{stem}.png", "map": map_name,
                 "max_location": [int(v) for v in np.unravel_index(int(heat.argmax()), heat.shape)]}
        if item.datasets and heat.ndim == 2:
            try:
                entry["dicom"] = _write_sc(item, heat, method, result["prediction"], out)
            except PellucidError as exc:
                result["skipped"].append({"object": f"{method} secondary capture", "reason": str(exc)})
        result["methods"].append(entry)
    if item.datasets and first_map is not None:
        result["files"] += _write_dicom(item, first_map, methods[0], model_name, result, out)
    return result


def _write_sc(item, heat: np.ndarray, method: str, prediction: dict, out: Path) -> str:
    from pellucid.io import dicom_objects as objects

    image = item.original[0].numpy()
    rgb = objects.overlay_rgb(image, heat, f"{method}: {prediction['class']} "
                                           f"p={prediction['probability']:.2f}")
    sc = objects.secondary_capture(item.datasets[0], rgb)
    name = f"{method}_overlay.dcm"
    sc.save_as(out / name)
    return name


def _write_dicom(item, heat: np.ndarray, method: str, model_name: str, result: dict,
                 out: Path) -> list[str]:
    from pellucid.io import dicom_objects as objects

    written, source = [], item.datasets
    frames = heat if heat.ndim == 3 else heat[None]
    lo, hi = float(frames.min()), float(frames.max())
    norm = (frames - lo) / (hi - lo) if hi > lo else np.zeros_like(frames)
    pmap = seg = None
    try:
        pmap = objects.parametric_map(source, frames, method)
        pmap.save_as(out / "parametric_map.dcm")
        written.append("parametric_map.dcm")
    except PellucidError as exc:
        result["skipped"].append({"object": "parametric map", "reason": str(exc)})
    try:
        seg = objects.segmentation(source, norm >= 0.5, f"{method} region")
        seg.save_as(out / "segmentation.dcm")
        written.append("segmentation.dcm")
    except PellucidError as exc:
        result["skipped"].append({"object": "segmentation", "reason": str(exc)})
    pred = result["prediction"]
    sr = objects.structured_report(source, model_name, "0", pred["class"], pred["probability"],
                                   method, pmap, seg)
    sr.save_as(out / "report_sr.dcm")
    written.append("report_sr.dcm")
    return written


def create_app(models: str | Path, out: str | Path = "pellucid_results", api_key: str | None = None,
               max_upload_mb: float = 64.0):
    """The FastAPI application serving the models under ``models``."""
    import pellucid
    import pellucid.explainers

    registry = Models(Path(models))
    results = Path(out)
    results.mkdir(parents=True, exist_ok=True)
    limit = int(max_upload_mb * 2**20)
    app = FastAPI(title="pellucid", version=pellucid.__version__,
                  description="Explain medical imaging models; DICOM in, DICOM out.")

    def check_key(key: str | None) -> None:
        if api_key is not None and not secrets.compare_digest(key or "", api_key):
            raise HTTPException(401, "missing or wrong API key (X-API-Key)")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a traceback to the client
        log.error("request failed: %s", type(exc).__name__)
        return JSONResponse({"detail": "internal error; the request was not processed"}, 500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": pellucid.__version__}

    @app.get("/v1/models")
    def list_models(x_api_key: str | None = Header(None)) -> dict:
        check_key(x_api_key)
        out_models = []
        for name in registry.names():
            card = json.loads((registry.folder / name / "card.json").read_text())
            out_models.append({"name": name, "task": card.get("task"), "arch": card.get("arch"),
                               "classes": card.get("class_names"),
                               "input_size": card.get("input_size"),
                               "in_channels": card.get("in_channels")})
        return {"models": out_models, "methods": pellucid.explainers.names()}

    @app.post("/v1/explain")
    async def explain(request: Request, x_api_key: str | None = Header(None)) -> dict:
        check_key(x_api_key)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(415, "send multipart/form-data with a 'file' field")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 65536:
            raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
        form = await request.form(max_part_size=limit + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "no 'file' field in the form")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
        kind = sniff(data[:400])
        if kind is None:
            raise HTTPException(400, "not a DICOM, NIfTI or PNG/JPEG/TIFF file")
        model_name = str(form.get("model") or (registry.names() or [""])[0])
        methods = [m.strip() for m in str(form.get("methods") or "gradcam").split(",") if m.strip()]
        target = form.get("target")
        job = secrets.token_hex(8)
        folder = results / job
        folder.mkdir(parents=True)
        path = folder / f"input{SUFFIXES[kind]}"
        path.write_bytes(data)
        start = time.perf_counter()
        log.info("job %s: %s upload, %d bytes, model %s, methods %s", job, kind, len(data),
                 model_name, ",".join(methods))
        try:
            for m in methods:
                pellucid.explainers.create(m)
            loaded = registry.get(model_name)
        except ConfigError as exc:
            path.unlink(missing_ok=True)
            raise HTTPException(400, str(exc)) from None
        try:
            answer = run_job(loaded, model_name, path, methods, str(target) if target else None,
                             folder)
        except (DataError, ConfigError) as exc:
            log.info("job %s: rejected (%s)", job, type(exc).__name__)
            message = str(exc)
            unfit = any(p in message for p in ("cannot go to", "the model takes", "model cannot"))
            raise HTTPException(422 if unfit else 400, _anonymous(message, path)) from None
        except ModelError as exc:
            log.info("job %s: the model cannot take the input", job)
            raise HTTPException(422, _anonymous(str(exc), path)) from None
        finally:
            path.unlink(missing_ok=True)  # the upload is not kept
        base = f"/v1/results/{job}/"
        for entry in answer["methods"]:
            for key in ("overlay", "map", "dicom"):
                if key in entry:
                    entry[key] = base + entry[key]
        answer["files"] = [base + f for f in answer["files"]]
        answer["job"] = job
        answer["seconds"] = round(time.perf_counter() - start, 3)
        log.info("job %s: done in %.2f s", job, answer["seconds"])
        return answer

    @app.get("/v1/results/{job}/{name}")
    def download(job: str, name: str, x_api_key: str | None = Header(None)):
        check_key(x_api_key)
        if not job.isalnum() or "/" in name or name.startswith("."):
            raise HTTPException(404, "no such result")
        path = results / job / name
        if not path.is_file():
            raise HTTPException(404, "no such result")
        media = {".png": "image/png", ".dcm": "application/dicom", ".npy": "application/octet-stream",
                 ".gz": "application/gzip"}
        return FileResponse(path, media_type=media.get(path.suffix, "application/octet-stream"))

    return app


def _anonymous(message: str, path: Path) -> str:
    """An error message without the server-side path of the upload."""
    return message.replace(str(path), "the upload").replace(path.name, "the upload")
