"""Fixtures shared by unit and integration tests: a throwaway PostgreSQL cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emailsync.devpostgres import Postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; start-up errors fail the tests that use it."""
    server = Postgres()
    server.start()  # raises PostgresStartError with the log tail when it cannot start
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh, empty database in the session's cluster."""
    return postgres.create_database()
