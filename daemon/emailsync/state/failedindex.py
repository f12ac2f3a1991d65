"""The Failed-for-no-group index and the log of link changes that brings such mail back.

A message filed to Failed for want of a group (``$EmailSyncNoGroup``) is indexed by each of
its counterpart addresses: ``(mailbox, uidvalidity, uid, address, message key)``, the UID and
UIDVALIDITY being Failed's (from the MOVE's COPYUID, RFC 4315; 0 and 0 when the server gave
none: a scan of that mailbox's Failed finds it). A link change (``groups add``/``import``, a
CRM's ``POST /v1/groups:changed``, the periodic check) is a row per address in
``link_changes`` and marks the index rows of those addresses ``due`` with its id, in one
transaction: the marks are the truth, so a daemon that was down, a worker that crashed in
the middle of a re-file, or a missed notification loses nothing. Whoever owns a mailbox
re-files its due messages (``emailsync.filing.refile``) and clears the marks it acted on, only up
to the change it saw (``settle``), so a change that lands meanwhile is never cleared unseen.

A message indexed right after a lookup that a link change overtook would miss that change:
``add`` takes the id of the newest change seen before the lookup (``watermark``) and marks
the rows of addresses changed since due at once.

The SQL is written once, with ``?`` markers, for SQLite and PostgreSQL (``SqlEngine`` and
``Dialect``, ``emailsync.state.sqlcore``).
In PostgreSQL, writers of link changes hold an advisory lock, so change ids commit in order,
and ``NOTIFY emailsync_links`` wakes the other instances (``emailsync.cluster.membership``).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from emailsync.state.rows import mailbox_key
from emailsync.state.sqlcore import POSTGRESQL, SQLITE, SqlEngine, many

# A message filed to Failed whose copy's UID is not known (no COPYUID): found by a scan.
UNKNOWN_UID = 0
# Why a message is due for a re-file; the value is the log's ``trigger``.
LINK_CHANGE = "link_change"
PERIODIC = "periodic"
# Link changes are kept this long: long enough for a filer that looked up groups before one
# to notice it, and for the log of what brought mail back.
CHANGE_RETENTION_SECONDS = 24 * 3600.0
# PostgreSQL: the channel that wakes every instance after a link change, and the advisory
# lock ("emaillnk" in ASCII) that makes change ids commit in increasing order.
LINKS_CHANNEL = "emailsync_links"
LINK_LOCK_KEY = 0x656D61696C6C6E6B
_ADDRESSES = "SELECT DISTINCT address FROM failed_index WHERE address > ? ORDER BY address LIMIT ?"
_ADDRESSES_OF_MAILBOXES = (
    "SELECT DISTINCT address FROM failed_index WHERE address > ? AND mailbox IN (?…)"
    " ORDER BY address LIMIT ?"
)
# Values per IN (…) list: far below SQLite's 32,766 and PostgreSQL's 65,535 parameters.
CHUNK = 500


@dataclass(frozen=True)
class FailedEntry:
    """One message filed to Failed for want of a group, and its counterpart addresses."""

    uidvalidity: int
    uid: int
    key: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class DueMessage:
    """A message of a mailbox's Failed that a link change asks to re-file."""

    uidvalidity: int
    uid: int
    key: str
    change: int  # the newest link change it waits for
    trigger: str  # LINK_CHANGE or PERIODIC
    changed_at: float | None  # when that change was made (Unix time), if still logged


@dataclass(frozen=True)
class LinkChange:
    """One logged change of an address's links."""

    id: int
    address: str
    trigger: str
    changed_at: float


