"""The Store protocol against SqliteStore and PostgresStore (same semantics), open_store, CSV."""

from __future__ import annotations

import random
import sqlite3
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from emailsync.errors import ConfigError, StoreError, StoreUnavailableError
from emailsync.model import Attachment, Direction, TimelineEvent, Via
from emailsync.store import open_store, read_group_csv
from emailsync.store.base import RegisteredMailbox, Store
from emailsync.store.postgres import PostgresStore
from emailsync.store.sqlite import SqliteStore, _migrations, _statements

BASE_TIME = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
SCHEMA_DIR = Path(__file__).parents[2] / "daemon" / "emailsync" / "store" / "schema"

# The migration that added per-mailbox directions and body_truncated (004_event_details).
EVENT_DETAILS_VERSION = 4


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


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store of each kind with the groups Smith and Jones.

    Every test taking this fixture runs against both, so both keep the same semantics.
    """
    opened: Store
    if request.param == "sqlite":
        opened = SqliteStore(tmp_path / "state" / "emailsync.db")
    else:
        opened = PostgresStore(request.getfixturevalue("pg_url"))
    opened.add_group("Smith", ["client@example.org"])
    opened.add_group("Jones", ["jones@example.net"])
    yield opened
    opened.close()


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


# -- schema --------------------------------------------------------------------------------


def test_a_fresh_file_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    """user_version equals the number of migration files; the journal is WAL."""
    path = tmp_path / "emailsync.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(
            list(SCHEMA_DIR.glob("*.sql"))
        )
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_reopening_keeps_data_and_schema_version(tmp_path: Path) -> None:
    """A second open applies nothing and sees what the first recorded."""
    path = tmp_path / "emailsync.db"
    first = SqliteStore(path)
    first.add_group("Smith", ["client@example.org"])
    first.record_events([make_event()])
    first.close()
    again = SqliteStore(path)
    try:
        assert len(again.list_events()) == 1
        assert again.list_groups()[0].addresses == ("client@example.org",)
    finally:
        again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(list(SCHEMA_DIR.glob("*.sql")))
    conn.close()


def test_a_database_from_a_newer_emailsync_is_refused(tmp_path: Path) -> None:
    """A schema version beyond the known migrations is a StoreError, not a guess."""
    path = tmp_path / "emailsync.db"
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SqliteStore(path)


# -- concurrency and failures -------------------------------------------------------------------


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


def test_writing_while_another_process_holds_the_write_lock_is_unavailable(
    tmp_path: Path,
) -> None:
    """A held lock gives StoreUnavailableError after the busy timeout; reads still work."""
    path = tmp_path / "emailsync.db"
    store = SqliteStore(path, busy_timeout_seconds=0.05)
    store.add_group("Smith", ["client@example.org"])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailableError, match="locked"):
            store.record_events([make_event()])
        assert store.list_groups()[0].name == "Smith"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.record_events([make_event()]) == 1
    store.close()


def test_opening_while_another_process_holds_the_write_lock_is_unavailable(
    tmp_path: Path,
) -> None:
    """The migration check waits for the lock like any write."""
    path = tmp_path / "emailsync.db"
    SqliteStore(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailableError):
            SqliteStore(path, busy_timeout_seconds=0.05)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_database_path_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    """A directory where the file should be cannot be opened: retry later, not fail mail."""
    path = tmp_path / "emailsync.db"
    path.mkdir()
    with pytest.raises(StoreUnavailableError, match=r"emailsync\.db"):
        SqliteStore(path)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    """A corrupt file is not a transient condition."""
    path = tmp_path / "emailsync.db"
    path.write_bytes(b"this is not a database, just text. " * 200)
    with pytest.raises(StoreError) as caught:
        SqliteStore(path)
    assert not isinstance(caught.value, StoreUnavailableError)


def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    """Every call after close() is a StoreError; close() twice is fine."""
    store = SqliteStore(tmp_path / "emailsync.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_groups()


def test_the_database_file_and_its_new_directory_are_private(tmp_path: Path) -> None:
    """It holds client mail: the file (and its WAL) are 0600, a created directory 0700."""
    path = tmp_path / "new-state" / "emailsync.db"
    store = SqliteStore(path)
    store.add_group("Smith", ["client@example.org"])
    try:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        wal = path.with_name(path.name + "-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        store.close()


# -- open_store ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "sqlite:", "sqlite://", "  sqlite:  "])
def test_open_store_defaults_to_the_state_directory(tmp_path: Path, url: str) -> None:
    """An empty or path-less sqlite URL opens <state_dir>/emailsync.db."""
    store = open_store(url, tmp_path / "state")
    store.close()
    assert (tmp_path / "state" / "emailsync.db").is_file()


def test_open_store_opens_an_absolute_sqlite_path(tmp_path: Path) -> None:
    """sqlite:///abs/path.db opens that file (percent-escapes decoded)."""
    store = open_store(f"sqlite://{tmp_path}/my%20store.db", tmp_path / "state")
    store.close()
    assert (tmp_path / "my store.db").is_file()
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://user:secret@db/emailsync", "unsupported store URL scheme 'mysql'"),
        ("https://crm.example.com/api", "unsupported store URL scheme 'https'"),
        ("sqlite://host/x.db", "names a host"),
        ("sqlite:relative.db", "absolute path"),
        ("/var/lib/emailsync/emailsync.db", "not a URL"),
        ("sqlite:///x.db?mode=ro", "query"),
    ],
)
def test_open_store_rejects_urls_it_cannot_use(tmp_path: Path, url: str, problem: str) -> None:
    """Each unusable URL is a ConfigError naming the problem, without echoing secrets."""
    with pytest.raises(ConfigError) as caught:
        open_store(url, tmp_path)
    (line,) = caught.value.problems
    assert line.startswith("store: ")
    assert problem in line
    assert "secret" not in line


