"""The HTTP listener on loopback with a stand-in supervisor: routing, auth, bad requests."""

from __future__ import annotations

import gzip
import html
import http.client
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

from emailsync.runtime.worker import WorkerStatus
from emailsync.state.base import IssuedToken
from emailsync.telemetry.metrics import Metrics
from emailsync.web.call import Access
from emailsync.web.pages import MAX_SESSIONS
from emailsync.web.routes import ROUTES, TOKEN_NEEDED, Route
from emailsync.web.server import MAX_CONNECTIONS, WebServer, metrics_need_token

TOKEN = "s3cret-token-for-the-web-tests"


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


def listen(
    host: str = "127.0.0.1", supervisor: Supervisor | None = None, **options: Any
) -> WebServer:
    """A started listener on port 0 with the stand-in supervisor; ``options`` are WebServer's
    keywords (the stand-in registrar and sign-ins among them)."""
    registry = CollectorRegistry()
    Metrics(registry).init_mailbox("agent@example.com")
    server = WebServer(host, 0, supervisor or Supervisor(), registry, TOKEN, **options)
    server.start()
    return server


@pytest.fixture
def served() -> Iterator[tuple[WebServer, Supervisor]]:
    supervisor = Supervisor()
    server = listen(supervisor=supervisor)
    yield server, supervisor
    server.stop()


@pytest.fixture
def server(served: tuple[WebServer, Supervisor]) -> WebServer:
    """The served listener, for tests that do not look at its supervisor."""
    return served[0]


def exchange(
    server: WebServer, method: str, path: str, **request: Any
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a connection of its own (``request``: http.client's ``headers`` and
    ``body``): the response, for its status and headers, and its body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, **request)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def call(
    server: WebServer,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: str | None = None,
) -> tuple[int, bytes]:
    """``exchange``'s status and body."""
    response, answer = exchange(server, method, path, headers=headers or {}, body=body)
    return response.status, answer


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_metrics_and_health_need_no_token(server: WebServer) -> None:
    status, body = call(server, "GET", "/metrics")
    assert status == 200
    assert b'emailsync_build_info{version="' in body
    assert call(server, "GET", "/healthz")[0] == 200


def get_metrics(server: WebServer, accept: str | None) -> tuple[dict[str, str], bytes]:
    """GET /metrics with this Accept-Encoding (None: no header): the headers and raw body."""
    headers = {} if accept is None else {"Accept-Encoding": accept}
    response, body = exchange(server, "GET", "/metrics", headers=headers)
    assert response.status == 200
    return {k.lower(): v for k, v in response.getheaders()}, body


@pytest.mark.parametrize(
    "accept",
    ["gzip", "gzip, deflate", "deflate, gzip;q=0.5", "*", "identity;q=0.5, *;q=0.1", "x-gzip"],
)
def test_metrics_are_gzipped_when_the_scraper_accepts_gzip(server: WebServer, accept: str) -> None:
    """Prometheus asks with Accept-Encoding: gzip; 2,000 mailboxes' text shrinks ~25-fold."""
    headers, body = get_metrics(server, accept)
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert int(headers["content-length"]) == len(body)
    text = gzip.decompress(body)
    assert (
        b'emailsync_mailbox_state{mailbox="agent@example.com",state="connecting"} 1.0' not in text
    )
    assert b'emailsync_queue_messages{mailbox="agent@example.com"} 0.0' in text
    assert text == get_metrics(server, None)[1]


@pytest.mark.parametrize("accept", [None, "", "identity", "deflate, br", "gzip;q=0", "*, gzip;q=0"])
def test_metrics_are_plain_text_unless_gzip_is_accepted(
    server: WebServer, accept: str | None
) -> None:
    headers, body = get_metrics(server, accept)
    assert "content-encoding" not in headers
    assert b"# TYPE emailsync_build_info gauge" in body


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
    server: WebServer,
) -> None:
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "-5"})[0] == 400
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "x"})[0] == 400
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "99999999"})[0] == 413


