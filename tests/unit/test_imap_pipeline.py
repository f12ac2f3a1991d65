"""The command pipeline (imap/pipeline.py): interleaved answers go to the command that asked.

Dovecot runs pipelined commands side by side, so the lines of a UID FETCH sent behind an
unanswered UID MOVE can come before, among and after the MOVE's own (its COPYUID, one
EXPUNGE per message, its tagged answer), in whatever order the server's work finishes.
No real server produces a chosen interleaving on demand, so these tests play scripted
server transcripts over a loopback socket to a real imaplib connection; the Dovecot side
is tests/integration/test_fetch_reader.py.
"""

from __future__ import annotations

import imaplib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

from emailsync.imap.pipeline import CommandPipeline

Script = Callable[[list[bytes]], bytes]  # the client's tags so far -> what the server sends


class ScriptedServer:
    """A loopback IMAP peer that answers each client line with a scripted reply."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.replies: list[tuple[int, Script, bool]] = []  # after the n-th command: send this
        self.commands: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def after(self, count: int, script: Script, *, close: bool = False) -> None:
        """Once ``count`` commands (after CAPABILITY) arrived, send ``script(tags)``."""
        self.replies.append((count, script, close))

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            reader = conn.makefile("rb")
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 MOVE UIDPLUS] ready\r\n")
            tag = reader.readline().split(b" ", 1)[0]  # imaplib's CAPABILITY
            conn.sendall(b"* CAPABILITY IMAP4rev1 MOVE UIDPLUS\r\n" + tag + b" OK done\r\n")
            tags: list[bytes] = []
            while True:
                line = reader.readline()
                if not line:
                    return
                self.commands.append(line.rstrip(b"\r\n"))
                tags.append(line.split(b" ", 1)[0])
                for count, script, close in self.replies:
                    if count == len(tags):
                        conn.sendall(script(tags))
                        if close:
                            return


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    peer = ScriptedServer()
    yield peer
    peer.listener.close()


@pytest.fixture
def connect(server: ScriptedServer) -> Iterator[Callable[[], imaplib.IMAP4]]:
    """Connects (once the script is set) a real imaplib connection to the scripted server."""
    opened: list[imaplib.IMAP4] = []

    def open_one() -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", server.port, timeout=5)
        imap.state = "SELECTED"  # as after a SELECT: only the UID commands are played
        opened.append(imap)
        return imap

    yield open_one
    for imap in opened:
        imap.shutdown()


def header(uid: int, seq: int) -> bytes:
    text = b"Subject: %d\r\n\r\n" % uid
    return b"* %d FETCH (UID %d BODY[HEADER] {%d}\r\n%s)\r\n" % (seq, uid, len(text), text)


def test_a_fetch_behind_an_unanswered_move_gets_its_own_lines_whatever_the_order(
    server: ScriptedServer, connect: Callable[[], imaplib.IMAP4]
) -> None:
    # MOVE 1:3, then FETCH 4:6 behind it: the FETCH's lines come before, among and after
    # the MOVE's, an unsolicited FETCH names a message being moved (UID 2, another client's
    # flag change), and the FETCH is answered before the MOVE.
    server.after(
        2,
        lambda tags: (
            header(4, 4)
            + b"* OK [COPYUID 9 1:3 11:13] Moved UIDs.\r\n"
            + b"* 1 EXPUNGE\r\n"
            + b"* 1 FETCH (UID 2 FLAGS (\\Seen))\r\n"
            + header(5, 4)
            + b"* VANISHED 3\r\n"
            + header(6, 4)
            + tags[1]
            + b" OK Fetch completed.\r\n"
            + b"* 1 EXPUNGE\r\n"
            + tags[0]
            + b" OK Move completed.\r\n"
        ),
    )
    imap = connect()
    pipeline = CommandPipeline(imap)
    move = pipeline.move([1, 2, 3], b'"Sent"')
    fetch = pipeline.fetch([4, 5, 6], [b"BODY.PEEK[HEADER]"])
    assert pipeline.busy
    pipeline.moved(move)  # read first, as the filer does: the FETCH's lines are kept
    assert pipeline.fetched(fetch) == {
        uid: {b"SEQ": 4, b"BODY[HEADER]": b"Subject: %d\r\n\r\n" % uid} for uid in (4, 5, 6)
    }
    assert not pipeline.busy
    untagged = imap.untagged_responses
    assert untagged["EXPUNGE"] == [b"1", b"1"]  # stored as imaplib stores them
    assert untagged["VANISHED"] == [b"3"]
    assert untagged["COPYUID"] == [b"9 1:3 11:13"]
    assert not imap.tagged_commands  # nothing left for imaplib to trip on
    assert server.commands[0].endswith(b'UID MOVE 1:3 "Sent"')
    assert server.commands[1].endswith(b"UID FETCH 4:6 (BODY.PEEK[HEADER])")


def test_two_fetches_in_flight_each_get_their_uids_and_a_refusal_stays_with_its_command(
    server: ScriptedServer, connect: Callable[[], imaplib.IMAP4]
) -> None:
    server.after(
        3,
        lambda tags: (
            header(7, 2)
            + header(1, 1)
            + tags[1]
            + b" NO [SERVERBUG] not these\r\n"
            + b"* 1 FETCH (FLAGS () UID 2)\r\n"  # UID not first: found by the full parser
            + tags[2]
            + b" OK done\r\n"
            + tags[0]
            + b" OK done\r\n"
        ),
    )
    imap = connect()
    pipeline = CommandPipeline(imap)
    first = pipeline.fetch([1, 2], [b"BODY.PEEK[HEADER]"])
    second = pipeline.fetch([7], [b"BODY.PEEK[HEADER]"])
    third = pipeline.fetch([9], [b"FLAGS"])
    with pytest.raises(IMAPClientError, match=r"fetch failed: \[SERVERBUG\] not these"):
        pipeline.fetched(second)
    assert pipeline.fetched(first) == {
        1: {b"SEQ": 1, b"BODY[HEADER]": b"Subject: 1\r\n\r\n"},
        2: {b"SEQ": 1, b"FLAGS": ()},
    }
    assert pipeline.fetched(third) == {}


def test_a_command_naming_a_uid_in_flight_waits_for_it_first(
    server: ScriptedServer, connect: Callable[[], imaplib.IMAP4]
) -> None:
    # The rule: a FETCH of a message a MOVE in flight names is sent once that MOVE is
    # answered (else it could find the message there or gone, by the server's timing).
    server.after(1, lambda tags: b"* 1 EXPUNGE\r\n" + tags[0] + b" OK Move completed.\r\n")
    server.after(2, lambda tags: tags[1] + b" OK Fetch completed.\r\n")
    server.after(3, lambda tags: header(3, 1) + tags[2] + b" OK Fetch completed.\r\n")
    imap = connect()
    pipeline = CommandPipeline(imap)
    move = pipeline.move([1], b'"Sent"')
    behind = pipeline.fetch([1, 2], [b"BODY.PEEK[HEADER]"])  # waited for the MOVE first
    assert move.done
    other = pipeline.fetch([3], [b"BODY.PEEK[HEADER]"])  # names nothing in flight: sent at once
    assert not behind.done
    assert pipeline.fetched(other) == {3: {b"SEQ": 1, b"BODY[HEADER]": b"Subject: 3\r\n\r\n"}}
    assert pipeline.fetched(behind) == {}  # moved away before it was asked for
    pipeline.moved(move)


def test_a_connection_lost_fails_every_command_in_flight_with_its_own_name(
    server: ScriptedServer, connect: Callable[[], imaplib.IMAP4]
) -> None:
    server.after(2, lambda tags: header(4, 1)[:20], close=True)  # cut in its middle: EOF
    imap = connect()
    pipeline = CommandPipeline(imap)
    move = pipeline.move([1], b'"Sent"')
    fetch = pipeline.fetch([4], [b"BODY.PEEK[HEADER]"])
    with pytest.raises(IMAPClientAbortError, match=r"^command: FETCH => socket error"):
        pipeline.fetched(fetch)
    with pytest.raises(IMAPClientAbortError, match=r"^command: UID => socket error"):
        pipeline.moved(move)
    assert not pipeline.busy
