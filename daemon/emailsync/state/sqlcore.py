"""What SQL written once needs to run on SQLite and PostgreSQL: the engine and the dialect.

Statements are written once, in SQLite's spelling with a few marks that a ``Dialect`` turns
into each database's own (``Dialect.sql``, cached per text):

``?``
    a bound parameter (psycopg's is ``%s``);
``(?…)``
    a list of ``listed`` bound parameters, for ``IN (…)`` over a chunk of values;
``IN [?]``
    membership in a list bound as *one* parameter (``Dialect.values``): SQLite reads a JSON
    array through ``json_each``, PostgreSQL an array with ``= ANY``. One statement and one
    plan for any number of values;
``{C}``
    after an ``ORDER BY`` term of text: code-point order. SQLite's default (``BINARY``) is
    already that; PostgreSQL's depends on the database's collation, so it gets
    ``COLLATE "C"``. Names and addresses are therefore listed alike by both, upper case
    before lower case (addresses are stored lower-case);
``{pairs(a, b)}``
    the aggregate of a subquery's rows into a JSON array of ``[a, b]`` (``[]`` when none).

``INSERT … ON CONFLICT … DO NOTHING / DO UPDATE`` is the same in both and written as is;
``now()`` (PostgreSQL) and ``datetime('now')`` are not needed: times are bound as
parameters. The values that differ in kind go through the dialect, not the statements:
times (SQLite: ISO 8601 UTC text, whose order is time order; PostgreSQL: ``timestamptz``)
and JSON columns (SQLite: text; PostgreSQL: ``jsonb``). A naive datetime is UTC in both.

Only marks are ever put into a statement's text: every value is a bound parameter.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from emailsync.errors import StoreError

if TYPE_CHECKING:
    from emailsync.state.vault import Vault

_PAIRS = re.compile(r"\{pairs\(([^,()]+), ([^,()]+)\)\}")


@runtime_checkable
class SqlEngine(Protocol):
    """A SQL database the shared statements run on: SqliteStore or PostgresStore."""

    param_marker: str  # "?" (sqlite3) or "%s" (psycopg)

    def transaction(self, doing: str) -> AbstractContextManager[Any]:
        """A connection in a write transaction, committed when the block ends."""
        ...

    def reading(self, doing: str) -> AbstractContextManager[Any]:
        """A connection for reads (one consistent statement each)."""
        ...


def to_iso(moment: datetime) -> str:
    """ISO 8601 in UTC with microseconds, so text order is time order (naive means UTC)."""
    if moment.tzinfo is UTC:
        return moment.isoformat(timespec="microseconds")  # already UTC: no conversion
    if moment.utcoffset() is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _from_iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=UTC)


def _aware(moment: datetime) -> datetime:
    """Naive means UTC; psycopg would otherwise send it as the session's local time."""
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment


@dataclass(frozen=True)
class Dialect:
    """One database's spelling of the shared statements and of the values that differ."""

    name: str  # "sqlite" or "postgresql"
    marker: str
    in_values: str  # what "IN [?]" becomes, with "?" for the one parameter
    collate_c: str  # what "{C}" becomes
    pairs: str  # what "{pairs(x, y)}" becomes, with {a} for x and {b} for y

    @property
    def postgres(self) -> bool:
        return self.name == "postgresql"

    def sql(self, text: str, listed: int = 0) -> str:
        """``text`` in this dialect; its ``(?…)`` list gets ``listed`` markers."""
        return _translate(self, text, listed)

    # -- values whose kind differs --------------------------------------------------------

    def values(self, values: Sequence[str]) -> object:
        """The one parameter of an ``IN [?]``: a JSON array (SQLite) or a list (psycopg)."""
        return list(values) if self.postgres else json.dumps(list(values))

    def time(self, moment: datetime | None) -> object:
        """A datetime as this database stores it; None stays None."""
        if moment is None:
            return None
        return _aware(moment) if self.postgres else to_iso(moment)

    @staticmethod
    def read_time(value: Any) -> datetime:
        """A stored time as an aware datetime in UTC (text from SQLite, a datetime from psycopg)."""
        if isinstance(value, str):
            return _from_iso(value)
        return value.astimezone(UTC)  # type: ignore[no-any-return]

    def json(self, value: list[Any], *, as_text: bool = False) -> object:
        """A JSON column's value from a list (``as_text``: JSON text for both, for a statement
        that casts it, such as an array of them)."""
        if self.postgres and not as_text:
            from psycopg.types.json import Jsonb  # noqa: PLC0415 -- psycopg only for PostgreSQL

            return Jsonb(value)
        # Most mail has no attachment: skip json.dumps, a tenth of a batch's recording.
        return json.dumps(value, ensure_ascii=False) if value else "[]"

    @staticmethod
    def read_json(value: Any) -> Any:
        """A JSON column's value as read: text from SQLite, already decoded from psycopg."""
        return json.loads(value) if isinstance(value, str | bytes) else value


