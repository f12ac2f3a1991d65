"""PostgresStore: the timeline store in PostgreSQL, shared by several emailsync instances.

Same protocol, schema and semantics as ``SqliteStore`` (groups, events idempotent on
``(group, message key)``, every filing mailbox listed); numbered migrations from
``schema_pg/`` run on open under an advisory lock, so instances starting together never
migrate at once. Writes for a leased mailbox can carry a ``Fence`` that is checked in the
same transaction (``emailsync.lease``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry
from psycopg.types.json import Jsonb

from emailsync.errors import LeaseLostError, StoreError
from emailsync.model import Attachment, Direction, Fence, Group, TimelineEvent
from emailsync.store.base import IssuedToken, Recorded
from emailsync.store.failedindex import LINK_CHANGE, record_link_changes
from emailsync.store.pgtranslate import translated
from emailsync.store.rows import (
    EventsQuery,
    TokenSql,
    checked_address,
    checked_group_name,
    event_links,
    groups_from_rows,
    mailbox_key,
    newest_first,
    via_from_rows,
)

# Connections per process: one per busy worker would be too many for 20,000 mailboxes;
# store calls are short, so a few connections serve every worker thread in turn.
POOL_MAX_SIZE = 8
# How long a call waits for a pooled connection (or the first connection at open).
CONNECT_TIMEOUT_SECONDS = 5.0
# The advisory lock key that serialises migrations across instances ("emailsync" in ASCII).
MIGRATION_LOCK_KEY = 0x656D61696C73796E
# How long a store statement may run before it is cancelled (a stuck lock is an outage).
STATEMENT_TIMEOUT_MS = 30_000

_GROUP_IDS_BY_NAME = "SELECT name, id FROM groups WHERE name = ANY(%s)"
_INSERT_GROUP = "INSERT INTO groups (name) VALUES (%s) ON CONFLICT (name) DO NOTHING"
_INSERT_LINK = (
    "INSERT INTO group_addresses (group_id, address) VALUES (%s, %s)"
    " ON CONFLICT (group_id, address) DO NOTHING"
)
_GROUPS_FOR_ADDRESSES = """
    WITH matched AS (
        SELECT DISTINCT group_id FROM group_addresses WHERE address = ANY(%s)
    )
    SELECT g.name, a.address
    FROM matched
    JOIN groups AS g ON g.id = matched.group_id
    JOIN group_addresses AS a ON a.group_id = g.id
    ORDER BY g.name COLLATE "C", a.address COLLATE "C"
"""
_ALL_GROUPS = """
    SELECT g.name, a.address
    FROM groups AS g LEFT JOIN group_addresses AS a ON a.group_id = g.id
    ORDER BY g.name COLLATE "C", a.address COLLATE "C"
"""
_INSERT_EVENT = """
    INSERT INTO timeline_events (
        group_id, message_key, direction, mailbox, message_id, subject, from_, to_, cc,
        date, body_text, attachments, size, filed_at, body_truncated
    ) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (group_id, message_key) DO NOTHING
"""
# A mailbox linked before its direction was kept (schema 4) gets it now.
_LINK_EVENT_MAILBOX = """
    INSERT INTO event_mailboxes (event_id, mailbox, direction)
    SELECT id, %s, %s FROM timeline_events WHERE group_id = %s AND message_key = %s
    ON CONFLICT (event_id, mailbox) DO UPDATE SET direction = excluded.direction
    WHERE event_mailboxes.direction IS NULL
"""
_EVENTS = EventsQuery(
    select="""
    SELECT g.name, e.direction, e.mailbox, e.message_key, e.message_id, e.subject, e.from_,
           e.to_, e.cc, e.date, e.body_text, e.attachments, e.size, e.filed_at,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(m.mailbox, m.direction)), '[]')
            FROM event_mailboxes AS m WHERE m.event_id = e.id) AS via,
           e.body_truncated
    FROM timeline_events AS e JOIN groups AS g ON g.id = e.group_id
