"""The REST service (FastAPI): ``POST /v1/explain`` takes one DICOM, NIfTI or PNG/JPEG/TIFF file
(multipart form field ``file``) with a model name, methods, an optional target and
``outside_intended_use`` (true to explain an input outside the model card's intended use, recorded
in every output) and ``segmentation`` (binary, the default, or fractional: the DICOM SEG of the
first method's map), and answers JSON:
the prediction, every class's probability, a summary per method, and links to the PNG overlays,
raw maps and, for DICOM input, the DICOM objects (Secondary Capture overlay per method,
Segmentation, Parametric Map where the source has a frame of reference, and the SR).
``GET /v1/models`` lists the models, ``GET /health`` answers (and says whether the workers are
warm), ``GET /ready`` is 200 only when every worker has loaded every model, ``/docs`` serves the
OpenAPI docs (behind the API key when one is set), ``DELETE /v1/results/{job}`` removes a job's
results.

Jobs run in a bounded pool of worker processes (:mod:`pellucid.service.workers`), never on the
event loop. Bad input gets a status and a one-line reason, never a traceback: not an image or
non-finite pixels (400), missing or wrong API key (401), an upload that does not arrive in time
(408), too large, as an upload (checked as it streams in) or as decoded pixels declared in the
header or a compressed DICOM's codestream (413, naming the limit; refused by the server itself,
before a worker is needed), not multipart (415), an image the model
cannot take or is not meant for (422: the card's intended use names what differs), every worker
busy and the queue full (503 with Retry-After; a job is admitted only once its whole body has
arrived), over the job's
time limit (504). The upload is deleted on every path; results are private to the server's user
(0600 files in 0700 folders) and deleted after ``retention_hours``. Logs carry the job id, sizes,
model and methods, never file names or DICOM header values. See docs/security.md.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.requests import ClientDisconnect

from pellucid.errors import ConfigError, DataError
from pellucid.guards import SERVICE_LIMITS, DecodeLimits, TooLarge
from pellucid.registry import normalise
from pellucid.service.folders import ModelFolders
from pellucid.service.workers import Busy, Job, JobFailed, JobTimeout, PoolConfig, WorkerPool
from pellucid.version import __version__

log = logging.getLogger("pellucid.service")
SUFFIXES = {"dicom": ".dcm", "nifti-gz": ".nii.gz", "nifti": ".nii", "png": ".png", "jpeg": ".jpg",
            "tiff": ".tif"}


@dataclass
class ServiceConfig:
    """The service's limits (see docs/security.md for what each bounds)."""

    api_key: str | None = None
    max_upload_mb: float = 64.0
    max_methods: int = 8
    workers: int = 2
    queue: int = 8
    job_timeout_s: float = 300.0
    retention_hours: float = 24.0  # 0 keeps results until deleted
    threads: int | None = None
    body_timeout_s: float = 120.0  # the whole upload must arrive within this (then 408)
    body_idle_s: float = 15.0  # longest pause between two pieces of an upload (then 408)
    receive_budget_mb: float = 512.0  # bytes of uploads held in memory at once (then 503)
    limits: DecodeLimits = field(default_factory=lambda: SERVICE_LIMITS)

    def __post_init__(self) -> None:
        checks = {"max_upload_mb": self.max_upload_mb > 0, "max_methods": self.max_methods >= 1,
                  "workers": self.workers >= 1, "queue": self.queue >= 0,
                  "job_timeout_s": self.job_timeout_s > 0, "retention_hours": self.retention_hours >= 0,
                  "body_timeout_s": self.body_timeout_s > 0, "body_idle_s": self.body_idle_s > 0,
                  "receive_budget_mb": self.receive_budget_mb >= self.max_upload_mb}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name}: got {getattr(self, name)!r}, which is out of range")
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable()):
            raise ConfigError("api key: give a non-empty printable key")


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
        return "nifti-gz"  # gzip: a .nii.gz (the reader checks it)
    if len(head) >= 348 and head[344:348] == b"n+1\x00":  # a single-file NIfTI-1
        return "nifti"
    return None


