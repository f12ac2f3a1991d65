"""The built-in timeline's SQL, written once for SQLite and PostgreSQL: groups and events.

``SqlTimeline`` runs these statements on a ``SqlEngine`` (SqliteStore or PostgresStore, which
delegate their ``Store`` methods here), each spelled for its database by its ``Dialect``
(``emailsync.state.sqlcore``). One behaviour for both, fixed here:

* groups are listed by name, and a group's addresses by address, in code-point order
  (``{C}``); names are unique, so that order is total;
* events are listed newest filed first; events filed at the same moment, the one recorded
  later first (``id``); a batch is recorded in ``(group, message key)`` order whatever order
  it came in — in PostgreSQL that also makes overlapping batches of concurrent instances
  take their row locks in one order, so they wait for each other instead of deadlocking;
* ``import_groups`` links each distinct ``(group, address)`` once and logs one link change
  per address (``record_link_changes``) in the same transaction;
* a ``Fence`` (``emailsync.cluster.lease``) is checked in the transaction that records: PostgreSQL
  only, since only a cluster has leases.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from emailsync.errors import LeaseLostError, StoreError
from emailsync.model import Attachment, Direction, Fence, Group, TimelineEvent
from emailsync.state.failedindex import LINK_CHANGE, record_link_changes
from emailsync.state.rows import (
    checked_address,
    checked_group_name,
    event_links,
    groups_from_rows,
    mailbox_key,
    via_from_rows,
)
from emailsync.state.sqlcore import SqlEngine, dialect_of, many

# A mailbox link of a recorded event: (group id, message key, mailbox, direction or None).
_Link = tuple[int, str, str, str | None]

GROUP_IDS_BY_NAME = "SELECT name, id FROM groups WHERE name IN [?]"
INSERT_GROUP = "INSERT INTO groups (name) VALUES (?) ON CONFLICT (name) DO NOTHING"
INSERT_LINK = (
    "INSERT INTO group_addresses (group_id, address) VALUES (?, ?)"
    " ON CONFLICT (group_id, address) DO NOTHING"
)
GROUP_ADDRESSES = "SELECT address FROM group_addresses WHERE group_id = ? ORDER BY address{C}"
GROUPS_FOR_ADDRESSES = """
    WITH matched AS (
        SELECT DISTINCT group_id FROM group_addresses WHERE address IN [?]
    )
    SELECT g.name, a.address
    FROM matched
    JOIN groups AS g ON g.id = matched.group_id
    JOIN group_addresses AS a ON a.group_id = g.id
    ORDER BY g.name{C}, a.address{C}
"""
ALL_GROUPS = """
    SELECT g.name, a.address
    FROM groups AS g LEFT JOIN group_addresses AS a ON a.group_id = g.id
    ORDER BY g.name{C}, a.address{C}
