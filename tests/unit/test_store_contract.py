"""The Store and TokenLedger contract: one suite, run against SqliteStore and PostgresStore.

Both stores run the same statements (``emailsync.state.statements``), so every behaviour here
is one behaviour; a test that only one database passes is a drift. Dialect-only matters
(SQLite's WAL, file modes and locks; PostgreSQL's pool, outages, migrations under a lock and
the lease fence) stay in ``test_store_sqlite.py``, ``test_store_postgres.py`` and
``test_lease.py``.

The PostgreSQL database here is created with an ICU (en-US) collation, not the cluster's C
locale, and a session time zone other than UTC, so an ``ORDER BY`` that leans on the
database's collation, or a time taken in the session's zone, shows up as a difference.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from emailsync.dev.postgres import Postgres
from emailsync.errors import StoreError
from emailsync.model import Attachment, Direction, TimelineEvent, Via
from emailsync.state import read_group_csv
from emailsync.state.base import (
    IssuedToken,
    RegisteredBranch,
    RegisteredMailbox,
    Registry,
    Store,
    TokenLedger,
)
from emailsync.state.failedindex import failed_index
from emailsync.state.postgres import PostgresStore
from emailsync.state.sqlite import SqliteStore

from .stores import KINDS, closed_after

BASE_TIME = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
AGENT = "agent@example.com"
OTHER = "other@example.com"


def make_event(
    group: str = "Smith",
    key: str = "k1",
    *,
    mailbox: str = "agent1@example.com",
    message_id: str | None = "<m1@example.com>",
    minutes: int = 0,
) -> TimelineEvent:
    """An outbound event filed ``minutes`` after BASE_TIME."""
    return TimelineEvent(
        group=group,
        direction=Direction.OUTBOUND,
        mailbox=mailbox,
        message_key=key,
        message_id=message_id,
        subject=f"Subject {key}",
        from_="Agent One <agent1@example.com>",
        to="Client <client@example.org>",
        cc="",
        date=BASE_TIME - timedelta(hours=1),
        body_text="Hello",
        attachments=(),
        size=1234,
        filed_at=BASE_TIME + timedelta(minutes=minutes),
    )


def icu_database(postgres: Postgres, name: str) -> str:
    """A fresh database whose default collation is ICU's en-US (punctuation and case are
    weighed after letters there, unlike code-point order) and whose sessions' time zone is
    not UTC, as an operator's server may well be set up."""
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu'
            " ICU_LOCALE 'en-US' LOCALE 'C'"  # name is built by the test, not user input
        )
        conn.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
    return postgres.url(name)


_databases = iter(range(1, 1_000_000))


def open_kind(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> SqliteStore | PostgresStore:
    """A fresh, empty store of ``kind``."""
    if kind == "sqlite":
        return SqliteStore(tmp_path / "state" / "emailsync.db")
    postgres: Postgres = request.getfixturevalue("postgres")
    return PostgresStore(icu_database(postgres, f"contract_{os.getpid()}_{next(_databases)}"))


@pytest.fixture(params=KINDS)
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStore | PostgresStore]:
    """A fresh store of each kind, with nothing in it."""
    yield from closed_after(open_kind(request.param, request, tmp_path))


@pytest.fixture
def store(empty: SqliteStore | PostgresStore) -> Store:
    """A fresh store of each kind with the groups Smith and Jones."""
    empty.add_group("Smith", ["client@example.org"])
    empty.add_group("Jones", ["jones@example.net"])
    return empty


@pytest.fixture
def ledger(empty: SqliteStore | PostgresStore) -> TokenLedger:
    """The agent-token ledger of each kind of state database."""
    return empty


# -- idempotency -----------------------------------------------------------------------------


def test_recording_the_same_event_twice_creates_it_once(store: Store) -> None:
    """The second recording of (group, message key) is a no-op and reports 0 new."""
    assert store.record_events([make_event()]) == 1
    assert store.record_events([make_event()]) == 0
    assert len(store.list_events()) == 1


