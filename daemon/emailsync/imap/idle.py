"""Waiting in IDLE (RFC 2177): for the server's announcements, a local wake-up, or a deadline.

imapclient reads the socket through a buffered reader. When the server sends ``+ idling``
and an untagged ``EXISTS`` in one segment (Dovecot does, for mail that landed just before
IDLE), ``IMAPClient.idle()`` reads the first line and the second stays in that buffer; the
socket itself is then silent and ``idle_check()``, which polls the socket first, never sees
it (imapclient#519, chatmail/core#4926). So before polling the socket this module looks at
what the reader already holds, and reads complete lines from there.

That reaches into imaplib (``IMAPClient._imap.file.peek()``, ``_imap._get_line()``): pinned
in pyproject.toml and checked by tests/unit/test_library_internals.py.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import imapclient
from imapclient.response_parser import parse_response

from emailsync.errors import ConnectionLostError
from emailsync.imap.translate import backoff_hint, translated

# Errors a non-blocking read raises when nothing is there yet (TLS: a record is incomplete).
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# Untagged status responses whose text is free-form (RFC 3501 §7.1), kept whole.
_STATUS_WORDS = (b"OK ", b"NO ", b"BAD ", b"BYE ", b"PREAUTH ")


class WakeSource(Protocol):
    """Something with a descriptor that becomes readable when the waiter should wake."""

    def fileno(self) -> int:
        """The descriptor to poll."""
        ...


@dataclass
class IdleUpdate:
    """What the server said (new mail: EXISTS grew) and whether a local wake-up came."""

    new_mail: bool = False
    woken: bool = False
    exists: int = 0


def mailbox_updates(responses: Sequence[Any], exists: int) -> IdleUpdate:
    """Apply untagged EXISTS/EXPUNGE/BYE responses to a message count (RFC 3501 §7.3-7.4).

    Raises ConnectionLostError for BYE, with the server's suggested back-off when it gave one.
    """
    update = IdleUpdate(exists=exists)
    for response in responses:
        if not isinstance(response, tuple) or len(response) < 2:
            continue
        first, second = response[0], response[1]
        if first == b"BYE":
            text = _text(second)
            raise ConnectionLostError(
                f"server said BYE: {text}", kind="bye", retry_after=backoff_hint(text)
            )
        if second == b"EXISTS" and isinstance(first, int):
            update.new_mail = update.new_mail or first > update.exists
            update.exists = first
        elif second == b"EXPUNGE" and isinstance(first, int):
            update.exists = max(0, update.exists - 1)
    return update


def begin(client: imapclient.IMAPClient) -> None:
    """Send IDLE and read the server's continuation."""
    with translated("idle"):
        client.idle()


def wait(
    client: imapclient.IMAPClient, timeout_seconds: float, wake: WakeSource, exists: int
) -> IdleUpdate:
    """Wait in IDLE for the server, a wake-up or the timeout; never blocks on buffered data.

    Returns at the first of: untagged responses (already buffered or newly arrived), a
    readable ``wake``, the timeout. Raises ConnectionLostError when the server closes.
    """
    sock = client.socket()
    responses = _buffered_responses(client)
    if responses:
        return mailbox_updates(responses, exists)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake.fileno(), select.POLLIN)
    events = dict(poller.poll(max(0.0, timeout_seconds) * 1000))
    woken = wake.fileno() in events
    update = IdleUpdate(exists=exists)
    if sock.fileno() in events:
        if _peek(client) == b"":
            # Readable with nothing to read: the server closed the connection.
            raise ConnectionLostError("idle: connection closed by the server", kind="bye")
        update = mailbox_updates(_buffered_responses(client), exists)
    update.woken = woken
    return update


def end(client: imapclient.IMAPClient, exists: int) -> IdleUpdate:
    """Leave IDLE (DONE); a server that does not answer within the timeout is dead."""
    with translated("idle done"):
        _, responses = client.idle_done()
    return mailbox_updates(responses, exists)


def _buffered_responses(client: imapclient.IMAPClient) -> list[Any]:
    """Parse every untagged line that is already here (buffered or on the socket)."""
    responses: list[Any] = []
    with translated("idle"):
        while _peek(client):
            # Something has arrived: the rest of its line is on the way, so a normal
            # (timed) read of one line is safe. imaplib's reader is the one imapclient uses.
            line = client._imap._get_line()
            responses.append(_parse_untagged(line))
    return responses


def nothing_pending(client: imapclient.IMAPClient) -> bool:
    """True when nothing the server sent is waiting to be read (buffered or on the socket)."""
    return _peek(client) is None


def _peek(client: imapclient.IMAPClient) -> bytes | None:
    """Bytes readable without blocking: buffered ones first. None: nothing; b"": closed.

    A peek never consumes: what it reads from the socket stays in the reader's buffer.
    """
    sock = client.socket()
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        data: bytes = client._imap.file.peek()  # the reader's buffer: see the module docstring
    except _WOULD_BLOCK:
        return None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    if data:
        return data
    # Empty: nothing buffered and either nothing sent yet or the peer closed. Only in the
    # second case is the socket readable.
    return b"" if _readable(sock) else None


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _parse_untagged(line: bytes) -> Any:
    if not line.startswith(b"* "):
        # Out of step: where the server's next answer starts is unknown (translate.py).
        raise ConnectionLostError(
            f"idle: unexpected line from the server: {line[:80]!r}", gone=True
        )
    text = line[2:].rstrip(b"\r\n")
    if text.startswith(_STATUS_WORDS):
        return tuple(text.split(b" ", 1))
    return parse_response([text])


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
