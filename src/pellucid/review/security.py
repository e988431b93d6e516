"""Invitation and admin tokens (random, stored only as SHA-256 hashes), the forms' CSRF tokens
(HMAC-SHA256 of the rater with the study's secret key, compared in constant time), the per-address
limit on failed tokens, and the neutralising of spreadsheet formulas in exported text."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def new_token() -> str:
    """A 192-bit random URL-safe token."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def csrf_token(secret: str, rater_id: int) -> str:
    return hmac.new(secret.encode(), f"rater:{rater_id}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, rater_id: int, given: str | None) -> bool:
    """Constant-time check; any characters may arrive (compared as bytes, never an error)."""
    return bool(given) and hmac.compare_digest(csrf_token(secret, rater_id).encode(),
                                               (given or "").encode("utf-8", "surrogateescape"))


class FailureLimiter:
    """At most ``limit`` failures per key (a client address, or a valid token whose CSRF checks
    fail, each of those weighing less) within ``window`` seconds; past that the key is refused
    (429) until its oldest failures leave the window. At most ``addresses`` keys are tracked (the
    least recently failing are forgotten first)."""

    def __init__(self, limit: int = 20, window: float = 600.0, addresses: int = 10000) -> None:
        self.limit, self.window, self.addresses = limit, window, addresses
        self._failures: OrderedDict[str, deque[tuple[float, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[tuple[float, float]]:
        times = self._failures.get(address, deque())
        while times and now - times[0][0] > self.window:
            times.popleft()
        return times

    def blocked(self, address: str) -> float:
        """Seconds until ``address`` (or token key) may try again (0 when it may now)."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            if sum(w for _, w in times) < self.limit - 1e-9:
                return 0.0
            return max(1.0, self.window - (now - times[0][0]))

    def failed(self, address: str, weight: float = 1.0) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._recent(address, now)
            times.append((now, weight))
            self._failures[address] = times
            self._failures.move_to_end(address)
            while len(self._failures) > self.addresses:
                self._failures.popitem(last=False)


def neutralise_cell(value: object) -> object:
    """Text that a spreadsheet would run as a formula (OWASP: starting with = + - @ tab or CR)
    gets a leading apostrophe; so does text that already starts with one, which keeps the rule
    reversible: :func:`recover_cell` drops one leading apostrophe. Non-text is returned as is."""
    if isinstance(value, str) and value and (value.startswith(FORMULA_STARTS) or value[0] == "'"):
        return "'" + value
    return value


def recover_cell(value: object) -> object:
    """The original text of a cell written by :func:`neutralise_cell`."""
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def neutralised(frame):
    """A copy of a pandas DataFrame with every text cell passed through :func:`neutralise_cell`."""
    out = frame.copy()
    for column in out.columns:
        if out[column].map(lambda v: isinstance(v, str)).any():  # object or string dtype
            out[column] = out[column].map(neutralise_cell).astype(object)
    return out