def test_same_message_from_two_mailboxes_is_one_event_listing_both(store: Store) -> None:
    """The same message queued by two agents gives one event naming both mailboxes."""
    assert store.record_events([make_event(mailbox="agent1@example.com")]) == 1
    assert store.record_events([make_event(mailbox="Agent2@Example.com")]) == 0
    (event,) = store.list_events()
    assert event.mailbox == "agent1@example.com"
    assert event.mailboxes == ("agent1@example.com", "agent2@example.com")


def test_each_mailbox_keeps_its_own_direction_on_the_one_event(store: Store) -> None:
    """Issue 19 defect 15: outbound from the sender's mailbox, inbound from the recipient's;
    the event's own direction stays the first filer's (for readers of the old shape)."""
    inbound = replace(make_event(mailbox="agent2@example.com"), direction=Direction.INBOUND)
    assert store.record_events([inbound]) == 1
    assert store.record_events([make_event(mailbox="Agent1@Example.com")]) == 0
    assert store.record_events([make_event(mailbox="agent1@example.com")]) == 0  # again
    (event,) = store.list_events()
    assert event.direction is Direction.INBOUND
    assert event.via == (
        Via("agent1@example.com", Direction.OUTBOUND),
        Via("agent2@example.com", Direction.INBOUND),
    )
    assert event.mailboxes == ("agent1@example.com", "agent2@example.com")


def test_body_truncated_round_trips(store: Store) -> None:
    """Issue 19 defect 14: whether body_text is the whole text is kept with the event."""
    store.record_events([replace(make_event(), body_truncated=True), make_event(key="k2")])
    flags = {e.message_key: e.body_truncated for e in store.list_events()}
    assert flags == {"k1": True, "k2": False}


def test_distinct_message_keys_with_the_same_message_id_are_two_events(
    store: Store,
) -> None:
    """A reused Message-ID does not merge different messages (DESIGN.md §1)."""
    events = [make_event(key="k1"), make_event(key="k2", minutes=1)]
    assert store.record_events(events) == 2
    assert [e.message_key for e in store.list_events()] == ["k2", "k1"]


def test_same_message_key_in_two_groups_is_one_event_per_group(store: Store) -> None:
    """The idempotency key includes the group."""
    assert store.record_events([make_event("Smith"), make_event("Jones")]) == 2


def test_duplicates_inside_one_batch_count_once(store: Store) -> None:
    """A batch repeating an event from another mailbox records it once, with both mailboxes."""
    batch = [make_event(), make_event(mailbox="agent2@example.com")]
    assert store.record_events(batch) == 1
    (event,) = store.list_events()
    assert event.mailboxes == ("agent1@example.com", "agent2@example.com")


def test_recording_no_events_returns_zero(store: Store) -> None:
    """An empty batch is fine and records nothing."""
    assert store.record_events([]) == 0


def test_an_event_reads_back_with_every_field(store: Store) -> None:
    """Fields round-trip; datetimes come back timezone-aware in UTC."""
    paris = timezone(timedelta(hours=2))
    event = TimelineEvent(
        group="Smith",
        direction=Direction.INBOUND,
        mailbox="agent1@example.com",
        message_key="abc",
        message_id=None,
        subject="Viewing — Tuesday",
        from_="Client <client@example.org>",
        to="agent1@example.com",
        cc="boss@example.com",
        date=datetime(2024, 5, 1, 11, 30, tzinfo=paris),
        body_text="Bonjour\nLine two",
        attachments=(Attachment("plan.pdf", "application/pdf", 5000), Attachment("é.txt", "", 0)),
        size=7777,
        filed_at=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )
    store.record_events([event])
    (read,) = store.list_events()
    assert read == replace(
        event,
        mailboxes=("agent1@example.com",),
        via=(Via("agent1@example.com", Direction.INBOUND),),
    )
    assert read.date is not None
    assert read.date.tzinfo is not None
    assert read.date.utcoffset() == timedelta(0)
    assert read.date == datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def test_naive_datetimes_are_taken_as_utc(store: Store) -> None:
    """A datetime without a zone is stored as UTC and read back aware."""
    event = replace(
        make_event(), date=datetime(2024, 1, 2, 3, 4), filed_at=datetime(2024, 1, 2, 3, 5)
    )
    store.record_events([event])
    (read,) = store.list_events()
    assert read.date == datetime(2024, 1, 2, 3, 4, tzinfo=UTC)
    assert read.filed_at == datetime(2024, 1, 2, 3, 5, tzinfo=UTC)