def _same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of secrets of any characters (bytes, so non-ASCII is no error)."""
    return secrets.compare_digest((given or "").encode("utf-8", "surrogateescape"),
                                  expected.encode("utf-8", "surrogateescape"))


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=False, exist_ok=False)
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class Retention:
    """Deletes job folders older than ``hours`` (checked at most once a minute)."""

    def __init__(self, results: Path, hours: float) -> None:
        self.results, self.seconds, self._last = results, hours * 3600, 0.0

    def sweep(self, force: bool = False) -> int:
        now = time.time()
        if self.seconds <= 0 or (not force and now - self._last < 60):
            return 0
        self._last = now
        removed = 0
        for folder in self.results.iterdir():
            if folder.is_dir() and folder.name.isalnum() and now - folder.stat().st_mtime > self.seconds:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("retention: removed %d job folder(s) older than %g h", removed, self.seconds / 3600)
        return removed


def create_app(models: str | Path, out: str | Path = "pellucid_results", api_key: str | None = None,
               max_upload_mb: float = 64.0, config: ServiceConfig | None = None) -> FastAPI:
    """The FastAPI application serving the models under ``models``; ``config`` sets every limit
    (``api_key`` and ``max_upload_mb`` are shortcuts for its fields)."""
    config = config or ServiceConfig(api_key=api_key, max_upload_mb=max_upload_mb)
    registry = ModelFolders(Path(models))
    results = Path(out)
    results.mkdir(parents=True, exist_ok=True)
    os.chmod(results, 0o700)
    limit = int(config.max_upload_mb * 2**20)
    pool = WorkerPool(PoolConfig(Path(models), config.workers, config.queue, config.job_timeout_s,
                                 config.threads, config.limits))
    retention = Retention(results, config.retention_hours)
    retention.sweep(force=True)
    key_set = config.api_key is not None
    app = FastAPI(title="pellucid", version=__version__,
                  description="Explain medical imaging models; DICOM in, DICOM out.",
                  docs_url=None if key_set else "/docs", redoc_url=None,
                  openapi_url=None if key_set else "/openapi.json")
    app.state.pool = pool
    pool.start()  # the workers import torch and the explainers while the server starts
    app.router.add_event_handler("shutdown", pool.close)

    def check_key(key: str | None) -> None:
        if config.api_key is not None and not _same_secret(key, config.api_key):
            log.info("request refused: 401 (missing or wrong API key)")
            raise HTTPException(401, "missing or wrong API key (X-API-Key)")

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # never a traceback to the client
        log.error("request failed: %s", type(exc).__name__)
        return JSONResponse({"detail": "internal error; the request was not processed"}, 500)

    @app.get("/health")
    def health() -> dict:
        """Liveness: the server answers; ``ready`` says whether every worker is warm."""
        return {"status": "ok", "version": __version__, "ready": pool.ready,
                "workers_ready": pool.workers_ready, "jobs_in_flight": pool.in_flight}

    @app.get("/ready")
    def ready() -> JSONResponse:
        """Readiness: 200 only when every worker has started and loaded every model, else 503."""
        body = {"ready": pool.ready, "workers_ready": pool.workers_ready,
                "workers": config.workers}
        return JSONResponse(body, 200 if body["ready"] else 503)

    if key_set:
        @app.get("/openapi.json", include_in_schema=False)
        def openapi(x_api_key: str | None = Header(None)) -> dict:
            check_key(x_api_key)
            return app.openapi()

        @app.get("/docs", include_in_schema=False)
        def docs(x_api_key: str | None = Header(None)):
            from fastapi.openapi.docs import get_swagger_ui_html

            check_key(x_api_key)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="pellucid")

    @app.get("/v1/models")
    def list_models(x_api_key: str | None = Header(None)) -> dict:
        check_key(x_api_key)
        out_models = []
        for name in registry.names():
            try:
                card = json.loads((registry.folder / name / "card.json").read_text())
            except (OSError, ValueError):
                card = {"task": None}
            out_models.append({"name": name, "task": card.get("task"), "arch": card.get("arch"),
                               "classes": card.get("class_names"),
                               "input_size": card.get("input_size"),
                               "in_channels": card.get("in_channels")})
        try:
            methods = pool.methods()
        except JobFailed as exc:
            raise refuse(exc.status, exc.reason) from None
        return {"models": out_models, "methods": methods,
                "limits": {"max_upload_mb": config.max_upload_mb, "max_methods": config.max_methods,
                           "max_pixels": config.limits.max_pixels,
                           "max_voxels": config.limits.max_voxels,
                           "max_frames": config.limits.max_frames,
                           "job_timeout_s": config.job_timeout_s}}

    def refuse(status: int, reason: str, job: str | None = None, **headers: str) -> HTTPException:
        log.info("%s: refused, %d", f"job {job}" if job else "request", status)
        return HTTPException(status, reason, headers=headers or None)

    async def methods_of(text: str) -> list[str]:
        """The requested methods (names normalised as the registry does, duplicates once)."""
        given: dict[str, str] = {}
        for m in text.split(","):
            if normalise(m):
                given.setdefault(normalise(m), m.strip())
        methods = list(given)
        if not methods:
            raise refuse(400, "methods: give at least one method")
        if len(methods) > config.max_methods:
            raise refuse(400, f"methods: at most {config.max_methods} methods per request, got "
                              f"{len(methods)}")
        try:  # the workers report the names they serve once started (a wait, off the event loop)
            known = {normalise(n): n for n in await anyio.to_thread.run_sync(pool.methods)}
        except JobFailed as exc:
            raise refuse(exc.status, exc.reason) from None
        for m in methods:
            if m not in known:
                raise refuse(400, f"unknown method {given[m][:64]!r}; available: "
                                  f"{', '.join(known.values())}")
        return [known[m] for m in methods]

    receiving = {"bytes": 0}

    async def read_body(request: Request) -> bytes:
        """The request body, read under the time limits (``body_timeout_s`` in all,
        ``body_idle_s`` between pieces: 408) and stopped at the size limit as it streams in (413;
        a chunked body has no length to check first). Bytes held across all uploads being
        received are bounded by ``receive_budget_mb`` (503)."""
        cap = limit + 65536  # the form's boundaries and fields around the file
        budget = int(config.receive_budget_mb * 2**20)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + config.body_timeout_s
        stream = request.stream().__aiter__()
        try:
            while True:
                wait = min(deadline - time.monotonic(), config.body_idle_s)
                try:
                    with anyio.fail_after(max(wait, 0.001)):
                        chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise refuse(408, f"the upload did not arrive in time (body_idle_s "
                                      f"{config.body_idle_s:g} s between pieces, body_timeout_s "
                                      f"{config.body_timeout_s:g} s in all)",
                                 Connection="close") from None
                size += len(chunk)
                receiving["bytes"] += len(chunk)
                if size > cap:
                    raise refuse(413, f"upload larger than {config.max_upload_mb:g} MB "
                                      f"(max_upload_mb)", Connection="close")
                if receiving["bytes"] > budget:
                    raise refuse(503, "the server is receiving too many uploads; retry later",
                                 **{"Retry-After": "5", "Connection": "close"})
                chunks.append(chunk)
        except ClientDisconnect:
            raise refuse(400, "the client disconnected before the upload arrived") from None
        finally:
            receiving["bytes"] -= size
        return b"".join(chunks)

    @app.post("/v1/explain")
    async def explain(request: Request, x_api_key: str | None = Header(None)) -> dict:
        check_key(x_api_key)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise refuse(415, "send multipart/form-data with a 'file' field")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 65536:
            raise refuse(413, f"upload larger than {config.max_upload_mb:g} MB (max_upload_mb)",
                         Connection="close")
        request._body = await read_body(request)  # the form parser reads it from here
        return await accepted(request)

    def precheck(path: Path, kind: str, model_name: str) -> None:
        """Header-level refusals in the server, before a worker is needed: the size the header
        (and a compressed DICOM's codestreams) declares against the limits, and a file no model of
        the card's dimensionality takes."""
        from pellucid.guards import decode_limits
        from pellucid.io.headers import check_fits, declared

        with decode_limits(config.limits):
            size = declared(path, kind)
            try:
                dims = int(json.loads((registry.folder / model_name / "card.json").read_text())
                           ["spatial_dims"])
            except (OSError, ValueError, KeyError, TypeError):
                return  # the worker reports a broken card (503)
            check_fits(path, size, dims)

    async def accepted(request: Request) -> dict:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise refuse(400, "no 'file' field in the form")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise refuse(413, f"upload larger than {config.max_upload_mb:g} MB (max_upload_mb)")
        kind = sniff(data[:400])
        if kind is None:
            raise refuse(400, "not a DICOM, NIfTI-1 or PNG/JPEG/TIFF file")
        model_name = str(form.get("model") or (registry.names() or [""])[0])
        if model_name not in registry.names():
            raise refuse(400, f"unknown model {model_name[:64]!r}; available: "
                              f"{', '.join(registry.names()) or 'none'}")
        target = form.get("target")
        target = str(target) if target else None
        if target is not None and (len(target) > 128 or not target.isprintable()):
            raise refuse(400, "target: give a class name or index (at most 128 printable characters)")
        override = str(form.get("outside_intended_use") or "false").strip().lower()
        if override not in ("true", "false"):
            raise refuse(400, "outside_intended_use: give true or false")
        segmentation = str(form.get("segmentation") or "binary").strip().lower()
        if segmentation not in ("binary", "fractional"):
            raise refuse(400, "segmentation: give binary or fractional")
        await anyio.to_thread.run_sync(retention.sweep)
        job = secrets.token_hex(8)
        folder = results / job
        _private_folder(folder)
        path = folder / f"input{SUFFIXES[kind]}"
        start = time.perf_counter()
        ok = admitted = False
        try:
            await anyio.to_thread.run_sync(_write_private, path, data)
            del data
            try:
                await anyio.to_thread.run_sync(precheck, path, kind, model_name)
            except DataError as exc:
                status = 413 if isinstance(exc, TooLarge) else \
                    422 if "cannot go to" in str(exc) else 400
                raise refuse(status, str(exc).replace(str(path), "the upload"), job) from None
            methods = await methods_of(str(form.get("methods") or "gradcam"))  # needs a worker
            try:
                pool.admit()  # counted only now that the whole upload is here and plausible
                admitted = True
            except Busy:
                raise refuse(503, "every worker is busy and the queue is full; retry later", job,
                             **{"Retry-After": "5"}) from None
            log.info("job %s: accepted, %s upload of %d bytes, model %s, methods %s", job, kind,
                     path.stat().st_size, model_name, ",".join(methods))
            answer = await anyio.to_thread.run_sync(
                pool.run, Job(model_name, path, methods, target, folder, override == "true",
                                     segmentation))
            ok = True
        except JobTimeout:
            raise refuse(504, f"the job ran past the time limit of {config.job_timeout_s:g} s "
                              f"(job_timeout_s)", job) from None
        except JobFailed as exc:
            raise refuse(exc.status, exc.reason, job) from None
        finally:
            if admitted:
                pool.release()
            path.unlink(missing_ok=True)  # the upload is never kept
            if not ok:
                shutil.rmtree(folder, ignore_errors=True)
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

    def job_folder(job: str) -> Path:
        if not (job.isascii() and job.isalnum() and len(job) <= 64):
            raise HTTPException(404, "no such result")
        return results / job

    @app.get("/v1/results/{job}/{name}")
    def download(job: str, name: str, x_api_key: str | None = Header(None)):
        check_key(x_api_key)
        folder = job_folder(job)
        if "/" in name or "\\" in name or name.startswith(".") or name.startswith("input"):
            raise HTTPException(404, "no such result")
        path = folder / name
        if not path.is_file():
            raise HTTPException(404, "no such result")
        media = {".png": "image/png", ".dcm": "application/dicom", ".npy": "application/octet-stream",
                 ".gz": "application/gzip"}
        return FileResponse(path, media_type=media.get(path.suffix, "application/octet-stream"))

    @app.delete("/v1/results/{job}")
    def delete(job: str, x_api_key: str | None = Header(None)) -> dict:
        check_key(x_api_key)
        folder = job_folder(job)
        if not folder.is_dir():
            raise HTTPException(404, "no such result")
        shutil.rmtree(folder)
        log.info("job %s: results deleted on request", job)
        return {"job": job, "deleted": True}

    return app
