"""``pellucid node``: a DICOM node a PACS or a modality routes studies to.

- **Receiving** (DIMSE C-STORE SCP, pynetdicom; ``accept_from`` limits the calling AE titles
  let in, others are rejected at association): each instance is written whole into the spool
  (:mod:`pellucid.node.spool`) before the success status goes back; a write that fails (a full
  disk) answers A700 "out of resources", so the sender keeps the instance and sends it again.
- **Explaining** (``workers`` threads, each with its own copy of each model, since an explainer
  hooks the model it runs on): a study no instance arrived for in ``settle_seconds`` is claimed
  by one worker (the claim is an atomic rename); each of its images goes to the first route that
  takes it (modality, body part, SOP class), through the same case pipeline as ``pellucid explain
  --pacs`` (intended use, the training-data check, the content-derived UIDs); an image no route
  takes, or its model refuses, is counted as refused with its reason.
- **Delivering** (a thread per destination, so that one down holds back no other): each result
  waits in the outbox of every destination of its route and goes by C-STORE or STOW-RS (one try
  each: the node's backoff, not the client's); a failure is retried with exponential backoff, and
  one that lasts ``alert_after_seconds`` raises an alert (log line and counter) naming the
  study's reference and the destination. A delivered result is recorded in the spool's ledger
  and never sent again.

Killed at any point (kill -9), the node restarts where it stopped: what was acknowledged is in the
spool, a claimed study without ``done.json`` is explained again (the same content has the same
UIDs, and the ledger holds back what was delivered), and the outbox is delivered. The one window
left, a result stored by the destination just before the ledger records it, sends that result again
under the same SOP Instance UID, which a PACS keeps once.

``GET /health`` (JSON) and ``GET /metrics`` (Prometheus text: received, explained, delivered,
refused, retried, alerts, and the queue sizes) on 127.0.0.1:``http_port``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pellucid.errors import PellucidError
from pellucid.node.routing import Destination, NodeConfig, Route
from pellucid.node.spool import Spool, reference

log = logging.getLogger("pellucid.node")

COUNTERS = ("received", "explained", "delivered", "refused", "retried", "alerts")
OUT_OF_RESOURCES = 0xA700


class Node:
    """The node of a :class:`NodeConfig`: :meth:`start` its threads, :meth:`stop` them."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.counts: Counter[str] = Counter({k: 0 for k in COUNTERS})
        self._models: dict[tuple[int, str], Any] = {}  # (worker, model path) -> loaded model
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._http: ThreadingHTTPServer | None = None
        self._failing: dict[str, tuple[float, int, float]] = {}  # dest -> (since, attempts, due)
        self._alerted: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Node:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        if self.config.accept_from:
            ae.require_calling_aet = list(self.config.accept_from)
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if self.config.workers > 1:  # the cores shared between the workers, not each taking all
            import os

            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.config.workers))
        left = self.spool.unfinished()  # what a killed node left claimed, shared by the workers
        loops = [(lambda w=w: self._explain_loop(w, left), f"explain-{w}")
                 for w in range(self.config.workers)]
        loops += [(lambda d=d: self._deliver_loop(d), f"deliver-{d.name}")  # one down holds no other
                  for d in self.config.destinations.values()]
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"pellucid-node-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.http_port:
            self._http = ThreadingHTTPServer(("127.0.0.1", self.config.http_port), _handler(self))
            thread = threading.Thread(target=self._http.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("node %s listening on %s:%d", self.config.ae_title, self.config.host, self.config.port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=30)

    def request_stop(self) -> None:
        """Ask the threads to finish (a signal handler may call it)."""
        self._stop.set()

    def wait(self) -> None:
        """Run until stopped (SIGTERM or Ctrl-C in ``pellucid node``)."""
        while not self._stop.wait(0.5):
            pass

    # -- receiving -------------------------------------------------------------------------
    def _on_store(self, event) -> int:
        from pydicom.filewriter import dcmwrite

        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study = str(ds.StudyInstanceUID)
            buffer = io.BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            ref = self.spool.receive(study, str(ds.SOPInstanceUID), buffer.getvalue())
        except OSError as exc:  # a full disk, a spool gone: the sender keeps the instance
            self._count("refused")
            self._count("alerts")
            log.error("ALERT cannot spool an instance (%s): refused with A700, the sender keeps it",
                      exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        except Exception as exc:  # a dataset that cannot be written back: refuse it, say so
            self._count("refused")
            log.warning("instance refused: %s", type(exc).__name__)
            return 0xC000
        self._count("received")
        self.spool.audit("received", study=ref, modality=str(ds.get("Modality", "")),
                         sop_class=str(ds.get("SOPClassUID", "")))
        return 0x0000

    # -- explaining ------------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += n

    def _explain_loop(self, worker: int, left: list[Path]) -> None:
        while left and not self._stop.is_set():  # what a killed node left claimed
            try:
                batch = left.pop(0)
            except IndexError:
                break
            self._guarded(batch, lambda b: self._explain_batch(b, worker))
        while not self._stop.is_set():
            for ref in self.spool.settled(self.config.settle_seconds):
                if self._stop.is_set():
                    return
                batch = self.spool.claim(ref)  # None: another worker claimed it first
                if batch is not None:
                    self._guarded(batch, lambda b: self._explain_batch(b, worker))
            self._stop.wait(0.2)

    def _guarded(self, batch: Path, work) -> bool:
        """Run ``work(batch)``; a failure pellucid did not foresee (a spool that cannot be
        written, a corrupt file) never stops the thread: the batch is set aside in
        ``spool/failed/`` and an alert names the study. Returns whether ``work`` returned true."""
        try:
            return bool(work(batch))
        except Exception as exc:
            ref = batch.name.split(".")[0]
            self._count("alerts")
            log.error("ALERT study %s: %s failed (%s); set aside in the spool's failed/ folder",
                      ref, batch.parent.name, type(exc).__name__)
            with contextlib.suppress(Exception):
                self.spool.audit("alert", study=ref, reason=f"{batch.parent.name} failed: "
                                 f"{type(exc).__name__}")
                self.spool.set_aside(batch)
            return False

    def _model(self, route: Route, worker: int):
        key = (worker, route.model)
        if key not in self._models:
            from pellucid.models import load_model

            self._models[key] = load_model(route.model)
        return self._models[key]

    def _explain_batch(self, batch: Path, worker: int = 0) -> None:
        import pydicom

        from pellucid.pacs import explain_instances
        from pellucid.pipeline.evidence import load_options_evidence

        done = batch / "done.json"
        if done.is_file():  # explained; killed before its images were deleted
            self.spool.finish(batch, json.loads(done.read_text()))
            return
        ref = batch.name.split(".")[0]
        instances = []
        for path in sorted(batch.glob("*.dcm")):
            try:
                instances.append(pydicom.dcmread(path))
            except Exception as exc:
                log.warning("study %s: an unreadable instance (%s)", ref, type(exc).__name__)
        summary: dict[str, Any] = {"study": ref, "routes": {}, "refused": []}
        taken: dict[str, list[Any]] = {}
        for ds in instances:
            route = next((r for r in self.config.routes if r.takes(ds)), None)
            if route is None:
                if "PixelData" in ds:
                    summary["refused"].append({"modality": str(ds.get("Modality", "")),
                                               "reason": "no route takes this image"})
                continue
            taken.setdefault(route.name, []).append(ds)
        for route in self.config.routes:
            if route.name not in taken:
                continue
            try:
                model, options = self._model(route, worker), route.options()
                result = explain_instances(
                    taken[route.name], model, Path(route.model).name, options,
                    batch / f"results-{route.name}", self._outbox(route, batch.name),
                    load_options_evidence(model, options), study=f"study {ref}")
            except PellucidError as exc:
                summary["refused"].append({"route": route.name, "reason": str(exc)})
                continue
            except Exception as exc:  # one route's failure never stops the others
                # the type only: an exception's text may quote DICOM header values
                log.error("study %s, route %s failed: %s", ref, route.name, type(exc).__name__)
                summary["refused"].append({"route": route.name,
                                           "reason": f"unexpected {type(exc).__name__}"})
                continue
            summary["routes"][route.name] = {
                "explained": len(result["explained"]), "results": len(result["stored"]),
                "skipped": [s["reason"] for s in result["skipped"]]}
            self._count("explained", len(result["explained"]))
            summary["refused"] += [{"route": route.name, "reason": s["reason"]}
                                   for s in result["skipped"]]
        self._count("refused", len(summary["refused"]))
        self.spool.audit("explained", study=ref, routes=summary["routes"],
                         refused=[r["reason"] for r in summary["refused"]])
        self.spool.finish(batch, summary)

    def _outbox(self, route: Route, batch: str):
        """The pipeline's ``deliver``: each result into the outbox of each of the route's
        destinations (not where the ledger says it was delivered)."""
        def deliver(datasets: list[Any]) -> list[str]:
            from pydicom.filewriter import dcmwrite

            uids = []
            for ds in datasets:
                buffer = io.BytesIO()
                dcmwrite(buffer, ds, enforce_file_format=True)
                for name in route.destinations:
                    self.spool.put_result(name, batch, str(ds.SOPInstanceUID), buffer.getvalue())
                uids.append(str(ds.SOPInstanceUID))
            return uids
        return deliver

    # -- delivering ------------------------------------------------------------------------
    def _deliver_loop(self, destination: Destination) -> None:
        while not self._stop.is_set():
            failing = self._failing.get(destination.name)
            if failing is None or time.time() >= failing[2]:
                for batch in self.spool.pending(destination.name):
                    if self._stop.is_set():
                        return
                    if not self._guarded(batch, lambda b: self._deliver_batch(destination, b)):
                        break
            self._stop.wait(0.2)

    def _deliver_batch(self, destination: Destination, batch: Path) -> bool:
        """Send one batch's queued results; False when the destination failed (retry later)."""
        import pydicom

        files = sorted(batch.glob("*.dcm"))
        if not files:
            if not self.spool.open_batch(batch.name):  # the worker may still be writing into it
                with contextlib.suppress(OSError):
                    batch.rmdir()
            return True
        datasets = [pydicom.dcmread(f) for f in files]
        ref = batch.name.split(".")[0]
        try:
            statuses = _send(destination, datasets)
        except Exception as exc:  # the destination down, refusing, timing out
            self._failed(destination, ref, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return False
        failed = 0
        for path, status in zip(files, statuses, strict=True):
            if status == 0 or 0xB000 <= status <= 0xBFFF:  # success, or success with a warning
                self.spool.mark_delivered(destination.name, path)
                self._count("delivered")
            else:
                failed += 1
        if failed:
            self._failed(destination, ref, f"{failed} result(s) refused by the destination")
            return False
        if destination.name in self._failing:
            log.info("destination %s delivers again", destination.describe())
        self._failing.pop(destination.name, None)
        self._alerted.discard(destination.name)
        self.spool.audit("delivered", study=ref, destination=destination.name, objects=len(files))
        return True

    def _failed(self, destination: Destination, ref: str, why: str) -> None:
        since, attempts, _ = self._failing.get(destination.name, (time.time(), 0, 0.0))
        attempts += 1
        delay = self.config.retry.delay(attempts)
        self._failing[destination.name] = (since, attempts, time.time() + delay)
        self._count("retried")
        self.spool.audit("retry", study=ref, destination=destination.name, attempt=attempts,
                         reason=why[:200], next_in_seconds=round(delay, 1))
        if time.time() - since >= self.config.retry.alert_after_seconds and \
                destination.name not in self._alerted:
            self._alerted.add(destination.name)
            self._count("alerts")
            log.error("ALERT study %s: results not delivered to %s for %.0f s (%s); still retrying",
                      ref, destination.describe(), time.time() - since, why[:200])
            self.spool.audit("alert", study=ref, destination=destination.name, reason=why[:200])

    # -- health ----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"status": "ok", "ae_title": self.config.ae_title, **dict(self.counts),
                "incoming": self.spool.count("incoming"), "outbox": self.spool.count("outbox"),
                "failing_destinations": sorted(self._failing)}

    def metrics(self) -> str:
        lines = []
        for name in COUNTERS:
            lines += [f"# TYPE pellucid_node_{name}_total counter",
                      f"pellucid_node_{name}_total {self.counts[name]}"]
        for name in ("incoming", "outbox"):
            lines += [f"# TYPE pellucid_node_{name} gauge",
                      f"pellucid_node_{name} {self.spool.count(name)}"]
        return "\n".join(lines) + "\n"


def _send(destination: Destination, datasets: list[Any]) -> list[int]:
    """Statuses of sending ``datasets`` (0: stored); raises when the destination cannot be reached."""
    if destination.kind == "cstore":
        from pellucid.pacs import c_store

        return c_store(datasets, destination.host, destination.port, destination.ae_title)
    import os

    from pellucid.pacs import DicomWeb

    web = DicomWeb(destination.url, os.environ.get("PELLUCID_PACS_USER"),
                   os.environ.get("PELLUCID_PACS_PASSWORD"), retry=False)  # the node's backoff
    web.store(datasets)
    return [0] * len(datasets)


def _handler(node: Node):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            if self.path == "/health":
                body, kind = json.dumps(node.health()).encode(), "application/json"
            elif self.path == "/metrics":
                body, kind = node.metrics().encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # no request lines in the node's log
            pass

    return Handler


def study_reference(uid: str) -> str:
    """The reference the node's logs and folders name a study by (see :mod:`pellucid.node.spool`)."""
    return reference(uid)
