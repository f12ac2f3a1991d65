"""IDLE waiting reads what the IMAP library already buffered before polling the socket.

imapclient's reader is a buffered file over the socket: a server line that arrived in the
same read as ``+ idling`` sits in that buffer while the socket is silent. These tests put
the worker's wait on a socket pair with imaplib's own reader, as imapclient has it.
"""

from __future__ import annotations

import imaplib
import socket
import time
from collections.abc import Iterator

import pytest

from emailsync.errors import ConnectionLostError
from emailsync.imap import idle
from emailsync.runtime.wakeup import Trigger, Wakeup


class Reader:
    """imaplib's line reader as imapclient uses it: a buffered file over the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def _get_line(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise imaplib.IMAP4.abort("socket error: EOF")
        return line[:-2]


class Client:
    """The two things imap/idle.py uses of an IMAPClient: ``socket()`` and ``_imap``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._imap = Reader(sock)

    def socket(self) -> socket.socket:
        return self._sock


@pytest.fixture
def pair() -> Iterator[tuple[Client, socket.socket]]:
    ours, server = socket.socketpair()
    ours.settimeout(5)
    client = Client(ours)
    yield client, server
    client._imap.file.close()
    ours.close()
    server.close()


def enter_idle(client: Client, server: socket.socket, first_read: bytes) -> None:
    """The server's first answer to IDLE; the library reads the continuation line only."""
    server.sendall(first_read)
    assert client._imap.file.readline() == b"+ idling\r\n"


def test_exists_in_the_same_read_as_the_continuation_is_seen_at_once(
    pair: tuple[Client, socket.socket],
) -> None:
    client, server = pair
    enter_idle(client, server, b"+ idling\r\n* 3 EXISTS\r\n* 1 RECENT\r\n")
    wakeup = Wakeup()
    started = time.monotonic()
    update = idle.wait(client, 5, wakeup, exists=2)  # type: ignore[arg-type]
    assert time.monotonic() - started < 1  # was: the full 5 s on a silent socket
    assert update.new_mail
    assert update.exists == 3
    wakeup.close()


def test_a_line_split_across_reads_is_completed(pair: tuple[Client, socket.socket]) -> None:
    client, server = pair
    enter_idle(client, server, b"+ idling\r\n* 4 EXI")
    wakeup = Wakeup()
    server.sendall(b"STS\r\n")
    update = idle.wait(client, 5, wakeup, exists=3)  # type: ignore[arg-type]
    assert (update.new_mail, update.exists) == (True, 4)
    wakeup.close()


def test_a_wake_up_ends_a_silent_wait(pair: tuple[Client, socket.socket]) -> None:
    client, server = pair
    enter_idle(client, server, b"+ idling\r\n")
    wakeup = Wakeup()
    wakeup.post(Trigger.START_SYNC)
    update = idle.wait(client, 5, wakeup, exists=3)  # type: ignore[arg-type]
    assert update.woken
    assert not update.new_mail
    wakeup.close()


def test_a_closed_connection_is_reported(pair: tuple[Client, socket.socket]) -> None:
    client, server = pair
    enter_idle(client, server, b"+ idling\r\n")
    server.close()
    wakeup = Wakeup()
    with pytest.raises(ConnectionLostError, match="closed"):
        idle.wait(client, 5, wakeup, exists=0)  # type: ignore[arg-type]
    wakeup.close()


def test_bye_keeps_the_servers_words_and_back_off_hint(pair: tuple[Client, socket.socket]) -> None:
    client, server = pair
    enter_idle(
        client,
        server,
        b"+ idling\r\n* BYE Request is throttled. Suggested Backoff Time: 5000 milliseconds\r\n",
    )
    wakeup = Wakeup()
    with pytest.raises(ConnectionLostError, match="throttled") as lost:
        idle.wait(client, 5, wakeup, exists=0)  # type: ignore[arg-type]
    assert lost.value.retry_after == 5.0
    wakeup.close()
