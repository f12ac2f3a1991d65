"""Fixtures shared by unit and integration tests: a throwaway PostgreSQL cluster, and each
test's logging configuration undone after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from emailsync.dev.postgres import Postgres


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


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog for the process (a level, a
    stream): the next test on the same xdist worker must not inherit it (a ``warning`` level
    there hid the INFO lines test_office365 looks for)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