# -- CSV ---------------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "groups.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_read_group_csv_returns_normalised_rows(tmp_path: Path) -> None:
    """BOM, header case, extra columns, quoting and blank lines are all handled."""
    path = write_csv(
        tmp_path,
        "\ufeffNote,Group,Address\r\n"
        'x,"Smith, John",John@Example.COM\r\n'
        "\r\n"
        "y,Jones,jones@example.net\r\n",
    )
    assert read_group_csv(path) == [
        ("Smith, John", "john@example.com"),
        ("Jones", "jones@example.net"),
    ]


def test_read_group_csv_reports_every_bad_row_with_its_line(tmp_path: Path) -> None:
    """One ValueError lists each bad row as FILE:LINE: problem."""
    path = write_csv(
        tmp_path,
        "group,address\nSmith,ok@example.com\n,x@example.com\nJones,not-an-address\nLone\n",
    )
    with pytest.raises(
        ValueError,
        match=r"(?s)groups\.csv:3: empty group name.*"
        r"groups\.csv:4: not an email address: 'not-an-address'.*"
        r"groups\.csv:5: expected 2 columns, found 1",
    ):
        read_group_csv(path)


def test_read_group_csv_requires_a_header_row(tmp_path: Path) -> None:
    """A file starting with data, or with nothing, says what header it wants."""
    with pytest.raises(ValueError, match=r"groups\.csv:1: the header row must name"):
        read_group_csv(write_csv(tmp_path, "Smith,ok@example.com\n"))
    with pytest.raises(ValueError, match="empty file"):
        read_group_csv(write_csv(tmp_path, "\n\n"))


def test_read_group_csv_rejects_text_that_is_not_utf8(tmp_path: Path) -> None:
    """A Latin-1 export is a clear ValueError, not a UnicodeDecodeError deep inside."""
    with pytest.raises(ValueError, match="not UTF-8"):
        read_group_csv(write_csv(tmp_path, "group,address\nMüller,m@example.com\n", "latin-1"))


def test_imported_csv_rows_link_groups(store: Store, tmp_path: Path) -> None:
    """read_group_csv feeds import_groups directly."""
    rows = read_group_csv(write_csv(tmp_path, "group,address\nTaylor,t@example.com\n"))
    assert store.import_groups(rows) == 1
    assert store.groups_for_addresses(["t@example.com"])[0].name == "Taylor"


