"""The one HTTP listener: /metrics, /healthz, /readyz, a status page and the /v1 control API.

Its shape is written down in ``config/control-api.yaml`` (OpenAPI 3.1); keep the two in step.

Hostile clients: at most ``MAX_CONNECTIONS`` connections are served at once, each gets one
request (HTTP/1.0) and ``REQUEST_SECONDS`` in all to send it (a deadline over the whole request,
not a timeout per read, so a client trickling a byte a second is cut off too). A connection
beyond the cap is answered ``503`` with ``Retry-After`` at once and closed: a flood of idle
connections delays ``/healthz`` by at most ``REQUEST_SECONDS``, when the idle ones are dropped.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import io
import ipaddress
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, unquote

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from emailsync.address import mailbox_address_problem, normalise_address
from emailsync.config import weak_token_problem
from emailsync.worker import WorkerStatus

log = structlog.get_logger(__name__)

REQUEST_SECONDS = 10.0  # headers and body of one request, in all; then the client is dropped
MAX_CONNECTIONS = 64  # served at once; beyond, 503 at once (a thread each: keep it small)
MAX_BODY_BYTES = 64 * 1024
REFUSED_WARNING_SECONDS = 10.0  # at most one warning about refused connections this often
REFUSE_SECONDS = 0.5  # what writing a 503 to a connection beyond the cap may take at most
NO_SUCH_MAILBOX = {"error": "no such mailbox"}
BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nbusy\n"
)


class Control(Protocol):
    """What the listener asks of the supervisor."""

    def statuses(self) -> list[WorkerStatus]: ...

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool: ...

    def stop_mailbox(self, address: str) -> bool: ...

    def start_mailbox(self, address: str) -> bool: ...

    def healthy(self) -> bool: ...

    def ready(self) -> bool: ...


class WebServer:
    """Serves HTTP on one address in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        control: Control,
        registry: CollectorRegistry,
        token: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_seconds: float = REQUEST_SECONDS,
    ) -> None:
        problem = weak_token_problem(token)
        if problem is not None:
            # Never serve the control API behind an empty or guessable token.
            raise ValueError(f"control token {problem}")
        handler = _handler_class(control, registry, token, request_seconds)
        self.httpd = _BoundedHTTPServer((host, port), handler, max_connections)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        if not is_loopback(host):
            log.warning(
                "listen_not_loopback",
                host=host,
                port=self.port,
                hint="the control API and /metrics are reachable from the network; "
                "put a TLS proxy in front and firewall the port",
            )

    @property
    def active_connections(self) -> int:
        """Connections being served now (at most ``max_connections``)."""
        return self.httpd.active

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()


