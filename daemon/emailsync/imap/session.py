"""One logged-in IMAP connection to one mailbox: connect, TLS, login, folders, SELECT, and
the session's commands (fetch, file, IDLE), whose body planning lives in imap/bodyfetch.py
and whose COPY fallback and COPYUID reading live in imap/moves.py.

Every imapclient call goes through ``_translated`` so that callers only ever see the
exceptions of ``emailsync.errors``, grouped by what they do about them.

Library internals used here (pinned in pyproject.toml, checked by
tests/unit/test_library_internals.py): ``IMAPClient._imap`` (the imaplib connection the
lean reader of imap/fetch.py talks through; its ``untagged_responses`` for COPYUID and
its ``file`` reader, replaced after login) and ``IMAPClient._normalise_folder``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import imapclient
import structlog
from imapclient.exceptions import IMAPClientError
from imapclient.imapclient import SocketTimeout

from emailsync.config import FolderSettings, MailboxSettings, Settings
from emailsync.errors import (
    MailboxError,
    UidValidityChangedError,
)
from emailsync.imap import bodyfetch, idle, moves
from emailsync.imap.auth import Authenticator, make_authenticator
from emailsync.imap.bodyfetch import (
    BODY_FETCH_CAP,
    FULL_FETCH_BYTES,
    WHOLE_FETCH_MAX,
    _FullFetch,
    as_text,
    messages_of,
    savedate,
)
from emailsync.imap.folders import FolderTree
from emailsync.imap.idle import IdleUpdate, WakeSource
from emailsync.imap.moves import FILING_KEYWORD, PendingMove, copyuid
from emailsync.imap.pipeline import Command, CommandPipeline
from emailsync.imap.translate import server_text, translated
from emailsync.model import STUCK_KEYWORD, BodyPlan, FetchedMessage, FolderRole

if TYPE_CHECKING:
    from emailsync.imap.tokencache import TokenCacheStore

# Moved to imap/bodyfetch.py and imap/moves.py; named here still for the callers.
__all__ = [
    "BODY_FETCH_CAP",
    "FILING_KEYWORD",
    "FULL_FETCH_BYTES",
    "HEADERS_KEPT",
    "READ_BUFFER_BYTES",
    "TLS_CONTEXTS",
    "WHOLE_FETCH_MAX",
    "ImapSession",
    "PendingMove",
    "_FullFetch",
    "session_for",
    "tls_context",
]

log = structlog.get_logger(__name__)

# Distinct TLS contexts kept (one per CA file and its version on disk).
TLS_CONTEXTS = 16
# imaplib reads through a BufferedReader of 8 KiB per connection, allocated for its whole life;
# a worker spends that life in IDLE reading short lines, and at 2,000 mailboxes the buffers
# are 16 MB (issue 10). A smaller one only means more recv() calls per big response (lines
# longer than it are still read whole, and large literal reads bypass it).
READ_BUFFER_BYTES = 1024
# Header FETCHes sent ahead (prefetch_headers) whose answers are kept until asked for.
HEADERS_KEPT = 4


def _enable_keepalive(sock: socket.socket) -> None:
    # TCP keepalive finds a peer that vanished while we sit in IDLE (no traffic for minutes).
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying client TLS context (system CAs, or ``ca_file`` when given), shared.

    Loading a CA store costs about 0.9 MB and most of a connect's CPU (issue 10: it was
    0.96 MB per mailbox, linear), so connections with the same CA file share one context
    (an SSLContext may wrap sockets from many threads). A CA file that changes on disk
    (its mtime or size) gets a new context at the next connect.
    """
    stamp: tuple[int, int] | None = None
    if ca_file is not None:
        with contextlib.suppress(OSError):
            info = os.stat(ca_file)
            stamp = (info.st_mtime_ns, info.st_size)
    return _tls_context(ca_file, stamp)


