"""Quarantine of messages refused again and again: what counts as an attempt and what does not.

The Queue here is a stand-in for the state a pass reads and changes (UIDs, keywords, which
message the server refuses); the refusals are the errors the IMAP layer raises for them. The
real server's refusals are tested in tests/integration/test_filing.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest

from emailsync.config import MailboxSettings, ServerSettings
from emailsync.errors import ConnectionLostError, StoreError, StoreUnavailableError
from emailsync.filing.queuepass import Filer
from emailsync.model import STUCK_KEYWORD, FetchedMessage, FolderRole, TimelineEvent
from emailsync.state.sqlite import SqliteStore

from .fakeserver import FilesAtOnce
from .stores import with_smith

OWNER = "agent@example.com"
REFUSED = "file to received: UID command error: NO [OVERQUOTA] Quota exceeded"


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "john@clients.example"
    msg["To"] = OWNER
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@test.example>"
    msg.set_content("Hello.")
    return msg.as_bytes()


class Queue(FilesAtOnce):
    """A Queue folder: messages by UID with their keywords, and what the server refuses."""

    def __init__(self) -> None:
        self.uidvalidity: int | None = 1
        self.keywords_allowed = True
        self.messages: dict[int, tuple[bytes, set[str]]] = {}
        self.filed: dict[FolderRole, list[bytes]] = {}
        self.next_uid = 1
        self.refuse_move: dict[int, str] = {}  # uid → the server's NO text
        self.refuse_fetch: set[int] = set()
        self.lose_connection_on_fetch: set[int] = set()
        self.lose_connection_alone: set[int] = set()  # in a batch: NO; alone: the line cut
        self.lose_connection_on_move = False
        self.move_attempts: list[int] = []
        self.prefetched: list[list[int]] = []  # header FETCHes sent ahead

    def add(self, raw: bytes) -> int:
        uid = self.next_uid
        self.next_uid += 1
        self.messages[uid] = (raw, set())
        return uid

    def keywords(self, uid: int) -> set[str]:
        return self.messages[uid][1]

    # -- the QueueSession protocol -------------------------------------------------------------

    def select_queue(self) -> int:
        return len(self.messages)

    def queue_uids(self) -> list[int]:
        return sorted(self.messages)

    def keyword_uids(self, keyword: str) -> list[int]:
        return sorted(uid for uid, (_, kw) in self.messages.items() if keyword in kw)

    def set_keyword(self, uids: Sequence[int], keyword: str, *, on: bool) -> bool:
        if on and not self.keywords_allowed:
            return False
        for uid in uids:
            (self.keywords(uid).add if on else self.keywords(uid).discard)(keyword)
        return True

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        return self._fetch(uids)

    def prefetch_headers(self, uids: Sequence[int]) -> None:
        self.prefetched.append(list(uids))  # fetch_headers answers at once anyway

    def _fetch(self, uids: Sequence[int]) -> list[FetchedMessage]:
        if self.lose_connection_on_fetch & set(uids):
            raise ConnectionLostError("fetch: server said BYE", kind="bye")
        if len(uids) == 1 and self.lose_connection_alone & set(uids):
            raise ConnectionLostError(
                "fetch: command: FETCH => socket error: unterminated line", kind="bye"
            )
        if self.refuse_fetch & set(uids) or self.lose_connection_alone & set(uids):
            raise ConnectionLostError("fetch: NO [SERVERBUG] Internal error", kind="protocol")
        return [
            FetchedMessage(uid, self.messages[uid][0], None, len(self.messages[uid][0]))
            for uid in uids
            if uid in self.messages
        ]

    def move(self, uids: Sequence[int], role: FolderRole) -> None:
        self.move_attempts.extend(uids)
        if self.lose_connection_on_move:
            raise ConnectionLostError("file: connection reset", kind="bye")
        refused = [self.refuse_move[uid] for uid in uids if uid in self.refuse_move]
        if refused:
            raise ConnectionLostError(refused[0], kind="protocol")
        for uid in uids:
            raw, _ = self.messages.pop(uid)
            self.filed.setdefault(role, []).append(raw)


def queue_of(*subjects: str) -> tuple[Queue, list[int]]:
    """A Queue holding a message for each subject, and their UIDs in that order."""
    queue = Queue()
    return queue, [queue.add(message(subject)) for subject in subjects]


def refusing(subject: str, error: str = REFUSED) -> tuple[Queue, int]:
    """A Queue holding one message whose MOVE the server refuses with ``error``."""
    queue, (uid,) = queue_of(subject)
    queue.refuse_move[uid] = error
    return queue, uid


class FlakyStore(SqliteStore):
    """The real SQLite store, which can be down (unavailable) or refuse some messages."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.refused_subjects: set[str] = set()

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        if self.down:
            raise StoreUnavailableError("store: database is locked")
        if any(e.subject in self.refused_subjects for e in events):
            raise StoreError("store: constraint failed")
        return super().record_events(events)


