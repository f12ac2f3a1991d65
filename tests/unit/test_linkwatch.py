"""The link watcher and the periodic re-check, over a real SQLite state database."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from emailsync.model import Group
from emailsync.runtime.linkwatch import FailedCheck, LinkWatch
from emailsync.state.failedindex import PERIODIC, FailedEntry, FailedIndex, failed_index
from emailsync.state.sqlite import SqliteStore

from .stores import closed_after

AGENT = "agent@example.com"
OTHER = "other@example.com"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    yield from closed_after(SqliteStore(tmp_path / "emailsync.db"))


@pytest.fixture
def index(store: SqliteStore) -> FailedIndex:
    found = failed_index(store)
    assert found is not None
    return found


def test_only_mailboxes_with_mail_made_due_are_woken_once_per_change(
    store: SqliteStore, index: FailedIndex
) -> None:
    woken: list[str] = []
    running = {AGENT, OTHER}

    def wake(mailbox: str) -> bool:
        if mailbox not in running:
            return False
        woken.append(mailbox)
        return True

    watch = LinkWatch(index, wake)
    index.add(AGENT, [FailedEntry(1, 5, "k5", ("alice@clients.example",))], seen=0)
    elsewhere = "elsewhere@example.com"
    index.add(elsewhere, [FailedEntry(1, 6, "k6", ("alice@clients.example",))], seen=0)
    assert watch.check() == []  # the first look only notes where the log is
    store.add_group("Jones", ["nobody@clients.example"])
    assert watch.check() == []  # a change with no Failed mail wakes nobody
    store.add_group("Smith", ["alice@clients.example"])
    assert watch.check() == [AGENT]  # the other mailbox runs elsewhere
    assert watch.check() == []  # nothing new
    # Another address changes while AGENT's mail is still due (its worker busy): AGENT was
    # woken for that change already, and is not woken again for it.
    store.add_group("Jones", ["someone@clients.example"])
    assert watch.check() == []
    store.add_group("Smith", ["alice@clients.example"])  # a new change of the same address
    assert watch.check() == [AGENT]
    assert woken == [AGENT, AGENT]


class CountingStore:
    """A timeline whose lookups are counted: the periodic check's CRM calls."""

    def __init__(self, linked: set[str]) -> None:
        self.linked = linked
        self.asked: list[list[str]] = []

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        asked = list(addresses)
        self.asked.append(asked)
        found = tuple(a for a in asked if a in self.linked)
        return [Group("g", found, id="g-1")] if found else []


def test_the_periodic_check_walks_the_index_a_budget_a_tick_and_marks_the_linked_due(
    index: FailedIndex,
) -> None:
    addresses = [f"c{n:02d}@clients.example" for n in range(25)]
    index.add(AGENT, [FailedEntry(1, n, f"k{n}", (a,)) for n, a in enumerate(addresses)], seen=0)
    index.add(OTHER, [FailedEntry(1, 1, "o1", ("zz@clients.example",))], seen=0)
    timeline = CountingStore({addresses[3], addresses[21], "zz@clients.example"})
    now = [0.0]
    pokes: list[int] = []
    check = FailedCheck(
        index,
        timeline,  # type: ignore[arg-type]  # only groups_for_addresses is asked
        lambda: [AGENT],  # OTHER runs on another instance: not ours to check
        every_seconds=3600,
        per_minute=60,
        tick_seconds=10,  # 10 addresses a tick
        on_change=lambda: pokes.append(1),
        clock=lambda: now[0],
    )
    assert check.tick() == 0  # not due yet
    assert timeline.asked == []
    now[0] = 600
    assert [check.tick(), check.tick(), check.tick(), check.tick()] == [1, 0, 1, 0]
    assert [len(batch) for batch in timeline.asked] == [10, 10, 5]
    assert sorted(d.uid for d in index.due(AGENT, 100)) == [3, 21]
    assert {d.trigger for d in index.due(AGENT, 100)} == {PERIODIC}
    assert index.due(OTHER, 100) == []
    assert pokes == [1, 1]
    now[0] = 600 + 3599
    check.tick()
    assert len(timeline.asked) == 3  # the next walk starts an hour after the last one did
    now[0] = 600 + 3600
    check.tick()
    assert len(timeline.asked) == 4
