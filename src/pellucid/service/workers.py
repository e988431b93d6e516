"""The service's worker pool: explanation jobs run in separate worker processes, never on the
event loop, so ``/health`` and every other request answer while jobs run.

``workers`` processes (spawned, each with ``threads`` torch threads, umask 077, DICOM library
messages redacted) take one job at a time. At most ``workers + queue`` jobs are admitted at once;
the next is refused at once with :class:`Busy` (the app answers 503 with Retry-After). A job that
runs past ``timeout`` seconds has its worker killed and replaced (:class:`JobTimeout`, 504): a hard
limit, not a request to stop. A worker that dies (a crash in a decoder, the kernel's OOM killer) is
replaced as well and the job fails cleanly. Inside a worker the decode limits bound what a reader
may allocate. A worker loads every model before it reports ready, so a job's time limit never
counts model loading, and the pool is :attr:`WorkerPool.ready` only when every worker is warm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.guards import DecodeLimits

log = logging.getLogger("pellucid.service")
STARTUP_S = 180.0  # a worker's imports on a slow, busy machine


class Busy(Exception):
    """Every worker is busy and the queue is full."""


class JobTimeout(Exception):
    """The job ran past the time limit; its worker was replaced."""


class JobFailed(Exception):
    """The job was refused or failed: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Job:
    model: str
    path: Path
    methods: list[str]
    target: str | None
    out: Path
    outside_intended_use: bool = False
    segmentation: str = "binary"


@dataclass
class PoolConfig:
    models: Path
    workers: int = 2
    queue: int = 8
    timeout: float = 300.0
    threads: int | None = None  # torch threads per worker; default: the cores shared out
    limits: DecodeLimits = field(default_factory=DecodeLimits)


def _status(exc: Exception) -> int:
    from pellucid.errors import ModelError
    from pellucid.guards import TooLarge
    from pellucid.service.jobs import ModelUnavailable

    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, ModelUnavailable):
        return 503
    if isinstance(exc, ModelError):
        return 422
    message = str(exc)
    unfit = any(p in message for p in ("cannot go to", "the model takes", "model cannot"))
    return 422 if unfit else 400


def _anonymous(message: str, path: Path) -> str:
    """An error message without the server-side path of the upload."""
    return message.replace(str(path), "the upload").replace(path.name, "the upload")


def worker_main(conn, models: str, limits: DecodeLimits, threads: int) -> None:
    """A worker process: answer jobs from ``conn`` until it closes."""
    os.umask(0o077)
    import torch

    import pellucid.explainers
    from pellucid.errors import PellucidError
    from pellucid.guards import decode_limits
    from pellucid.privacy import redact_library_messages
    from pellucid.service.jobs import Models, run_job

    redact_library_messages()
    torch.set_num_threads(max(1, threads))
    registry = Models(Path(models))
    for name in registry.names():  # warm: a job's time limit never pays for loading a model
        with contextlib.suppress(PellucidError):  # a model that cannot load is refused per job
            registry.get(name)
    _send(conn, ["ready", os.getpid(), pellucid.explainers.names()])
    while True:
        try:
            spec = json.loads(conn.recv_bytes())[0]
        except (EOFError, OSError):
            return
        job = Job(spec["model"], Path(spec["path"]), list(spec["methods"]), spec["target"],
                  Path(spec["out"]), bool(spec.get("outside_intended_use", False)),
                  str(spec.get("segmentation", "binary")))
        try:
            with decode_limits(limits):
                answer: tuple = ("ok", run_job(registry.get(job.model), job.model, job.path,
                                               job.methods, job.target, job.out,
                                               job.outside_intended_use, job.segmentation))
        except PellucidError as exc:
            answer = ("error", _status(exc), _anonymous(str(exc), job.path))
        except MemoryError:
            answer = ("error", 413, "the input needs more memory than the server allows")
        except Exception as exc:  # an unexpected failure: the type only, no data in the message
            answer = ("error", 500, f"internal error ({type(exc).__name__}); the request was not "
                                    f"processed")
        _send(conn, list(answer))


