"""Where pellucid finds the shared sample data and writes its default outputs."""

from __future__ import annotations

import os
from pathlib import Path

from pellucid.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The real sample data folder: ``$PELLUCID_DATA`` or ``../shared/data`` beside the project."""
    env = os.environ.get("PELLUCID_DATA")
    path = Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise DataError(path, "shared sample data folder not found; set PELLUCID_DATA to it")
    return path