def test_events_for_an_unknown_group_raise_and_record_nothing(store: Store) -> None:
    """The whole batch is refused when one event names a group that does not exist."""
    with pytest.raises(StoreError, match="Nobody"):
        store.record_events([make_event("Smith"), make_event("Nobody")])
    assert store.list_events() == []


def test_a_failure_mid_batch_rolls_back_the_whole_batch(store: Store) -> None:
    """Nothing of a failed batch is kept, and the store keeps working afterwards."""
    batch = [make_event(key=f"k{i}", minutes=i) for i in range(999)]
    batch.append(make_event(key="last", mailbox="boom@example.com"))
    with boom_trigger(store), pytest.raises(StoreError, match="boom"):
        store.record_events(batch)
    assert store.list_events() == []
    assert store.record_events(batch) == 1000


@contextmanager
def boom_trigger(store: Store) -> Iterator[None]:
    """A trigger, installed behind the store's back, that fails linking boom@example.com."""
    if isinstance(store, SqliteStore):
        saboteur = sqlite3.connect(store.path, isolation_level=None)
        saboteur.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON event_mailboxes"
            " WHEN NEW.mailbox = 'boom@example.com' BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        try:
            yield
        finally:
            saboteur.execute("DROP TRIGGER boom")
            saboteur.close()
        return
    assert isinstance(store, PostgresStore)
    with store.transaction("install trigger") as conn:
        conn.execute(
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.mailbox = 'boom@example.com' THEN RAISE EXCEPTION 'boom'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON event_mailboxes"
            " FOR EACH ROW EXECUTE FUNCTION boom()"
        )
    try:
        yield
    finally:
        with store.transaction("drop trigger") as conn:
            conn.execute("DROP TRIGGER boom ON event_mailboxes")
            conn.execute("DROP FUNCTION boom()")


def test_a_batch_of_a_thousand_events_is_recorded(store: Store) -> None:
    """A large batch records every event and reports each as new, once."""
    batch = [make_event(key=f"k{i:04d}", minutes=i) for i in range(1000)]
    assert store.record_events(batch) == 1000
    assert store.record_events(batch) == 0
    assert len(store.list_events()) == 1000


# -- groups ------------------------------------------------------------------------------------


def test_groups_for_addresses_returns_each_group_once_by_name_with_all_addresses(
    store: Store,
) -> None:
    """Groups matched through several addresses appear once, carrying every address."""
    store.add_group("Adams", ["shared@example.com", "adams@example.com"])
    store.add_group("Smith", ["shared@example.com"])
    groups = store.groups_for_addresses(
        ["shared@example.com", "client@example.org", "nobody@example.com"]
    )
    assert [g.name for g in groups] == ["Adams", "Smith"]
    assert groups[0].addresses == ("adams@example.com", "shared@example.com")
    assert groups[1].addresses == ("client@example.org", "shared@example.com")


def test_groups_for_addresses_ignores_case(store: Store) -> None:
    """Addresses added and looked up in any case find the same group."""
    store.add_group("Brown", ["Mixed.Case@Example.COM"])
    (group,) = store.groups_for_addresses(["MIXED.case@example.com"])
    assert group.name == "Brown"
    assert group.addresses == ("mixed.case@example.com",)


def test_groups_for_addresses_without_a_match_is_empty(store: Store) -> None:
    """No match and no addresses both give no groups."""
    assert store.groups_for_addresses(["stranger@example.com"]) == []
    assert store.groups_for_addresses([]) == []


