"""The HTTP listener on loopback with a stand-in supervisor: routing, auth, bad requests."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from emailsync.metrics import Metrics
from emailsync.web import WebServer
from emailsync.worker import WorkerStatus

TOKEN = "s3cret-token"


class Supervisor:
    """Answers the listener's questions from plain fields and records what it was asked."""

    def __init__(self) -> None:
        self.is_ready = False
        self.synced: list[str | None] = []
        self.include_stuck: list[bool] = []
        self.known = {"agent@example.com"}

    def statuses(self) -> list[WorkerStatus]:
        return [WorkerStatus("<script>@example.com", "idle", "auto", last_error="a & b")]

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool:
        self.synced.append(address)
        self.include_stuck.append(include_stuck)
        return address is None or address in self.known

    def stop_mailbox(self, address: str) -> bool:
        return address in self.known

    def start_mailbox(self, address: str) -> bool:
        return address in self.known

    def healthy(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.is_ready


@pytest.fixture
def served() -> Iterator[tuple[WebServer, Supervisor]]:
    supervisor = Supervisor()
    registry = CollectorRegistry()
    Metrics(registry).init_mailbox("agent@example.com")
    server = WebServer("127.0.0.1", 0, supervisor, registry, TOKEN)
    server.start()
    yield server, supervisor
    server.stop()


def call(
    server: WebServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_metrics_and_health_need_no_token(served: tuple[WebServer, Supervisor]) -> None:
    server, _ = served
    status, body = call(server, "GET", "/metrics")
    assert status == 200
    assert b'emailsync_build_info{version="' in body
    assert call(server, "GET", "/healthz")[0] == 200


def test_readyz_is_503_until_every_mailbox_had_its_first_attempt(
    served: tuple[WebServer, Supervisor],
) -> None:
    server, supervisor = served
    assert call(server, "GET", "/readyz")[0] == 503
    supervisor.is_ready = True
    assert call(server, "GET", "/readyz")[0] == 200


def test_control_api_needs_the_exact_bearer_token(served: tuple[WebServer, Supervisor]) -> None:
    server, supervisor = served
    assert call(server, "POST", "/v1/sync")[0] == 401
    assert call(server, "POST", "/v1/sync", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
    assert call(server, "POST", "/v1/sync", {"Authorization": TOKEN})[0] == 401
    assert supervisor.synced == []
    assert call(server, "POST", "/v1/sync", AUTH)[0] == 202
    assert supervisor.synced == [None]


def test_mailbox_actions_route_by_address(served: tuple[WebServer, Supervisor]) -> None:
    server, supervisor = served
    assert call(server, "POST", "/v1/mailboxes/agent%40example.com/sync", AUTH)[0] == 202
    assert supervisor.synced == ["agent@example.com"]
    assert call(server, "POST", "/v1/mailboxes/other@example.com/stop", AUTH)[0] == 404
    assert call(server, "POST", "/v1/mailboxes/agent@example.com/delete", AUTH)[0] == 404


def test_start_sync_takes_include_stuck_from_the_query(
    served: tuple[WebServer, Supervisor],
) -> None:
    server, supervisor = served
    path = "/v1/mailboxes/agent%40example.com/sync"
    assert call(server, "POST", path + "?include_stuck=true", AUTH)[0] == 202
    assert call(server, "POST", path, AUTH)[0] == 202
    assert call(server, "POST", "/v1/sync?include_stuck=1", AUTH)[0] == 202
    assert call(server, "POST", path + "?include_stuck=false", AUTH)[0] == 202
    assert supervisor.synced == [
        "agent@example.com",
        "agent@example.com",
        None,
        "agent@example.com",
    ]
    assert supervisor.include_stuck == [True, False, True, False]
    assert call(server, "POST", path + "?include_stuck=maybe", AUTH)[0] == 400
    assert len(supervisor.synced) == 4  # a bad value starts nothing


def test_bad_or_huge_bodies_are_refused_without_reading_them(
    served: tuple[WebServer, Supervisor],
) -> None:
    server, _ = served
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "-5"})[0] == 400
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "x"})[0] == 400
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "99999999"})[0] == 413


def test_status_page_escapes_what_it_shows(served: tuple[WebServer, Supervisor]) -> None:
    server, _ = served
    status, body = call(server, "GET", "/")
    assert status == 200
    assert b"&lt;script&gt;@example.com" in body
    assert b"a &amp; b" in body
    assert b"<script>" not in body
    assert TOKEN.encode() not in body
