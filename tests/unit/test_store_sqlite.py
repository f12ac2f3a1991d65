"""SqliteStore beyond the shared contract (test_store_contract.py): the file, its schema
migrations, WAL and locks, open_store, the group CSV."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from emailsync.errors import ConfigError, StoreError, StoreUnavailableError
from emailsync.model import Direction, Fence, Via
from emailsync.state import read_group_csv
from emailsync.state.base import RegisteredMailbox
from emailsync.state.sqlcore import migrations
from emailsync.state.sqlite import SqliteStore, _statements
from emailsync.state.timeline_sql import SqlTimeline
from emailsync.timeline import open_store

from .test_store_contract import make_event

SCHEMA_DIR = Path(__file__).parents[2] / "daemon" / "emailsync" / "state" / "schema"

# The migration that added per-mailbox directions and body_truncated (004_event_details).
EVENT_DETAILS_VERSION = 4


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


def test_a_lease_fence_needs_postgresql(tmp_path: Path) -> None:
    """The shared timeline SQL checks a fence in PostgreSQL only: SQLite has no leases, so a
    fence there is a StoreError, never a silent write."""
    store = SqliteStore(tmp_path / "emailsync.db")
    try:
        timeline = SqlTimeline(store)
        fence = Fence("agent1@example.com", "instance-a", 1)
        with pytest.raises(StoreError, match="PostgreSQL"):
            timeline.record_events([], fence=fence)
        with pytest.raises(StoreError, match="PostgreSQL"):
            timeline.check_fence(fence)
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
        for version, _name, script in migrations("schema")[:2]:
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
        for version, _name, script in migrations("schema"):
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