def is_loopback(host: str) -> bool:
    """True for a listen host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but never more than ``max_connections`` at once."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of clients (a dashboard refresh, a
    # CRM's Start Sync fan-out) would see connections dropped by the kernel before the cap
    # above could answer them with a 503.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._count_lock = threading.Lock()
        self.active = 0
        self._max_connections = max_connections
        self._refused = 0  # since the last warning
        self._warned_at = float("-inf")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse(request)
            self.shutdown_request(request)
            self._refused += 1
            now = time.monotonic()
            if now - self._warned_at >= REFUSED_WARNING_SECONDS:
                # One line per interval, not per connection: a flood must not flood the journal.
                log.warning(
                    "http_connections_refused",
                    count=self._refused,
                    max_connections=self._max_connections,
                    last_client=client_address[0],
                )
                self._refused, self._warned_at = 0, now
            return
        self._count(+1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._count(-1)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._count(-1)
            self._slots.release()

    def _count(self, change: int) -> None:
        with self._count_lock:
            self.active += change


def _refuse(request: socket.socket) -> None:
    """Answer 503 without reading the request; runs on the accept thread, so never blocks long."""
    try:
        request.settimeout(REFUSE_SECONDS)
        request.sendall(BUSY_RESPONSE)
        request.shutdown(socket.SHUT_WR)
        # Read what already arrived: closing with unread data sends RST, which can make the
        # client lose the 503 it was sent.
        request.recv(MAX_BODY_BYTES, socket.MSG_DONTWAIT)
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """Reads a socket until a deadline over the whole request, not a timeout per read."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def _handler_class(
    control: Control, registry: CollectorRegistry, token: str, request_seconds: float
) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "emailsync"
        sys_version = ""
        timeout = request_seconds

        def setup(self) -> None:
            super().setup()
            deadline = time.monotonic() + request_seconds
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

        def end_headers(self) -> None:
            # The deadline covers reading the request; writing the answer gets its own time
            # (a request read just before the deadline would leave the socket a few ms).
            self.connection.settimeout(request_seconds)
            super().end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            # The request line only: never headers (Authorization) or bodies.
            # (requestline is unset when the request line itself timed out or was garbage.)
            log.debug(
                "http_request",
                request=getattr(self, "requestline", ""),
                client=self.client_address[0],
                detail=format % args,  # the status line or the error; never a header
            )

        def do_GET(self) -> None:
            try:
                self._get()
            except Exception:
                self._failed()

        def do_POST(self) -> None:
            try:
                self._post()
            except Exception:
                self._failed()

        def _method_not_allowed(self) -> None:
            # RFC 9110 §15.5.6: 405 with Allow, for a method we know but this path has not
            # (a 501 would say the server does not know the method at all).
            path = self.path.split("?", 1)[0]
            self.close_connection = True
            body = b'{"error": "method not allowed"}'
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", _allowed_method(path) or "GET, POST")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        if not TYPE_CHECKING:  # (for mypy, Handler keeps no catch-all attribute)

            def __getattr__(self, name: str) -> Any:
                # http.server dispatches on do_<METHOD> and answers 501 when there is none:
                # every method but GET and POST (HEAD, PUT, TRACE, QUERY, …) gets 405 instead.
                if name.startswith("do_"):
                    return self._method_not_allowed
                raise AttributeError(name)

        def _failed(self) -> None:
            # A bug in a route must cost a 500 and a log line, not the connection or a thread.
            log.exception("http_request_failed", request=self.requestline)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

        def _get(self) -> None:
            path = self.path.split("?", 1)[0]
            if _allowed_method(path) == "POST":
                self._method_not_allowed()
            elif path == "/metrics":
                self._send(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = control.healthy()
                self._text(
                    HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                    "ok" if ok else "unhealthy",
                )
            elif path == "/readyz":
                ok = control.ready()
                self._text(
                    HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                    "ready" if ok else "starting",
                )
            elif path == "/":
                # Addresses and errors only for the token holder; others see counts by state.
                detailed = self._has_token()
                self._send(
                    HTTPStatus.OK,
                    _status_page(control.statuses(), detailed=detailed).encode(),
                    "text/html; charset=utf-8",
                )
            elif path == "/v1/mailboxes":
                if self._authorised():
                    self._json(
                        HTTPStatus.OK, {"mailboxes": [asdict(s) for s in control.statuses()]}
                    )
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _post(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
                return
            if length > MAX_BODY_BYTES:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            if length:
                self.rfile.read(length)
            if _allowed_method(self.path.split("?", 1)[0]) == "GET":
                self._method_not_allowed()
                return
            if not self._authorised():
                return
            path, _, query = self.path.partition("?")
            parts = [unquote(p) for p in path.strip("/").split("/")]
            include_stuck = _include_stuck(query)
            if include_stuck is None:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "include_stuck must be true or false"})
                return
            if parts == ["v1", "sync"]:
                control.start_sync(None, include_stuck=include_stuck)
                self._json(HTTPStatus.ACCEPTED, {"sync": "all"})
                return
            if (
                len(parts) == 4
                and parts[:2] == ["v1", "mailboxes"]
                and parts[3] in ("sync", "stop", "start")
            ):
                action = parts[3]
                address = _mailbox_address(parts[2])
                act = {
                    "sync": lambda a: control.start_sync(a, include_stuck=include_stuck),
                    "stop": control.stop_mailbox,
                    "start": control.start_mailbox,
                }
                # An invalid address answers exactly like an unknown one, and no path is ever
                # built from it (stop markers are named by a hash).
                if address is not None and act[action](address):
                    self._json(HTTPStatus.ACCEPTED, {action: address})
                else:
                    self._json(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
                return
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _has_token(self) -> bool:
            given = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
            return hmac.compare_digest(given, expected)

        def _authorised(self) -> bool:
            if self._has_token():
                return True
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Bearer realm="emailsync"')
            body = b'{"error": "missing or wrong bearer token"}'
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return False

        def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _text(self, status: HTTPStatus, text: str) -> None:
            self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _include_stuck(query: str) -> bool | None:
    """``include_stuck`` of a Start Sync query string; None when its value is not a boolean."""
    values = parse_qs(query, keep_blank_values=True).get("include_stuck", ["false"])
    return {"true": True, "1": True, "false": False, "0": False}.get(values[-1].lower())


GET_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/v1/mailboxes"})
MAILBOX_ACTIONS = ("sync", "stop", "start")


def _allowed_method(path: str) -> str | None:
    """The one method a known path answers, or None for a path we do not serve."""
    if path in GET_PATHS:
        return "GET"
    parts = path.strip("/").split("/")
    if parts == ["v1", "sync"] or (
        len(parts) == 4 and parts[:2] == ["v1", "mailboxes"] and parts[3] in MAILBOX_ACTIONS
    ):
        return "POST"
    return None


def _mailbox_address(raw: str) -> str | None:
    """The normalised address from a URL path segment, or None when it is not a mailbox's."""
    address = normalise_address(raw) if raw and raw == raw.strip() else None
    if address is None or mailbox_address_problem(address) is not None:
        return None
    return address


def _status_page(statuses: list[WorkerStatus], *, detailed: bool) -> str:
    if detailed:
        head = (
            "<tr><th>mailbox</th><th>state</th><th>trigger</th><th>queue</th><th>stuck</th>"
            "<th>last sync</th><th>filed</th><th>last error</th></tr>"
        )
        cells: list[tuple[object, ...]] = [
            (
                s.address,
                s.state,
                s.trigger,
                s.queue,
                s.stuck,
                s.last_sync or "never",
                ", ".join(f"{k}: {n}" for k, n in sorted(s.filed.items())) or "-",
                s.last_error or "",
            )
            for s in statuses
        ]
        note = ""
    else:
        head = "<tr><th>state</th><th>mailboxes</th></tr>"
        cells = sorted(Counter(s.state for s in statuses).items())
        note = (
            "<p>Counts only: addresses and errors are shown with the control token "
            "(<code>emailsync status</code>, or an <code>Authorization: Bearer</code> header)."
            "</p>"
        )
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in cells
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>emailsync</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>emailsync</h1>
<table>{head}
{rows}
</table>{note}<p><a href="/metrics">/metrics</a></p></body></html>
"""
