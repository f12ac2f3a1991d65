"""SqliteStore: the built-in timeline store, one SQLite file with numbered schema migrations."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from emailsync.errors import StoreError, StoreUnavailableError
from emailsync.model import TimelineEvent
from emailsync.privilege import access_hint
from emailsync.state.base import Recorded
from emailsync.state.registry_sql import SqlRegistry
from emailsync.state.sqlcore import migrations_after
from emailsync.state.sqlstate import SqlStateMethods
from emailsync.state.timeline_sql import SqlTimeline
from emailsync.state.tokens_sql import SqlTokens

# How long a writer waits for another writer (another thread or a CLI process) to commit.
BUSY_TIMEOUT_SECONDS = 5.0
# Connections kept open between uses; more are opened while more threads use the store at
# once, and closed when they come back. Each holds ~160 KB (parsed schema, page cache).
IDLE_CONNECTIONS = 4
# The file holds client mail: owner-only, and so is a state directory we create.
DB_FILE_MODE = 0o600
STATE_DIR_MODE = 0o700

# Primary result codes (https://sqlite.org/rescode.html) after which a later retry can
# succeed: another writer holds the lock, the disk failed or is full, the file is not
# reachable right now. Anything else (corrupt file, constraint, bug) is a plain StoreError.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_PROTOCOL,
    }
)
# Extended result codes carry the primary code in their low byte.
_PRIMARY_CODE_MASK = 0xFF


class SqliteStore(SqlStateMethods):
    """The timeline store in one SQLite file, shared by every mailbox worker thread.

    A thread takes a connection from a small pool for one ``reading`` or ``transaction``
    block and gives it back after, so lookups run beside the single writer (WAL mode) and an
    idle thread holds none (issue 23: 2,000 worker threads). A block inside another on the
    same thread uses the outer block's connection: it sees that transaction's writes.
    Writes are ``BEGIN IMMEDIATE`` transactions: a writer takes the lock up front, waiting at
    most ``busy_timeout_seconds`` for another writer, instead of failing half-way through.
    Opening the store creates the file (mode 0600) and applies pending schema migrations.

    Mailboxes are stored in their normalised address form, like group addresses. Call
    ``close()`` only after the threads using the store have stopped.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS,
        idle_connections: int = IDLE_CONNECTIONS,
    ) -> None:
        self.path = path
        self._busy_timeout_seconds = busy_timeout_seconds
        self._idle_cap = idle_connections
        # The connections not in use, most recently returned last (its cache is warmest).
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        # The connection this thread has checked out, and whether it must be closed, not
        # returned, when its outermost block ends.
        self._local = threading.local()
        self._timeline = SqlTimeline(self)
        self._tokens = SqlTokens(self)
        self._registry = SqlRegistry(self, scrub=self._scrub)
        _create_private_file(path)
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- recording events (the other shared methods: emailsync.state.sqlstate) ------------

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """Record events in one transaction; return how many were new.

        Idempotent on ``(group, message_key)``: recording an existing pair links the event's
        ``mailbox`` (and any ``mailboxes``) to the stored event and creates no new event.
        Every group must exist; otherwise ``StoreError`` and nothing is recorded.
        """
        return self._timeline.record_events(events)

    def record_events_checked(self, events: Sequence[TimelineEvent]) -> Recorded:
        """``record_events``; the built-in store never refuses an event."""
        return Recorded(new=self.record_events(events))

    # -- the registry's scrub (its statements: emailsync.state.sqlstate, registry_sql) -----

    def _scrub(self) -> None:
        """Move the WAL into the file and truncate it, so a replaced secret's old pages go.

        With ``secure_delete`` on, SQLite zeroes freed content in the database file; the WAL
        still holds the old page images until a checkpoint. Best effort: a reader holding a
        snapshot makes the checkpoint partial, and the next write retries.
        """
        with self._checkout() as conn, _translated(self.path, "checkpoint"):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- connections ----------------------------------------------------------------------

    # For the SQL written once for both engines (emailsync.state.failedindex.SqlEngine).
    param_marker = "?"

    def transaction(self, doing: str) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``), committed when the block ends."""
        return self._transaction(doing)

    @contextmanager
    def reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A connection for reads; each statement is one consistent snapshot."""
        with self._checkout() as conn, _translated(self.path, doing):
            yield conn

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The built-in store has no metrics of its own."""

    def close(self) -> None:
        """Close the pooled connections; later uses raise ``StoreError``.

        A connection still checked out is closed when its block ends.
        """
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def _checkout(self) -> Iterator[sqlite3.Connection]:
        """A connection for the block: this thread's current one inside another block, else
        one from the pool (or a new one), given back when the block ends."""
        held: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        conn = self._take()
        self._local.conn = conn
        self._local.broken = False
        try:
            yield conn
        finally:
            broken = self._local.broken or conn.in_transaction
            self._local.conn = None
            self._give_back(conn, broken=broken)

    def _take(self) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StoreError(f"store {self.path}: already closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give_back(self, conn: sqlite3.Connection, *, broken: bool) -> None:
        """Keep ``conn`` for the next block, unless it is broken, the pool is full or closed."""
        with self._pool_lock:
            if not broken and not self._closed and len(self._idle) < self._idle_cap:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        with _translated(self.path, "open database"):
            # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
            # check_same_thread=False: a pooled connection serves one thread after another.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_seconds,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                # Zero deleted content (an erased password's ciphertext) instead of leaving it
                # in free pages: https://sqlite.org/pragma.html#pragma_secure_delete
                conn.execute("PRAGMA secure_delete = ON")
                # FULL, not the WAL-usual NORMAL: an event must survive power loss once
                # committed, because the message is moved out of Queue right after.
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error:
                conn.close()
                raise
        return conn

    def _discard_connection(self) -> None:
        """Close this thread's connection, not return it, when its outermost block ends:
        it failed in a way we cannot undo."""
        self._local.broken = True

    @contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._checkout() as conn:
            try:
                with _translated(self.path, doing):
                    conn.execute("BEGIN IMMEDIATE")
                    yield conn
                    conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # The connection's state is unknown: never reuse it.
                        self._discard_connection()

    def _query(self, doing: str, sql: str, params: Sequence[object]) -> list[Any]:
        """All rows of one read statement (one statement is one consistent snapshot)."""
        with self._checkout() as conn, _translated(self.path, doing):
            return conn.execute(sql, params).fetchall()

    # -- schema -----------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Apply the schema files newer than the file's ``PRAGMA user_version``, atomically."""
        with self._checkout() as conn, _translated(self.path, "enable WAL"):
            # Persistent in the file: readers never wait for the writer, nor it for them.
            conn.execute("PRAGMA journal_mode = WAL")
        # One transaction for the check and the changes, so two processes opening a fresh
        # file at once cannot both migrate it.
        with self._transaction("migrate schema") as txn:
            (current,) = txn.execute("PRAGMA user_version").fetchone()
            for version, name, script in migrations_after("schema", current, f"store {self.path}"):
                with _translated(self.path, f"apply migration {name}"):
                    for statement in _statements(script):
                        txn.execute(statement)
                    # PRAGMA takes no bound parameters; version is an int from a file name.
                    txn.execute(f"PRAGMA user_version = {version:d}")