class FailedIndex:
    """The index and the link-change log in a SQL store; safe to share between threads."""

    def __init__(self, engine: SqlEngine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.postgres = engine.param_marker != "?"

    def _sql(self, text: str, listed: int = 0) -> str:
        """``text`` in this engine's markers; its ``(?…)`` list gets ``listed`` of them."""
        return _sql(text, self.engine.param_marker, listed)

    # -- written while filing ------------------------------------------------------------

    def watermark(self) -> int:
        """The id of the newest link change; take it before looking groups up."""
        with self.engine.reading("read link changes") as conn:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM link_changes").fetchone()
        return int(row[0]) if row else 0

    def add(self, mailbox: str, entries: Sequence[FailedEntry], *, seen: int) -> int:
        """Index messages just filed to Failed; how many are due at once.

        ``seen`` is the ``watermark`` taken before their groups were looked up: an address
        whose links changed since makes its message due (the lookup may predate the link).
        """
        rows = [(entry, address) for entry in entries for address in dict.fromkeys(entry.addresses)]
        if not rows:
            return 0
        key = mailbox_key(mailbox)
        addresses = sorted({address for _, address in rows})
        with self.engine.transaction("index failed mail") as conn:
            changed: dict[str, int] = {}
            for chunk in _chunks(addresses):
                changed.update(
                    conn.execute(
                        self._sql(
                            "SELECT address, max(id) FROM link_changes"
                            " WHERE id > ? AND address IN (?…) GROUP BY address",
                            len(chunk),
                        ),
                        (seen, *chunk),
                    ).fetchall()
                )
            many(
                conn,
                self._sql(
                    "INSERT INTO failed_index"
                    " (mailbox, uidvalidity, uid, address, message_key, due)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (mailbox, uidvalidity, uid, address, message_key) DO NOTHING"
                ),
                [
                    (key, e.uidvalidity, e.uid, address, e.key, changed.get(address))
                    for e, address in rows
                ],
            )
        return len({(e.uidvalidity, e.uid, e.key) for e, a in rows if a in changed})

    # -- read and settled by the mailbox's owner -----------------------------------------

    def folder(self, mailbox: str) -> int | None:
        """Failed's UIDVALIDITY when it was last scanned; None: never (or not any more)."""
        with self.engine.reading("read failed index") as conn:
            row = conn.execute(
                self._sql("SELECT uidvalidity FROM failed_folders WHERE mailbox = ?"),
                (mailbox_key(mailbox),),
            ).fetchone()
        return None if row is None else int(row[0])

    def due(self, mailbox: str, limit: int) -> list[DueMessage]:
        """Up to ``limit`` of the mailbox's due messages, by UID, with what they wait for."""
        with self.engine.reading("read failed index") as conn:
            rows = conn.execute(
                self._sql(
                    "SELECT uidvalidity, uid, message_key, max(due) FROM failed_index"
                    " WHERE mailbox = ? AND due IS NOT NULL"
                    " GROUP BY uidvalidity, uid, message_key ORDER BY uid LIMIT ?"
                ),
                (mailbox_key(mailbox), limit),
            ).fetchall()
            changes = sorted({int(row[3]) for row in rows})
            logged: dict[int, tuple[str, float]] = {}
            for chunk in _chunks(changes):
                for change, trigger, at in conn.execute(
                    self._sql(
                        "SELECT id, trigger, changed_at FROM link_changes WHERE id IN (?…)",
                        len(chunk),
                    ),
                    tuple(chunk),
                ).fetchall():
                    logged[int(change)] = (str(trigger), float(at))
        result = []
        for uidvalidity, uid, key, change in rows:
            trigger, at = logged.get(int(change), (LINK_CHANGE, None))
            result.append(DueMessage(int(uidvalidity), int(uid), key, int(change), trigger, at))
        return result

    def settle(self, mailbox: str, uidvalidity: int, uids: Collection[int], upto: int) -> None:
        """The messages were looked at for every change up to ``upto``: not due for those."""
        with self.engine.transaction("settle failed index") as conn:
            for chunk in _chunks(sorted(uids)):
                conn.execute(
                    self._sql(
                        "UPDATE failed_index SET due = NULL"
                        " WHERE mailbox = ? AND uidvalidity = ? AND due <= ?"
                        " AND uid IN (?…)",
                        len(chunk),
                    ),
                    (mailbox_key(mailbox), uidvalidity, upto, *chunk),
                )

    def drop(self, mailbox: str, uidvalidity: int, uids: Collection[int]) -> None:
        """Forget messages that left Failed (re-filed, moved or deleted by someone)."""
        with self.engine.transaction("drop from failed index") as conn:
            for chunk in _chunks(sorted(uids)):
                conn.execute(
                    self._sql(
                        "DELETE FROM failed_index WHERE mailbox = ? AND uidvalidity = ?"
                        " AND uid IN (?…)",
                        len(chunk),
                    ),
                    (mailbox_key(mailbox), uidvalidity, *chunk),
                )

    def unknown(self, mailbox: str) -> bool:
        """True when the mailbox has indexed messages whose UID in Failed is not known."""
        with self.engine.reading("read failed index") as conn:
            row = conn.execute(
                self._sql("SELECT 1 FROM failed_index WHERE mailbox = ? AND uid = ? LIMIT 1"),
                (mailbox_key(mailbox), UNKNOWN_UID),
            ).fetchone()
        return row is not None

    def forget_folder(self, mailbox: str) -> None:
        """Failed must be scanned again (its UIDVALIDITY changed, or writes were lost)."""
        with self.engine.transaction("forget failed folder") as conn:
            conn.execute(
                self._sql("DELETE FROM failed_folders WHERE mailbox = ?"), (mailbox_key(mailbox),)
            )

    def finish_scan(self, mailbox: str, uidvalidity: int, uids: Collection[int]) -> None:
        """A scan of Failed found exactly ``uids`` (indexed by ``add``): forget the rest."""
        key = mailbox_key(mailbox)
        with self.engine.transaction("finish failed scan") as conn:
            conn.execute(
                self._sql(
                    "DELETE FROM failed_index WHERE mailbox = ? AND (uidvalidity <> ? OR uid = ?)"
                ),
                (key, uidvalidity, UNKNOWN_UID),
            )
            indexed = {
                int(uid)
                for (uid,) in conn.execute(
                    self._sql(
                        "SELECT DISTINCT uid FROM failed_index"
                        " WHERE mailbox = ? AND uidvalidity = ?"
                    ),
                    (key, uidvalidity),
                ).fetchall()
            }
            for chunk in _chunks(sorted(indexed - set(uids))):
                conn.execute(
                    self._sql(
                        "DELETE FROM failed_index WHERE mailbox = ? AND uidvalidity = ?"
                        " AND uid IN (?…)",
                        len(chunk),
                    ),
                    (key, uidvalidity, *chunk),
                )
            conn.execute(
                self._sql(
                    "INSERT INTO failed_folders (mailbox, uidvalidity, scanned_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (mailbox) DO UPDATE"
                    " SET uidvalidity = excluded.uidvalidity, scanned_at = excluded.scanned_at"
                ),
                (key, uidvalidity, self.clock()),
            )

    def forget_mailbox(self, mailbox: str) -> None:
        """Forget a mailbox's index (its Failed was emptied, e.g. by ``retry-failed``)."""
        key = mailbox_key(mailbox)
        with self.engine.transaction("forget failed index") as conn:
            conn.execute(self._sql("DELETE FROM failed_index WHERE mailbox = ?"), (key,))

    # -- link changes --------------------------------------------------------------------

    def links_changed(self, addresses: Iterable[str], trigger: str = LINK_CHANGE) -> int:
        """Log a change of these addresses' links and mark their Failed mail due; its id."""
        with self.engine.transaction("record link change") as conn:
            return record_link_changes(
                conn, addresses, trigger, marker=self.engine.param_marker, now=self.clock()
            )

    def changes_after(self, last: int, limit: int = 10_000) -> list[LinkChange]:
        """The link changes logged after id ``last``, oldest first."""
        with self.engine.reading("read link changes") as conn:
            rows = conn.execute(
                self._sql(
                    "SELECT id, address, trigger, changed_at FROM link_changes"
                    " WHERE id > ? ORDER BY id LIMIT ?"
                ),
                (last, limit),
            ).fetchall()
        return [LinkChange(int(i), str(a), str(t), float(at)) for i, a, t, at in rows]

    def due_mailboxes(self) -> dict[str, int]:
        """Every mailbox with due messages, and the newest change they wait for."""
        with self.engine.reading("read failed index") as conn:
            rows = conn.execute(
                "SELECT mailbox, max(due) FROM failed_index WHERE due IS NOT NULL GROUP BY mailbox"
            ).fetchall()
        return {str(mailbox): int(change) for mailbox, change in rows}

    def addresses(
        self, after: str, limit: int, mailboxes: Collection[str] | None = None
    ) -> list[str]:
        """Up to ``limit`` indexed addresses after ``after``, in order (of ``mailboxes`` only).

        For the periodic check, which walks the index a slice at a time; fewer than
        ``limit`` means the walk reached the end.
        """
        if mailboxes is not None and not mailboxes:
            return []
        wanted = sorted({mailbox_key(m) for m in mailboxes or ()})
        sql = _ADDRESSES_OF_MAILBOXES if wanted else _ADDRESSES
        with self.engine.reading("read failed index") as conn:
            rows = conn.execute(self._sql(sql, len(wanted)), (after, *wanted, limit)).fetchall()
        return [str(address) for (address,) in rows]


def record_link_changes(
    conn: Any, addresses: Iterable[str], trigger: str, *, marker: str, now: float
) -> int:
    """In the caller's transaction: log a link change per address and mark their mail due.

    The stores call this where they link addresses (``add_group``, ``import_groups``), so a
    link and its change commit together. Returns the newest change id (0: no address).
    """
    postgres = marker != "?"

    def sql(text: str) -> str:
        return _sql(text, marker)

    wanted = sorted(set(addresses))
    if not wanted:
        return 0
    if postgres:
        conn.execute(sql("SELECT pg_advisory_xact_lock(?)"), (LINK_LOCK_KEY,))
    conn.execute(
        sql("DELETE FROM link_changes WHERE changed_at < ?"), (now - CHANGE_RETENTION_SECONDS,)
    )
    newest = 0
    for address in wanted:
        row = conn.execute(
            sql(
                "INSERT INTO link_changes (address, trigger, changed_at) VALUES (?, ?, ?)"
                " RETURNING id"
            ),
            (address, trigger, now),
        ).fetchone()
        newest = int(row[0])
        conn.execute(
            sql("UPDATE failed_index SET due = ? WHERE address = ? AND (due IS NULL OR due < ?)"),
            (newest, address, newest),
        )
    if postgres:
        conn.execute(sql("SELECT pg_notify(?, ?)"), (LINKS_CHANNEL, str(newest)))
    return newest


_indexes: weakref.WeakKeyDictionary[object, FailedIndex] = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def failed_index(store: object) -> FailedIndex | None:
    """The index of a store's state database; None when it keeps none.

    SqliteStore and PostgresStore keep it beside their tables; a cluster's FencedStore has
    its PostgresStore's; a CRM's HttpStore keeps it in its state file (``state()``).
    """
    engine: object | None = store
    if not isinstance(engine, SqlEngine):
        inner = getattr(store, "store", None)  # a FencedStore
        state = getattr(store, "state", None)  # an HttpStore
        engine = inner if isinstance(inner, SqlEngine) else (state() if callable(state) else None)
    if not isinstance(engine, SqlEngine):
        return None
    with _indexes_lock:
        index = _indexes.get(engine)
        if index is None:
            index = _indexes[engine] = FailedIndex(engine)
        return index


def _chunks(values: Sequence[Any]) -> list[Sequence[Any]]:
    return [values[start : start + CHUNK] for start in range(0, len(values), CHUNK)]


def _sql(text: str, marker: str, listed: int = 0) -> str:
    """A statement written with ``?`` in ``marker``s; ``(?…)`` becomes ``listed`` markers
    (``emailsync.state.sqlcore.Dialect.sql``)."""
    return (SQLITE if marker == "?" else POSTGRESQL).sql(text, listed)
