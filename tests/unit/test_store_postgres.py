"""PostgresStore beyond the shared protocol tests: migrations, outages, error translation."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import psycopg_pool
import pytest

from emailsync.dev.net import free_port
from emailsync.dev.postgres import Postgres
from emailsync.errors import StoreError, StoreUnavailableError
from emailsync.model import Direction, Via
from emailsync.state.base import RegisteredBranch, RegisteredMailbox
from emailsync.state.pgtranslate import translate
from emailsync.state.postgres import PostgresStore
from emailsync.state.registry_sql import REGISTRY_CHANNEL
from emailsync.state.sqlcore import migrations
from emailsync.timeline import open_store

# The migration that added per-mailbox directions and body_truncated (004_event_details).
EVENT_DETAILS_VERSION = 4


def test_open_store_picks_postgres_for_a_postgresql_url(pg_url: str, tmp_path: Path) -> None:
    """store = "postgresql://…" opens a PostgresStore and writes nothing to the state dir."""
    store = open_store(pg_url, tmp_path / "state")
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema_version() == len(migrations("schema_pg"))
    finally:
        store.close()
    assert not (tmp_path / "state").exists()


def test_instances_opening_a_fresh_database_together_migrate_it_once(pg_url: str) -> None:
    """Four stores opened at once: one applies the migrations, the others wait and see them."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        stores = list(pool.map(lambda _: PostgresStore(pg_url), range(4)))
    try:
        with psycopg.connect(pg_url) as conn:
            versions = conn.execute("SELECT version FROM emailsync_schema ORDER BY 1").fetchall()
        assert versions == [(n,) for n in range(1, len(migrations("schema_pg")) + 1)]
        stores[0].add_group("Smith", ["client@example.org"])
        assert [g.name for g in stores[3].list_groups()] == ["Smith"]
    finally:
        for store in stores:
            store.close()


def test_a_database_from_a_newer_emailsync_is_refused(pg_url: str) -> None:
    """A schema version beyond ours is a StoreError asking to upgrade."""
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO emailsync_schema (version) VALUES (999)")
    with pytest.raises(StoreError, match="newer than this emailsync knows"):
        PostgresStore(pg_url)


def test_an_unreachable_server_is_unavailable_without_the_password() -> None:
    """Nothing listening: StoreUnavailableError at open, and the password is not echoed."""
    url = f"postgresql://emailsync:s3cret@127.0.0.1:{free_port()}/emailsync"
    with pytest.raises(StoreUnavailableError) as caught:
        PostgresStore(url, connect_timeout_seconds=1)
    assert "s3cret" not in str(caught.value)


def test_connections_the_server_dropped_are_replaced_on_the_next_call(pg_url: str) -> None:
    """pg_terminate_backend (an admin shutdown of our sessions) costs no failed call."""
    store = PostgresStore(pg_url)
    try:
        store.add_group("Smith", ["client@example.org"])
        dbname = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()
        assert killed is not None
        assert killed[0] >= 1
        assert [g.name for g in store.list_groups()] == ["Smith"]
    finally:
        store.close()


def test_a_restarted_server_is_unavailable_while_down_and_usable_after() -> None:
    """Server stopped: StoreUnavailableError (mail stays in Queue); started again: works."""
    server = Postgres()
    server.start()
    try:
        store = PostgresStore(server.create_database(), connect_timeout_seconds=1)
        store.add_group("Smith", ["client@example.org"])
        server.stop()
        with pytest.raises(StoreUnavailableError):
            store.list_groups()
        server.start()
        # The pool reconnects with its own back-off (1 s, doubling): usable within seconds.
        deadline = time.monotonic() + 15
        while True:
            try:
                assert [g.name for g in store.list_groups()] == ["Smith"]
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        store.close()
    finally:
        server.close()


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.CannotConnectNow("starting up"), True),
        (psycopg.errors.SerializationFailure("retry"), True),
        (psycopg.errors.DeadlockDetected("deadlock"), True),
        (psycopg.errors.TooManyConnections("too many"), True),
        (psycopg.OperationalError("connection refused"), True),
        (psycopg_pool.PoolTimeout("no connection"), True),
        (psycopg.errors.UniqueViolation("duplicate"), False),
        (psycopg.errors.UndefinedTable("no such table"), False),
        (psycopg_pool.PoolClosed("closed"), False),
    ],
)
def test_psycopg_errors_translate_by_whether_a_retry_can_help(
    error: Exception, *, unavailable: bool
) -> None:
    """Outages and lost races are StoreUnavailableError; the rest is a plain StoreError."""
    translated = translate(error, "doing it")
    assert isinstance(translated, StoreError)
    assert isinstance(translated, StoreUnavailableError) is unavailable
    assert translated.args[0].startswith("store (postgresql): doing it: ")