@contextmanager
def _translated(path: Path, doing: str) -> Iterator[None]:
    """Turn sqlite3 errors into StoreUnavailableError (retry later) or StoreError."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        message = f"store {path}: {doing}: {exc}"
        if code is not None and (code & _PRIMARY_CODE_MASK) in _UNAVAILABLE_CODES:
            raise StoreUnavailableError(message) from exc
        raise StoreError(message) from exc


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 (and a missing directory 0700) before SQLite opens it.

    SQLite would create it with the umask's mode; its -wal and -shm files copy the mode of
    the database file, so they end up private too.
    """
    try:
        path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        # O_RDONLY: creating needs no write access to an existing file (a read-only CLI).
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, DB_FILE_MODE)
        os.close(fd)
    except PermissionError as exc:
        raise StoreUnavailableError(
            f"store {path}: cannot open the database file: {exc.strerror}; "
            + access_hint(path, path.parent)
        ) from exc
    except OSError as exc:
        raise StoreUnavailableError(f"store {path}: cannot create database file: {exc}") from exc


def _statements(script: str) -> Iterator[str]:
    """Split a SQL script into statements, leaving ``;`` inside strings and triggers alone.

    ``executescript`` would do this, but it commits first, which would break the migration
    transaction.
    """
    start = 0
    for index, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : index + 1]):
            yield script[start : index + 1]
            start = index + 1
    rest = script[start:]
    # Whatever follows the last ';' must be comments or blank, not a forgotten statement.
    if _has_code(rest):
        raise StoreError(f"store: migration ends in a statement without ';': {rest.strip()!r}")


def _has_code(sql: str) -> bool:
    """True when ``sql`` holds anything besides whitespace and ``--`` comments."""
    return any(line.strip() and not line.strip().startswith("--") for line in sql.splitlines())
