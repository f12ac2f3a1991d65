"""A backlog's batches are recorded on a recorder thread while the next batch is decided.

The store's time (a database server's, a CRM's) overlaps the pass's own (issue 23); the
order record → move still holds for every batch, and a batch whose recording failed stays
in Queue. The Queue is test_filing_stuck's stand-in; the store is the real SQLite store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from emailsync.config import MailboxSettings, ServerSettings
from emailsync.errors import StoreUnavailableError
from emailsync.filing.queuepass import Filer
from emailsync.model import FolderRole, Group, TimelineEvent
from emailsync.state.sqlite import SqliteStore

from .stores import with_smith
from .test_filing_stuck import OWNER, Queue, message

WAIT_SECONDS = 5.0


class WatchedStore(SqliteStore):
    """The real SQLite store, noting whether a batch's recording began before the next lookup."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[str] = []
        self.down_for: set[str] = set()  # subjects whose recording fails (store unavailable)
        self.watching = False
        self._changed = threading.Condition()
        self._lookups = 0
        self._recordings = 0

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        with self._changed:
            self._lookups += 1
            batch = self._lookups
            if self.watching and batch > 1:
                # Recorded ahead, the batch before is being recorded already (or was).
                began = self._changed.wait_for(lambda: self._recordings >= batch - 1, WAIT_SECONDS)
                self.calls.append(f"batch {batch - 1} recording when {batch} looked up: {began}")
        return super().groups_for_addresses(addresses)

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        with self._changed:
            self._recordings += 1
            self._changed.notify_all()
        if self.down_for.intersection(e.subject for e in events):
            raise StoreUnavailableError("store: database is locked")
        return super().record_events(events)


@pytest.fixture
def store(tmp_path: Path) -> WatchedStore:
    return with_smith(WatchedStore(tmp_path / "emailsync.db"))


def filer_for(store: WatchedStore) -> Filer:
    mailbox = MailboxSettings(address=OWNER, server=ServerSettings("imap.example", 993))
    return Filer(mailbox, store, batch_size=1)


def test_a_batch_is_recorded_while_the_next_one_is_decided(store: WatchedStore) -> None:
    queue = Queue()
    for n in range(3):
        queue.add(message(f"m{n}"))
    store.watching = True
    result = filer_for(store).run_pass(queue)
    assert result.new_events == 3
    assert not queue.messages
    assert store.calls == [
        "batch 1 recording when 2 looked up: True",
        "batch 2 recording when 3 looked up: True",
    ]


def test_a_batch_whose_recording_ahead_failed_stays_in_queue(store: WatchedStore) -> None:
    queue = Queue()
    first, second, third = (queue.add(message(f"m{n}")) for n in range(3))
    store.down_for = {"m1"}
    recorded: list[int] = []
    filer = filer_for(store)
    filer.on_recorded = recorded.append
    with pytest.raises(StoreUnavailableError):
        filer.run_pass(queue)
    assert first not in queue.messages  # recorded, then moved
    assert second in queue.messages  # not recorded: not moved
    assert third in queue.messages  # decided, not recorded yet
    assert [len(raws) for raws in queue.filed.values()] == [1]
    store.down_for = set()
    filer.run_pass(queue)
    assert not queue.messages
    assert len(queue.filed[FolderRole.RECEIVED]) == 3
    assert sum(recorded) == 3
    assert len(store.list_events()) == 3