def test_add_group_normalises_addresses(store: Store) -> None:
    """Display forms, case and IDN domains are stored in the normalised form."""
    group = store.add_group("Müller", ['"Hans" <Hans@Bücher.example>', "  X@Y.example "])
    assert group.addresses == ("hans@xn--bcher-kva.example", "x@y.example")
    assert store.groups_for_addresses(["hans@xn--bcher-kva.example"])[0].name == "Müller"


def test_add_group_extends_an_existing_group(store: Store) -> None:
    """Adding to an existing group keeps its addresses and adds the new ones once."""
    group = store.add_group("Smith", ["second@example.org", "client@example.org"])
    assert group.addresses == ("client@example.org", "second@example.org")
    assert [g.name for g in store.list_groups()] == ["Jones", "Smith"]


def test_add_group_rejects_an_invalid_address_naming_it_and_writes_nothing(
    store: Store,
) -> None:
    """One bad address refuses the whole call, before the group is created."""
    with pytest.raises(ValueError, match="not-an-address"):
        store.add_group("New", ["ok@example.com", "not-an-address"])
    assert [g.name for g in store.list_groups()] == ["Jones", "Smith"]


def test_add_group_rejects_an_empty_name(store: Store) -> None:
    """A blank group name is a ValueError."""
    with pytest.raises(ValueError, match="empty group name"):
        store.add_group("   ", ["ok@example.com"])


def test_list_groups_includes_groups_without_addresses_in_name_order(
    store: Store,
) -> None:
    """A group created with no addresses is listed, with none."""
    store.add_group("Empty", [])
    groups = store.list_groups()
    assert [(g.name, g.addresses) for g in groups] == [
        ("Empty", ()),
        ("Jones", ("jones@example.net",)),
        ("Smith", ("client@example.org",)),
    ]


def test_import_groups_counts_new_links_only(store: Store) -> None:
    """Rows already linked, or repeated, are not counted; new groups are created."""
    rows = [
        ("Smith", "client@example.org"),  # already linked
        ("Smith", "other@example.org"),
        ("Taylor", "taylor@example.com"),
        ("Taylor", "TAYLOR@example.com"),  # the same link again
    ]
    assert store.import_groups(rows) == 2
    assert store.import_groups(rows) == 0
    assert [g.name for g in store.groups_for_addresses(["taylor@example.com"])] == ["Taylor"]


def test_import_groups_rejects_a_bad_row_and_writes_nothing(store: Store) -> None:
    """The error names the row; the valid rows before it are not written either."""
    with pytest.raises(ValueError, match=r"row 2: not an email address: 'bad'"):
        store.import_groups([("Taylor", "taylor@example.com"), ("Taylor", "bad")])
    assert store.groups_for_addresses(["taylor@example.com"]) == []


# -- listing events --------------------------------------------------------------------------


