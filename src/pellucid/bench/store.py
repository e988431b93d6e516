"""The result store: one Parquet part per finished work unit, written atomically and verified
whenever it is read.

A part is written to a temporary file in the same folder, flushed to disk and renamed into place,
then its manifest (``<part>.json``: the unit key, row count, SHA-256 of the part's bytes, and
this installation's tag over the three, :mod:`pellucid.bench.provenance`) the same way; the
manifest commits the unit. A run killed at any moment (even SIGKILL) loses only the
units in flight. A part that does not match its manifest (truncated, emptied, replaced, or not
Parquet) is moved to ``parts/bad/`` with its manifest, the user is told in one line, and the unit
counts as not done, so a resume re-runs it; a resume also re-runs a unit whose part carries no
valid tag (written elsewhere). The table is the union of the verified parts, sorted.
Gallery maps of a unit are written (atomically) before its part and read without unpickling.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pellucid.progress import warn
from pellucid.signing import tag, valid

PART_PURPOSE = "run-part"  # a part's tag: HMAC over its unit key, row count and SHA-256
SORT = ["dataset", "model", "case_id", "target", "method", "metric"]


def unit_digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix + ".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultStore:
    """Parts under ``root/parts``, gallery maps under ``root/maps``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.maps = self.root / "maps"

    def part(self, key: str) -> Path:
        return self.parts / f"{unit_digest(key)}.parquet"

    def done(self, key: str) -> bool:
        """True when the unit's part exists and matches its manifest (a bad part is moved aside)."""
        return self.part(key).is_file() and self._verified(self.part(key), key) is not None

    def _quarantine(self, part: Path, why: str) -> None:
        bad = self.parts / "bad"
        bad.mkdir(exist_ok=True)
        for f in (part, part.with_suffix(".json")):
            if f.exists():
                os.replace(f, bad / f.name)
        warn(f"result part {part.name} is unusable ({why}); moved to {bad.name}/ (the next "
             f"`pellucid bench` of this run computes its unit again)")

    def _verified(self, part: Path, key: str | None = None) -> pd.DataFrame | None:
        """The part's rows when it matches its manifest; else None (and the part is moved aside)."""
        manifest = part.with_suffix(".json")
        try:
            data = part.read_bytes()
            meta = json.loads(manifest.read_text())
            if not isinstance(meta, dict):
                raise ValueError("manifest is not an object")
        except FileNotFoundError:
            self._quarantine(part, "no manifest")
            return None
        except (OSError, ValueError) as exc:
            self._quarantine(part, f"unreadable manifest: {type(exc).__name__}")
            return None
        if meta.get("sha256") != hashlib.sha256(data).hexdigest():
            self._quarantine(part, "checksum does not match its manifest")
            return None
        if key is not None and meta.get("key") != key:
            self._quarantine(part, "manifest names another unit")
            return None
        if key is not None and not valid(PART_PURPOSE, f"{key}|{meta.get('rows')}|"
                                         f"{meta['sha256']}".encode(), meta.get("tag")):
            self._quarantine(part, "not written by this installation (no valid tag)")
            return None
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for broken files
            self._quarantine(part, f"not readable as Parquet: {type(exc).__name__}")
            return None
        if len(frame) != meta.get("rows") or "unit" not in frame:
            self._quarantine(part, "row count does not match its manifest")
            return None
        return frame

    def write(self, key: str, rows: list[dict[str, Any]], maps: dict[str, np.ndarray] | None = None
              ) -> None:
        if maps:
            _atomic_write(self.maps / f"{unit_digest(key)}.npz",
                          lambda fh: np.savez_compressed(fh, **maps))
        frame = pd.DataFrame(rows)
        frame["unit"] = key
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        data = buf.getvalue()
        part = self.part(key)
        _atomic_write(part, lambda fh: fh.write(data))
        digest = hashlib.sha256(data).hexdigest()
        manifest = {"key": key, "rows": len(frame), "sha256": digest,
                    "tag": tag(PART_PURPOSE, f"{key}|{len(frame)}|{digest}".encode())}
        _atomic_write(part.with_suffix(".json"), lambda fh: fh.write(json.dumps(manifest).encode()))

    def signed_parts(self) -> tuple[int, int]:
        """(parts whose manifest carries this installation's tag over their unit, rows and
        bytes, all parts); read only, nothing moved."""
        files = sorted(f for f in self.parts.glob("*.parquet") if not f.name.startswith("."))
        good = 0
        for part in files:
            try:
                meta = json.loads(part.with_suffix(".json").read_text())
                digest = hashlib.sha256(part.read_bytes()).hexdigest()
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("sha256") == digest and valid(
                    PART_PURPOSE, f"{meta.get('key')}|{meta.get('rows')}|{digest}".encode(),
                    meta.get("tag")):
                good += 1
        return good, len(files)

    def load_maps(self, key: str) -> dict[str, np.ndarray]:
        """The unit's gallery maps; {} (with a warning) when the file is missing or unreadable."""
        path = self.maps / f"{unit_digest(key)}.npz"
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # zip/npy format errors of several types; object arrays refused
            warn(f"gallery maps {path.name} unreadable ({type(exc).__name__}); left out")
            return {}

    def sweep(self) -> int:
        """Remove temporary files left by a killed writer; returns how many."""
        stale = [f for folder in (self.parts, self.maps) if folder.is_dir()
                 for f in folder.glob(".tmp-*")]
        for f in stale:
            f.unlink(missing_ok=True)
        return len(stale)

    def table(self) -> pd.DataFrame:
        files = sorted(f for f in self.parts.glob("*.parquet") if not f.name.startswith("."))
        frames = [f for f in (self._verified(p) for p in files) if f is not None and len(f)]
        if not frames:
            return pd.DataFrame()
        frame = pd.concat(frames, ignore_index=True)
        missing = [c for c in SORT if c not in frame]
        if missing:
            warn(f"result parts lack the columns {missing}; the table is not sorted")
            return frame
        return frame.sort_values(SORT, kind="stable").reset_index(drop=True)

    def export(self, frame: pd.DataFrame) -> None:
        """results.parquet and results.csv (curves as JSON text in the CSV)."""
        _atomic_write(self.root / "results.parquet", lambda fh: frame.to_parquet(fh, index=False))
        flat = frame.copy()
        if "curve" in flat:
            flat["curve"] = [json.dumps(list(map(float, c))) if c is not None else ""
                             for c in flat["curve"]]
        _atomic_write(self.root / "results.csv", lambda fh: fh.write(flat.to_csv(index=False).encode()))
