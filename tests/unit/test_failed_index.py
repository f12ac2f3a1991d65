"""The Failed-for-no-group index and the link-change log, against SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from emailsync.state.base import Store
from emailsync.state.failedindex import (
    LINK_CHANGE,
    LINKS_CHANNEL,
    PERIODIC,
    FailedEntry,
    FailedIndex,
    failed_index,
)
from emailsync.state.postgres import PostgresStore

from .stores import KINDS, closed_after, open_store_of

AGENT = "agent@example.com"
OTHER = "other@example.com"
ALICE = "alice@clients.example"
BOB = "bob@clients.example"


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh built-in store of each kind: the index lives beside its tables."""
    yield from closed_after(open_store_of(request.param, request, tmp_path))


@pytest.fixture
def index(store: Store) -> FailedIndex:
    found = failed_index(store)
    assert found is not None
    return found


def entry(uid: int, *addresses: str, uidvalidity: int = 7) -> FailedEntry:
    return FailedEntry(uidvalidity, uid, f"key-{uid}", addresses)


def test_linking_an_address_makes_only_its_failed_mail_due(
    store: Store, index: FailedIndex
) -> None:
    """groups add marks the messages of the linked address due, in every mailbox, no others."""
    seen = index.watermark()
    assert index.add(AGENT, [entry(1, ALICE), entry(2, BOB), entry(3, ALICE, BOB)], seen=seen) == 0
    index.add(OTHER, [entry(9, ALICE)], seen=seen)
    assert index.due_mailboxes() == {}
    store.add_group("Smith", [ALICE])
    due = index.due(AGENT, 100)
    assert [(d.uid, d.key, d.trigger) for d in due] == [
        (1, "key-1", LINK_CHANGE),
        (3, "key-3", LINK_CHANGE),
    ]
    assert due[0].changed_at is not None
    assert set(index.due_mailboxes()) == {AGENT, OTHER}
    [change] = index.changes_after(seen)
    assert (change.address, change.trigger) == (ALICE, LINK_CHANGE)


def test_import_groups_logs_a_change_per_address(store: Store, index: FailedIndex) -> None:
    index.add(AGENT, [entry(1, ALICE), entry(2, BOB)], seen=index.watermark())
    store.import_groups([("Smith", ALICE), ("Jones", BOB), ("Jones", ALICE)])
    assert [d.uid for d in index.due(AGENT, 100)] == [1, 2]
    assert sorted(c.address for c in index.changes_after(0)) == [ALICE, BOB]


def test_settle_clears_only_the_changes_looked_at(index: FailedIndex) -> None:
    """A change made while a message was being looked at keeps it due."""
    index.add(AGENT, [entry(1, ALICE)], seen=index.watermark())
    first = index.links_changed([ALICE])
    second = index.links_changed([ALICE], PERIODIC)
    assert second > first
    index.settle(AGENT, 7, [1], upto=first)
    [due] = index.due(AGENT, 100)
    assert (due.change, due.trigger) == (second, PERIODIC)
    index.settle(AGENT, 7, [1], upto=second)
    assert index.due(AGENT, 100) == []
    assert index.due_mailboxes() == {}


def test_a_link_change_between_lookup_and_indexing_makes_the_message_due(
    index: FailedIndex,
) -> None:
    """The filer looked groups up before the link was made: its message is due at once."""
    seen = index.watermark()
    index.links_changed([ALICE])
    assert index.add(AGENT, [entry(1, ALICE), entry(2, BOB)], seen=seen) == 1
    assert [d.uid for d in index.due(AGENT, 100)] == [1]


def test_drop_forgets_messages_and_a_scan_replaces_the_mailboxs_rows(index: FailedIndex) -> None:
    seen = index.watermark()
    index.add(AGENT, [entry(1, ALICE), entry(2, BOB), entry(0, ALICE, uidvalidity=0)], seen=seen)
    index.add(OTHER, [entry(1, ALICE)], seen=seen)
    assert index.unknown(AGENT)
    assert index.folder(AGENT) is None
    index.drop(AGENT, 7, [1])
    index.links_changed([ALICE, BOB])
    assert [d.uid for d in index.due(AGENT, 100)] == [0, 2]
    # A scan of Failed (now UIDVALIDITY 8) found message 5 only.
    index.add(AGENT, [entry(5, BOB, uidvalidity=8)], seen=index.watermark())
    index.finish_scan(AGENT, 8, [5])
    assert index.folder(AGENT) == 8
    assert not index.unknown(AGENT)
    index.links_changed([BOB])
    assert [(d.uidvalidity, d.uid) for d in index.due(AGENT, 100)] == [(8, 5)]
    assert [d.uid for d in index.due(OTHER, 100)] == [1]  # other mailboxes untouched
    index.forget_folder(AGENT)
    assert index.folder(AGENT) is None


def test_the_periodic_walk_goes_through_the_addresses_of_the_mailboxes_asked(
    index: FailedIndex,
) -> None:
    seen = index.watermark()
    index.add(AGENT, [entry(1, "a@x.example"), entry(2, "b@x.example", "c@x.example")], seen=seen)
    index.add(OTHER, [entry(1, "bb@x.example")], seen=seen)
    assert index.addresses("", 2) == ["a@x.example", "b@x.example"]
    assert index.addresses("b@x.example", 2) == ["bb@x.example", "c@x.example"]
    assert index.addresses("c@x.example", 2) == []
    assert index.addresses("", 10, [AGENT]) == ["a@x.example", "b@x.example", "c@x.example"]
    assert index.addresses("", 10, []) == []


def test_a_link_change_notifies_every_instance_in_postgresql(pg_url: str) -> None:
    """NOTIFY emailsync_links goes out with the change's commit (the cluster's wake-up)."""
    store = PostgresStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {LINKS_CHANNEL}")
            store.add_group("Smith", [ALICE])
            notified = list(listener.notifies(timeout=5, stop_after=1))
        index = failed_index(store)
        assert index is not None
        assert [n.payload for n in notified] == [str(index.watermark())]
    finally:
        store.close()