def test_list_events_filters_by_group_and_mailbox_newest_first(store: Store) -> None:
    """Filters combine; a mailbox matches events it filed second too; limit caps."""
    store.record_events(
        [
            make_event("Smith", "a", mailbox="agent1@example.com", minutes=1),
            make_event("Jones", "b", mailbox="agent1@example.com", minutes=2),
            make_event("Smith", "c", mailbox="agent2@example.com", minutes=3),
        ]
    )
    store.record_events([make_event("Smith", "a", mailbox="agent2@example.com")])

    def keys(
        group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[str]:
        events = store.list_events(group=group, mailbox=mailbox, limit=limit)
        return [event.message_key for event in events]

    assert keys() == ["c", "b", "a"]
    assert keys(group="Smith") == ["c", "a"]
    assert keys(mailbox="agent2@example.com") == ["c", "a"]
    assert keys(mailbox="AGENT1@example.com") == ["b", "a"]
    assert keys(group="Jones", mailbox="agent2@example.com") == []
    assert keys(limit=2) == ["c", "b"]
    assert keys(group="Smith", limit=1) == ["c"]
    assert keys(group="Unknown") == []


def test_list_events_rejects_a_negative_limit(store: Store) -> None:
    """A negative limit is a caller's mistake, not 'no limit'."""
    with pytest.raises(ValueError, match="limit"):
        store.list_events(limit=-1)


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_threads_recording_overlapping_events_give_exact_counts(
    store: Store,
) -> None:
    """8 mailbox threads record the same 200 events in different orders: 200 new in total."""
    mailboxes = [f"agent{i}@example.com" for i in range(8)]
    keys = [f"k{i:03d}" for i in range(200)]
    start = threading.Barrier(len(mailboxes))

    def worker(index: int) -> int:
        order = keys[:]
        # A seeded shuffle, for a reproducible order per thread; nothing secret.
        random.Random(index).shuffle(order)
        start.wait()
        new = 0
        for offset in range(0, len(order), 10):
            assert store.groups_for_addresses(["client@example.org"])
            batch = [
                make_event("Smith" if int(key[1:]) % 2 else "Jones", key, mailbox=mailboxes[index])
                for key in order[offset : offset + 10]
            ]
            new += store.record_events(batch)
        return new

    with ThreadPoolExecutor(max_workers=len(mailboxes)) as pool:
        results = list(pool.map(worker, range(len(mailboxes))))

    assert sum(results) == len(keys)
    events = store.list_events()
    assert len(events) == len(keys)
    assert all(event.mailboxes == tuple(sorted(mailboxes)) for event in events)


# -- one order and one de-duplication in both databases (issue 20) ----------------------------


def test_events_filed_at_the_same_moment_list_in_one_order(store: Store) -> None:
    """Ties on filed_at: the later recorded first; a batch is recorded in (group, message key)
    order whatever order the caller gave it, so both databases list it alike."""
    store.record_events(
        [make_event("Smith", "b"), make_event("Smith", "a"), make_event("Jones", "c")]
    )
    store.record_events([make_event("Jones", "a")])
    listed = [(e.group, e.message_key) for e in store.list_events()]
    assert listed == [("Jones", "a"), ("Smith", "b"), ("Smith", "a"), ("Jones", "c")]


def test_groups_and_their_addresses_are_in_code_point_order(store: Store) -> None:
    """Names and addresses sort by code point (upper case before lower, punctuation by its
    code), not by the database's collation: the same lists from SQLite and PostgreSQL."""
    store.add_group("adams", ["a.b@example.com", "a-b@example.com", "ab@example.com"])
    store.add_group("Émile", ["emile@example.com"])
    store.add_group("Zeta", ["a.b@example.com"])
    listed = [(g.name, g.addresses) for g in store.list_groups()]
    assert listed == [
        ("Jones", ("jones@example.net",)),
        ("Smith", ("client@example.org",)),
        ("Zeta", ("a.b@example.com",)),
        ("adams", ("a-b@example.com", "a.b@example.com", "ab@example.com")),
        ("Émile", ("emile@example.com",)),
    ]
    found = store.groups_for_addresses(["a.b@example.com", "emile@example.com"])
    assert [g.name for g in found] == ["Zeta", "adams", "Émile"]
    assert found[1].addresses == ("a-b@example.com", "a.b@example.com", "ab@example.com")
    assert store.add_group("adams", []).addresses == found[1].addresses


def test_import_groups_links_repeated_rows_once_and_logs_one_change_an_address(
    store: Store,
) -> None:
    """The same link in several spellings is one link, counted once, and each address's link
    change is logged once (it brings that address's Failed mail back)."""
    index = failed_index(store)
    assert index is not None
    before = index.watermark()
    rows = [
        ("Taylor", "taylor@example.com"),
        (" Taylor ", '"T" <TAYLOR@Example.com>'),
        ("Taylor", "taylor@example.com"),
        ("Smith", "client@example.org"),  # linked before
        ("Smith", "taylor@example.com"),
    ]
    assert store.import_groups(rows) == 2
    assert sorted(c.address for c in index.changes_after(before)) == [
        "client@example.org",
        "taylor@example.com",
    ]
    assert [(g.name, g.addresses) for g in store.groups_for_addresses(["taylor@example.com"])] == [
        ("Smith", ("client@example.org", "taylor@example.com")),
        ("Taylor", ("taylor@example.com",)),
    ]
    assert store.import_groups([]) == 0


def test_an_event_recorded_again_by_another_mailbox_adds_it_without_a_new_event(
    store: Store,
) -> None:
    """Idempotent on (group, message key): a later recording only adds its mailbox, in a
    batch that also records new events, and the first filer's fields stay."""
    store.record_events([make_event(key="k1", mailbox="agent1@example.com")])
    later = replace(make_event(key="k1", mailbox="agent2@example.com"), subject="changed")
    assert store.record_events([later, make_event(key="k2", minutes=1)]) == 1
    first = store.list_events(group="Smith")[1]
    assert (first.message_key, first.subject, first.mailbox) == (
        "k1",
        "Subject k1",
        "agent1@example.com",
    )
    assert first.mailboxes == ("agent1@example.com", "agent2@example.com")
    assert store.record_events_checked([later]).new == 0
    assert store.record_events_checked([make_event(key="k3")]).rejected == {}


def test_list_events_limit_zero_and_unknown_filters_give_nothing(store: Store) -> None:
    """limit=0 is none (not 'no limit'); an unknown mailbox or group matches nothing."""
    store.record_events([make_event(key="a"), make_event(key="b", minutes=1)])
    assert store.list_events(limit=0) == []
    assert [e.message_key for e in store.list_events(limit=5)] == ["b", "a"]
    assert store.list_events(mailbox="stranger@example.com") == []
    assert store.list_events(group="Nobody", mailbox="agent1@example.com") == []


# -- agent tokens (TokenLedger) ----------------------------------------------------------------


def token(  # noqa: PLR0917 -- a row builder
    token_id: str,
    address: str = AGENT,
    hours: int | None = 0,
    expires_at: datetime | None = T0 + timedelta(days=90),
    last_used_at: datetime | None = None,
    revoked_at: datetime | None = None,
) -> IssuedToken:
    """A token issued ``hours`` after T0 (None: the row of a mailbox's es1 tokens)."""
    issued = None if hours is None else T0 + timedelta(hours=hours)
    issuer = "es1" if hours is None else "cli:root"
    return IssuedToken(token_id, address, issued, issuer, expires_at, last_used_at, revoked_at)


def test_a_token_is_recorded_once_and_read_back_with_every_time(ledger: TokenLedger) -> None:
    """Every field round-trips (times aware, in UTC); an id recorded again keeps its first row."""
    paris = timezone(timedelta(hours=1))
    full = token(
        "a1",
        hours=2,
        expires_at=datetime(2026, 4, 5, 13, 0, 0, 250000, tzinfo=paris),
        last_used_at=T0 + timedelta(hours=3),
        revoked_at=T0 + timedelta(hours=4),
    )
    ledger.record_token(full)
    ledger.record_token(token("a1", OTHER, hours=5))
    read = ledger.issued_token("a1")
    assert read == full
    assert read is not None
    assert read.expires_at is not None
    assert read.expires_at.utcoffset() == timedelta(0)
    assert ledger.issued_token("zz") is None
    ledger.record_token(token("n1", expires_at=None))
    assert ledger.issued_token("n1") == IssuedToken("n1", AGENT, T0, "cli:root", None)


def test_tokens_are_listed_newest_first_with_the_es1_rows_last_by_address(
    ledger: TokenLedger,
) -> None:
    for each in (
        token("old", hours=0),
        token("es1-other", OTHER, hours=None),
        token("new", OTHER, hours=9),
        token("es1-agent", AGENT, hours=None),
        token("mid", hours=4),
    ):
        ledger.record_token(each)
    assert [t.id for t in ledger.issued_tokens()] == ["new", "mid", "old", "es1-agent", "es1-other"]


def test_revoking_keeps_the_first_time_and_names_the_tokens(ledger: TokenLedger) -> None:
    """By id: that token; by address: every token of it; a revoked one keeps its first
    revoked_at; an unknown id names none; exactly one of id and address."""
    for each in (token("a1"), token("a2", hours=1), token("b1", OTHER, hours=2)):
        ledger.record_token(each)
    first = ledger.revoke_tokens(T0 + timedelta(hours=4), token_id="a1")
    assert [(t.id, t.revoked_at) for t in first] == [("a1", T0 + timedelta(hours=4))]
    both = ledger.revoke_tokens(T0 + timedelta(hours=6), address=AGENT)
    assert [(t.id, t.revoked_at) for t in both] == [
        ("a2", T0 + timedelta(hours=6)),
        ("a1", T0 + timedelta(hours=4)),
    ]
    assert ledger.issued_token("b1") == token("b1", OTHER, hours=2)
    assert ledger.revoke_tokens(T0, token_id="nope") == []
    assert ledger.revoke_tokens(T0, address="nobody@example.com") == []
    with pytest.raises(ValueError, match="one"):
        ledger.revoke_tokens(T0, token_id="a1", address=AGENT)
    with pytest.raises(ValueError, match="one"):
        ledger.revoke_tokens(T0)


def test_revoking_all_counts_only_tokens_not_revoked_yet(ledger: TokenLedger) -> None:
    for each in (token("a1"), token("a2", hours=1), token("e1", OTHER, hours=None)):
        ledger.record_token(each)
    ledger.revoke_tokens(T0 + timedelta(hours=1), token_id="a1")
    assert ledger.revoke_all_tokens(T0 + timedelta(hours=2)) == 2
    assert ledger.revoke_all_tokens(T0 + timedelta(hours=3)) == 0
    assert {t.id: t.revoked_at for t in ledger.issued_tokens()} == {
        "a1": T0 + timedelta(hours=1),
        "a2": T0 + timedelta(hours=2),
        "e1": T0 + timedelta(hours=2),
    }
    assert all(t.state(T0) == "revoked" for t in ledger.issued_tokens())


def test_a_tokens_last_use_is_overwritten_and_naive_times_are_utc(ledger: TokenLedger) -> None:
    ledger.record_token(token("a1"))
    ledger.token_used("a1", T0 + timedelta(minutes=1))
    ledger.token_used("a1", datetime(2026, 1, 5, 12, 2))  # naive: UTC
    ledger.token_used("unknown", T0)  # nothing to update: no error
    read = ledger.issued_token("a1")
    assert read is not None
    assert read.last_used_at == T0 + timedelta(minutes=2)
    assert read.state(T0) == "active"
    assert read.state(T0 + timedelta(days=91)) == "expired"


def test_imported_csv_rows_link_groups(store: Store, tmp_path: Path) -> None:
    """read_group_csv feeds import_groups directly."""
    path = tmp_path / "groups.csv"
    path.write_text("group,address\nTaylor,t@example.com\n", encoding="utf-8")
    assert store.import_groups(read_group_csv(path)) == 1
    assert store.groups_for_addresses(["t@example.com"])[0].name == "Taylor"


# -- the registry (Registry): branches, mailboxes, secrets, stops, the per-mailbox lock -------


@pytest.fixture
def registry(empty: SqliteStore | PostgresStore) -> Registry:
    """The registry of each kind of state database."""
    assert isinstance(empty, Registry)
    return empty


def mailbox(address: str = AGENT, **changes: object) -> RegisteredMailbox:
    """A registered password mailbox on branch london (``changes`` replace fields)."""
    return replace(
        RegisteredMailbox(address, "london", "password", address, True, False), **changes
    )


def stored_secrets(engine: SqliteStore | PostgresStore) -> list[bytes]:
    """Every secret the registry table holds, read past the Registry methods."""
    with engine.reading("test: raw secrets") as conn:
        rows = conn.execute("SELECT secret FROM registered_mailboxes").fetchall()
    return [bytes(row[0]) for row in rows if row[0] is not None]


def test_a_branch_is_new_once_then_replaced_and_listed_by_name(registry: Registry) -> None:
    assert registry.put_branch(RegisteredBranch("paris", "imap.fr", 993, "ssl")) is True
    assert registry.put_branch(RegisteredBranch("London", "imap.uk", 143, "starttls", "/ca.pem"))
    assert registry.put_branch(RegisteredBranch("paris", "imap2.fr", 143, "none")) is False
    assert registry.registered_branches() == [
        RegisteredBranch("London", "imap.uk", 143, "starttls", "/ca.pem"),
        RegisteredBranch("paris", "imap2.fr", 143, "none", None),
    ]


def test_a_mailbox_round_trips_without_its_secret_and_the_secret_apart(
    registry: Registry,
) -> None:
    registry.put_mailbox(mailbox(trigger="manual"), b"sealed-1")
    registry.put_mailbox(mailbox(OTHER, auth="office365", has_secret=False, branch=""), None)
    assert registry.registered_mailboxes() == [
        mailbox(trigger="manual"),
        mailbox(OTHER, auth="office365", has_secret=False, branch=""),
    ]
    assert registry.registered_mailbox(AGENT) == mailbox(trigger="manual")
    assert registry.registered_mailbox("nobody@example.com") is None
    assert registry.mailbox_secret(AGENT) == b"sealed-1"
    assert registry.mailbox_secret(OTHER) is None
    assert registry.mailbox_secret("nobody@example.com") is None
    # Set up again: the row and the secret are replaced.
    registry.put_mailbox(mailbox(username="a.gent", branch="paris"), b"sealed-2")
    assert registry.registered_mailbox(AGENT) == mailbox(username="a.gent", branch="paris")
    assert registry.mailbox_secret(AGENT) == b"sealed-2"


def test_forgetting_a_mailbox_takes_its_secret_out_of_the_table(
    empty: SqliteStore | PostgresStore,
) -> None:
    empty.put_mailbox(mailbox(), b"sealed-agent")
    empty.put_mailbox(mailbox(OTHER), b"sealed-other")
    assert empty.remove_mailbox(AGENT) is True
    assert empty.remove_mailbox(AGENT) is False
    assert empty.registered_mailbox(AGENT) is None
    assert empty.mailbox_secret(AGENT) is None
    assert stored_secrets(empty) == [b"sealed-other"]


def test_reencrypting_rewrites_every_secret_in_one_go(registry: Registry) -> None:
    registry.put_mailbox(mailbox(), b"a")
    registry.put_mailbox(mailbox(OTHER), b"b")
    registry.put_mailbox(mailbox("o365@example.com", auth="office365", has_secret=False), None)
    assert registry.reencrypt_secrets(lambda blob, address: blob + address.encode()) == 2
    assert registry.mailbox_secret(AGENT) == b"a" + AGENT.encode()
    assert registry.mailbox_secret(OTHER) == b"b" + OTHER.encode()
    assert registry.mailbox_secret("o365@example.com") is None


def test_a_stop_holds_until_cleared_and_is_recorded_once(registry: Registry) -> None:
    assert registry.stopped_mailboxes() == set()
    registry.record_stop(AGENT)
    registry.record_stop(AGENT)
    registry.record_stop(OTHER)
    assert registry.stopped_mailboxes() == {AGENT, OTHER}
    assert registry.is_stopped(AGENT)
    assert registry.clear_stop(AGENT) is True
    assert registry.clear_stop(AGENT) is False
    assert not registry.is_stopped(AGENT)
    assert registry.stopped_mailboxes() == {OTHER}


def test_the_mailbox_lock_serialises_one_mailbox_and_leaves_others_free(
    registry: Registry,
) -> None:
    """A second holder of one address waits for the first; another address does not, and
    the holder's own statements run while it holds the lock."""
    held, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with registry.mailbox_lock(AGENT):
            order.append("first in")
            held.set()
            registry.put_mailbox(mailbox(), b"x")  # a statement of the locked operation
            release.wait(10)
            order.append("first out")

    def second() -> None:
        with registry.mailbox_lock(AGENT):
            order.append("second in")

    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(first)
        assert held.wait(10)
        two = pool.submit(second)
        with registry.mailbox_lock(OTHER):
            order.append("other")
        two_done_early = two.done()
        release.set()
        one.result(10)
        two.result(10)
    assert not two_done_early
    assert order == ["first in", "other", "first out", "second in"]
