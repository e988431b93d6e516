"""Which forward-only backend runs, and where exported models are kept.

``set_backend`` / ``$PELLUCID_BACKEND`` / the command line's ``--backend``: ``auto`` (default),
``torch``, ``onnxruntime`` or ``openvino``. The cache folder is ``$PELLUCID_CACHE``, else
``$XDG_CACHE_HOME/pellucid``, else ``~/.cache/pellucid``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pellucid.errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "openvino")
SETTINGS = ("auto", *BACKENDS)
_BACKEND: str | None = None


def _checked(name: str, source: str) -> str:
    if name not in SETTINGS:
        raise ConfigError(f"{source} must be one of {', '.join(SETTINGS)}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Run forward-only work through ``name`` (see :data:`SETTINGS`); ``None`` goes back to
    ``$PELLUCID_BACKEND`` or ``auto``."""
    global _BACKEND
    _BACKEND = None if name is None else _checked(name, "backend")


def backend_setting() -> str:
    """The backend setting in force: ``set_backend``'s, else ``$PELLUCID_BACKEND``, else ``auto``."""
    if _BACKEND is not None:
        return _BACKEND
    return _checked(os.environ.get("PELLUCID_BACKEND") or "auto", "PELLUCID_BACKEND")


def use_backend(name: str | None) -> None:
    """``set_backend`` for this process and the workers it starts (through the environment);
    ``None`` (a command-line option left out) changes nothing."""
    if name is None:
        return
    set_backend(name)
    os.environ["PELLUCID_BACKEND"] = name


def cache_dir() -> Path:
    """pellucid's cache folder (created private to the user on first use)."""
    env = os.environ.get("PELLUCID_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "pellucid"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def cache_limit_bytes() -> int:
    """Exported models kept at most: ``$PELLUCID_CACHE_MB`` (default 2048) MiB, oldest dropped."""
    text = os.environ.get("PELLUCID_CACHE_MB", "2048")
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0:
        raise ConfigError(f"PELLUCID_CACHE_MB must be a positive number of MiB, got {text!r}")
    return int(megabytes * 2**20)
