"""The registry's SQL (``Registry``), written once for SQLite and PostgreSQL.

Branches and mailboxes registered at run time (the API, the self-service pages), their
encrypted secrets (``emailsync.state.vault``), Stop Email Sync of the config file's mailboxes
(``mailbox_stops``) and the per-mailbox lock that serialises set-up, forget and a sign-in's
finish (``mailbox_locks``). ``SqlRegistry`` runs these on a ``SqlEngine``.

Erasing a secret: the row goes (or its ``secret`` becomes NULL). In SQLite, ``secure_delete``
zeroes the freed bytes in the file and the store's ``scrub`` (a WAL checkpoint that
truncates) takes the old page images out of the WAL. In PostgreSQL the secret is gone from the
table at once: no query sees it; the dead tuple's bytes stay in the table's file until
(auto)VACUUM reuses the space, like every deleted row there.

In PostgreSQL every change is announced in its own transaction with ``NOTIFY`` on
``emailsync_registry`` (payload: the address; empty for "re-read everything", a branch
change), so every instance of a cluster re-reads that mailbox's rows at once
(``emailsync.cluster.membership``). The rows are the truth, the notification only a wake-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from emailsync.state.base import RegisteredBranch, RegisteredMailbox
from emailsync.state.sqlcore import SqlEngine, dialect_of, to_iso

# PostgreSQL: the channel that tells every instance a registry row changed.
REGISTRY_CHANNEL = "emailsync_registry"
EVERYTHING = ""  # the payload of a change that concerns every mailbox (a branch)

_BRANCH_EXISTS = "SELECT 1 FROM registered_branches WHERE name = ?"
_PUT_BRANCH = (
    "INSERT INTO registered_branches (name, host, port, security, ca_file, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET host = excluded.host,"
    " port = excluded.port, security = excluded.security,"
    " ca_file = excluded.ca_file, updated_at = excluded.updated_at"
)
_BRANCHES = "SELECT name, host, port, security, ca_file FROM registered_branches ORDER BY name {C}"
_PUT_MAILBOX = (
    "INSERT INTO registered_mailboxes"
    " (address, branch, auth, username, secret, stopped, updated_at, trigger)"
    " VALUES (?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (address) DO UPDATE SET"
    " branch = excluded.branch, auth = excluded.auth, username = excluded.username,"
    " secret = excluded.secret, stopped = 0, updated_at = excluded.updated_at,"
    " trigger = excluded.trigger"
)
_MAILBOX_COLUMNS = (
    "SELECT address, branch, auth, username, secret IS NOT NULL, stopped, trigger, updated_at"
    " FROM registered_mailboxes"
)
_MAILBOXES = _MAILBOX_COLUMNS + " ORDER BY address {C}"
_MAILBOX = _MAILBOX_COLUMNS + " WHERE address = ?"
_READ_SECRET = "SELECT secret FROM registered_mailboxes WHERE address = ?"  # noqa: S105 -- SQL
_REMOVE = "DELETE FROM registered_mailboxes WHERE address = ?"
_SECRETS = "SELECT address, secret FROM registered_mailboxes WHERE secret IS NOT NULL"
_RESEAL = "UPDATE registered_mailboxes SET secret = ? WHERE address = ?"
_STOP = (
    "INSERT INTO mailbox_stops (address, stopped_at) VALUES (?, ?) ON CONFLICT (address) DO NOTHING"
)
_UNSTOP = "DELETE FROM mailbox_stops WHERE address = ?"
_STOPS = "SELECT address FROM mailbox_stops"
_IS_STOPPED = "SELECT 1 FROM mailbox_stops WHERE address = ?"
_NOTIFY = "SELECT pg_notify(?, ?)"
_LOCK_ROW = "INSERT INTO mailbox_locks (address) VALUES (?) ON CONFLICT (address) DO NOTHING"
_LOCK = "SELECT address FROM mailbox_locks WHERE address = ? FOR UPDATE"


class LockingEngine(SqlEngine, Protocol):
    """An engine that can hold a transaction on a connection of its own (PostgreSQL)."""

    def own_transaction(self, doing: str) -> AbstractContextManager[Any]:
        """A connection outside the shared ones, in a transaction, closed when done."""
        ...


class SqlRegistry:
    """The ``Registry`` methods on a SQL engine; each one statement or one transaction.

    ``scrub`` runs after a secret was replaced or erased (SQLite: the WAL checkpoint).
    """

    def __init__(self, engine: SqlEngine, *, scrub: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.dialect = dialect_of(engine)
        self._scrub = scrub
        # SQLite (one host, one daemon process writes the registry): per-address locks here.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- branches ---------------------------------------------------------------------------

    def put_branch(self, branch: RegisteredBranch) -> bool:
        """Create or replace a branch; True when it is new."""
        sql = self.dialect.sql
        with self.engine.transaction("register branch") as conn:
            new = conn.execute(sql(_BRANCH_EXISTS), (branch.name,)).fetchone() is None
            conn.execute(
                sql(_PUT_BRANCH),
                (branch.name, branch.host, branch.port, branch.security, branch.ca_file, _now()),
            )
            self._notify(conn, EVERYTHING)
        return new

    def registered_branches(self) -> list[RegisteredBranch]:
        """Every registered branch, by name."""
        with self.engine.reading("list branches") as conn:
            rows = conn.execute(self.dialect.sql(_BRANCHES)).fetchall()
        return [RegisteredBranch(*row) for row in rows]

    # -- mailboxes --------------------------------------------------------------------------

    def put_mailbox(self, mailbox: RegisteredMailbox, secret: bytes | None) -> None:
        """Create or replace a mailbox with its encrypted secret; it is not stopped after."""
        with self.engine.transaction("register mailbox") as conn:
            conn.execute(
                self.dialect.sql(_PUT_MAILBOX),
                (
                    mailbox.address,
                    mailbox.branch,
                    mailbox.auth,
                    mailbox.username,
                    secret,
                    _now(),
                    mailbox.trigger,
                ),
            )
            self._notify(conn, mailbox.address)
        self._scrub()

    def registered_mailboxes(self) -> list[RegisteredMailbox]:
        """Every registered mailbox, by address (no secrets)."""
        with self.engine.reading("list mailboxes") as conn:
            rows = conn.execute(self.dialect.sql(_MAILBOXES)).fetchall()
        return [_mailbox(row) for row in rows]

    def registered_mailbox(self, address: str) -> RegisteredMailbox | None:
        """One registered mailbox (no secret), or None."""
        with self.engine.reading("read mailbox") as conn:
            row = conn.execute(self.dialect.sql(_MAILBOX), (address,)).fetchone()
        return None if row is None else _mailbox(row)

    def mailbox_secret(self, address: str) -> bytes | None:
        """The encrypted secret of a registered mailbox, or None."""
        with self.engine.reading("read secret") as conn:
            row = conn.execute(self.dialect.sql(_READ_SECRET), (address,)).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def remove_mailbox(self, address: str) -> bool:
        """Forget a registered mailbox and its secret for good; False when not registered."""
        with self.engine.transaction("remove mailbox") as conn:
            changed = conn.execute(self.dialect.sql(_REMOVE), (address,)).rowcount
            self._notify(conn, address)
        self._scrub()
        return bool(changed)

    def reencrypt_secrets(self, convert: Callable[[bytes, str], bytes]) -> int:
        """Rewrite every secret with ``convert(blob, address)`` in one transaction."""
        sql = self.dialect.sql
        with self.engine.transaction("re-encrypt secrets") as conn:
            rows: Sequence[Any] = conn.execute(sql(_SECRETS)).fetchall()
            for address, blob in rows:
                conn.execute(sql(_RESEAL), (convert(bytes(blob), address), address))
        self._scrub()
        return len(rows)

    # -- Stop Email Sync of the config file's mailboxes -------------------------------------

    def record_stop(self, address: str) -> None:
        """Stop Email Sync for a mailbox: it stays stopped, on every instance, until
        ``clear_stop`` (First Time Setup). A stop recorded before keeps its first time."""
        with self.engine.transaction("record stop") as conn:
            conn.execute(self.dialect.sql(_STOP), (address, time.time()))
            self._notify(conn, address)

    def clear_stop(self, address: str) -> bool:
        """The mailbox may run again; False when it was not stopped."""
        with self.engine.transaction("clear stop") as conn:
            changed = conn.execute(self.dialect.sql(_UNSTOP), (address,)).rowcount
            self._notify(conn, address)
        return bool(changed)

    def stopped_mailboxes(self) -> set[str]:
        """Every mailbox Stop Email Sync holds stopped."""
        with self.engine.reading("list stops") as conn:
            return {row[0] for row in conn.execute(self.dialect.sql(_STOPS)).fetchall()}

    def is_stopped(self, address: str) -> bool:
        """Whether Stop Email Sync holds this mailbox stopped."""
        with self.engine.reading("read stop") as conn:
            return conn.execute(self.dialect.sql(_IS_STOPPED), (address,)).fetchone() is not None

    # -- the per-mailbox lock ----------------------------------------------------------------

    def mailbox_lock(self, address: str) -> AbstractContextManager[None]:
        """Hold the mailbox's lock for the block: set-up, forget and a sign-in's finish of one
        mailbox never interleave.

        PostgreSQL: its ``mailbox_locks`` row, ``SELECT … FOR UPDATE`` in a transaction held
        for the block on a connection of its own (so the block's own statements never wait
        for a pooled one), across every instance. SQLite: a lock in this process. The file
        belongs to one host and one daemon, the only process that registers or forgets
        mailboxes; a write transaction held that long would stall every worker's events.
        """
        if self.dialect.postgres:
            return self._row_lock(address)
        with self._locks_lock:
            lock = self._locks.setdefault(address, threading.Lock())
        return _holding(lock)

    @contextmanager
    def _row_lock(self, address: str) -> Iterator[None]:
        engine = self.engine
        if not hasattr(engine, "own_transaction"):
            raise TypeError("a PostgreSQL engine holds row locks on a connection of its own")
        sql = self.dialect.sql
        with engine.own_transaction("lock mailbox") as conn:
            conn.execute(sql(_LOCK_ROW), (address,))
            conn.execute(sql(_LOCK), (address,))
            yield

    def _notify(self, conn: Any, payload: str) -> None:
        if self.dialect.postgres:
            conn.execute(self.dialect.sql(_NOTIFY), (REGISTRY_CHANNEL, payload))


@contextmanager
def _holding(lock: threading.Lock) -> Iterator[None]:
    with lock:
        yield


def _mailbox(row: Sequence[Any]) -> RegisteredMailbox:
    address, branch, auth, username, has_secret, stopped, trigger, updated_at = row
    return RegisteredMailbox(
        address, branch, auth, username, bool(has_secret), bool(stopped), trigger, updated_at
    )


def _now() -> str:
    return to_iso(datetime.now(UTC))
