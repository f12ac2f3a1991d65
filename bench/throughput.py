"""Pass throughput: ``Filer.run_pass`` against a bare imapclient loop doing the same IMAP work.

Each trial seeds one corpus into two fresh mailboxes' Queues. The baseline files one Queue with
imapclient alone, issuing the commands a pass needs (SELECT, SEARCH, header FETCH per batch,
body FETCH of the linked messages, keyword STORE and UID MOVE per destination, the closing
SEARCH) but knowing each message's destination from the corpus: no parsing, no store. emailsync
files the other Queue with a real ``ImapSession`` and SQLite store. Only the pass is timed
(connection, login and seeding are not). Perf-counter wrappers around the Filer's collaborators
split its time into IMAP, parsing, classification and store; they cost about a microsecond a
call, under 0.1 % of a pass.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import imapclient
from corpus import BenchMessage, make_corpus
from testbed import OWNER_ALIAS, BenchMailbox, Testbed, append_all, folder_counts

from emailsync.config import CrmSettings
from emailsync.filing import decision, queuepass
from emailsync.filing.decision import PassResult
from emailsync.filing.queuepass import FETCH_BATCH, Filer
from emailsync.filing.sessions import PendingFiling, QueueSession
from emailsync.imap.folders import FolderTree
from emailsync.imap.session import ImapSession
from emailsync.model import FolderRole, Outcome
from emailsync.state.base import Store
from emailsync.timeline import open_store

PHASES = ("imap", "parse", "classify", "store")
HEADER_ITEMS = [b"BODY.PEEK[HEADER]", b"INTERNALDATE", b"RFC822.SIZE", b"FLAGS"]
BODY_ITEMS = [b"BODY.PEEK[]", b"INTERNALDATE", b"RFC822.SIZE", b"FLAGS"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Trial:
    """One timed pass over a freshly seeded Queue."""

    messages: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Messages filed per second."""
        return self.messages / self.seconds


@dataclass
class ThroughputResult:
    """The trials of both contenders, and what went wrong, if anything."""

    baseline: list[Trial] = field(default_factory=list)
    emailsync: list[Trial] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class PhaseClock:
    """Adds up wall time per phase for the functions it wraps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, function: F) -> F:
        """``function``, with its time added to ``phase``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return cast(F, timed)


class TimedSession:
    """A ``QueueSession`` that times every call into the real ``ImapSession``."""

    def __init__(self, session: ImapSession, clock: PhaseClock) -> None:
        self._session = session
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        """The session's method, timed (for ``file_later``, the wait for its answer too);
        state such as ``uidvalidity`` is read through."""
        found = getattr(self._session, name)
        if not callable(found):
            return found
        timed = self._clock.wrap("imap", found)
        if name != "file_later":
            return timed

        def file_later(*args: Any, **kwargs: Any) -> PendingFiling:
            pending: PendingFiling = timed(*args, **kwargs)
            pending.wait = self._clock.wrap("imap", pending.wait)  # type: ignore[method-assign]
            return pending

        return file_later


class TimedStore:
    """The two store calls a pass makes, timed; everything else passes through."""

    def __init__(self, store: Store, clock: PhaseClock) -> None:
        self._store = store
        self.groups_for_addresses = clock.wrap("store", store.groups_for_addresses)
        self.record_events = clock.wrap("store", store.record_events)
        self.record_events_checked = clock.wrap("store", store.record_events_checked)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@contextlib.contextmanager
def timed_parsing(clock: PhaseClock) -> Iterator[None]:
    """Time the parser and classifier the Filer calls (module globals, restored after)."""
    phases = {
        (queuepass, "parse_headers"): "parse",
        (decision, "parse_message"): "parse",
        (queuepass, "classify"): "classify",
    }
    originals = {key: getattr(*key) for key in phases}
    try:
        for (module, name), phase in phases.items():
            setattr(module, name, clock.wrap(phase, originals[module, name]))
        yield
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)


def run_throughput(testbed: Testbed, count: int, repeats: int, seed: int) -> ThroughputResult:
    """``repeats`` trials of each contender, alternating, on a fresh corpus per trial."""
    result = ThroughputResult()
    for trial in range(repeats):
        rng = random.Random(seed + trial)  # noqa: S311 -- test data, not cryptography
        corpus = make_corpus(count, OWNER_ALIAS, testbed.directory, rng)
        result.baseline.append(_baseline_trial(testbed, corpus, result.problems))
        result.emailsync.append(_emailsync_trial(testbed, corpus, result.problems))
    return result


