"""``POST /v1/groups:changed``: a CRM tells emailsync whose group links changed (issue 22).

The one call from the CRM to emailsync. It is signed like emailsync's own requests to the
CRM (``emailsync.timeline.crm.signing``, scheme v2: HMAC-SHA256 with the ``[crm]`` secret over
method, request path, time and body), with its own replay window
(``[crm] changed_window_seconds``): a call whose signed time is further from emailsync's
clock is refused, and so is a second call with the same signed time, path and body inside
the window (a replay; a CRM signs each attempt anew). The body is ``{"addresses": [...]}``, at most
MAX_ADDRESSES. The answer is ``202`` at once: the addresses' Failed mail is marked due in the
state database before it, and the mailboxes' own connections re-file it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, Protocol, runtime_checkable

import structlog

from emailsync.errors import StoreError
from emailsync.mail.address import normalise_address
from emailsync.timeline.crm import signing

log = structlog.get_logger(__name__)

GROUPS_CHANGED_PATH = "/v1/groups:changed"
# The document's maxItems, as for groups:lookup.
MAX_ADDRESSES = 1000
# A CRM that the store cannot take a call from now is asked to retry after this long.
RETRY_AFTER_SECONDS = 5
# Signatures remembered inside the window, at most (a CRM calling 10 times a second for the
# whole of a 5-minute window stays well below); beyond, the oldest go first.
MAX_SEEN = 20_000

Answer = tuple[HTTPStatus, dict[str, Any], dict[str, str]]


@runtime_checkable
class GroupsChangedHandler(Protocol):
    """What the listener hands a ``POST /v1/groups:changed`` to (the supervisor)."""

    def groups_changed_call(self, header: str | None, path: str, body: bytes) -> Answer:
        """The answer to one call: status, JSON body, extra headers."""
        ...


class ChangeReceiver:
    """Checks a ``groups:changed`` call and hands its addresses on; safe from any thread."""

    def __init__(
        self,
        secret: bytes,
        on_change: Callable[[Sequence[str]], object],
        *,
        window_seconds: float = signing.REPLAY_WINDOW_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self._on_change = on_change
        self.window_seconds = window_seconds
        self.clock = clock
        self._seen: dict[bytes, float] = {}  # digest of (time, path, body) → its signed time
        self._lock = threading.Lock()

    def receive(self, header: str | None, path: str, body: bytes) -> Answer:
        """Verify, parse and act on one call (``path``: the request-target as received)."""
        now = self.clock()
        try:
            signing.verify(
                self._secret,
                header,
                "POST",
                path,
                body,
                now=now,
                window_seconds=self.window_seconds,
            )
        except signing.SignatureError as exc:
            log.warning("groups_changed_refused", reason=str(exc))
            return HTTPStatus.UNAUTHORIZED, {"error": f"signature refused: {exc}"}, {}
        assert header is not None  # noqa: S101 -- verify() refuses a missing header
        signed_at = _signed_time(header)
        # The signed content, not the header's text: fields reordered are the same call.
        digest = hashlib.sha256(f"{signed_at:.0f}\n{path}\n".encode() + body).digest()
        if not self._first_time(digest, signed_at, now):
            log.warning("groups_changed_refused", reason="replayed")
            return HTTPStatus.UNAUTHORIZED, {"error": "signature refused: replayed request"}, {}
        addresses = _addresses(body)
        if isinstance(addresses, str):
            return HTTPStatus.BAD_REQUEST, {"error": addresses}, {}
        try:
            self._on_change(addresses)
        except StoreError as exc:
            # Not acted on, and not the caller's fault: the same call may come again.
            self._forget(digest)
            log.warning("groups_changed_not_recorded", error=str(exc))
            return (
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "cannot record the change now; try again"},
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        log.info("groups_changed_received", addresses=len(addresses))
        return HTTPStatus.ACCEPTED, {"accepted": len(addresses)}, {}

    def _first_time(self, digest: bytes, signed_at: float, now: float) -> bool:
        """Remember a call for the window; False when it was seen already (a replay)."""
        with self._lock:
            horizon = now - self.window_seconds
            for key in [k for k, at in self._seen.items() if at < horizon]:
                del self._seen[key]
            if digest in self._seen:
                return False
            while len(self._seen) >= MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            self._seen[digest] = signed_at
        return True

    def _forget(self, digest: bytes) -> None:
        with self._lock:
            self._seen.pop(digest, None)


def _signed_time(header: str) -> float:
    """The ``t=`` of a verified header (the pruning of seen signatures goes by it)."""
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            return float(value)
    return 0.0


def _addresses(body: bytes) -> list[str] | str:
    """The call's normalised addresses, or what is wrong with its body."""
    expected = f'expected {{"addresses": [1 to {MAX_ADDRESSES} email addresses]}}'
    try:
        data = json.loads(body)
    except ValueError:
        return expected
    if not isinstance(data, dict) or set(data) != {"addresses"}:
        return expected
    given = data["addresses"]
    if not isinstance(given, list) or not 0 < len(given) <= MAX_ADDRESSES:
        return expected
    found: list[str] = []
    for value in given:
        address = normalise_address(value) if isinstance(value, str) else None
        if address is None:
            return f"not an email address: {str(value)[:100]!r}"
        found.append(address)
    return list(dict.fromkeys(found))