@pytest.fixture
def store(tmp_path: Path) -> FlakyStore:
    return with_smith(FlakyStore(tmp_path / "emailsync.db"))


def filer_for(store: FlakyStore, stuck_after: int = 5) -> Filer:
    mailbox = MailboxSettings(address=OWNER, server=ServerSettings("imap.example", 993))
    return Filer(mailbox, store, stuck_after=stuck_after)


def test_a_refused_move_is_quarantined_after_n_passes_and_then_skipped(
    store: FlakyStore,
) -> None:
    queue, stuck = refusing("over quota")
    filer = filer_for(store)
    for attempt in range(1, 5):
        filer.run_pass(queue)
        assert filer.attempts[stuck] == attempt
        assert STUCK_KEYWORD not in queue.keywords(stuck)
        assert filer.stuck == 0
    filer.run_pass(queue)  # the fifth refusal
    assert STUCK_KEYWORD in queue.keywords(stuck)
    assert filer.stuck == 1
    tried = len(queue.move_attempts)
    fine = queue.add(message("fine"))
    filer.run_pass(queue)
    assert queue.filed[FolderRole.RECEIVED] == [message("fine")]  # the pass ran
    assert fine not in queue.messages
    assert queue.move_attempts[tried:] == [fine]  # and left the stuck one alone
    assert stuck in filer.attempted  # so the worker does not count it as unseen mail
    assert filer.stuck == 1


def test_a_store_that_is_down_counts_for_no_message(store: FlakyStore) -> None:
    queue, (uid,) = queue_of("waits for the store")
    filer = filer_for(store, stuck_after=2)
    store.down = True
    for _ in range(6):
        with pytest.raises(StoreUnavailableError):
            filer.run_pass(queue)
    assert filer.attempts == {}
    assert queue.keywords(uid) == set()
    store.down = False
    filer.run_pass(queue)
    assert queue.messages == {}


def test_a_store_that_refuses_one_message_counts_for_that_message(store: FlakyStore) -> None:
    queue, (bad, good) = queue_of("refused by the store", "fine")
    store.refused_subjects = {"refused by the store"}
    filer = filer_for(store, stuck_after=2)
    filer.run_pass(queue)
    assert filer.attempts == {bad: 1}
    assert good not in queue.messages
    filer.run_pass(queue)
    assert STUCK_KEYWORD in queue.keywords(bad)


@pytest.mark.parametrize(
    "error",
    [
        "file to received: NO [UNAVAILABLE] Try again later",  # RFC 5530: transient
        "file to received: NO [INUSE] Mailbox in use",  # another client holds it
    ],
)
def test_a_transient_refusal_counts_for_no_message(store: FlakyStore, error: str) -> None:
    queue, uid = refusing("later", error)
    filer = filer_for(store, stuck_after=1)
    for _ in range(3):
        filer.run_pass(queue)
    assert filer.attempts == {}
    assert queue.keywords(uid) == set()


def test_a_lost_connection_counts_for_no_message(store: FlakyStore) -> None:
    queue, (uid,) = queue_of("connection drops")
    queue.lose_connection_on_move = True
    filer = filer_for(store, stuck_after=1)
    for _ in range(3):
        with pytest.raises(ConnectionLostError):
            filer.run_pass(queue)
    assert filer.attempts == {}
    assert queue.keywords(uid) == set()


def test_a_refused_fetch_counts_for_that_message_and_the_others_are_filed(
    store: FlakyStore,
) -> None:
    queue, (first, broken, last) = queue_of("first", "cannot be fetched", "last")
    queue.refuse_fetch = {broken}
    filer = filer_for(store, stuck_after=2)
    filer.run_pass(queue)
    assert filer.attempts == {broken: 1}
    assert first not in queue.messages
    assert last not in queue.messages
    filer.run_pass(queue)
    assert STUCK_KEYWORD in queue.keywords(broken)


def test_a_fetch_that_loses_the_connection_counts_only_when_the_message_is_alone(
    store: FlakyStore,
) -> None:
    queue, (innocent, killer) = queue_of("innocent", "kills the server process")
    queue.lose_connection_on_fetch = {killer}
    filer = filer_for(store, stuck_after=2)
    with pytest.raises(ConnectionLostError):
        filer.run_pass(queue)  # the batch: nobody's fault yet
    assert filer.attempts == {}
    with pytest.raises(ConnectionLostError):
        filer.run_pass(queue)  # suspects alone: the innocent one is filed, the killer fails
    assert innocent not in queue.messages
    assert filer.attempts == {killer: 1}
    with pytest.raises(ConnectionLostError):
        filer.run_pass(queue)
    filer.run_pass(queue)  # quarantined: the pass no longer touches it
    assert STUCK_KEYWORD in queue.keywords(killer)
    assert filer.stuck == 1
    # A suspect's headers are never sent ahead: its FETCH must fail in its own batch.
    assert all(killer not in uids for uids in queue.prefetched)


