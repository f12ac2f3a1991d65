"""Fresh state stores for the unit tests that hold for both kinds (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from emailsync.state.postgres import PostgresStore
from emailsync.state.sqlite import SqliteStore

KINDS = ["sqlite", "postgres"]


class Closes(Protocol):
    def close(self) -> None: ...


ClosesT = TypeVar("ClosesT", bound=Closes)


def open_store_of(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> SqliteStore | PostgresStore:
    """A fresh, empty store of ``kind``: a SQLite file under ``tmp_path``, or a new database
    in the session's PostgreSQL (``pg_url``)."""
    if kind == "sqlite":
        return SqliteStore(tmp_path / "state" / "emailsync.db")
    return PostgresStore(request.getfixturevalue("pg_url"))


StoreT = TypeVar("StoreT", bound=SqliteStore | PostgresStore)


def with_smith(store: StoreT) -> StoreT:
    """``store`` with the group Smith, whose client is john@clients.example (the filing tests'
    messages from or to him are filed)."""
    store.add_group("Smith", ["john@clients.example"])
    return store


def closed_after(store: ClosesT) -> Iterator[ClosesT]:
    """A fixture's body: ``store`` for the test, closed after it."""
    yield store
    store.close()
