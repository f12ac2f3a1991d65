"""The pages with their sessions in a store: what needs a session reads it, what needs none
does not (static files and the Office 365 callback still answer while the state is down)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emailsync.errors import StoreUnavailableError
from emailsync.state.sessions_sql import SessionRow
from emailsync.web.server import WebServer

from .test_web import Registrar, listen, page


class DownSessions:
    """A session store whose database cannot be reached; counts the attempts."""

    def __init__(self) -> None:
        self.reads = 0

    def load(self, sid: str, now: float | None = None) -> SessionRow | None:
        self.reads += 1
        raise StoreUnavailableError("store (postgresql): read a page session: connection refused")

    def insert(self, session: SessionRow, now: float | None = None) -> None:
        raise StoreUnavailableError("store (postgresql): connection refused")

    def delete(self, sid: str) -> None:
        raise StoreUnavailableError("store (postgresql): connection refused")

    def save_messages(self, sid: str, messages: dict[str, str]) -> None:
        raise StoreUnavailableError("store (postgresql): connection refused")


@pytest.fixture
def down() -> Iterator[tuple[WebServer, DownSessions]]:
    """A listener whose session store is down."""
    sessions = DownSessions()
    server = listen(registrar=Registrar(), sessions=sessions)
    yield server, sessions
    server.stop()


def test_static_files_are_served_without_reading_the_session(
    down: tuple[WebServer, DownSessions],
) -> None:
    """The stylesheet of the error page loads while the state database is down; a page that
    needs the session fails (500) instead of treating the visitor as logged out."""
    server, sessions = down
    cookie = "emailsync_session=some-logged-in-session-id"
    assert page(server, "/static/emailsync.css", cookie)[0] == 200
    assert sessions.reads == 0
    assert page(server, "/it", cookie)[0] == 500
    assert sessions.reads == 1