def test_a_message_refused_in_its_batch_that_loses_the_connection_alone_is_quarantined(
    store: FlakyStore,
) -> None:
    """Issue 19 defect 3: retried alone after its batch was refused, its FETCH loses the
    connection; that makes it a suspect, so its next FETCH alone counts."""
    queue, (first, killer, last) = queue_of("first", "cut mid-line", "last")
    queue.lose_connection_alone = {killer}
    filer = filer_for(store, stuck_after=2)
    for _ in range(3):
        with pytest.raises(ConnectionLostError):
            filer.run_pass(queue)
    assert filer.attempts == {killer: 2}
    filer.run_pass(queue)  # quarantined: the message behind it is filed
    assert STUCK_KEYWORD in queue.keywords(killer)
    assert first not in queue.messages
    assert last not in queue.messages


def test_each_batch_sends_the_next_one_s_header_fetch_ahead(store: FlakyStore) -> None:
    queue = Queue()
    uids = [queue.add(message(f"m{n}")) for n in range(3)]
    mailbox = MailboxSettings(address=OWNER, server=ServerSettings("imap.example", 993))
    result = Filer(mailbox, store, batch_size=1).run_pass(queue)
    assert result.messages == 3
    assert queue.prefetched == [[uids[1]], [uids[2]]]


def test_removing_the_keyword_releases_the_message_with_a_fresh_count(
    store: FlakyStore,
) -> None:
    queue, uid = refusing("released by hand")
    filer = filer_for(store, stuck_after=2)
    filer.run_pass(queue)
    filer.run_pass(queue)
    assert STUCK_KEYWORD in queue.keywords(uid)
    queue.keywords(uid).discard(STUCK_KEYWORD)  # a person, or retry-failed
    tried = len(queue.move_attempts)
    filer.run_pass(queue)
    assert queue.move_attempts[tried:] == [uid, uid]  # tried again (batch, then alone)
    assert filer.attempts == {uid: 1}
    assert STUCK_KEYWORD not in queue.keywords(uid)


def test_release_stuck_makes_the_next_pass_retry_and_file_it(store: FlakyStore) -> None:
    queue, uid = refusing("include stuck")
    filer = filer_for(store, stuck_after=1)
    filer.run_pass(queue)
    assert STUCK_KEYWORD in queue.keywords(uid)
    del queue.refuse_move[uid]  # the cause is gone (quota raised)
    filer.run_pass(queue)
    assert uid in queue.messages  # still quarantined: nothing asked for it
    filer.release_stuck()
    filer.run_pass(queue)
    assert uid not in queue.messages
    assert queue.filed[FolderRole.RECEIVED] == [message("include stuck")]
    assert filer.stuck == 0


def test_the_quarantine_survives_a_new_filer(store: FlakyStore) -> None:
    queue, _ = refusing("restart")
    filer_for(store, stuck_after=1).run_pass(queue)
    fresh = filer_for(store, stuck_after=1)  # the daemon restarted: no counts in memory
    tried = len(queue.move_attempts)
    fresh.run_pass(queue)
    assert queue.move_attempts[tried:] == []
    assert fresh.stuck == 1


def test_without_keywords_the_quarantine_is_kept_in_memory(store: FlakyStore) -> None:
    queue, uid = refusing("no keywords here")
    queue.keywords_allowed = False
    filer = filer_for(store, stuck_after=1)
    filer.run_pass(queue)
    tried = len(queue.move_attempts)
    filer.run_pass(queue)
    assert queue.move_attempts[tried:] == []
    assert filer.stuck == 1
    assert queue.keywords(uid) == set()


def test_a_new_uidvalidity_forgets_the_counts(store: FlakyStore) -> None:
    queue, uid = refusing("renumbered")
    filer = filer_for(store, stuck_after=3)
    filer.run_pass(queue)
    filer.run_pass(queue)
    assert filer.attempts == {uid: 2}
    queue.uidvalidity = 2  # the same UID names another message now (RFC 3501 §2.3.1.1)
    filer.run_pass(queue)
    assert filer.attempts == {uid: 1}
    assert queue.keywords(uid) == set()


def test_a_dry_run_counts_nothing(store: FlakyStore) -> None:
    queue = Queue()
    queue.add(message("dry"))
    queue.refuse_fetch = {1}
    filer = filer_for(store, stuck_after=1)
    filer.run_pass(queue, dry_run=True)
    assert filer.attempts == {}