def test_status_page_escapes_what_it_shows(server: WebServer) -> None:
    status, body = call(server, "GET", "/", AUTH)
    assert status == 200
    assert b"&lt;script&gt;@example.com" in body
    assert b"a &amp; b" in body
    assert b"<script>" not in body
    assert TOKEN.encode() not in body


def test_status_page_without_the_token_shows_counts_not_addresses_or_errors(
    server: WebServer,
) -> None:
    """/ answers browsers without a token, but only with counts by state."""
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}):
        status, body = call(server, "GET", "/", headers)
        assert status == 200
        assert b"<td>idle</td><td>1</td>" in body
        assert b"example.com" not in body
        assert b"a &amp; b" not in body


@pytest.mark.parametrize("token", ["", " ", "short", "x" * 40])
def test_an_empty_or_weak_token_is_never_served(token: str) -> None:
    """An empty token file must not turn `Authorization: Bearer ` into a pass."""
    with pytest.raises(ValueError, match="control token"):
        WebServer("127.0.0.1", 0, Supervisor(), CollectorRegistry(), token)


@pytest.mark.parametrize(
    "raw",
    ["..%2Fx@d", "%2E%2E%2Fx@example.com", "x@-d", "%20agent@example.com", "", "%00@d"],
)
def test_an_invalid_address_answers_like_an_unknown_one(
    served: tuple[WebServer, Supervisor], raw: str
) -> None:
    """No path traversal reaches the supervisor, and the answer does not echo the input."""
    server, supervisor = served
    unknown = call(server, "POST", "/v1/mailboxes/nobody@example.com/stop", AUTH)
    assert unknown == (404, b'{"error": "no such mailbox"}')
    assert call(server, "POST", f"/v1/mailboxes/{raw}/stop", AUTH) == unknown
    assert call(server, "POST", f"/v1/mailboxes/{raw}/sync", AUTH) == unknown
    assert supervisor.synced == []


def test_pages_need_a_session_and_send_a_strict_content_security_policy(
    server: WebServer,
) -> None:
    response, _ = exchange(server, "GET", "/email-sync/agent@example.com")
    assert response.status == 303
    assert response.getheader("Location") == "/login"
    response, body = exchange(server, "GET", "/login")
    assert response.status == 200
    policy = response.getheader("Content-Security-Policy") or ""
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    assert response.getheader("Referrer-Policy") == "no-referrer"
    cookie = response.getheader("Set-Cookie") or ""
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert b'name="csrf"' in body