def test_events_recorded_before_directions_per_mailbox_read_with_what_is_known(
    pg_url: str,
) -> None:
    """Issue 19: as in SQLite, an old event reads the event's direction for the mailbox that
    filed it first and None for the others; an old cut mark reads as truncated."""
    with psycopg.connect(pg_url) as conn:  # a database at the schema before, with old rows
        conn.execute(
            "CREATE TABLE emailsync_schema ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, _name, script in migrations("schema_pg"):
            if version >= EVENT_DETAILS_VERSION:
                break
            conn.execute(script.encode())
            conn.execute("INSERT INTO emailsync_schema (version) VALUES (%s)", (version,))
        (group_id,) = conn.execute(
            "INSERT INTO groups (name) VALUES ('Smith') RETURNING id"
        ).fetchone()
        (event_id,) = conn.execute(
            "INSERT INTO timeline_events (group_id, message_key, direction, mailbox, message_id,"
            " subject, from_, to_, cc, date, body_text, size, filed_at) VALUES (%s, 'k1',"
            " 'inbound', 'agent2@example.com', NULL, 's', 'f', 't', '', NULL, %s, 10, now())"
            " RETURNING id",
            (group_id, "Hello\n[… truncated]"),
        ).fetchone()
        for mailbox in ("agent1@example.com", "agent2@example.com"):
            conn.execute(
                "INSERT INTO event_mailboxes (event_id, mailbox) VALUES (%s, %s)",
                (event_id, mailbox),
            )
    store = PostgresStore(pg_url)
    try:
        (event,) = store.list_events()
        assert event.via == (
            Via("agent1@example.com", None),
            Via("agent2@example.com", Direction.INBOUND),
        )
        assert event.body_truncated
    finally:
        store.close()


def test_the_mailbox_lock_holds_across_instances_sharing_the_database(pg_url: str) -> None:
    """Two instances' stores: the second waits for the first's row lock (set-up, forget and
    a sign-in's finish of one mailbox never interleave anywhere in the cluster)."""
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        entered = threading.Event()

        def wait_for_lock() -> None:
            with two.mailbox_lock("agent@example.com"):
                entered.set()

        with one.mailbox_lock("agent@example.com"):
            waiter = threading.Thread(target=wait_for_lock)
            waiter.start()
            assert not entered.wait(0.5)
        assert entered.wait(5)
        waiter.join(5)
    finally:
        one.close()
        two.close()


def test_every_registry_change_notifies_the_registry_channel_with_its_address(
    pg_url: str,
) -> None:
    """In the change's transaction: a listener sees one notification per change, the address
    as payload (empty for a branch: every mailbox may have changed)."""
    store = PostgresStore(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {REGISTRY_CHANNEL}")
            mailbox = RegisteredMailbox("a@example.com", "b", "password", "a", True, False)
            store.put_branch(RegisteredBranch("b", "imap.example.com", 993, "ssl"))
            store.put_mailbox(mailbox, b"sealed")
            store.remove_mailbox("a@example.com")
            store.record_stop("c@example.com")
            store.clear_stop("c@example.com")
            store.registered_mailboxes()  # reads notify nothing
            payloads = [n.payload for n in listener.notifies(timeout=1.0)]
        assert payloads == ["", "a@example.com", "a@example.com", "c@example.com", "c@example.com"]
    finally:
        store.close()
