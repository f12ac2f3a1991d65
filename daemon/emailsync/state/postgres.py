"""PostgresStore: the timeline store in PostgreSQL, shared by several emailsync instances.

Same protocol, schema and semantics as ``SqliteStore`` (groups, events idempotent on
``(group, message key)``, every filing mailbox listed); numbered migrations from
``schema_pg/`` run on open under an advisory lock, so instances starting together never
migrate at once. Writes for a leased mailbox can carry a ``Fence`` that is checked in the
same transaction (``emailsync.cluster.lease``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry

from emailsync.model import Fence, TimelineEvent
from emailsync.state.base import Recorded
from emailsync.state.pgtranslate import translated
from emailsync.state.registry_sql import SqlRegistry
from emailsync.state.sqlcore import migrations_after
from emailsync.state.sqlstate import SqlStateMethods
from emailsync.state.timeline_sql import SqlTimeline
from emailsync.state.tokens_sql import SqlTokens

# Connections per process: one per busy worker would be too many for 20,000 mailboxes;
# store calls are short, so a few connections serve every worker thread in turn.
POOL_MAX_SIZE = 8
# How long a call waits for a pooled connection (or the first connection at open).
CONNECT_TIMEOUT_SECONDS = 5.0
# The advisory lock key that serialises migrations across instances ("emailsync" in ASCII).
MIGRATION_LOCK_KEY = 0x656D61696C73796E
# How long a store statement may run before it is cancelled (a stuck lock is an outage).
STATEMENT_TIMEOUT_MS = 30_000


class PostgresStore(SqlStateMethods):
    """The timeline store in a PostgreSQL database, shared by threads and by instances.

    Connections come from a small pool; each call is one transaction. Opening the store
    connects (``StoreUnavailableError`` if the server cannot be reached within
    ``connect_timeout_seconds``) and applies pending migrations.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = POOL_MAX_SIZE,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self._url = url
        self._timeout = connect_timeout_seconds
        self._timeline = SqlTimeline(self)
        self._tokens = SqlTokens(self)
        self._registry = SqlRegistry(self)
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=connect_timeout_seconds,
            kwargs={
                "connect_timeout": max(1, round(connect_timeout_seconds)),
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            },
            # A connection the server dropped (restart, admin shutdown) is replaced on
            # checkout instead of failing the next call.
            check=psycopg_pool.ConnectionPool.check_connection,
            open=False,
            name="emailsync-store",
        )
        try:
            with translated("open database"):
                self.pool.open(wait=True, timeout=connect_timeout_seconds)
            self._migrate()
        except BaseException:
            self.close()
            raise

    # -- recording events (the other shared methods: emailsync.state.sqlstate) ------------

    def record_events(self, events: Sequence[TimelineEvent], *, fence: Fence | None = None) -> int:
        """Record events in one transaction; return how many were new.

        Idempotent on ``(group, message_key)``: recording an existing pair links the event's
        ``mailbox`` (and any ``mailboxes``) to the stored event and creates no new event.
        Every group must exist; otherwise ``StoreError`` and nothing is recorded. With a
        ``fence``, the lease is checked in the same transaction: ``LeaseLostError`` and
        nothing recorded when this instance no longer holds it with that generation.
        """
        return self._timeline.record_events(events, fence=fence)

    def check_fence(self, fence: Fence) -> None:
        """Raise ``LeaseLostError`` unless this instance still holds the lease ``fence`` names."""
        self._timeline.check_fence(fence)

    def record_events_checked(
        self, events: Sequence[TimelineEvent], *, fence: Fence | None = None
    ) -> Recorded:
        """``record_events`` (fence included); this store never refuses a single event."""
        return Recorded(new=self.record_events(events, fence=fence))

    # -- connections ----------------------------------------------------------------------

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The PostgreSQL store has no metrics of its own (the lease keeper registers its own)."""

    def close(self) -> None:
        """Close the pool; later calls raise ``StoreError``."""
        self.pool.close()

    # For the SQL written once for both engines (emailsync.state.failedindex.SqlEngine).
    param_marker = "%s"

    def reading(self, doing: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection for reads (a transaction, like every call here)."""
        return self.transaction(doing)

    @contextmanager
    def transaction(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction: committed when the block ends, else rolled back.

        psycopg errors inside the block are translated (``emailsync.state.pgtranslate``).
        """
        with translated(doing), self.pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def own_transaction(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """A new connection outside the pool, in a transaction, closed when the block ends.

        For a lock held while the block runs statements of its own: a pooled connection held
        that long could leave none for them.
        """
        with (
            translated(doing),
            psycopg.connect(
                self._url,
                connect_timeout=max(1, round(self._timeout)),
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="emailsync-lock",
            ) as conn,
            conn.transaction(),
        ):
            yield conn

    def listen_connection(self, application_name: str = "") -> psycopg.Connection[Any]:
        """A new autocommit connection outside the pool, for ``LISTEN`` (close it when done).

        ``application_name`` names it in ``pg_stat_activity`` (which instance listens there).
        Raises psycopg errors untranslated: the listener owns its reconnect loop.
        """
        return psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=max(1, round(self._timeout)),
            application_name=application_name,
        )

    # -- schema -----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version the database is at."""
        with self.transaction("read schema version") as conn:
            row = conn.execute("SELECT max(version) FROM emailsync_schema").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _migrate(self) -> None:
        """Apply the ``schema_pg/`` files newer than the database's version, atomically.

        The advisory lock is the cluster-wide mutex: a second instance waits for the first
        to finish and then finds nothing to do.
        """
        with self.transaction("migrate schema") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS emailsync_schema ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT max(version) FROM emailsync_schema").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            for version, name, script in migrations_after(
                "schema_pg", current, "store (postgresql)"
            ):
                with translated(f"apply migration {name}"):
                    conn.execute(script.encode())
                    conn.execute("INSERT INTO emailsync_schema (version) VALUES (%s)", (version,))