""",
    where_group="g.name = %s",
    where_mailbox=(
        "EXISTS (SELECT 1 FROM event_mailboxes AS f WHERE f.event_id = e.id AND f.mailbox = %s)"
    ),
    order_and_limit=" ORDER BY e.filed_at DESC, e.id DESC LIMIT %s",
    no_limit=None,  # LIMIT NULL means no limit in PostgreSQL
)
_TOKEN_SQL = TokenSql.for_engine("%s")
# The fence holds while the lease row names us with this generation and has not expired.
# FOR SHARE keeps a claimer (FOR UPDATE SKIP LOCKED) off the row until we commit.
_CHECK_FENCE = """
    SELECT 1 FROM mailbox_leases
    WHERE mailbox = %s AND owner = %s AND generation = %s AND expires_at > now()
    FOR SHARE
"""


class PostgresStore:
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

    # -- groups -------------------------------------------------------------------------

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """Groups linked to any of the (normalised) addresses, each once, ordered by name.

        Each ``Group.addresses`` holds all addresses of the group, not only the matched ones.
        Addresses are compared case-insensitively.
        """
        wanted = sorted({address.strip().lower() for address in addresses})
        if not wanted:
            return []
        with self.transaction("look up groups") as conn:
            rows = conn.execute(_GROUPS_FOR_ADDRESSES, (wanted,)).fetchall()
        return groups_from_rows(rows)

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """Create the group, or extend it, with the addresses; return it with all addresses.

        Raises ``ValueError`` naming the first name or address that is not valid; nothing is
        written then.
        """
        name = checked_group_name(name)
        normalised = sorted({checked_address(address) for address in addresses})
        with self.transaction("add group") as conn:
            conn.execute(_INSERT_GROUP, (name,))
            ids = dict(conn.execute(_GROUP_IDS_BY_NAME, ([name],)).fetchall())
            with conn.cursor() as cur:
                cur.executemany(_INSERT_LINK, [(ids[name], address) for address in normalised])
            # Their mail in Failed comes back (issue 22): logged with the link, one commit.
            record_link_changes(conn, normalised, LINK_CHANGE, marker="%s", now=time.time())
            rows = conn.execute(
                "SELECT address FROM group_addresses WHERE group_id = %s"
                ' ORDER BY address COLLATE "C"',
                (ids[name],),
            ).fetchall()
        return Group(name=name, addresses=tuple(address for (address,) in rows))

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """Link ``(group, address)`` rows, creating groups as needed; return new links.

        Raises ``ValueError`` naming the first row that is not valid; nothing is written then.
        """
        links: list[tuple[str, str]] = []
        for number, (group, address) in enumerate(rows, start=1):
            try:
                links.append((checked_group_name(group), checked_address(address)))
            except ValueError as exc:
                raise ValueError(f"row {number}: {exc}") from None
        if not links:
            return 0
        names = sorted({name for name, _ in links})
        unique_links = sorted(set(links))
        with self.transaction("import groups") as conn:
            with conn.cursor() as cur:
                cur.executemany(_INSERT_GROUP, [(name,) for name in names])
            ids = dict(conn.execute(_GROUP_IDS_BY_NAME, (names,)).fetchall())
            new_links = 0
            for name, address in unique_links:
                cursor = conn.execute(_INSERT_LINK, (ids[name], address))
                new_links += max(cursor.rowcount, 0)
            record_link_changes(
                conn, [a for _, a in unique_links], LINK_CHANGE, marker="%s", now=time.time()
            )
            return new_links

    def list_groups(self) -> list[Group]:
        """Every group with all its addresses, ordered by name."""
        with self.transaction("list groups") as conn:
            return groups_from_rows(conn.execute(_ALL_GROUPS).fetchall())

    # -- timeline -----------------------------------------------------------------------

    def record_events(self, events: Sequence[TimelineEvent], *, fence: Fence | None = None) -> int:
        """Record events in one transaction; return how many were new.

        Idempotent on ``(group, message_key)``: recording an existing pair links the event's
        ``mailbox`` (and any ``mailboxes``) to the stored event and creates no new event.
        Every group must exist; otherwise ``StoreError`` and nothing is recorded. With a
        ``fence``, the lease is checked in the same transaction: ``LeaseLostError`` and
        nothing recorded when this instance no longer holds it with that generation.
        """
        if not events and fence is None:
            return 0
        # Inserting in key order makes concurrent batches that overlap take their row locks
        # in the same order, so they wait for each other instead of deadlocking.
        ordered = sorted(events, key=lambda e: (e.group, e.message_key))
        columns = [_event_columns(event) for event in ordered]
        mailbox_links = sorted(
            {
                (mailbox, direction, event.group, event.message_key)
                for event in ordered
                for mailbox, direction in event_links(event).items()
            },
            key=lambda link: (link[2], link[3], link[0], link[1] or ""),
        )
        names = sorted({event.group for event in ordered})
        with self.transaction("record events") as conn:
            if fence is not None:
                self._check_fence(conn, fence)
            if not events:
                return 0
            ids: dict[str, int] = dict(conn.execute(_GROUP_IDS_BY_NAME, (names,)).fetchall())
            missing = [name for name in names if name not in ids]
            if missing:
                raise StoreError(f"store: cannot record events for unknown group(s) {missing}")
            new_events = 0
            for event, row in zip(ordered, columns, strict=True):
                cursor = conn.execute(_INSERT_EVENT, (ids[event.group], *row))
                new_events += max(cursor.rowcount, 0)
            with conn.cursor() as cur:
                cur.executemany(
                    _LINK_EVENT_MAILBOX,
                    [(mailbox, way, ids[group], key) for mailbox, way, group, key in mailbox_links],
                )
        return new_events

    def check_fence(self, fence: Fence) -> None:
        """Raise ``LeaseLostError`` unless this instance still holds the lease ``fence`` names."""
        with self.transaction("check lease") as conn:
            self._check_fence(conn, fence)

    @staticmethod
    def _check_fence(conn: psycopg.Connection[Any], fence: Fence) -> None:
        row = conn.execute(_CHECK_FENCE, (fence.mailbox, fence.owner, fence.generation)).fetchone()
        if row is None:
            raise LeaseLostError(
                f"lease on {fence.mailbox} (generation {fence.generation}) is no longer held"
                f" by {fence.owner}"
            )

    def record_events_checked(
        self, events: Sequence[TimelineEvent], *, fence: Fence | None = None
    ) -> Recorded:
        """``record_events`` (fence included); this store never refuses a single event."""
        return Recorded(new=self.record_events(events, fence=fence))

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` filled in (sorted).

        ``group`` keeps one group's events, ``mailbox`` the events that mailbox filed (first
        or later); ``limit`` caps how many are returned.
        """
        sql, params = _EVENTS.build(group=group, mailbox=mailbox, limit=limit)
        with self.transaction("list events") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_event_from_row(row) for row in rows]

    # -- agent tokens (the TokenLedger protocol) ------------------------------------------
    # Here, not in a file of each instance: a token revoked on one host must stop working on
    # every instance of the cluster at once, and tokens issued anywhere are listed together.

    def record_token(self, token: IssuedToken) -> None:
        """Record a token; an id recorded before keeps its first row."""
        with self.transaction("record agent token") as conn:
            conn.execute(
                _TOKEN_SQL.insert,
                (
                    token.id,
                    token.address,
                    token.issued_at,
                    token.issued_by,
                    token.expires_at,
                    token.last_used_at,
                    token.revoked_at,
                ),
            )

    def issued_token(self, token_id: str) -> IssuedToken | None:
        """The token with this id, or None."""
        with self.transaction("read agent token") as conn:
            row = conn.execute(_TOKEN_SQL.by_id, (token_id,)).fetchone()
        return None if row is None else _token_from_row(row)

    def issued_tokens(self) -> list[IssuedToken]:
        """Every token recorded, newest first (the es1 rows last)."""
        with self.transaction("list agent tokens") as conn:
            rows = conn.execute(_TOKEN_SQL.every).fetchall()
        return newest_first(_token_from_row(row) for row in rows)

    def revoke_tokens(
        self, at: datetime, *, token_id: str | None = None, address: str | None = None
    ) -> list[IssuedToken]:
        """Revoke the token with this id, or every token of this address; the tokens named."""
        by_id, value = TokenSql.revocation(token_id, address)
        with self.transaction("revoke agent tokens") as conn:
            revoke = _TOKEN_SQL.revoke_id if by_id else _TOKEN_SQL.revoke_address
            conn.execute(revoke, (at, value))
            select = _TOKEN_SQL.by_id if by_id else _TOKEN_SQL.by_address
            rows = conn.execute(select, (value,)).fetchall()
        return newest_first(_token_from_row(row) for row in rows)

    def revoke_all_tokens(self, at: datetime) -> int:
        """Revoke every token not revoked yet; how many."""
        with self.transaction("revoke agent tokens") as conn:
            cursor = conn.execute(_TOKEN_SQL.revoke_all, (at,))
        return cursor.rowcount

    def token_used(self, token_id: str, at: datetime) -> None:
        """Record the token's last use."""
        with self.transaction("record agent token use") as conn:
            conn.execute(_TOKEN_SQL.used, (at, token_id))

    # -- connections ----------------------------------------------------------------------

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The PostgreSQL store has no metrics of its own (the lease keeper registers its own)."""

    def close(self) -> None:
        """Close the pool; later calls raise ``StoreError``."""
        self.pool.close()

    # For the SQL written once for both engines (emailsync.store.failedindex.SqlEngine).
    param_marker = "%s"

    def reading(self, doing: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection for reads (a transaction, like every call here)."""
        return self.transaction(doing)

    @contextmanager
    def transaction(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction: committed when the block ends, else rolled back.

        psycopg errors inside the block are translated (``emailsync.store.pgtranslate``).
        """
        with translated(doing), self.pool.connection() as conn, conn.transaction():
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
        migrations = _migrations()
        latest = migrations[-1][0]
        with self.transaction("migrate schema") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS emailsync_schema ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT max(version) FROM emailsync_schema").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > latest:
                raise StoreError(
                    f"store (postgresql): schema version {current} is newer than this "
                    f"emailsync knows ({latest}); upgrade emailsync"
                )
            for version, name, script in migrations:
                if version <= current:
                    continue
                with translated(f"apply migration {name}"):
                    conn.execute(script.encode())
                    conn.execute("INSERT INTO emailsync_schema (version) VALUES (%s)", (version,))


@functools.cache
def _migrations() -> tuple[tuple[int, str, str], ...]:
    """The ``(version, file name, SQL)`` of every ``schema_pg/NNN_name.sql``, by version."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("emailsync.store").joinpath("schema_pg").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number = entry.name.split("_", 1)[0]
        if not number.isdigit():
            raise StoreError(f"store: migration {entry.name!r} does not start with a number")
        found.append((int(number), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [version for version, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"store: migrations must be numbered 1, 2, 3... found {versions}")
    return tuple(found)


def _token_from_row(row: Sequence[Any]) -> IssuedToken:
    token_id, address, issued_at, issued_by, *times = row
    issued, expires, used, revoked = (
        None if t is None else t.astimezone(UTC) for t in (issued_at, *times)
    )
    return IssuedToken(token_id, address, issued, issued_by, expires, used, revoked)


def _utc(moment: datetime) -> datetime:
    """Naive means UTC, as in SqliteStore."""
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment


def _event_columns(event: TimelineEvent) -> tuple[object, ...]:
    """The event's columns after ``group_id``, in ``_INSERT_EVENT`` order."""
    attachments = [
        {"filename": a.filename, "content_type": a.content_type, "size": a.size}
        for a in event.attachments
    ]
    return (
        event.message_key,
        event.direction.value,
        mailbox_key(event.mailbox),
        event.message_id,
        event.subject,
        event.from_,
        event.to,
        event.cc,
        None if event.date is None else _utc(event.date),
        event.body_text,
        Jsonb(attachments),
        event.size,
        _utc(event.filed_at),
        event.body_truncated,
    )


def _event_from_row(row: Sequence[Any]) -> TimelineEvent:
    (name, direction, mailbox, key, message_id, subject, from_, to, cc, date, body) = row[:11]
    attachments, size, filed_at, via_rows, body_truncated = row[11:]
    via = via_from_rows(json.loads(via_rows) if isinstance(via_rows, str) else via_rows)
    if isinstance(attachments, str):
        attachments = json.loads(attachments)
    return TimelineEvent(
        group=name,
        direction=Direction(direction),
        mailbox=mailbox,
        message_key=key,
        message_id=message_id,
        subject=subject,
        from_=from_,
        to=to,
        cc=cc,
        date=None if date is None else date.astimezone(UTC),
        body_text=body,
        attachments=tuple(
            Attachment(filename=a["filename"], content_type=a["content_type"], size=a["size"])
            for a in attachments
        ),
        size=size,
        filed_at=filed_at.astimezone(UTC),
        mailboxes=tuple(v.mailbox for v in via),
        body_truncated=body_truncated,
        via=via,
    )