def _seed(mailbox: BenchMailbox, corpus: Sequence[BenchMessage]) -> dict[int, BenchMessage]:
    """The corpus APPENDed to the mailbox's Queue, by UID."""
    client = mailbox.client()
    try:
        return append_all(client, mailbox.tree.queue, corpus)
    finally:
        client.logout()


def _baseline_trial(testbed: Testbed, corpus: Sequence[BenchMessage], problems: list[str]) -> Trial:
    mailbox = testbed.new_mailbox()
    seeded = _seed(mailbox, corpus)
    client = mailbox.client()
    try:
        started = time.perf_counter()
        baseline_pass(client, mailbox.tree, seeded)
        seconds = time.perf_counter() - started
        problems.extend(_check_folders("baseline", client, mailbox.tree, corpus))
    finally:
        client.logout()
    return Trial(len(corpus), seconds)


def baseline_pass(
    client: imapclient.IMAPClient, tree: FolderTree, seeded: dict[int, BenchMessage]
) -> None:
    """The IMAP commands of a pass, with destinations known beforehand."""
    client.select_folder(tree.queue)
    uids = sorted(client.search(["ALL"]))
    for start in range(0, len(uids), FETCH_BATCH):
        chunk = uids[start : start + FETCH_BATCH]
        client.fetch(chunk, HEADER_ITEMS)
        linked = [uid for uid in chunk if seeded[uid].linked]
        if linked:
            client.fetch(linked, BODY_ITEMS)
        by_outcome: dict[Outcome, list[int]] = {}
        for uid in chunk:
            by_outcome.setdefault(seeded[uid].outcome, []).append(uid)
        for moving in by_outcome.values():
            keyword = seeded[moving[0]].keyword
            if keyword:
                client.add_flags(moving, [keyword], silent=True)
            client.move(moving, tree.name(seeded[moving[0]].destination))  # RFC 6851
    client.search(["ALL"])  # the pass's closing look for mail that landed meanwhile


def _emailsync_trial(
    testbed: Testbed,
    corpus: Sequence[BenchMessage],
    problems: list[str],
    *,
    crm: CrmSettings | None = None,
    state: str | None = None,
) -> Trial:
    mailbox = testbed.new_mailbox(state=state)
    _seed(mailbox, corpus)
    settings = mailbox.settings()
    # With ``crm`` the groups and events are the CRM's (bench/crm.py), else the mailbox's state
    # database's (SQLite or PostgreSQL: ``state``); the CRM keeps its state in that database.
    store = open_store(settings.store_url, settings.daemon.state_dir, crm)
    session = mailbox.open_session()
    clock = PhaseClock()
    filer = Filer(
        settings.mailboxes[0],
        cast(Store, TimedStore(store, clock)),
        batch_size=settings.daemon.fetch_batch,
    )
    try:
        with timed_parsing(clock):
            started = time.perf_counter()
            passed = filer.run_pass(cast(QueueSession, TimedSession(session, clock)))
            seconds = time.perf_counter() - started
        problems.extend(_check_pass(passed, corpus))
        client = mailbox.client()
        try:
            problems.extend(_check_folders("emailsync", client, mailbox.tree, corpus))
        finally:
            client.logout()
    finally:
        session.logout()
        store.close()
    return Trial(len(corpus), seconds, dict(clock.seconds))


def _check_pass(passed: PassResult, corpus: Sequence[BenchMessage]) -> list[str]:
    problems = []
    for outcome in Outcome:
        want = sum(1 for m in corpus if m.outcome is outcome)
        if passed.count(outcome) != want:
            problems.append(f"emailsync: {passed.count(outcome)} {outcome.value}, want {want}")
    want_events = sum(m.events for m in corpus)
    if passed.new_events != want_events:
        problems.append(f"emailsync: {passed.new_events} new events, want {want_events}")
    return problems


def _check_folders(
    who: str, client: imapclient.IMAPClient, tree: FolderTree, corpus: Sequence[BenchMessage]
) -> list[str]:
    counts = folder_counts(client, tree)
    want = expected_counts(corpus)
    return [
        f"{who}: {counts[role]} in {role.value}, want {want[role]}"
        for role in FolderRole
        if counts[role] != want[role]
    ]


def expected_counts(corpus: Sequence[BenchMessage]) -> dict[FolderRole, int]:
    """How many messages each folder holds once the corpus is filed."""
    counts = dict.fromkeys(FolderRole, 0)
    for message in corpus:
        counts[message.destination] += 1
    return counts