"""
INSERT_EVENT = """
    INSERT INTO timeline_events (
        group_id, message_key, direction, mailbox, message_id, subject, from_, to_, cc,
        date, body_text, attachments, size, filed_at, body_truncated
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (group_id, message_key) DO NOTHING
"""
# A mailbox linked before its direction was kept (schema 4) gets it now. The WHERE clause
# is needed anyway, and also tells SQLite's parser that ON CONFLICT belongs to the INSERT,
# not to a join (https://sqlite.org/lang_upsert.html, "Parsing Ambiguity").
LINK_EVENT_MAILBOX = """
    INSERT INTO event_mailboxes (event_id, mailbox, direction)
    SELECT id, ?, ? FROM timeline_events WHERE group_id = ? AND message_key = ?
    ON CONFLICT (event_id, mailbox) DO UPDATE SET direction = excluded.direction
    WHERE event_mailboxes.direction IS NULL
"""
# PostgreSQL records a batch in two statements whatever its size: each column goes as one
# array and ``unnest`` turns them back into rows (executemany would run one INSERT a row,
# each parsed, planned and executed on its own: most of a batch's time in the server).
# ``ORDER BY n`` keeps the batch's order, the order its row locks are taken in. The arrays go
# in binary (``%b``): psycopg dumps them ten times faster than as quoted text.
INSERT_EVENTS_PG = """
    INSERT INTO timeline_events (
        group_id, message_key, direction, mailbox, message_id, subject, from_, to_, cc,
        date, body_text, attachments, size, filed_at, body_truncated
    )
    SELECT group_id, message_key, direction, mailbox, message_id, subject, from_, to_, cc,
           date, body_text, attachments::jsonb, size, filed_at, body_truncated
    FROM unnest(
        %b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
        %b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[], %b::bigint[],
        %b::timestamptz[], %b::boolean[]
    ) WITH ORDINALITY AS u (
        group_id, message_key, direction, mailbox, message_id, subject, from_, to_, cc,
        date, body_text, attachments, size, filed_at, body_truncated, n
    )
    ORDER BY n
    ON CONFLICT (group_id, message_key) DO NOTHING
"""
# LINK_EVENT_MAILBOX for a whole batch; each (event, mailbox) at most once in it (one
# statement may not update a row twice).
LINK_EVENT_MAILBOXES_PG = """
    INSERT INTO event_mailboxes (event_id, mailbox, direction)
    SELECT e.id, u.mailbox, u.direction
    FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[]) WITH ORDINALITY
        AS u (group_id, message_key, mailbox, direction, n)
    JOIN timeline_events AS e ON e.group_id = u.group_id AND e.message_key = u.message_key
    ORDER BY u.n
    ON CONFLICT (event_id, mailbox) DO UPDATE SET direction = excluded.direction
    WHERE event_mailboxes.direction IS NULL
"""
# One statement, so the events and their mailboxes come from one consistent snapshot.
EVENTS = """
    SELECT g.name, e.direction, e.mailbox, e.message_key, e.message_id, e.subject, e.from_,
           e.to_, e.cc, e.date, e.body_text, e.attachments, e.size, e.filed_at,
           (SELECT {pairs(m.mailbox, m.direction)}
            FROM event_mailboxes AS m WHERE m.event_id = e.id) AS via,
           e.body_truncated
    FROM timeline_events AS e JOIN groups AS g ON g.id = e.group_id
"""
EVENTS_OF_GROUP = "g.name = ?"
EVENTS_OF_MAILBOX = (
    "EXISTS (SELECT 1 FROM event_mailboxes AS f WHERE f.event_id = e.id AND f.mailbox = ?)"
)
EVENTS_ORDER = " ORDER BY e.filed_at DESC, e.id DESC"
# PostgreSQL only (SQLite has no leases): the fence holds while the lease row names us with
# this generation and has not expired. FOR SHARE keeps a claimer (FOR UPDATE SKIP LOCKED)
# off the row until we commit.
CHECK_FENCE = """
    SELECT 1 FROM mailbox_leases
    WHERE mailbox = ? AND owner = ? AND generation = ? AND expires_at > now()
    FOR SHARE