def test_a_form_without_the_sessions_csrf_token_is_refused(
    server: WebServer,
) -> None:
    response, body = exchange(server, "GET", "/login")
    page = body.decode()
    cookie = (response.getheader("Set-Cookie") or "").split(";")[0]
    good = re.search(r'name="csrf" value="([^"]+)"', page)
    assert good is not None
    for csrf in ("", "wrong", good.group(1)[:-1]):
        body = f"token={TOKEN}&csrf={csrf}"
        status, answer = call(
            server,
            "POST",
            "/login",
            {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
            body,
        )
        assert status == 403
        assert b"expired" in answer
    # The same form with the session's token logs in (so the refusals above were the token's).
    status, _ = call(
        server,
        "POST",
        "/login",
        {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
        f"token={TOKEN}&csrf={good.group(1)}",
    )
    assert status == 303


def test_a_non_loopback_listener_warns() -> None:
    with structlog.testing.capture_logs() as logs:
        WebServer("0.0.0.0", 0, Supervisor(), CollectorRegistry(), TOKEN).httpd.server_close()  # noqa: S104 -- the case under test
        WebServer("127.0.0.1", 0, Supervisor(), CollectorRegistry(), TOKEN).httpd.server_close()
    warnings = [e for e in logs if e["event"] == "listen_not_loopback"]
    assert [w["host"] for w in warnings] == ["0.0.0.0"]  # noqa: S104 -- the case under test


@pytest.fixture
def strict() -> Iterator[WebServer]:
    """A listener with a small cap and a short request deadline, so the tests are quick."""
    server = listen(max_connections=4, request_seconds=REQUEST_SECONDS)
    yield server
    server.stop()


REQUEST_SECONDS = 2.5


def test_a_slowloris_client_is_cut_off_at_the_request_deadline_while_healthz_answers(
    strict: WebServer,
) -> None:
    """A byte every 0.2 s never trips a per-read timeout; the per-request deadline cuts it."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as slow:
        started = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        cut_after = None
        for _ in range(50):  # 10 s at most
            try:
                slow.sendall(b"X")
            except OSError:
                cut_after = time.monotonic() - started
                break
            assert call(strict, "GET", "/healthz")[0] == 200  # served meanwhile
            ready, _, _ = select.select([slow], [], [], 0.2)
            if ready and slow.recv(4096) == b"":
                cut_after = time.monotonic() - started
                break
    assert cut_after is not None, "the trickling client was never cut off"
    assert REQUEST_SECONDS <= cut_after < REQUEST_SECONDS + 1.5


def wait_for_connections(server: WebServer, count: int) -> None:
    deadline = time.monotonic() + 5
    while server.active_connections != count:
        assert time.monotonic() < deadline, (server.active_connections, count)
        time.sleep(0.01)


def call_from(
    server: WebServer, source: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """GET ``path`` from the loopback address ``source`` (127.0.0.0/8 is all this machine's)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=5, source_address=(source, 0)
    )
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def idle_from(server: WebServer, source: str, count: int) -> list[socket.socket]:
    """``count`` connections from ``source`` that never send a byte."""
    return [
        socket.create_connection(("127.0.0.1", server.port), timeout=5, source_address=(source, 0))
        for _ in range(count)
    ]


def test_one_client_holding_every_connection_leaves_healthz_and_other_clients_served(
    served: tuple[WebServer, Supervisor],
) -> None:
    """Issue 19: 64 idle connections from one client kept /healthz at 503 (and a liveness probe
    restarted a healthy daemon). Now that client gets half the slots, health probes have a
    reserve of their own, and another client still reaches the API."""
    server, _ = served
    # The listener accepts in order: every request below comes after all the idle connections.
    idle = idle_from(server, "127.0.0.1", MAX_CONNECTIONS)
    try:
        for path in ("/healthz", "/readyz", "/healthz"):
            started = time.monotonic()
            status, _ = call_from(server, "127.0.0.1", path)
            assert status == (503 if path == "/readyz" else 200)  # (the stand-in is not ready)
            assert time.monotonic() - started < 1.0
        assert call_from(server, "127.0.0.2", "/v1/mailboxes", AUTH)[0] == 200
        assert call_from(server, "127.0.0.1", "/v1/mailboxes", AUTH) == (503, b"busy\n")
        assert server.active_connections == MAX_CONNECTIONS // 2  # the flooder's share
    finally:
        for each in idle:
            each.close()


def test_connections_beyond_the_cap_get_503_but_health_answers_until_idle_ones_are_dropped(
    strict: WebServer,
) -> None:
    """A cap of 4 (2 a client): one client's 2 idle connections leave it no room for an API call
    but leave room for others; 4 fill the cap for everyone but /healthz; the idle ones are
    dropped at the request deadline, then the API answers again."""
    idle = idle_from(strict, "127.0.0.1", 2)
    try:
        wait_for_connections(strict, 2)
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            assert call_from(strict, "127.0.0.1", "/v1/mailboxes", AUTH) == (503, b"busy\n")
            assert time.monotonic() - started < 1.0  # refused at once, not queued
            assert call_from(strict, "127.0.0.1", "/healthz")[0] == 200
            assert call_from(strict, "127.0.0.2", "/v1/mailboxes", AUTH)[0] == 200
            wait_for_connections(strict, 2)  # that call's slot is free again
            idle += idle_from(strict, "127.0.0.2", 2)
            wait_for_connections(strict, 4)  # the cap is full
            assert call_from(strict, "127.0.0.3", "/v1/mailboxes", AUTH)[0] == 503
            assert call_from(strict, "127.0.0.3", "/healthz")[0] == 200
            assert time.monotonic() - started < 1.0
            deadline = started + REQUEST_SECONDS + 2.0
            while call_from(strict, "127.0.0.1", "/v1/mailboxes", AUTH)[0] != 200:
                assert time.monotonic() < deadline, "still refused after the deadline"
                time.sleep(0.1)
        # The idle ones were dropped at their deadline, not before.
        assert time.monotonic() - started >= REQUEST_SECONDS - 1.0
        assert all(each.recv(1) == b"" for each in idle)  # closed by the server, no answer
        # Several refusals, one warning: a flood does not flood the log.
        refused = [e for e in logs if e["event"] == "http_connections_refused"]
        assert [(e["count"], e["max_connections"]) for e in refused] == [(1, 4)]
    finally:
        for each in idle:
            each.close()


# (method, path, Allow): a method each path does not take, and the Allow header it answers.
NOT_ALLOWED = [
    ("TRACE", "/v1/sync", "POST"),
    ("PUT", "/v1/mailboxes/agent@example.com/stop", "POST"),
    ("GET", "/v1/sync", "POST"),
    ("POST", "/healthz", "GET"),
    ("DELETE", "/v1/mailboxes", "GET"),
    ("OPTIONS", "/", "GET"),
    ("PATCH", "/elsewhere", "GET, POST"),
    ("QUERY", "/v1/mailboxes", "GET"),
    ("HEAD", "/healthz", "GET"),
    ("POST", "/v1/mailboxes/agent@example.com", "GET, PUT, DELETE"),
    ("PATCH", "/v1/mailboxes/agent@example.com", "GET, PUT, DELETE"),
    ("GET", "/v1/branches/main", "PUT"),
    ("PUT", "/v1/tokens", "GET, POST"),
    ("GET", "/v1/tokens/0123456789abcdef", "DELETE"),
    ("GET", "/v1/mailboxes/agent@example.com/office365/start", "POST"),
    ("PUT", "/login", "GET, POST"),
    ("POST", "/it", "GET"),
    ("GET", "/email-sync/agent@example.com/stop", "POST"),
    ("DELETE", "/email-sync/agent@example.com", "GET"),
]


@pytest.mark.parametrize(("method", "path", "allow"), NOT_ALLOWED)
def test_a_method_a_path_does_not_take_is_405_with_allow_not_a_5xx(
    served: tuple[WebServer, Supervisor], method: str, path: str, allow: str
) -> None:
    """Found by schemathesis: http.server answered TRACE and friends with 501 (a 5xx)."""
    server, supervisor = served
    response, body = exchange(server, method, path, headers=AUTH)
    assert response.status == 405
    assert response.getheader("Allow") == allow
    assert body == (b"" if method == "HEAD" else b'{"error": "method not allowed"}')
    assert supervisor.synced == []


class Registrar:
    """Just enough of the self-service registrar for the IT page to render."""

    def branches(self) -> list[dict[str, object]]:
        return []

    def mailbox_detail(self, address: str) -> dict[str, object] | None:
        return None


@pytest.fixture
def with_pages() -> Iterator[WebServer]:
    """A listener whose IT page renders (a stand-in registrar)."""
    server = listen(registrar=Registrar())
    yield server
    server.stop()


def page(server: WebServer, path: str, cookie: str | None = None) -> tuple[int, str]:
    """GET a page: its status and the session cookie it set ("" when none)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = conn.getresponse()
        response.read()
        return response.status, (response.getheader("Set-Cookie") or "").split(";")[0]
    finally:
        conn.close()


def test_anonymous_visitors_never_log_out_a_logged_in_session(with_pages: WebServer) -> None:
    """Issue 19: every GET /login without a cookie stored a session; at MAX_SESSIONS the oldest,
    the logged-in ones, were dropped. More than MAX_SESSIONS anonymous visits later, IT's
    session still opens the IT page."""
    status, cookie = page(with_pages, f"/login?token={TOKEN}")
    assert status == 200
    assert cookie.startswith("emailsync_session=")
    assert page(with_pages, "/it", cookie)[0] == 200
    for _ in range(MAX_SESSIONS + 10):
        status, anonymous = page(with_pages, "/login")
        assert status == 200
        assert anonymous.startswith("emailsync_session=")
    assert page(with_pages, "/it", cookie)[0] == 200


@pytest.mark.parametrize(
    ("host", "needed"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),  # all of 127.0.0.0/8 is this machine's
        ("::1", False),
        ("[::1]", False),
        ("localhost", False),
        ("0.0.0.0", True),  # noqa: S104 -- the case under test
        ("::", True),
        ("192.0.2.10", True),
        ("emailsync.example", True),  # a name may resolve to anything
    ],
)
def test_metrics_need_the_token_unless_the_listener_is_loopback_only(
    host: str, needed: bool
) -> None:
    """Issue 19: /metrics names every mailbox; off loopback only the token holder reads it."""
    assert metrics_need_token(host) is needed


def test_metrics_on_a_wildcard_listener_answer_401_without_the_token() -> None:
    """A listener on 0.0.0.0 (reached here on loopback) keeps /metrics to the token holder, with
    the same 401 as /v1; health and readiness stay open for probes."""
    server = listen("0.0.0.0")  # noqa: S104 -- the case under test
    try:
        status, body = call(server, "GET", "/metrics")
        assert (status, body) == (401, b'{"error": "missing or wrong bearer token"}')
        assert call(server, "GET", "/metrics", {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        status, body = call(server, "GET", "/metrics", AUTH)
        assert status == 200
        assert b'mailbox="agent@example.com"' in body
        assert call(server, "GET", "/healthz")[0] == 200
    finally:
        server.stop()


@pytest.mark.parametrize("length", ["+0", "-0", "0_0", "0x0", "0 0"])
def test_content_length_must_be_plain_digits(
    served: tuple[WebServer, Supervisor], length: str
) -> None:
    """Issue 19: int() took `+0`, `-0`, `0_0` as a length. RFC 9110 §8.6: 1*DIGIT only."""
    server, supervisor = served
    status, body = call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": length})
    assert (status, body) == (400, b'{"error": "bad Content-Length"}')
    assert supervisor.synced == []
    # The same request with a plain length is served (the refusal was the header's).
    assert call(server, "POST", "/v1/sync", {**AUTH, "Content-Length": "0"})[0] == 202


def test_two_different_content_lengths_are_refused(served: tuple[WebServer, Supervisor]) -> None:
    """RFC 9112 §6.3: differing Content-Length values are an unrecoverable framing error."""
    server, supervisor = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(
            b"POST /v1/sync HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + TOKEN.encode()
            + b"\r\nContent-Length: 0\r\nContent-Length: 2\r\n\r\n{}"
        )
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 400 ")
    assert supervisor.synced == []


def test_favicon_is_answered_without_an_error(server: WebServer) -> None:
    """Issue 19: browsers ask every page's origin for /favicon.ico; a 404 put an error in the
    console of every page. 204: nothing to show, and nothing logged."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/favicon.ico")
        response = conn.getresponse()
        assert response.status == 204
        assert response.read() == b""
        assert "max-age" in (response.getheader("Cache-Control") or "")
    finally:
        conn.close()


class SignIns:
    """The stand-in Office 365 sign-ins, recording the redirect URI and trigger of each start."""

    def __init__(self) -> None:
        self.redirect_uris: list[str] = []
        self.triggers: list[str] = []

    def available(self) -> bool:
        return True

    def start(self, address: str, branch: str | None, redirect_uri: str, trigger: str) -> str:
        self.redirect_uris.append(redirect_uri)
        self.triggers.append(trigger)
        return "https://login.example/authorize"


def linking_server(host: str, public_url: str = "") -> tuple[WebServer, SignIns]:
    signins = SignIns()
    server = listen(
        host,
        registrar=Registrar(),
        signins=signins,
        issue_agent_token=lambda address, days, issued_by: (
            "es1.agent-token",
            IssuedToken("0123456789abcdef", address, None, issued_by, None),
        ),
        public_url=public_url,
    )
    return server, signins


def post_as(server: WebServer, host: str, path: str, body: str, host_header: str | None) -> bytes:
    """POST with the admin token and this Host header (None: no Host header at all)."""
    conn = http.client.HTTPConnection(host, server.port, timeout=5)
    try:
        conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
        if host_header is not None:
            conn.putheader("Host", host_header)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body.encode())
        response = conn.getresponse()
        answer = response.read()
        assert response.status in (200, 201), (response.status, answer)
        return answer
    finally:
        conn.close()


