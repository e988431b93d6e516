"""Which files this installation wrote: HMAC-SHA256 tags under a per-user key kept outside every
folder pellucid reads data from (RFC 2104).

A digest alone proves nothing about who wrote a file: whoever can plant a file can recompute its
SHA-256 (a forged run folder with recomputed manifests, an ONNX export under the right name in
the cache). A tag ``HMAC(key, purpose || 0x00 || data)`` can only be made by someone who holds the
key, which lives in ``$PELLUCID_KEY_FILE``, else ``$XDG_CONFIG_HOME/pellucid/key``, else
``~/.config/pellucid/key``: 32 random bytes, created on first use, mode 0600 in a 0700 folder.
``purpose`` separates the uses (an export's tag is never a valid run tag).

What this protects: files that someone else placed in the cache or handed over in a run folder.
What it does not: an attacker who can read the key file already runs as the user.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from pellucid.errors import ConfigError

KEY_BYTES = 32


def key_path() -> Path:
    """Where this user's signing key lives (see the module docstring)."""
    env = os.environ.get("PELLUCID_KEY_FILE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pellucid" / "key"


def _key() -> bytes:
    path = key_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pellucid's signing key ({exc.strerror})") from None
    if data:
        if len(data) != KEY_BYTES:
            raise ConfigError(f"{path}: pellucid's signing key must be {KEY_BYTES} bytes, got "
                              f"{len(data)}; remove it to make a new one (tags it made stop "
                              f"verifying)")
        return data
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return _key()
    with os.fdopen(fd, "wb") as fh:
        fh.write(fresh)
    return fresh


def tag(purpose: str, data: bytes) -> str:
    """The hex HMAC-SHA256 of ``data`` for ``purpose`` under this installation's key."""
    return hmac.new(_key(), purpose.encode() + b"\x00" + data, hashlib.sha256).hexdigest()


def valid(purpose: str, data: bytes, given: str | None) -> bool:
    """Whether ``given`` is this installation's tag of ``data`` for ``purpose`` (constant time)."""
    if not isinstance(given, str) or len(given) != 64:
        return False
    return hmac.compare_digest(tag(purpose, data), given)