SQLITE = Dialect(
    name="sqlite",
    marker="?",
    in_values="IN (SELECT value FROM json_each(?))",
    collate_c="",
    pairs="json_group_array(json_array({a}, {b}))",
)
POSTGRESQL = Dialect(
    name="postgresql",
    marker="%s",
    in_values="= ANY(?)",
    collate_c=' COLLATE "C"',
    pairs="coalesce(jsonb_agg(jsonb_build_array({a}, {b})), '[]')",
)


def dialect_of(engine: SqlEngine) -> Dialect:
    """The dialect of an engine, told by its parameter marker."""
    return SQLITE if engine.param_marker == "?" else POSTGRESQL


@functools.lru_cache(maxsize=512)
def _translate(dialect: Dialect, text: str, listed: int) -> str:
    text = text.replace("IN [?]", dialect.in_values).replace("{C}", dialect.collate_c)
    text = _PAIRS.sub(lambda m: dialect.pairs.format(a=m.group(1), b=m.group(2)), text)
    text = text.replace("(?…)", "(" + ", ".join("?" * listed) + ")")
    return text if dialect.marker == "?" else text.replace("?", dialect.marker)


def many(conn: Any, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    """executemany on a cursor (sqlite3 and psycopg both give one); rows changed in all.

    Both drivers sum the rows each execution changed; an ``ON CONFLICT DO NOTHING`` that
    skipped a row adds 0.
    """
    cursor = conn.cursor()
    try:
        cursor.executemany(sql, rows)
        return max(int(cursor.rowcount), 0)
    finally:
        cursor.close()


@dataclass(frozen=True)
class Capped:
    """The statements that keep a table of expiring rows to a cap, so that a flood cannot grow
    it: ``delete_expired`` takes the time now, ``delete_oldest`` how many rows go."""

    delete_expired: str
    count: str
    delete_oldest: str

    def make_room(self, conn: Any, dialect: Dialect, now: float, cap: int) -> None:
        """Before an insert: delete the expired rows, then the oldest beyond ``cap - 1``."""
        conn.execute(dialect.sql(self.delete_expired), (now,))
        (rows,) = conn.execute(dialect.sql(self.count)).fetchone()
        if int(rows) >= cap:
            conn.execute(dialect.sql(self.delete_oldest), (int(rows) - cap + 1,))


def row_label(table: str, key: str) -> str:
    """The associated data a value sealed in a row is bound to: its table and key, so that a
    blob copied to another row does not open."""
    return f"{table}:{key}"


class SealedRows:
    """A table on a SQL engine with a column the vault seals, each value bound to its row
    (``row_label``); every call of a subclass is one transaction."""

    def __init__(self, engine: SqlEngine, vault: Vault, table: str) -> None:
        self.engine = engine
        self.vault = vault
        self.table = table
        self.dialect = dialect_of(engine)

    def seal(self, key: str, text: str) -> bytes:
        """``text`` sealed for the row of ``key``."""
        return self.vault.encrypt(text, row_label(self.table, key))

    def unseal(self, key: str, blob: bytes) -> str:
        """The text sealed in the row of ``key``; ConfigError when it cannot be opened."""
        return self.vault.decrypt(blob, row_label(self.table, key)).reveal()


@functools.cache
def migrations(folder: str) -> tuple[tuple[int, str, str], ...]:
    """The ``(version, file name, SQL)`` of every ``folder/NNN_name.sql`` of this package, by
    version: ``schema`` SQLite's, ``schema_pg`` PostgreSQL's. Raises StoreError unless they
    are numbered 1, 2, 3..."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("emailsync.state").joinpath(folder).iterdir():
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


def migrations_after(folder: str, current: int, store: str) -> list[tuple[int, str, str]]:
    """The ``migrations(folder)`` newer than schema version ``current``, to apply in order;
    StoreError when ``current`` is newer than all of them (``store`` names it)."""
    found = migrations(folder)
    latest = found[-1][0]
    if current > latest:
        raise StoreError(
            f"{store}: schema version {current} is newer than this emailsync knows ({latest}); "
            "upgrade emailsync"
        )
    return [migration for migration in found if migration[0] > current]
