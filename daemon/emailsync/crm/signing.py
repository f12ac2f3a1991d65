"""HMAC request signing (``X-EmailSync-Signature``), shared by the client and the reference CRM.

The header is ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + body)>``: the time is
signed with the body, so a captured request cannot be replayed after the window, and the body
cannot be altered. Several ``v1=`` values may appear while a secret is being rotated.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-EmailSync-Signature"
# How far a request's signed time may be from the receiver's clock, either way.
REPLAY_WINDOW_SECONDS = 300


class SignatureError(Exception):
    """A request's signature is missing, malformed, wrong or outside the replay window."""


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret``."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, *, now: float | None = None) -> str:
    """The ``X-EmailSync-Signature`` header value for a request body."""
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify(
    secret: bytes,
    header: str | None,
    body: bytes,
    *,
    now: float | None = None,
    window_seconds: float = REPLAY_WINDOW_SECONDS,
) -> None:
    """Raise ``SignatureError`` unless ``header`` signs ``body`` with ``secret`` in the window."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {HEADER} header")
        if name == "t":
            if not value.isdigit():
                raise SignatureError(f"malformed {HEADER} timestamp")
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(f"{HEADER} needs t= and v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > window_seconds:
        raise SignatureError(f"signature time is outside the {int(window_seconds)} s window")
    expected = signature(secret, timestamp, body)
    # compare_digest: the comparison time must not reveal how much of a forgery was right.
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("signature does not match")