def it_page_token_link(server: WebServer, host_header: str) -> str:
    """Log in as IT, make an agent's link on the IT page, and read it back from the page."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"/login?token={TOKEN}", headers={"Host": host_header})
    response = conn.getresponse()
    response.read()
    cookie = (response.getheader("Set-Cookie") or "").split(";")[0]
    conn.close()

    def get_it() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/it", headers={"Host": host_header, "Cookie": cookie})
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    csrf = re.search(r'name="csrf" value="([^"]+)"', get_it())
    assert csrf is not None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request(
        "POST",
        "/it/tokens",
        body=f"address=agent%40example.com&csrf={csrf.group(1)}",
        headers={
            "Host": host_header,
            "Cookie": cookie,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert conn.getresponse().status == 303
    conn.close()
    link = re.search(r'<code id="token-link">([^<]+)</code>', get_it())
    assert link is not None
    return html.unescape(link.group(1))


def test_links_and_the_redirect_uri_use_public_url_whatever_the_host_header_says() -> None:
    """Issue 19: behind a TLS proxy, links and the OAuth redirect were http:// + Host. With
    public_url they are built from it alone: the API's link, the IT page's, the redirect URI."""
    server, registrar = linking_server("127.0.0.1", "https://emailsync.example.com/sync")
    try:
        for host_header in ("attacker.example", f"127.0.0.1:{server.port}", None):
            answer = post_as(
                server, "127.0.0.1", "/v1/tokens", '{"address": "agent@example.com"}', host_header
            )
            assert json.loads(answer)["link"] == (
                "https://emailsync.example.com/sync/login?token=es1.agent-token"
            )
            post_as(
                server,
                "127.0.0.1",
                "/v1/mailboxes/agent@example.com/office365/start",
                "",
                host_header,
            )
        assert (
            registrar.redirect_uris
            == ["https://emailsync.example.com/sync/oauth/office365/callback"] * 3
        )
        assert it_page_token_link(server, "attacker.example") == (
            "https://emailsync.example.com/sync/login?token=es1.agent-token"
        )
    finally:
        server.stop()


def test_without_public_url_links_come_from_the_host_header_with_ipv6_bracketed() -> None:
    """Without public_url: http:// + the Host header; without a usable Host, the listener's own
    address, an IPv6 literal in brackets (RFC 3986 §3.2.2), never `http://::1:9387`."""
    server, registrar = linking_server("::1")
    try:
        bracketed = f"http://[::1]:{server.port}"
        for host_header in (f"[::1]:{server.port}", None, f"::1:{server.port}"):
            answer = post_as(
                server, "::1", "/v1/tokens", '{"address": "agent@example.com"}', host_header
            )
            assert json.loads(answer)["link"] == f"{bracketed}/login?token=es1.agent-token"
            post_as(
                server, "::1", "/v1/mailboxes/agent@example.com/office365/start", "", host_header
            )
        assert registrar.redirect_uris == [f"{bracketed}/oauth/office365/callback"] * 3
    finally:
        server.stop()
    server, _ = linking_server("127.0.0.1")
    try:
        assert it_page_token_link(server, "emailsync.lan:9387") == (
            "http://emailsync.lan:9387/login?token=es1.agent-token"
        )
    finally:
        server.stop()


def test_the_session_cookie_is_secure_when_public_url_is_https() -> None:
    """Browsers reach the pages over TLS (public_url https://): the cookie is never sent in
    clear. Without it (plain http on loopback) a Secure cookie would not be kept at all."""
    for public_url, secure in (("https://emailsync.example.com", True), ("", False)):
        server, _ = linking_server("127.0.0.1", public_url)
        try:
            for path in (f"/login?token={TOKEN}", "/login"):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                conn.close()
                attributes = (response.getheader("Set-Cookie") or "").split("; ")
                assert ("Secure" in attributes) is secure, attributes
                assert "HttpOnly" in attributes
        finally:
            server.stop()


class SetUp(SignIns):
    """The stand-in registrar and sign-ins in one, recording each First Time Setup's trigger."""

    def setup_mailbox(self, address: str, *args: str, **_: object) -> None:
        self.triggers.append(args[3] if len(args) > 3 else "auto")

    def mailbox_detail(self, address: str) -> dict[str, object] | None:
        return {"address": address, "trigger": self.triggers[-1]} if self.triggers else None

    def branches(self) -> list[dict[str, object]]:
        return [{"name": "main", "host": "imap.example.com"}]


def test_first_time_setup_through_the_api_takes_the_trigger() -> None:
    """Issue 19: `PUT /v1/mailboxes/{address}` and the Office 365 start take `trigger`
    (`auto`, the default, or `manual`); anything else is a 400 that starts nothing."""
    registrar = SetUp()
    server = listen(registrar=registrar, signins=registrar)
    try:
        path = "/v1/mailboxes/agent@example.com"
        setup = {"branch": "main", "username": "agent", "password": "pw"}
        for body, expected in (
            ({**setup, "trigger": "manual"}, (200, "manual")),
            (setup, (200, "auto")),
            ({**setup, "trigger": "auto"}, (200, "auto")),
            ({**setup, "trigger": "sometimes"}, (400, None)),
            ({**setup, "trigger": None}, (400, None)),
        ):
            status, answer = call(server, "PUT", path, AUTH, json.dumps(body))
            assert (status, json.loads(answer).get("trigger")) == expected, answer
        start = path + "/office365/start"
        assert call(server, "POST", start, AUTH, '{"trigger": "manual"}')[0] == 200
        assert call(server, "POST", start, AUTH, "")[0] == 200
        assert call(server, "POST", start, AUTH, '{"trigger": "never"}')[0] == 400
        assert registrar.triggers == ["manual", "auto", "auto", "manual", "auto"]
    finally:
        server.stop()


def test_the_email_sync_page_lets_the_agent_choose_the_trigger() -> None:
    """Both First Time Setup forms offer "as soon as it lands" and "when I click Start Sync";
    the choice reaches the registrar (a value not offered is read as the default, auto)."""
    registrar = SetUp()
    server = listen(registrar=registrar, signins=registrar)
    try:
        _, cookie = page(server, f"/login?token={TOKEN}")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/email-sync/agent@example.com", headers={"Cookie": cookie})
        setup_page = conn.getresponse().read().decode()
        conn.close()
        for form in ("basic", "office365"):
            section = setup_page[setup_page.index(f'id="{form}"') :]
            section = section[: section.index("</form>")]
            assert 'name="trigger" value="auto" checked' in section
            assert 'name="trigger" value="manual"' in section
        csrf = re.search(r'name="csrf" value="([^"]+)"', setup_page)
        assert csrf is not None
        form_headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
        for action, trigger in (("setup", "manual"), ("office365", "manual"), ("setup", "x")):
            body = f"csrf={csrf.group(1)}&branch=main&username=a&password=p&trigger={trigger}"
            status, _ = call(
                server, "POST", f"/email-sync/agent@example.com/{action}", form_headers, body
            )
            assert status in (200, 303)
        assert registrar.triggers == ["manual", "manual", "auto"]
    finally:
        server.stop()


AGENT_TOKEN = "es2.0123456789abcdef.the-agents-secret"
AGENT = {"Authorization": f"Bearer {AGENT_TOKEN}"}
API_ROUTES = [r for r in ROUTES if not r.access.page]
ROUTED = {(r.method, r.path) for r in ROUTES}
CONTROL_API = Path(__file__).resolve().parents[2] / "config" / "control-api.yaml"


def concrete(path: str, address: str) -> str:
    """A request path for a route's path, its parameters filled in."""
    return path.replace("{address}", address).replace("{name}", "main").replace("{id}", "0" * 16)


@pytest.fixture
def with_agent() -> Iterator[tuple[WebServer, Supervisor]]:
    """A listener that knows one agent token besides the admin's: agent@example.com's."""
    supervisor = Supervisor()
    server = listen(
        supervisor=supervisor,
        registrar=Registrar(),
        check_agent_token=lambda token: "agent@example.com" if token == AGENT_TOKEN else None,
    )
    yield server, supervisor
    server.stop()


@pytest.mark.parametrize("route", API_ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_each_api_route_admits_whom_its_access_in_the_table_says(
    with_agent: tuple[WebServer, Supervisor], route: Route
) -> None:
    """No token: 401 where the route needs one. An agent's token: 403 on an admin route, the
    unknown mailbox's 404 on another mailbox's route, and nothing else refused."""
    server, supervisor = with_agent
    path = concrete(route.path, "other@example.com")
    unauthorised = (401, b'{"error": "missing or wrong bearer token"}')
    forbidden = (403, b'{"error": "this token is for one mailbox only"}')
    not_theirs = (404, b'{"error": "no such mailbox"}')
    answer = call(server, route.method, path)
    assert (answer == unauthorised) is (route.access in TOKEN_NEEDED), answer
    answer = call(server, route.method, path, AGENT)
    if route.access is Access.ADMIN:
        assert answer == forbidden
    elif route.access is Access.MAILBOX:
        assert answer == not_theirs
    else:
        assert answer not in (unauthorised, forbidden, not_theirs)
    assert supervisor.synced == []


def test_the_admin_alone_may_call_the_branch_token_and_sync_all_routes() -> None:
    """The table's ADMIN routes, written out: an agent's token never reaches these (the test
    above checks that the dispatch honours the table; this one, that the table is right)."""
    admin_only = {(r.method, r.path) for r in ROUTES if r.access is Access.ADMIN}
    assert admin_only == {
        ("POST", "/v1/sync"),
        ("GET", "/v1/branches"),
        ("PUT", "/v1/branches/{name}"),
        ("GET", "/v1/tokens"),
        ("POST", "/v1/tokens"),
        ("DELETE", "/v1/tokens/{id}"),
    }


@pytest.mark.parametrize("path", sorted({r.path for r in ROUTES}))
def test_every_method_a_routed_path_lacks_is_405_with_the_tables_allow(
    server: WebServer, path: str
) -> None:
    routed = [m for m in ("GET", "POST", "PUT", "DELETE") if (m, path) in ROUTED]
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"):
        if method in routed:
            continue
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request(method, concrete(path, "agent@example.com"), headers=AUTH)
            response = conn.getresponse()
            response.read()
            assert (response.status, response.getheader("Allow")) == (405, ", ".join(routed))
        finally:
            conn.close()


def test_the_api_routes_are_the_operations_of_control_api_yaml() -> None:
    """config/control-api.yaml documents each API route of the table and no other, with the
    credentials the table asks for (no token, an optional one, or the bearer token)."""
    document = yaml.safe_load(CONTROL_API.read_text(encoding="utf-8"))
    security = {"[]": "none", "[{}, {'bearer': []}]": "optional", "[{'bearer': []}]": "bearer"}
    documented = {
        (method.upper(), path, security[str(operation.get("security", document["security"]))])
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "delete")
    }
    credentials = {
        Access.ANYONE: "none",
        Access.SIGNED: "none",
        Access.OPTIONAL: "optional",
        Access.METRICS: "optional",
        **dict.fromkeys(TOKEN_NEEDED, "bearer"),
    }
    routed = {(r.method, r.path, credentials[r.access]) for r in API_ROUTES}
    assert routed == documented
