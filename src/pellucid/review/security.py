"""Invitation and admin tokens (random, stored only as SHA-256 hashes) and the forms' CSRF tokens
(HMAC-SHA256 of the rater with the study's secret key, compared in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> str:
    """A 192-bit random URL-safe token."""
    return secrets.token_urlsafe(24)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(secret: str, rater_id: int) -> str:
    return hmac.new(secret.encode(), f"rater:{rater_id}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(secret: str, rater_id: int, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(csrf_token(secret, rater_id), given or "")
