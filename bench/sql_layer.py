"""The shared statement layer against SQLAlchemy Core, on the hot statements (issue 20 #2).

    .venv/bin/python bench/sql_layer.py [--rounds N] [--no-postgresql]

Issue 20 allows "a single statement layer parametrised by dialect" (``emailsync.state.
sqlcore``, ``timeline_sql``) instead of SQLAlchemy Core only if it is measured faster. In one
run, on identical databases made by emailsync's own migrations, this times:

* ``record_events``: a batch of 500 new events (a quarter of them filed by two mailboxes),
  each with its mailbox links, in one transaction, counting the new ones;
* ``groups_for_addresses``: 500 addresses among 4,000 linked to 2,000 groups.

"ours" is ``SqliteStore``/``PostgresStore`` as the daemon calls them. "core" is the same
statements built with SQLAlchemy Core (its dialect ``insert().on_conflict_…``, an expanding
``IN``, compiled-statement cache warm), over the same rows: the events' column values come
from the same conversion (``SqlTimeline._event_columns``), so only the statement layer
differs, and the same transaction and pragmas (SQLite: ``BEGIN IMMEDIATE``, foreign keys,
``synchronous = FULL``). Rounds alternate the two; prints each median and core / ours (above
1: ours is faster). Needs the ``bench`` extra (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from emailsync.dev.postgres import Postgres
from emailsync.model import Direction, Group, TimelineEvent
from emailsync.state.postgres import PostgresStore
from emailsync.state.rows import event_links, groups_from_rows
from emailsync.state.sqlite import SqliteStore
from emailsync.state.timeline_sql import SqlTimeline

BATCH = 500
LOOKUP = 500
GROUPS = 2000
ROUNDS = 15
SEED = 20

_META = sa.MetaData()
GROUPS_T = sa.Table(
    "groups", _META, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.Text)
)
ADDRESSES_T = sa.Table(
    "group_addresses",
    _META,
    sa.Column("group_id", sa.Integer, primary_key=True),
    sa.Column("address", sa.Text, primary_key=True),
)
EVENT_COLUMNS = (
    "message_key",
    "direction",
    "mailbox",
    "message_id",
    "subject",
    "from_",
    "to_",
    "cc",
    "date",
    "body_text",
    "attachments",
    "size",
    "filed_at",
    "body_truncated",
)
EVENTS_T = sa.Table(
    "timeline_events",
    _META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("group_id", sa.Integer),
    # The values arrive converted already (ISO text or aware datetimes, JSON): no type
    # processing, as in the statement layer.
    *(sa.Column(name, sa.types.NullType()) for name in EVENT_COLUMNS),
)
LINKS_T = sa.Table(
    "event_mailboxes",
    _META,
    sa.Column("event_id", sa.Integer, primary_key=True),
    sa.Column("mailbox", sa.Text, primary_key=True),
    sa.Column("direction", sa.Text),
)


class CoreTimeline:
    """record_events and groups_for_addresses in SQLAlchemy Core, same rows and semantics."""

    def __init__(self, engine: sa.Engine, timeline: SqlTimeline) -> None:
        self.engine = engine
        self.convert = timeline  # the same value conversion as ours
        postgres = engine.dialect.name == "postgresql"
        insert = pg_dialect.insert if postgres else sqlite_dialect.insert
        self.group_ids = sa.select(GROUPS_T.c.name, GROUPS_T.c.id).where(
            GROUPS_T.c.name.in_(sa.bindparam("names", expanding=True))
        )
        # Core's own way to count an executemany's new rows (its cursor's rowcount is -1
        # there): RETURNING, which its "insertmanyvalues" batches into multi-row INSERTs.
        self.insert_event = (
            insert(EVENTS_T)
            .on_conflict_do_nothing(index_elements=["group_id", "message_key"])
            .returning(EVENTS_T.c.id)
        )
        link = insert(LINKS_T).from_select(
            ["event_id", "mailbox", "direction"],
            sa.select(
                EVENTS_T.c.id,
                sa.bindparam("mb", type_=sa.Text),
                sa.bindparam("way", type_=sa.Text),
            ).where(
                EVENTS_T.c.group_id == sa.bindparam("gid"),
                EVENTS_T.c.message_key == sa.bindparam("key"),
            ),
        )
        self.link = link.on_conflict_do_update(
            index_elements=["event_id", "mailbox"],
            set_={"direction": link.excluded.direction},
            where=LINKS_T.c.direction.is_(None),
        )
        collate = (lambda c: c.collate("C")) if postgres else (lambda c: c)
        matched = (
            sa.select(ADDRESSES_T.c.group_id)
            .where(ADDRESSES_T.c.address.in_(sa.bindparam("addresses", expanding=True)))
            .distinct()
            .cte("matched")
        )
        members = ADDRESSES_T.alias("a")
        self.lookup = (
            sa.select(GROUPS_T.c.name, members.c.address)
            .select_from(
                matched.join(GROUPS_T, GROUPS_T.c.id == matched.c.group_id).join(
                    members, members.c.group_id == GROUPS_T.c.id
                )
            )
            .order_by(collate(GROUPS_T.c.name), collate(members.c.address))
        )

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        ordered = sorted(events, key=lambda e: (e.group, e.message_key))
        rows = [
            dict(zip(EVENT_COLUMNS, self.convert._event_columns(e), strict=True)) for e in ordered
        ]
        links = sorted(
            {
                (e.group, e.message_key, mailbox, direction or "")
                for e in ordered
                for mailbox, direction in event_links(e).items()
            }
        )
        names = sorted({e.group for e in ordered})
        with self.engine.begin() as conn:
            ids = dict(conn.execute(self.group_ids, {"names": names}).all())
            for row, event in zip(rows, ordered, strict=True):
                row["group_id"] = ids[event.group]
            new = len(conn.execute(self.insert_event, rows).all())
            conn.execute(
                self.link,
                [{"mb": m, "way": w or None, "gid": ids[g], "key": k} for g, k, m, w in links],
            )
        return int(new)

    def groups_for_addresses(self, addresses: Sequence[str]) -> list[Group]:
        wanted = sorted({a.strip().lower() for a in addresses})
        with self.engine.connect() as conn:
            return groups_from_rows(conn.execute(self.lookup, {"addresses": wanted}).all())


def sqlite_engine(path: Path) -> sa.Engine:
    """pysqlite as SqliteStore runs it: autocommit driver, BEGIN IMMEDIATE, the same pragmas."""
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"isolation_level": None})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi: Any, _record: Any) -> None:
        for pragma in ("foreign_keys = ON", "secure_delete = ON", "synchronous = FULL"):
            dbapi.execute(f"PRAGMA {pragma}")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def directory(rng: random.Random) -> list[tuple[str, str]]:
    """GROUPS groups of two addresses each."""
    return [
        (f"Group {n:04d}", f"client{n}.{side}@example{rng.randint(1, 9)}.org")
        for n in range(GROUPS)
        for side in ("a", "b")
    ]


def batch(
    round_no: int, rows: Sequence[tuple[str, str]], rng: random.Random
) -> list[TimelineEvent]:
    """BATCH new events of this round; a quarter of them also filed by a second mailbox."""
    filed = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=round_no)
    events = []
    for n in range(BATCH):
        group, address = rng.choice(rows)
        event = TimelineEvent(
            group=group,
            direction=Direction.INBOUND if n % 2 else Direction.OUTBOUND,
            mailbox="agent1@example.com",
            message_key=f"r{round_no}-m{n}",
            message_id=f"<r{round_no}.{n}@bench.example.com>",
            subject=f"Message {n} of round {round_no}",
            from_=address,
            to="agent1@example.com",
            cc="",
            date=filed - timedelta(hours=1),
            body_text="tenancy deposit inventory " * 180,
            attachments=(),
            size=5000,
            filed_at=filed,
        )
        events.append(replace(event, mailboxes=("agent2@example.com",)) if n % 4 == 0 else event)
    return events


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def compare(
    name: str,
    ours: SqliteStore | PostgresStore,
    theirs: SqliteStore | PostgresStore,
    engine: sa.Engine,
    rounds: int,
) -> list[str]:
    """Rounds of both layers, alternating; lines of the table. ``theirs`` made the schema
    of the database ``engine`` reaches (and its groups)."""
    rng = random.Random(SEED)  # noqa: S311 -- test data
    rows = directory(rng)
    ours.import_groups(rows)
    theirs.import_groups(rows)
    core = CoreTimeline(engine, SqlTimeline(theirs))
    addresses = [address for _, address in rng.sample(rows, LOOKUP)]
    # Both give the same answer, and each batch counts as 500 new events in both.
    if core.groups_for_addresses(addresses) != ours.groups_for_addresses(addresses):
        raise SystemExit(f"{name}: SQLAlchemy Core looked up other groups than ours")
    times: dict[str, list[float]] = {
        k: [] for k in ("ours rec", "core rec", "ours look", "core look")
    }
    for n in range(-2, rounds):  # two warm-up rounds, not counted
        events = batch(n + 2, rows, rng)
        pairs = [
            ("ours rec", lambda e=events: _expect(ours.record_events(e), BATCH)),
            ("core rec", lambda e=events: _expect(core.record_events(e), BATCH)),
            ("ours look", lambda: ours.groups_for_addresses(addresses)),
            ("core look", lambda: core.groups_for_addresses(addresses)),
        ]
        if n % 2:
            pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
        for key, work in pairs:
            seconds = timed(work)
            if n >= 0:
                times[key].append(seconds)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return [
        f"{name:10} record_events x{BATCH:<4}  ours {med['ours rec']:7.2f} ms"
        f"  core {med['core rec']:7.2f} ms  core/ours {med['core rec'] / med['ours rec']:.2f}",
        f"{name:10} groups_for x{LOOKUP:<4}     ours {med['ours look']:7.2f} ms"
        f"  core {med['core look']:7.2f} ms  core/ours {med['core look'] / med['ours look']:.2f}",
    ]


@contextmanager
def closed_after(engine: sa.Engine, *stores: SqliteStore | PostgresStore) -> Iterator[None]:
    """The engine disposed of and the stores closed at the end, even on failure."""
    try:
        yield
    finally:
        engine.dispose()
        for store in stores:
            store.close()


def _expect(new: int, want: int) -> None:
    if new != want:
        raise SystemExit(f"recorded {new} new events, want {want}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-postgresql", action="store_true")
    args = parser.parse_args()
    lines = [f"median of {args.rounds} rounds each, SQLAlchemy {sa.__version__}"]
    with tempfile.TemporaryDirectory(prefix="emailsync-sql-layer-") as scratch:
        ours = SqliteStore(Path(scratch) / "ours.db")
        theirs = SqliteStore(Path(scratch) / "core.db")  # the same migrations, for Core
        engine = sqlite_engine(theirs.path)
        with closed_after(engine, ours, theirs):
            lines += compare("sqlite", ours, theirs, engine, args.rounds)
    if not args.no_postgresql:
        with Postgres() as server:
            ours_pg = PostgresStore(server.create_database("ours"))
            url = server.create_database("core")
            theirs_pg = PostgresStore(url)
            engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
            with closed_after(engine, ours_pg, theirs_pg):
                lines += compare("postgresql", ours_pg, theirs_pg, engine, args.rounds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
