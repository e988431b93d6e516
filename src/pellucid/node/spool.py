"""The node's durable spool: every received instance, every result waiting for a destination and
every delivery is a file, written whole (a temporary file, fsync, rename, fsync of the folder)
before anything is acknowledged, so that a node killed at any point resumes where it stopped.

    incoming/<study>/<instance>.dcm   received, the study still arriving
    work/<study>.<n>/                 claimed by the worker (a study that settled); done.json last
    outbox/<destination>/<study>.<n>/<result>.dcm   results not yet delivered there
    delivered/<destination>/<result>  the ledger: a result delivered there (never sent again)
    done/<study>.<n>.json             what was explained, refused and why (no patient data)
    failed/...                        a claimed study or outbox folder that failed unforeseen
                                      (an alert named it), kept for the operator
    audit.log                         one JSON line per event, studies named by a reference

A study's reference is the first 16 hex digits of the SHA-256 of its Study Instance UID (a UID is
an identifier the DICOM de-identification profile replaces): logs and folder names carry the
reference, never the UID, a name or an ID.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any


def reference(uid: str) -> str:
    """A study's or instance's reference: the first 16 hex digits of the SHA-256 of its UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old state or the whole file:
    a temporary file in the same folder, fsync, rename over ``path``, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


class Spool:
    """The spool folder (see the module's docstring). Thread-safe for one node process."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for name in ("incoming", "work", "outbox", "delivered", "done"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # receiving into a study vs claiming it

    # -- receiving -------------------------------------------------------------------------
    def receive(self, study_uid: str, sop_uid: str, data: bytes) -> str:
        """Keep one instance of a study (whole and synced: only then may it be acknowledged);
        returns the study's reference."""
        ref = reference(study_uid)
        with self._lock:
            write_whole(self.root / "incoming" / ref / f"{reference(sop_uid)}.dcm", data)
        return ref

    def settled(self, seconds: float) -> list[str]:
        """The incoming studies no instance arrived for in the last ``seconds``."""
        now, out = time.time(), []
        for folder in sorted((self.root / "incoming").iterdir()):
            if folder.is_dir() and now - folder.stat().st_mtime >= seconds:
                out.append(folder.name)
        return out

    def claim(self, ref: str) -> Path | None:
        """Move a settled study to work/ (atomically); an instance arriving later starts a new
        incoming folder, explained as a study of its own."""
        with self._lock:
            source = self.root / "incoming" / ref
            if not source.is_dir():
                return None
            target = self.root / "work" / f"{ref}.{time.time_ns()}"
            os.rename(source, target)
            _fsync_folder(self.root / "work")
            return target

    def unfinished(self) -> list[Path]:
        """Claimed studies a killed node did not finish (oldest first)."""
        return sorted(p for p in (self.root / "work").iterdir() if p.is_dir())

    # -- results ---------------------------------------------------------------------------
    def delivered(self, destination: str, result_uid: str) -> bool:
        return (self.root / "delivered" / destination / result_uid).exists()

    def put_result(self, destination: str, batch: str, result_uid: str, data: bytes) -> bool:
        """Queue a result for a destination, unless the ledger says it was delivered there
        (a study explained again after a crash, or received twice). Returns whether queued."""
        if self.delivered(destination, result_uid):
            return False
        write_whole(self.root / "outbox" / destination / batch / f"{result_uid}.dcm", data)
        return True

    def pending(self, destination: str) -> list[Path]:
        """The batches (folders) with results waiting for ``destination``, oldest first."""
        folder = self.root / "outbox" / destination
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name.split(".")[-1])

    def mark_delivered(self, destination: str, result: Path) -> None:
        """Record a delivery in the ledger, then drop the queued file."""
        write_whole(self.root / "delivered" / destination / result.stem, b"")
        result.unlink(missing_ok=True)

    def count(self, what: str) -> int:
        """Files waiting: ``incoming`` instances or ``outbox`` results (a folder claimed or
        emptied while it is counted is skipped)."""
        return sum(name.endswith(".dcm") for _, _, names in os.walk(self.root / what)
                   for name in names)

    def open_batch(self, batch: str) -> bool:
        """Whether the worker may still add results to the outbox folders of ``batch``."""
        return (self.root / "work" / batch).exists()

    # -- finishing -------------------------------------------------------------------------
    def finish(self, batch: Path, summary: dict[str, Any]) -> None:
        """Record what a claimed study gave, then delete its received images (kept no longer
        than needed)."""
        write_whole(batch / "done.json", json.dumps(summary, indent=1).encode())
        write_whole(self.root / "done" / f"{batch.name}.json", json.dumps(summary, indent=1).encode())
        shutil.rmtree(batch, ignore_errors=True)

    def set_aside(self, batch: Path) -> Path:
        """Move a batch that failed (claimed study or outbox folder) to ``failed/`` for the
        operator, out of the way of the threads."""
        target = self.root / "failed" / batch.relative_to(self.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(batch, target)
        return target

    def audit(self, event: str, **fields: Any) -> None:
        """One JSON line in audit.log (references, counts and reasons; no patient identifier)."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **fields},
                          default=str)
        with self._lock, open(self.root / "audit.log", "a") as fh:
            fh.write(line + "\n")
