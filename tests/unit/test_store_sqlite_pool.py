"""SqliteStore's connection pool (issue 23): a thread holds a connection only for one reading or
transaction block, a block inside another on the same thread uses the outer one's connection,
at most IDLE_CONNECTIONS stay open between uses, and a connection that failed is closed."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.state.sqlite import IDLE_CONNECTIONS, SqliteStore

THREADS = 2 * IDLE_CONNECTIONS
WRITES_EACH = 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "emailsync.db")
    yield opened
    opened.close()


def open_connections(store: SqliteStore) -> int:
    """This process's connections that have read the database: those with its WAL open (a
    closed connection's descriptor on the database file itself may linger, see
    test_worker_memory)."""
    wal = str(store.path) + "-wal"
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == wal
    return count


def group_names(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM groups")}


def test_a_reading_inside_a_transaction_sees_its_uncommitted_write(store: SqliteStore) -> None:
    with store.transaction("add a group") as conn:
        conn.execute("INSERT INTO groups (name) VALUES ('Smith')")
        with store.reading("look up groups") as inner:
            assert group_names(inner) == {"Smith"}
        # Another thread reads the last committed state, beside the open write.
        seen: list[set[str]] = []
        reader = threading.Thread(target=lambda: seen.append(store_groups(store)))
        reader.start()
        reader.join(10)
        assert seen == [set()]
    assert store_groups(store) == {"Smith"}


def store_groups(store: SqliteStore) -> set[str]:
    with store.reading("look up groups") as conn:
        return group_names(conn)


def test_threads_at_once_open_more_connections_and_keep_only_the_idle_cap(
    store: SqliteStore,
) -> None:
    """Like mailbox workers: each thread uses the store, then waits (alive) holding none."""
    inside = threading.Barrier(THREADS + 1, timeout=20)
    waiting = threading.Barrier(THREADS + 1, timeout=60)
    errors: list[BaseException] = []

    def use(n: int) -> None:
        try:
            with store.reading("look up groups") as conn:
                group_names(conn)
                inside.wait()  # every thread in a reading block at once
                inside.wait()
            for k in range(WRITES_EACH):
                with store.transaction("add a group") as conn:
                    conn.execute("INSERT INTO groups (name) VALUES (?)", (f"g{n}-{k}",))
                store_groups(store)
        except BaseException as exc:
            errors.append(exc)
            inside.abort()
        waiting.wait()  # done, alive, as a worker waiting in IDLE
        waiting.wait()

    threads = [threading.Thread(target=use, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    inside.wait()
    at_once = open_connections(store)
    inside.wait()
    waiting.wait()
    while_waiting = open_connections(store)
    waiting.wait()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert at_once >= THREADS
    assert 1 <= while_waiting <= IDLE_CONNECTIONS
    assert len(store_groups(store)) == THREADS * WRITES_EACH


def test_a_connection_whose_rollback_failed_is_closed_not_reused(store: SqliteStore) -> None:
    used: list[sqlite3.Connection] = []
    with pytest.raises(RuntimeError):
        write_and_refuse_the_rollback(store, used)
    (failed,) = used
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        failed.execute("SELECT 1")
    # Closing it dropped its write lock and its uncommitted write.
    store.add_group("Jones", ["jones@example.org"])
    assert store_groups(store) == {"Jones"}


def write_and_refuse_the_rollback(store: SqliteStore, used: list[sqlite3.Connection]) -> None:
    """A transaction whose block fails and whose ROLLBACK then fails too."""

    def no_rollback(action: int, operation: str | None, *_: object) -> int:
        denied = action == sqlite3.SQLITE_TRANSACTION and operation == "ROLLBACK"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    with store.transaction("add a group") as conn:
        used.append(conn)
        conn.execute("INSERT INTO groups (name) VALUES ('Smith')")
        conn.set_authorizer(no_rollback)
        raise RuntimeError("the block fails; its ROLLBACK is refused")