def test_migration_scripts_split_at_statement_ends_only() -> None:
    """A ';' inside a string or a trigger body does not end a statement; trailing comments pass."""
    script = (
        "CREATE TABLE t (a TEXT DEFAULT ';');\n"
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;\n"
        "-- trailing comment\n"
    )
    assert [s.strip() for s in _statements(script)] == [
        "CREATE TABLE t (a TEXT DEFAULT ';');",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;",
    ]
    with pytest.raises(StoreError, match="without ';'"):
        list(_statements("CREATE TABLE u (a)"))


def test_a_registered_mailbox_keeps_its_trigger_and_older_rows_read_as_auto(
    tmp_path: Path,
) -> None:
    """Issue 19: a self-registered mailbox was always `auto`. Its trigger is stored now; a
    mailbox registered before the column existed (schema 2) reads as `auto`, as it ran."""
    path = tmp_path / "emailsync.db"
    with sqlite3.connect(path) as conn:  # a store at schema 2, with one mailbox in it
        for version, _name, script in _migrations()[:2]:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute(
            "INSERT INTO registered_mailboxes (address, branch, auth, username, secret, stopped,"
            " updated_at) VALUES ('old@example.com', 'main', 'password', 'old', x'00', 0, 'now')"
        )
    path.chmod(0o600)
    store = SqliteStore(path)
    try:
        store.put_mailbox(
            RegisteredMailbox("new@example.com", "main", "password", "new", True, False, "manual"),
            b"\x01",
        )
        triggers = {m.address: m.trigger for m in store.registered_mailboxes()}
        assert triggers == {"old@example.com": "auto", "new@example.com": "manual"}
        store.put_mailbox(
            RegisteredMailbox("new@example.com", "main", "password", "new", True, False, "auto"),
            b"\x01",
        )
        assert {m.trigger for m in store.registered_mailboxes()} == {"auto"}
    finally:
        store.close()


def test_events_recorded_before_directions_per_mailbox_read_with_what_is_known(
    tmp_path: Path,
) -> None:
    """Issue 19: an event two mailboxes filed before each one's direction was kept reads the
    event's direction for the mailbox that filed it first and None for the other, until that
    one files the message again; a body that ended with the old cut mark reads as truncated."""
    path = tmp_path / "emailsync.db"
    with sqlite3.connect(path) as conn:  # a store at the schema before, with old rows
        for version, _name, script in _migrations():
            if version >= EVENT_DETAILS_VERSION:
                break
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("INSERT INTO groups (id, name) VALUES (1, 'Smith')")
        for number, body in ((1, "Hello\n[… truncated]"), (2, "Hello, all of it")):
            conn.execute(
                "INSERT INTO timeline_events (id, group_id, message_key, direction, mailbox,"
                " message_id, subject, from_, to_, cc, date, body_text, size, filed_at)"
                " VALUES (?, 1, ?, 'inbound', 'agent2@example.com', NULL, 's', 'f', 't', '',"
                " NULL, ?, 10, ?)",
                (number, f"k{number}", body, f"2024-05-01T09:0{number}:00.000000+00:00"),
            )
        conn.executemany(
            "INSERT INTO event_mailboxes (event_id, mailbox) VALUES (?, ?)",
            [(1, "agent1@example.com"), (1, "agent2@example.com"), (2, "agent2@example.com")],
        )
    conn.close()
    path.chmod(0o600)
    store = SqliteStore(path)
    try:
        second, first = store.list_events()
        assert first.via == (
            Via("agent1@example.com", None),
            Via("agent2@example.com", Direction.INBOUND),
        )
        assert (first.body_truncated, second.body_truncated) == (True, False)
        assert first.body_text == "Hello\n[… truncated]"  # the text is left as it was
        store.record_events([make_event(key="k1", mailbox="agent1@example.com")])
        assert store.list_events()[1].via == (
            Via("agent1@example.com", Direction.OUTBOUND),
            Via("agent2@example.com", Direction.INBOUND),
        )
    finally:
        store.close()