@functools.lru_cache(maxsize=TLS_CONTEXTS)
def _tls_context(ca_file: str | None, stamp: tuple[int, int] | None) -> ssl.SSLContext:
    del stamp  # part of the cache key only
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ImapSession:
    """A logged-in connection to one mailbox, with the folder tree resolved."""

    def __init__(
        self, client: imapclient.IMAPClient, mailbox: MailboxSettings, folders: FolderSettings
    ) -> None:
        self._client = client
        # The UID FETCHes and MOVEs in flight, and what may be sent behind what.
        self._pipeline = CommandPipeline(client._imap)
        self._headers_ahead: dict[tuple[int, ...], Command] = {}  # prefetch_headers, by UIDs
        self._full_ahead: _FullFetch | None = None  # prefetch_full's FETCHes
        # Queue UIDs moved to Failed, and their copies' (UIDVALIDITY, UID) there from the
        # MOVE answers' COPYUID (RFC 4315 §3), for the Failed-for-no-group index (issue 22).
        self._to_failed: set[int] = set()
        self._copies: dict[int, tuple[int, int]] = {}
        self._failed_uidvalidity: int | None = None  # Failed's, while it is selected
        self._capabilities: frozenset[str] | None = None
        self.mailbox = mailbox
        self.folders = folders
        self.tree: FolderTree | None = None
        self.uidvalidity: int | None = None
        self.keywords_allowed = False
        self.exists = 0
        self.log = log.bind(mailbox=mailbox.address)

    @classmethod
    def open(
        cls,
        mailbox: MailboxSettings,
        folders: FolderSettings,
        authenticator: Authenticator,
        *,
        timeout_seconds: float,
    ) -> ImapSession:
        """Connect, secure and log in; raises ConnectionLostError or AuthError."""
        server = mailbox.server
        context = tls_context(str(server.ca_file) if server.ca_file else None)
        action = f"connect {server.host}:{server.port}"
        with translated(action):
            client = imapclient.IMAPClient(
                server.host,
                port=server.port,
                ssl=server.security == "ssl",
                ssl_context=context,
                timeout=SocketTimeout(connect=timeout_seconds, read=timeout_seconds),
            )
        try:
            with translated(action):
                if server.security == "starttls":
                    # RFC 3501 §6.2.1; never falls back to clear text when the server lacks it.
                    client.starttls(context)
                _enable_keepalive(client.socket())
                client.normalise_times = False  # keep INTERNALDATE's time zone
            authenticator.login(client)
            with translated(action):
                _shrink_read_buffer(client)
        except BaseException:
            _close_quietly(client)
            raise
        return cls(client, mailbox, folders)

    @property
    def client(self) -> imapclient.IMAPClient:
        """The connection, for commands of one's own (doctor, demo, tests); reads nothing.

        imapclient reads only its own answers, so with commands in flight (``busy``) it
        would read theirs: refused then (RuntimeError, a bug in the caller); ``settle()``
        reads them first.
        """
        if self._pipeline.busy:
            raise RuntimeError("IMAP commands in flight: settle() the session first")
        return self._client

    @property
    def busy(self) -> bool:
        """True while commands sent ahead (FETCHes, MOVEs) have answers unread; reads nothing."""
        return self._pipeline.busy

    def settle(self) -> imapclient.IMAPClient:
        """Read the answers of every command in flight, each kept for whoever waits for it.

        Returns the connection, ready for any command (see imap/pipeline.py: nothing but
        UID FETCHes and MOVEs goes out behind an unanswered command). Reads the network
        only when ``busy``; never raises: a read error is kept by the commands it failed.
        """
        if self._pipeline.busy:
            self._pipeline.settle()
            self._note_copies()
        return self._client

    def queue_name(self) -> str:
        """The full name of the Queue folder; asks the server (``resolve_tree``) the first time.

        A method, not a property: it may read from the network (issue 21).
        """
        return (self.tree or self.resolve_tree()).queue

    def capabilities(self) -> frozenset[str]:
        """The server's capabilities after login (asked once: they do not change after it).

        Kept, so that ``has("MOVE")`` while MOVEs are in flight does not read their answers.
        """
        if self._capabilities is None:
            with translated("capability"):
                self._capabilities = frozenset(
                    c.decode("ascii", "replace").upper() for c in self.settle().capabilities()
                )
        return self._capabilities

    def has(self, capability: str) -> bool:
        """True when the server announced a capability (e.g. MOVE, UIDPLUS, IDLE)."""
        return capability.upper() in self.capabilities()

    # -- folders -------------------------------------------------------------------------------

    def resolve_tree(self) -> FolderTree:
        """Find the delimiter and personal namespace (RFC 2342) and name the tree from them."""
        with translated("namespace"):
            prefix, delimiter = "", None
            if self.has("NAMESPACE"):
                personal = self.settle().namespace().personal
                if personal:
                    prefix, delimiter = personal[0][0] or "", personal[0][1]
            if delimiter is None:
                listing = self.settle().list_folders(pattern="")  # RFC 3501 §6.3.8: the delimiter
                delimiter = listing[0][1] if listing else "/"
        delim = delimiter.decode() if isinstance(delimiter, bytes) else str(delimiter or "/")
        self.tree = FolderTree.build(self.folders, prefix=as_text(prefix), delimiter=delim)
        return self.tree

    def ensure_folders(self) -> list[str]:
        """Create and subscribe root and its four children where missing; returns those created."""
        tree = self.tree or self.resolve_tree()
        created: list[str] = []
        with translated("ensure folders"):
            existing = {
                as_text(name) for _, _, name in self.settle().list_folders(pattern=f"{tree.root}*")
            }
            subscribed = {
                as_text(name)
                for _, _, name in self.settle().list_sub_folders(pattern=f"{tree.root}*")
            }
            for name in tree.all_names():
                if name not in existing:
                    try:
                        self.settle().create_folder(name)
                        created.append(name)
                    except IMAPClientError as exc:
                        # Another connection may have created it a moment ago.
                        if (
                            "ALREADYEXISTS" not in server_text(exc).upper()
                            and "EXISTS" not in server_text(exc).upper()
                        ):
                            raise
                if name not in subscribed:
                    self.settle().subscribe_folder(name)
        if created:
            self.log.info("folders_created", folders=created)
        return created

    # -- queue ---------------------------------------------------------------------------------

    def select_queue(self) -> int:
        """SELECT the Queue; returns its message count. Detects a UIDVALIDITY change."""
        tree = self.tree or self.resolve_tree()
        with translated("select queue"):
            info = self.settle().select_folder(tree.queue)
        self._forget_ahead()  # answers sent ahead for belong to the pass before
        self._to_failed.clear()  # copies not asked for by now never will be
        self._copies.clear()
        self._failed_uidvalidity = None
        uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        changed = self.uidvalidity is not None and uidvalidity != self.uidvalidity
        self.uidvalidity = uidvalidity
        self.keywords_allowed = b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
        self.exists = int(info.get(b"EXISTS", 0))
        if changed:
            raise UidValidityChangedError(f"Queue UIDVALIDITY changed to {uidvalidity}")
        return self.exists

    def failed_status(self) -> tuple[int, int]:
        """Failed's UIDVALIDITY and message count by STATUS (RFC 3501 §6.3.10): Queue stays
        selected, so a mailbox whose Failed is empty needs no SELECT to be indexed."""
        tree = self.tree or self.resolve_tree()
        with translated("status failed"):
            info = self.settle().folder_status(
                tree.name(FolderRole.FAILED), ["UIDVALIDITY", "MESSAGES"]
            )
        return int(info.get(b"UIDVALIDITY", 0)), int(info.get(b"MESSAGES", 0))

    def select_failed(self) -> tuple[int, int]:
        """SELECT Failed, leaving Queue (select it again after); its UIDVALIDITY and count.

        ``fetch_headers``, ``fetch_full``, ``keyword_uids`` and ``set_keyword`` then work on
        Failed, and ``refile`` moves from it.
        """
        tree = self.tree or self.resolve_tree()
        with translated("select failed"):
            info = self.settle().select_folder(tree.name(FolderRole.FAILED))
        self._forget_ahead()
        self.keywords_allowed = b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
        uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        self._failed_uidvalidity = uidvalidity
        return uidvalidity, int(info.get(b"EXISTS", 0))

    def copied_to_failed(self, uids: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Of these Queue UIDs filed to Failed, each copy's (UIDVALIDITY, UID) the server gave.

        From the MOVE answers' COPYUID (RFC 4315, UIDPLUS); a UID the server named no copy
        for is left out. Each is given once.
        """
        return {uid: copy for uid in uids if (copy := self._copies.pop(uid, None)) is not None}

    def queue_uids(self) -> list[int]:
        """The UIDs in the (selected) Queue, oldest first."""
        with translated("search queue"):
            return sorted(int(uid) for uid in self.settle().search(["ALL"]))

    def keyword_uids(self, keyword: str) -> list[int]:
        """The UIDs in the (selected) Queue that carry a keyword (RFC 3501 §6.4.4 KEYWORD)."""
        with translated("search queue"):
            return sorted(int(uid) for uid in self.settle().search(["KEYWORD", keyword]))

    def set_keyword(self, uids: Sequence[int], keyword: str, *, on: bool) -> bool:
        """STORE +FLAGS (``on``) or -FLAGS a keyword on messages of the (selected) Queue.

        Returns False, storing nothing, when the Queue takes no new keywords (no ``\\*`` in
        PERMANENTFLAGS, RFC 3501 §7.1): setting one would only earn a NO.
        """
        if not uids:
            return True
        if on and not self.keywords_allowed:
            return False
        with translated("store keyword"):
            if on:
                self.settle().add_flags(list(uids), [keyword], silent=True)
            else:
                self.settle().remove_flags(list(uids), [keyword], silent=True)
        return True

    def release_stuck(self) -> int:
        """Take STUCK_KEYWORD off every Queue message; returns how many carried it."""
        self.select_queue()
        uids = self.keyword_uids(STUCK_KEYWORD)
        self.set_keyword(uids, STUCK_KEYWORD, on=False)
        return len(uids)

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        """Header blocks, INTERNALDATE, size, flags and body plan (missing messages skipped).

        The BODYSTRUCTURE travels in the same FETCH (issue 10: one round trip fewer per
        batch): each message's ``plan`` is read from it, None where it is unreadable, and
        ``fetch_full`` takes these plans instead of asking for the structures again.
        """
        ahead = self._headers_ahead.pop(tuple(uids), None)  # given once
        if ahead is None or not uids:
            return self._fetch(uids, b"BODY.PEEK[HEADER]", b"BODY[HEADER]", structure=True)
        with translated("fetch"):
            response = self._pipeline.fetched(ahead)
        return messages_of(response, b"BODY[HEADER]", structure=True)

    def prefetch_headers(self, uids: Sequence[int]) -> None:
        """Send the header FETCH of ``uids`` now; ``fetch_headers(uids)`` reads its answer.

        The server builds the next batch's answer while this process works on the batch
        before (issue 10; RFC 3501 §5.5 lets a client send a command before the previous
        one's answer is read), behind any FETCHes and MOVEs in flight (imap/pipeline.py).
        The answer is kept for ``fetch_headers`` until a folder is selected (at most
        HEADERS_KEPT batches: the oldest goes first). Never raises: a FETCH that cannot be
        sent is sent again, and fails, in ``fetch_headers``.
        """
        if not uids:
            return
        ahead = self._headers_ahead
        ahead.pop(tuple(uids), None)
        while len(ahead) >= HEADERS_KEPT:
            del ahead[next(iter(ahead))]
        with contextlib.suppress(MailboxError), translated("fetch"):
            items = self._items(b"BODY.PEEK[HEADER]", structure=True)
            ahead[tuple(uids)] = self._pipeline.fetch(uids, items)

    def _forget_ahead(self) -> None:
        """Drop what was sent ahead (its answers are read, by the pipeline, and dropped)."""
        self._headers_ahead.clear()
        self._full_ahead = None

    def fetch_full(
        self,
        uids: Sequence[int],
        sizes: dict[int, int] | None = None,
        plans: Mapping[int, BodyPlan | None] | None = None,
    ) -> list[FetchedMessage]:
        """What events need of these messages' bodies, by their BODYSTRUCTURE (RFC 3501 §7.4.2).

        One FETCH of the structures, then the text parts only, each cut at BODY_FETCH_CAP
        (``BODY.PEEK[n]<0.cap>``, §6.4.5), one FETCH per set of part numbers: attachments are
        listed from the structure and never downloaded. A message whose structure cannot be
        read is fetched whole when it is at most WHOLE_FETCH_MAX bytes (by its RFC822.SIZE),
        else its first BODY_FETCH_CAP bytes, and the stdlib parser reads what came.
        ``plans`` are the ones ``fetch_headers`` read already: only messages without one
        have their structure fetched here. The FETCHes ``prefetch_full`` sent for the same
        UIDs are read instead of asking again.
        """
        ahead, self._full_ahead = self._full_ahead, None
        if ahead is None or ahead.uids != tuple(uids):
            ahead = self._send_full(uids, sizes, plans)
        return bodyfetch.read_full(self._pipeline, ahead)

    def prefetch_full(
        self,
        uids: Sequence[int],
        sizes: dict[int, int] | None = None,
        plans: Mapping[int, BodyPlan | None] | None = None,
    ) -> None:
        """Send the FETCHes of ``fetch_full`` now; ``fetch_full(uids)`` reads their answers.

        The server builds them while this process works on something else (issue 23: the
        batch before is recorded and moved meanwhile), behind the FETCHes and MOVEs in
        flight. Never raises: what fails here is sent again, and fails, in ``fetch_full``.
        """
        self._full_ahead = None
        if uids:
            with contextlib.suppress(MailboxError):
                self._full_ahead = self._send_full(uids, sizes, plans)

    def _send_full(
        self,
        uids: Sequence[int],
        sizes: dict[int, int] | None,
        plans: Mapping[int, BodyPlan | None] | None,
    ) -> _FullFetch:
        """Send the FETCHes ``fetch_full`` reads (imap/bodyfetch.py); a method, so that a
        session can plan otherwise (a test's fetches bodies whole)."""
        return bodyfetch.send_full(self._pipeline, uids, sizes, plans, self._items)

    def _fetch(
        self, uids: Sequence[int], item: bytes, key: bytes, *, structure: bool = False
    ) -> list[FetchedMessage]:
        if not uids:
            return []
        with translated("fetch"):
            pipeline = self._pipeline
            items = self._items(item, structure=structure)
            response = pipeline.fetched(pipeline.fetch(uids, items))
        return messages_of(response, key, structure=structure)

    def _items(self, item: bytes, *, structure: bool) -> list[bytes]:
        items = [item, b"INTERNALDATE", b"RFC822.SIZE", b"FLAGS"]
        if structure:
            items.append(b"BODYSTRUCTURE")
        if self.has("SAVEDATE"):
            items.append(b"SAVEDATE")  # RFC 8514: when it landed in Queue, for latency
        return items

    # -- filing --------------------------------------------------------------------------------

    def file_later(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str | None = None,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> PendingMove:
        """Send the MOVE of ``file`` and return without its answer; ``wait()`` reads it.

        The server moves the messages while this process works on the next batch (issue
        10: waiting for MOVE answers was 29 % of a backlog pass); the next batches' FETCHes
        may go out behind it (issue 23: the pipeline routes each answer line by its UID,
        imap/pipeline.py). Its answer is read by ``wait()``, or on the way by any read of
        the connection, and kept. Never raises: ``wait()`` raises what ``file`` would.
        Tagging with a keyword, or a server without MOVE (COPY, STORE, EXPUNGE, each
        answered before the next), is done at once, its error kept for ``wait()``.
        ``confirm()`` runs last before anything is sent (a cluster's lease check); what it
        raises is raised here, and nothing is sent.
        """
        pending = PendingMove(self, role)
        if not uids:
            return pending
        try:
            if (keyword and self.keywords_allowed) or not self.has("MOVE"):
                self.file(uids, role, keyword, confirm=confirm)
                return pending
            dest = (self.tree or self.resolve_tree()).name(role)
            with translated(f"file to {role.value}"):
                folder = self._client._normalise_folder(dest)
                self._pipeline.make_way(uids)  # the rule's waits, if any: before the check
            if confirm is not None:
                confirm()  # after anything that can wait on a slow server
            if role is FolderRole.FAILED:
                self._to_failed.update(uids)
            with translated(f"file to {role.value}"):
                pending.command = self._pipeline.move(
                    uids, folder if isinstance(folder, bytes) else folder.encode()
                )
        except MailboxError as exc:
            pending.error = exc
        return pending

    def file(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str | None = None,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> None:
        """Move messages from the (selected) Queue to a folder of the tree, optionally tagged.

        ``confirm()`` runs once the answers still pending were read, before anything is sent.
        """
        if not uids:
            return
        tree = self.tree or self.resolve_tree()
        dest = tree.name(role)
        if role is FolderRole.FAILED:
            self._to_failed.update(uids)
        with translated(f"file to {role.value}"):
            self.settle()  # reads the answers still pending (a slow server's)
            if confirm is not None:
                confirm()
            if keyword and self.keywords_allowed:
                self.settle().add_flags(list(uids), [keyword], silent=True)
            self._move(list(uids), tree.queue, dest, self.uidvalidity)

    def requeue(
        self,
        role: FolderRole,
        keywords: Sequence[str],
        *,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Move every message of a folder (e.g. Failed) back to Queue, without the keywords.

        With ``batch_size``, in batches of that many UIDs (MOVE keeps the other UIDs valid),
        telling ``progress(done, total)`` after each.
        """
        tree = self.tree or self.resolve_tree()
        source = tree.name(role)
        with translated(f"requeue {role.value}"):
            info = self.settle().select_folder(source)
            uids = sorted(int(u) for u in self.settle().search(["ALL"]))
            if not uids:
                return 0
            keywords_allowed = b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
            self.keywords_allowed = False  # the fallback's marker is for Queue only
            uidvalidity = int(info.get(b"UIDVALIDITY", 0))
            step = batch_size or len(uids)
            for start in range(0, len(uids), step):
                chunk = uids[start : start + step]
                if keywords_allowed:
                    self.settle().remove_flags(chunk, list(keywords), silent=True)
                self._move(chunk, source, tree.queue, uidvalidity)
                if progress is not None:
                    progress(start + len(chunk), len(uids))
        return len(uids)

    def refile(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> None:
        """Move messages from the (selected) Failed to a folder, taking ``keyword`` off first.

        ``select_failed`` must have been called. ``confirm()`` (a cluster's lease check)
        runs last before anything is sent. A crash between the two commands leaves the
        message in Failed without the keyword, still indexed: the next re-file moves it.
        """
        if not uids:
            return
        tree = self.tree or self.resolve_tree()
        with translated(f"refile to {role.value}"):
            self.settle()  # reads any answer still pending
            if confirm is not None:
                confirm()
            if self.keywords_allowed:
                self.settle().remove_flags(list(uids), [keyword], silent=True)
            self._move(
                list(uids), tree.name(FolderRole.FAILED), tree.name(role), self._failed_uidvalidity
            )

    def _note_copies(self) -> None:
        """Keep the COPYUIDs (RFC 4315 §3) of a MOVE answer just read, for moves to Failed.

        imaplib keeps every response code it reads until someone takes it: taken here, so
        a long-lived connection does not pile up one per MOVE.
        """
        codes = self._client._imap.untagged_responses.pop("COPYUID", None)
        if not codes or not self._to_failed:
            return
        for code in codes:
            for source, copy in copyuid(code):
                if source in self._to_failed:
                    self._to_failed.discard(source)
                    self._copies[source] = copy

    def _move(self, uids: list[int], source: str, dest: str, uidvalidity: int | None) -> None:
        if self.has("MOVE"):  # RFC 6851, its answer read by the lean reader (imap/pipeline.py)
            folder = self._client._normalise_folder(dest)
            folder = folder if isinstance(folder, bytes) else folder.encode()
            self._pipeline.moved(self._pipeline.move(uids, folder))
            self._note_copies()
        else:
            moves.copy_then_expunge(self, uids, source, dest, uidvalidity)  # no MOVE

    def _copies_in(self, dest: str, uids: list[int]) -> set[int]:
        """Queue UIDs among ``uids`` with a copy in dest (imap/moves.py); a method, so that a
        session can act in between (a test's replaces Queue there)."""
        return moves.copies_in(self, dest, uids)

    # -- IDLE (RFC 2177) ------------------------------------------------------------------------

    def idle_begin(self) -> None:
        """Enter IDLE on the selected Queue."""
        idle.begin(self.settle())

    def idle_wait(self, timeout_seconds: float, wake: WakeSource) -> IdleUpdate:
        """Wait in IDLE for the server, a wake-up on ``wake`` or the timeout (see imap/idle.py)."""
        return self._count(idle.wait(self.settle(), timeout_seconds, wake, self.exists))

    def idle_end(self) -> IdleUpdate:
        """Leave IDLE (DONE); a server that does not answer within the timeout is dead."""
        return self._count(idle.end(self.settle(), self.exists))

    def _count(self, update: IdleUpdate) -> IdleUpdate:
        self.exists = update.exists
        return update

    def oldest_queued(self, uids: Sequence[int]) -> datetime | None:
        """When the oldest of these Queue messages landed there; None for no messages.

        SAVEDATE (RFC 8514) where the server has it; else INTERNALDATE, which for a message
        moved in from another folder is when it was first received, so an over-estimate.
        """
        if not uids:
            return None
        with translated("fetch oldest"):
            items = [b"INTERNALDATE", *([b"SAVEDATE"] if self.has("SAVEDATE") else [])]
            response = self.settle().fetch([min(uids)], items)
        for data in response.values():
            saved = savedate(data.get(b"SAVEDATE"))
            internal = data.get(b"INTERNALDATE")
            return saved or (internal if isinstance(internal, datetime) else None)
        return None

    # -- lifetime ------------------------------------------------------------------------------

    def noop(self) -> IdleUpdate:
        """NOOP: proves the connection answers; reports new mail among its untagged updates.

        RFC 3501 §6.1.2: a server may announce new mail in the NOOP response, and then not
        again in the next IDLE, so the caller must act on ``new_mail``.
        """
        with translated("noop"):
            _, responses = self.settle().noop()
        return self._count(idle.mailbox_updates(responses, self.exists))

    def logout(self, timeout_seconds: float | None = None) -> None:
        """LOGOUT politely (waiting at most ``timeout_seconds`` when given), close; never raises."""
        if timeout_seconds is not None:
            with contextlib.suppress(OSError):
                self._client.socket().settimeout(timeout_seconds)
        with contextlib.suppress(Exception):
            self._client.logout()
        _close_quietly(self._client)

    def close(self) -> None:
        """Close the socket without LOGOUT (for a connection already known dead)."""
        _close_quietly(self._client)


@contextlib.contextmanager
def session_for(
    settings: Settings,
    address: str,
    *,
    timeout_seconds: float | None = None,
    token_caches: TokenCacheStore | None = None,
) -> Iterator[ImapSession]:
    """A logged-in session to one configured mailbox, as the daemon opens it; logged out at
    the end. ``timeout_seconds``: the daemon's by default; ``token_caches``: as
    ``make_authenticator``'s (files in ``state_dir`` by default)."""
    mailbox = settings.mailbox(address)
    session = ImapSession.open(
        mailbox,
        settings.folders,
        make_authenticator(mailbox, settings, token_caches=token_caches),
        timeout_seconds=(
            settings.daemon.timeout_seconds if timeout_seconds is None else timeout_seconds
        ),
    )
    try:
        yield session
    finally:
        session.logout()


def _shrink_read_buffer(client: imapclient.IMAPClient) -> None:
    """Give a logged-in connection a READ_BUFFER_BYTES reader, when nothing is buffered.

    Bytes already in the old reader would be lost with it, so it is replaced only when the
    server has sent nothing unread (after LOGIN's tagged answer it normally has not).
    """
    if not idle.nothing_pending(client):
        return
    imap = client._imap
    old = imap.file
    imap.file = client.socket().makefile("rb", buffering=READ_BUFFER_BYTES)
    old.close()  # the reader only: the socket stays open for the new one


def _close_quietly(client: imapclient.IMAPClient) -> None:
    with contextlib.suppress(Exception):
        client.shutdown()
