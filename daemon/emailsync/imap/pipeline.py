"""The commands in flight on one connection, and the one rule of what may be sent behind what.

RFC 3501 §5.5 lets a client send a command before the previous one is answered, and a
backlog pass lives on it (issue 10, issue 23): the server moves batch n-1, and builds the
answers to batch n's text FETCH and n+1's header FETCH, while this process parses and
records. Dovecot runs pipelined commands side by side, so the untagged lines of the
commands in flight come interleaved, in any order before each one's tagged answer. What
keeps them apart is that every line a UID command brings names its message by UID
(RFC 3501 §6.4.8: a UID FETCH's responses carry ``UID n``): each untagged FETCH is handed
to the FETCH in flight that asked for that UID, and the EXPUNGEs of a MOVE (RFC 6851 §4.3)
are stored as imaplib stores them, never taken for anything else.

**The rule** (``CommandPipeline``, the only place that knows it):

* a UID FETCH or UID MOVE may go behind any FETCHes and MOVEs in flight that name none
  of its UIDs; one that does is answered first (a FETCH behind a MOVE of the same message
  could find it there or gone, a MOVE behind a FETCH of it could take it away before its
  lines are read, and two FETCHes of one UID could not be told apart);
* anything else (SELECT, SEARCH, STORE, IDLE, NOOP, … through imapclient, which reads
  only its own answers) goes out only once nothing is in flight: ``settle()`` reads every
  answer first and keeps it for whoever waits for it.

A FETCH line for a UID no FETCH in flight asked for (another client's flag change,
RFC 3501 §7.4.2 unsolicited FETCH) is dropped, as imapclient drops it. A lost connection
fails every command in flight with the same error. Nothing here reads the network except
``wait``, ``settle`` and the waits the rule asks for in ``fetch`` and ``move``.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from imapclient.exceptions import IMAPClientError, ProtocolError

from emailsync.imap.fetch import (
    FetchData,
    check_answer,
    parse_fetch_items,
    read_until,
    reworded,
    send_fetch,
    send_move,
)

# A UID FETCH response that names its UID first, as Dovecot's do: "(UID 123 ...".
_UID_FIRST = re.compile(rb"\(UID (\d+)[ )]")


class Command:
    """A UID FETCH or UID MOVE sent on the pipeline; its answer once read."""

    __slots__ = ("answer", "error", "name", "refused", "responses", "tag", "uids", "unreadable")

    def __init__(self, tag: bytes, name: str, refused: str, uids: Iterable[int]) -> None:
        self.tag = tag
        self.name = name  # as imaplib names it in errors: "FETCH", or "UID" for a MOVE
        self.refused = refused  # as imapclient words a NO: "fetch failed", "move failed"
        self.uids = frozenset(uids)
        self.responses: list[tuple[int, list[bytes]]] = []  # its untagged FETCHes, raw
        self.answer: tuple[str, list[bytes]] | None = None  # the tagged answer, once read
        self.error: Exception | None = None  # what reading it met instead (connection lost)
        self.unreadable: ProtocolError | None = None  # a FETCH line of it that did not parse

    @property
    def done(self) -> bool:
        """True once answered (or failed): waiting for it reads nothing."""
        return self.answer is not None or self.error is not None


class CommandPipeline:
    """The UID FETCHes and MOVEs in flight on one imaplib connection (see the module doc)."""

    def __init__(self, imap: imaplib.IMAP4) -> None:
        self._imap = imap
        self._in_flight: dict[bytes, Command] = {}  # by tag, oldest first
        self._naming: dict[int, Command] = {}  # UID -> the command in flight naming it

    @property
    def busy(self) -> bool:
        """True while any command's answer is unread (reads nothing)."""
        return bool(self._in_flight)

    def fetch(self, uids: Sequence[int], items: Sequence[bytes]) -> Command:
        """Send ``UID FETCH uids (items)`` (``uids`` not empty) behind what the rule allows."""
        self.make_way(uids)
        command = Command(send_fetch(self._imap, uids, items), "FETCH", "fetch failed", uids)
        return self._sent(command)

    def move(self, uids: Sequence[int], folder: bytes) -> Command:
        """Send ``UID MOVE uids folder`` (``folder`` encoded and quoted) behind what it may."""
        self.make_way(uids)
        command = Command(send_move(self._imap, uids, folder), "UID", "move failed", uids)
        return self._sent(command)

    def wait(self, command: Command) -> None:
        """Read until ``command`` is answered, handing every line on the way to its own."""
        if command.done:
            return
        try:
            answer = read_until(self._imap, command.tag, self._route)
        except Exception as exc:
            self._lost(exc)
            return
        self._answered(command, answer)
        self._collect()

    def settle(self) -> None:
        """Read the answers of every command in flight (kept for their waiters)."""
        while self._in_flight:
            self.wait(next(iter(self._in_flight.values())))

    def fetched(self, command: Command) -> dict[int, FetchData]:
        """A FETCH's answer: each asked-for UID that came back → its items (imapclient's way).

        Raises as ``imap.fetch.uid_fetch`` would.
        """
        self.wait(command)
        self._raise(command)
        if command.unreadable is not None:
            raise command.unreadable
        result: dict[int, FetchData] = {}
        wanted = command.uids
        for seq, segments in command.responses:
            data = parse_fetch_items(seq, segments)
            uid = data.pop(b"UID", None)
            if uid is not None and uid in wanted:
                result.setdefault(uid, {}).update(data)
        command.responses = []
        return result

    def moved(self, command: Command) -> None:
        """Return once a MOVE is answered OK; raises as ``imap.fetch.uid_move`` would."""
        self.wait(command)
        self._raise(command)

    # -- inside ----------------------------------------------------------------------------

    def make_way(self, uids: Sequence[int]) -> None:
        """Wait for the commands in flight that name any of ``uids`` (the rule)."""
        if not self._naming:
            return
        naming = self._naming
        blocking = {command for uid in uids if (command := naming.get(uid)) is not None}
        for command in sorted(blocking, key=lambda c: list(self._in_flight).index(c.tag)):
            self.wait(command)

    def _sent(self, command: Command) -> Command:
        self._in_flight[command.tag] = command
        naming = self._naming
        for uid in command.uids:
            naming[uid] = command
        return command

    def _route(self, seq: int, segments: list[bytes]) -> None:
        """Hand an untagged FETCH to the FETCH in flight that asked for its UID."""
        match = _UID_FIRST.match(segments[0])
        if match is not None:
            uid: object = int(match[1])
        else:
            try:
                uid = parse_fetch_items(seq, segments).get(b"UID")
            except ProtocolError as exc:
                # Unreadable, so nobody's for sure: the oldest FETCH in flight reports it.
                oldest = next((c for c in self._in_flight.values() if c.name == "FETCH"), None)
                if oldest is not None and oldest.unreadable is None:
                    oldest.unreadable = exc
                return
        command = self._naming.get(uid) if isinstance(uid, int) else None
        if command is not None and command.name == "FETCH":
            command.responses.append((seq, segments))

    def _answered(self, command: Command, answer: tuple[str, list[bytes]]) -> None:
        self._in_flight.pop(command.tag, None)
        if command.answer is None:
            command.answer = answer
        naming = self._naming
        for uid in command.uids:
            if naming.get(uid) is command:
                del naming[uid]

    def _collect(self) -> None:
        """Take the answers other commands got while one was waited for."""
        tagged: dict[bytes, Any] = self._imap.tagged_commands
        for tag, command in list(self._in_flight.items()):
            answer = tagged.get(tag)
            if answer is not None:
                del tagged[tag]
                self._answered(command, answer)

    def _lost(self, exc: Exception) -> None:
        """The connection is out of step or gone: every command in flight failed with it."""
        for command in self._in_flight.values():
            command.error = exc
        self._in_flight.clear()
        self._naming.clear()

    @staticmethod
    def _raise(command: Command) -> None:
        error = command.error
        if isinstance(error, IMAPClientError):
            raise reworded(error, command.name) from error
        if error is not None:
            raise error
        assert command.answer is not None  # noqa: S101 -- done means one of the two
        check_answer(command.answer, command.name, command.refused)