"""


class SqlTimeline:
    """The ``Store`` methods of groups and events on a SQL engine; safe from any thread."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine
        self.dialect = dialect_of(engine)

    # -- groups -------------------------------------------------------------------------

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """Groups linked to any of the addresses (compared lower-case), each once, by name."""
        wanted = sorted({address.strip().lower() for address in addresses})
        if not wanted:
            return []
        sql = self.dialect.sql(GROUPS_FOR_ADDRESSES)
        with self.engine.reading("look up groups") as conn:
            rows = conn.execute(sql, (self.dialect.values(wanted),)).fetchall()
        return groups_from_rows(rows)

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """Create or extend a group; ``ValueError`` before anything is written."""
        group_name = checked_group_name(name)
        links = sorted({checked_address(address) for address in addresses})
        sql = self.dialect.sql
        with self.engine.transaction("add group") as conn:
            conn.execute(sql(INSERT_GROUP), (group_name,))
            ids = self._group_ids(conn, [group_name])
            many(conn, sql(INSERT_LINK), [(ids[group_name], address) for address in links])
            # Their mail in Failed comes back (issue 22): logged with the link, one commit.
            record_link_changes(
                conn, links, LINK_CHANGE, marker=self.dialect.marker, now=time.time()
            )
            rows = conn.execute(sql(GROUP_ADDRESSES), (ids[group_name],)).fetchall()
        return Group(name=group_name, addresses=tuple(address for (address,) in rows))

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """Link ``(group, address)`` rows; new links. ``ValueError`` names the first bad row
        (counting from 1) before anything is written."""
        links: set[tuple[str, str]] = set()
        for number, (name, address) in enumerate(rows, start=1):
            try:
                links.add((checked_group_name(name), checked_address(address)))
            except ValueError as exc:
                raise ValueError(f"row {number}: {exc}") from None
        if not links:
            return 0
        ordered = sorted(links)
        names = sorted({name for name, _ in ordered})
        sql = self.dialect.sql
        with self.engine.transaction("import groups") as conn:
            many(conn, sql(INSERT_GROUP), [(name,) for name in names])
            ids = self._group_ids(conn, names)
            new_links = many(conn, sql(INSERT_LINK), [(ids[n], a) for n, a in ordered])
            record_link_changes(
                conn,
                [address for _, address in ordered],
                LINK_CHANGE,
                marker=self.dialect.marker,
                now=time.time(),
            )
        return new_links

    def list_groups(self) -> list[Group]:
        """Every group with all its addresses, by name."""
        with self.engine.reading("list groups") as conn:
            return groups_from_rows(conn.execute(self.dialect.sql(ALL_GROUPS)).fetchall())

    # -- timeline -----------------------------------------------------------------------

    def record_events(self, events: Sequence[TimelineEvent], *, fence: Fence | None = None) -> int:
        """Record events in one transaction; how many were new (see the module docstring).

        Every group must exist; otherwise ``StoreError`` and nothing is recorded. With a
        ``fence``, ``LeaseLostError`` and nothing recorded unless the lease still holds.
        """
        if fence is not None and not self.dialect.postgres:
            raise StoreError("store: a lease fence needs the PostgreSQL state database")
        if not events and fence is None:
            return 0
        # Converted before the transaction, to hold the write lock as briefly as possible.
        ordered = sorted(events, key=lambda e: (e.group, e.message_key))
        columns = [self._event_columns(event) for event in ordered]
        mailbox_links = sorted(
            {
                (event.group, event.message_key, mailbox, direction or "")
                for event in ordered
                for mailbox, direction in event_links(event).items()
            }
        )
        names = sorted({event.group for event in ordered})
        sql = self.dialect.sql
        with self.engine.transaction("record events") as conn:
            if fence is not None:
                self._check_fence(conn, fence)
            if not events:
                return 0
            ids = self._group_ids(conn, names)
            missing = [name for name in names if name not in ids]
            if missing:
                raise StoreError(f"store: cannot record events for unknown group(s) {missing}")
            rows = [(ids[event.group], *row) for event, row in zip(ordered, columns, strict=True)]
            links = [(ids[group], key, mb, way or None) for group, key, mb, way in mailbox_links]
            if self.dialect.postgres:
                return _record_pg(conn, rows, links)
            new_events = many(conn, sql(INSERT_EVENT), rows)
            many(
                conn, sql(LINK_EVENT_MAILBOX), [(mb, way, gid, key) for gid, key, mb, way in links]
            )
        return new_events

    def check_fence(self, fence: Fence) -> None:
        """``LeaseLostError`` unless this instance still holds the lease ``fence`` names."""
        if not self.dialect.postgres:
            raise StoreError("store: a lease fence needs the PostgreSQL state database")
        with self.engine.transaction("check lease") as conn:
            self._check_fence(conn, fence)

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` and ``via`` (sorted).

        ``group`` keeps one group's events, ``mailbox`` the events that mailbox filed (first
        or later); ``limit`` caps how many (``ValueError`` when negative).
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        conditions: list[str] = []
        params: list[object] = []
        if group is not None:
            conditions.append(EVENTS_OF_GROUP)
            params.append(group)
        if mailbox is not None:
            conditions.append(EVENTS_OF_MAILBOX)
            params.append(mailbox_key(mailbox))
        text = EVENTS + (" WHERE " + " AND ".join(conditions) if conditions else "")
        text += EVENTS_ORDER + ("" if limit is None else " LIMIT ?")
        if limit is not None:
            params.append(limit)
        with self.engine.reading("list events") as conn:
            rows = conn.execute(self.dialect.sql(text), params).fetchall()
        return [self._event_from_row(row) for row in rows]

    # -- rows -----------------------------------------------------------------------------

    def _group_ids(self, conn: Any, names: Sequence[str]) -> dict[str, int]:
        sql = self.dialect.sql(GROUP_IDS_BY_NAME)
        return dict(conn.execute(sql, (self.dialect.values(names),)).fetchall())

    def _check_fence(self, conn: Any, fence: Fence) -> None:
        row = conn.execute(
            self.dialect.sql(CHECK_FENCE), (fence.mailbox, fence.owner, fence.generation)
        ).fetchone()
        if row is None:
            raise LeaseLostError(
                f"lease on {fence.mailbox} (generation {fence.generation}) is no longer held"
                f" by {fence.owner}"
            )

    def _event_columns(self, event: TimelineEvent) -> tuple[object, ...]:
        """The event's columns after ``group_id``, in ``INSERT_EVENT`` order."""
        dialect = self.dialect
        return (
            event.message_key,
            event.direction.value,
            mailbox_key(event.mailbox),
            event.message_id,
            event.subject,
            event.from_,
            event.to,
            event.cc,
            dialect.time(event.date),
            event.body_text,
            dialect.json(
                [
                    {"filename": a.filename, "content_type": a.content_type, "size": a.size}
                    for a in event.attachments
                ],
                as_text=True,
            ),
            event.size,
            dialect.time(event.filed_at),
            event.body_truncated,
        )

    def _event_from_row(self, row: Sequence[Any]) -> TimelineEvent:
        (name, direction, mailbox, key, message_id, subject, from_, to, cc, date, body) = row[:11]
        attachments, size, filed_at, via_rows, body_truncated = row[11:]
        dialect = self.dialect
        via = via_from_rows(dialect.read_json(via_rows))
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
            date=None if date is None else dialect.read_time(date),
            body_text=body,
            attachments=tuple(
                Attachment(filename=a["filename"], content_type=a["content_type"], size=a["size"])
                for a in dialect.read_json(attachments)
            ),
            size=size,
            filed_at=dialect.read_time(filed_at),
            mailboxes=tuple(v.mailbox for v in via),
            body_truncated=bool(body_truncated),
            via=via,
        )


def _record_pg(conn: Any, rows: Sequence[Sequence[object]], links: Sequence[_Link]) -> int:
    """``INSERT_EVENTS_PG`` then ``LINK_EVENT_MAILBOXES_PG``: how many events were new.

    ``rows`` are ``INSERT_EVENT``'s parameters (attachments as JSON text), ``links``
    ``(group id, message key, mailbox, direction or None)`` in ``(group, key, mailbox,
    direction)`` order. A link listed twice for one (event, mailbox) keeps the direction
    executemany would have left: the first one given that is not None.
    """
    cursor = conn.execute(INSERT_EVENTS_PG, [list(column) for column in zip(*rows, strict=True)])
    new_events = max(int(cursor.rowcount), 0)
    merged: dict[tuple[object, str, str], str | None] = {}
    for group_id, key, mailbox, direction in links:
        if merged.get((group_id, key, mailbox)) is None:
            merged[(group_id, key, mailbox)] = direction
    if merged:
        columns = list(zip(*((*link, way) for link, way in merged.items()), strict=True))
        conn.execute(LINK_EVENT_MAILBOXES_PG, [list(column) for column in columns])
    return new_events
