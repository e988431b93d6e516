"""The result store: one Parquet part per finished work unit, written atomically.

A part is written to a temporary file in the same folder, flushed to disk and renamed into place,
so a part either exists whole or not at all: a run killed at any moment (even SIGKILL) loses only
the units in flight, and a re-run skips every unit whose part exists. The table is the union of the
parts, sorted. Gallery maps of a unit are written (atomically) before its part, which commits it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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
        return self.part(key).is_file()

    def write(self, key: str, rows: list[dict[str, Any]], maps: dict[str, np.ndarray] | None = None
              ) -> None:
        if maps:
            _atomic_write(self.maps / f"{unit_digest(key)}.npz",
                          lambda fh: np.savez_compressed(fh, **maps))
        frame = pd.DataFrame(rows)
        frame["unit"] = key
        _atomic_write(self.part(key), lambda fh: frame.to_parquet(fh, index=False))

    def load_maps(self, key: str) -> dict[str, np.ndarray]:
        path = self.maps / f"{unit_digest(key)}.npz"
        if not path.is_file():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    def sweep(self) -> int:
        """Remove temporary files left by a killed writer; returns how many."""
        stale = [f for folder in (self.parts, self.maps) if folder.is_dir()
                 for f in folder.glob(".tmp-*")]
        for f in stale:
            f.unlink(missing_ok=True)
        return len(stale)

    def table(self) -> pd.DataFrame:
        files = sorted(f for f in self.parts.glob("*.parquet") if not f.name.startswith("."))
        if not files:
            return pd.DataFrame()
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return frame.sort_values(SORT, kind="stable").reset_index(drop=True)

    def export(self, frame: pd.DataFrame) -> None:
        """results.parquet and results.csv (curves as JSON text in the CSV)."""
        _atomic_write(self.root / "results.parquet", lambda fh: frame.to_parquet(fh, index=False))
        flat = frame.copy()
        if "curve" in flat:
            flat["curve"] = [json.dumps(list(map(float, c))) if c is not None else ""
                             for c in flat["curve"]]
        _atomic_write(self.root / "results.csv", lambda fh: fh.write(flat.to_csv(index=False).encode()))