def _send(conn, message: list) -> None:
    """Messages between the server and its workers are JSON (nothing is unpickled)."""
    conn.send_bytes(json.dumps(message, default=float).encode())


def _recv(conn) -> list:
    return json.loads(conn.recv_bytes())


class _Worker:
    """One worker process; a thread reads its start-up message (the method names it serves)."""

    def __init__(self, config: PoolConfig, threads: int, on_ready) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, name="pellucid-worker", daemon=True,
                                   args=(child, str(config.models), config.limits, threads))
        self.process.start()
        child.close()
        self.ready = threading.Event()
        self.failed = False
        threading.Thread(target=self._await_ready, args=(on_ready,), daemon=True).start()

    def _await_ready(self, on_ready) -> None:
        try:
            if self.conn.poll(STARTUP_S):
                message = _recv(self.conn)
                if message[0] == "ready":
                    on_ready(message[2])
                    self.ready.set()
                    return
        except (EOFError, OSError, ValueError):
            pass
        self.failed = True
        self.ready.set()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class WorkerPool:
    """Runs :class:`Job` s in worker processes; see the module docstring."""

    def __init__(self, config: PoolConfig) -> None:
        if config.workers < 1 or config.queue < 0 or config.timeout <= 0:
            raise ValueError("workers >= 1, queue >= 0 and timeout > 0 are required")
        self.config = config
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.threads = config.threads or max(1, (cores or 1) // config.workers)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._started = False
        self._all: list[_Worker] = []
        self._methods: list[str] = []
        self._methods_known = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for _ in range(self.config.workers):
                self._add()

    def _ready(self, methods: list[str]) -> None:
        self._methods = list(methods)
        self._methods_known.set()

    def methods(self) -> list[str]:
        """The explanation methods the workers serve (waits for the first worker to start)."""
        self.start()
        if not self._methods_known.wait(STARTUP_S):
            raise JobFailed(503, "the workers did not start")
        return self._methods

    def _add(self) -> None:
        worker = _Worker(self.config, self.threads, self._ready)
        self._all.append(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
            if self._started:
                self._add()

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def workers_ready(self) -> int:
        """Workers that have started, imported the explainers and loaded every model."""
        with self._lock:
            workers = list(self._all)
        return sum(w.ready.is_set() and not w.failed for w in workers)

    @property
    def ready(self) -> bool:
        return self._started and self.workers_ready >= self.config.workers

    def admit(self) -> None:
        """Reserve a place for one job, or raise :class:`Busy`."""
        self.start()
        with self._lock:
            if self._admitted >= self.config.workers + self.config.queue:
                raise Busy()
            self._admitted += 1

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def run(self, job: Job) -> dict[str, Any]:
        """Run an admitted job (blocking: call from a thread); its answer dict, or raise."""
        worker = self._idle.get()
        try:
            worker.ready.wait(STARTUP_S + 5)  # a new worker's first job waits for its start-up
            if worker.failed or not worker.ready.is_set():
                raise EOFError
            _send(worker.conn, [{"model": job.model, "path": str(job.path), "methods": job.methods,
                                 "target": job.target, "out": str(job.out),
                                 "outside_intended_use": job.outside_intended_use,
                                 "segmentation": job.segmentation}])
            if not worker.conn.poll(self.config.timeout):
                log.warning("job %s: over the time limit of %g s; worker %d replaced",
                            job.out.name, self.config.timeout, worker.process.pid)
                self._replace(worker)
                worker = None
                raise JobTimeout()
            answer = _recv(worker.conn)
        except (EOFError, OSError, BrokenPipeError):
            log.error("job %s: worker %s stopped; replaced", job.out.name,
                      worker.process.exitcode if worker else "?")
            if worker is not None:
                self._replace(worker)
                worker = None
            raise JobFailed(500, "the worker stopped while processing the request") from None
        finally:
            if worker is not None:
                self._idle.put(worker)
        if answer[0] == "ok":
            return answer[1]
        raise JobFailed(answer[1], answer[2])

    def close(self) -> None:
        with self._lock:
            self._started = False
            workers, self._all = self._all, []
        for w in workers:
            w.kill()
