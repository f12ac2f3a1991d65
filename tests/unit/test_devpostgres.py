"""The throwaway PostgreSQL of the tests: comes up as a non-root user, reports why it did not."""

from __future__ import annotations

import os

import psycopg
import pytest

from emailsync.dev.postgres import Postgres, PostgresStartError


def test_the_cluster_accepts_logins_and_runs_as_an_unprivileged_user(postgres: Postgres) -> None:
    """Fresh databases open; the server process is not root (PostgreSQL refuses root)."""
    url = postgres.create_database()
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW fsync").fetchone()
    assert row == ("off",)
    assert postgres.pid is not None
    assert os.stat(f"/proc/{postgres.pid}").st_uid != 0


def test_a_server_that_cannot_start_raises_with_its_log() -> None:
    """A broken data directory fails start() with the server's own complaint, not a hang."""
    # Its own temp dir: pytest's tmp_path is root-only, and the server runs as another user.
    server = Postgres()
    try:
        server.start()
        server.stop()
        (server.data_dir / "PG_VERSION").write_text("1\n")
        with pytest.raises(PostgresStartError, match="database files are incompatible"):
            server.start()
    finally:
        server.close()
