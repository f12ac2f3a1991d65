"""LoginThrottle: how many refused logins a mailbox and a client may cost, in a sliding window.

First Time Setup answers a wrong password with 422 and the server's words and a right one
with 200: without a limit that is a password-guessing oracle, and every refused LOGIN counts
towards the account's lockout at the server (Active Directory locks an account after a few).
So a mailbox may have at most ``MAILBOX_FAILURES`` refused logins in ``WINDOW_SECONDS``, its
set-ups' and its worker's together (one lockout budget), and a client (one peer address) at
most ``CLIENT_FAILURES`` over all mailboxes. Beyond, set-up answers 429 with Retry-After and
no LOGIN is sent; a worker treats it as a refused login (needs_reauth, its slow retry).

An attempt takes its place before the LOGIN, so requests in parallel cannot all slip through
at once, and gives it back when the login succeeded or never reached the server. A set-up
whose login succeeds also clears the mailbox's count (whoever sent it knows the password, as a
directory resets its bad-password count), never the client's. A worker's successful login
clears nothing: an agent could otherwise stop and start its mailbox between rounds of guesses.

The counts are kept in memory: a restart forgets them, and each instance keeps its own (the
self-service registry lives in the single-host SQLite store).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from emailsync.errors import AuthError, TooManyLoginsError

if TYPE_CHECKING:
    import imapclient

    from emailsync.imap.auth import Authenticator

WINDOW_SECONDS = 15 * 60.0
MAILBOX_FAILURES = 5
# One office behind one NAT or proxy shares an address, and IT sets up many mailboxes from
# one desk: a client's budget covers several mailboxes' typos, a sprayer's is still small.
CLIENT_FAILURES = 20


@dataclass(eq=False)
class _Entry:
    at: float  # monotonic


@dataclass(eq=False)
class Attempt:
    """One set-up login's places in the counts, kept unless it is given back."""

    throttle: LoginThrottle
    mailbox: str
    entries: list[tuple[str, _Entry]] = field(default_factory=list)

    def succeeded(self) -> None:
        """The login succeeded: nothing counts, and the mailbox's count starts again."""
        self.throttle._give_back(self.entries)
        self.throttle.clear(self.mailbox)

    def not_tried(self) -> None:
        """No LOGIN reached the server (refused connection, TLS failed): nothing counts."""
        self.throttle._give_back(self.entries)


class LoginThrottle:
    """Sliding-window counts of refused logins, per mailbox and per client; thread-safe."""

    def __init__(
        self,
        *,
        mailbox_failures: int = MAILBOX_FAILURES,
        client_failures: int = CLIENT_FAILURES,
        window_seconds: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"mailbox": mailbox_failures, "client": client_failures}
        self.window_seconds = window_seconds
        self._clock = clock
        self._entries: dict[str, list[_Entry]] = {}
        self._lock = threading.Lock()

    def attempt(self, mailbox: str, client: str | None) -> Attempt:
        """Take a place for one set-up login, or raise TooManyLoginsError naming the limit."""
        keys = [("mailbox", f"mailbox:{mailbox}")]
        if client is not None:
            keys.append(("client", f"client:{client}"))
        with self._lock:
            now = self._clock()
            for kind, key in keys:
                entries = self._current(key, now)
                if len(entries) >= self.limits[kind]:
                    raise TooManyLoginsError(
                        self._message(kind, mailbox), retry_after=self._wait(entries, now)
                    )
            taken = [(key, _Entry(now)) for _, key in keys]
            for key, entry in taken:
                self._entries.setdefault(key, []).append(entry)
        return Attempt(self, mailbox, taken)

    def refused(self, mailbox: str) -> None:
        """A worker's login was refused: it counts against the mailbox's budget."""
        with self._lock:
            self._entries.setdefault(f"mailbox:{mailbox}", []).append(_Entry(self._clock()))

    def exhausted(self, mailbox: str) -> TooManyLoginsError | None:
        """Why a worker must not try a login now (the budget is spent), or None."""
        with self._lock:
            now = self._clock()
            entries = self._current(f"mailbox:{mailbox}", now)
            if len(entries) < self.limits["mailbox"]:
                return None
            return TooManyLoginsError(
                self._message("mailbox", mailbox), retry_after=self._wait(entries, now)
            )

    def clear(self, mailbox: str) -> None:
        """A login succeeded: the mailbox's count starts again."""
        with self._lock:
            self._entries.pop(f"mailbox:{mailbox}", None)

    def _give_back(self, taken: list[tuple[str, _Entry]]) -> None:
        with self._lock:
            for key, entry in taken:
                entries = self._entries.get(key, [])
                if entry in entries:
                    entries.remove(entry)

    def _current(self, key: str, now: float) -> list[_Entry]:
        """The key's entries still in the window (older ones are dropped)."""
        entries = [e for e in self._entries.get(key, []) if now - e.at < self.window_seconds]
        if entries:
            self._entries[key] = entries
        else:
            self._entries.pop(key, None)
        return entries

    def _wait(self, entries: list[_Entry], now: float) -> int:
        # The oldest entry leaves the window first; whole seconds, at least 1 (RFC 9110 §10.2.3).
        return max(1, math.ceil(min(e.at for e in entries) + self.window_seconds - now))

    def _message(self, kind: str, mailbox: str) -> str:
        minutes = f"{self.window_seconds / 60:g} minutes"
        if kind == "mailbox":
            return (
                f"{mailbox}: {self.limits['mailbox']} refused logins in {minutes}; "
                "wait before trying again, so the server does not lock the account"
            )
        return (
            f"{self.limits['client']} refused logins from this address in {minutes}; "
            "wait before trying again"
        )


class ThrottledAuthenticator:
    """A worker's password login that shares its mailbox's budget with the set-ups.

    A refused login counts; with the budget spent, no LOGIN is sent and the worker sees a
    refused login (needs_reauth, whose slow retry outlasts the window).
    """

    def __init__(self, inner: Authenticator, throttle: LoginThrottle, mailbox: str) -> None:
        self._inner = inner
        self._throttle = throttle
        self._mailbox = mailbox

    def login(self, client: imapclient.IMAPClient) -> None:
        """Log in through the wrapped authenticator unless the budget is spent."""
        spent = self._throttle.exhausted(self._mailbox)
        if spent is not None:
            raise AuthError(f"{spent} (no login for {spent.retry_after} s)")
        try:
            self._inner.login(client)
        except AuthError:
            self._throttle.refused(self._mailbox)
            raise

    def token_expiry(self) -> datetime | None:
        """The wrapped authenticator's (None for passwords)."""
        return self._inner.token_expiry()

    def forget(self) -> None:
        """The wrapped authenticator's."""
        self._inner.forget()
