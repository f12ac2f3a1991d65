"""HMAC request signing (``X-EmailSync-Signature``), shared by the client and the reference CRM.

Scheme v2: the header is ``t=<unix seconds>,v2=<hex HMAC-SHA256(secret, message)>`` with
``message = "v2\\n" + t + "\\n" + METHOD + "\\n" + path + "\\n" + body``, the path being the
request-target as sent (``/emailsync/v1/groups:lookup``). The time is signed, so a captured
request cannot be replayed after the window; the method and path are signed, so a captured
body cannot be replayed to another endpoint inside it; and the body cannot be altered. The
fields cannot run into each other: ``t`` is digits, a method a token, and a request-target
holds no line feed (RFC 9112 section 3.2). Several ``v2=`` values may appear while a secret is
being rotated.

Scheme v1 (``v1=``, an HMAC of ``t + "." + body`` alone) left the endpoint open to that
replay; it is refused. emailsync is the scheme's only client and has sent v2 since, and a
refused request (401) leaves the mail in Queue to be retried, so nothing needs v1 any more.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-EmailSync-Signature"
SCHEME = "v2"
# How far a request's signed time may be from the receiver's clock, either way.
REPLAY_WINDOW_SECONDS = 300


class SignatureError(Exception):
    """A request's signature is missing, malformed, wrong or outside the replay window."""


def signature(secret: bytes, timestamp: int, method: str, path: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of the v2 message for one request under ``secret``."""
    head = f"{SCHEME}\n{timestamp}\n{method.upper()}\n{path}\n".encode()
    return hmac.new(secret, head + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, path: str, body: bytes, *, now: float | None = None) -> str:
    """The ``X-EmailSync-Signature`` header value for a request (``path``: its target)."""
    timestamp = int(time.time() if now is None else now)
    return f"t={timestamp},{SCHEME}={signature(secret, timestamp, method, path, body)}"


def verify(
    secret: bytes,
    header: str | None,
    method: str,
    path: str,
    body: bytes,
    *,
    now: float | None = None,
    window_seconds: float = REPLAY_WINDOW_SECONDS,
) -> None:
    """Raise ``SignatureError`` unless ``header`` signs this request with ``secret`` in time."""
    if not header:
        raise SignatureError(f"no {HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    v1 = False
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {HEADER} header")
        if name == "t":
            if not value.isdigit():
                raise SignatureError(f"malformed {HEADER} timestamp")
            timestamp = int(value)
        elif name == SCHEME:
            candidates.append(value)
        elif name == "v1":
            v1 = True
    if v1 and not candidates:
        raise SignatureError("v1 signatures (time and body only) are no longer accepted; sign v2")
    if timestamp is None or not candidates:
        raise SignatureError(f"{HEADER} needs t= and {SCHEME}=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > window_seconds:
        raise SignatureError(f"signature time is outside the {int(window_seconds)} s window")
    expected = signature(secret, timestamp, method, path, body)
    # compare_digest: the comparison time must not reveal how much of a forgery was right.
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise SignatureError("signature does not match")
