"""The one HTTP listener and its limits; the request handler the route table dispatches from.

What answers which request is ``emailsync.web.routes`` (one table: method, path, who may call,
handler); the handlers are ``emailsync.web.api`` (health, metrics, /v1) and
``emailsync.web.pageroutes`` (the HTML). The shape of the API is ``config/control-api.yaml``
(OpenAPI 3.1).

Hostile clients: at most ``MAX_CONNECTIONS`` connections are served at once, and one client
address holds at most half of them, so a single client cannot lock the others out. Each
connection gets one request (HTTP/1.0) and ``REQUEST_SECONDS`` in all to send it (a deadline
over the whole request, not a timeout per read, so a client trickling a byte a second is cut
off too), its body at most ``MAX_BODY_BYTES``. A connection beyond the caps goes to a small
reserve that answers only ``/healthz`` and ``/readyz`` (anything else: ``503`` with
``Retry-After``); it has ``PROBE_SECONDS`` to send its request, and when the reserve is full
the oldest connection that has sent nothing yet is dropped to make room. Idle connections,
however many, never keep a liveness probe from its answer (issue 19: a restart of a healthy
daemon). Beyond the reserve: ``503`` at once.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import weak_token_problem
from emailsync.errors import KeyUnavailableError
from emailsync.web import routes
from emailsync.web.call import RefusedError
from emailsync.web.pages import Pages, SessionStore
from emailsync.web.ports import (
    AgentTokenCheck,
    AgentTokenIssue,
    AgentTokenList,
    AgentTokenRevoke,
    App,
    Control,
)

if TYPE_CHECKING:
    from emailsync.runtime.registrar import MailboxRegistrar
    from emailsync.runtime.signins import SignIns

log = structlog.get_logger(__name__)

REQUEST_SECONDS = 10.0  # headers and body of one request, in all; then the client is dropped
MAX_CONNECTIONS = 64  # served at once; beyond, 503 at once (a thread each: keep it small)
# Beyond the caps, this many more connections may ask for /healthz or /readyz only.
HEALTH_RESERVE_CONNECTIONS = 8
PROBE_SECONDS = 1.0  # what a reserve connection has to send its request (a probe sends at once)
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY_BYTES = 64 * 1024
REFUSED_WARNING_SECONDS = 10.0  # at most one warning about refused connections this often
REFUSE_SECONDS = 0.5  # what writing a 503 to a connection beyond the cap may take at most
KEY_UNAVAILABLE = (
    "This server cannot check sign-in links right now: it cannot read its registry key or "
    "its state database. Please tell IT (the daemon's log says which and why)."
)
# Every page: nothing but our own stylesheet and script, no framing, no referrer (a login
# link carries a token), no sniffing. https://www.w3.org/TR/CSP3/
PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nbusy\n"
)


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
        max_connections_per_client: int | None = None,
        request_seconds: float = REQUEST_SECONDS,
        registrar: MailboxRegistrar | None = None,
        signins: SignIns | None = None,
        check_agent_token: AgentTokenCheck | None = None,
        issue_agent_token: AgentTokenIssue | None = None,
        list_agent_tokens: AgentTokenList | None = None,
        revoke_agent_tokens: AgentTokenRevoke | None = None,
        public_url: str = "",
        sessions: SessionStore | None = None,
        anonymous_key: Callable[[], bytes] | None = None,
    ) -> None:
        problem = weak_token_problem(token)
        if problem is not None:
            # Never serve the control API behind an empty or guessable token.
            raise ValueError(f"control token {problem}")
        self.pages = Pages(
            secure_cookie=public_url.startswith("https://"),
            sessions=sessions,
            anonymous_key=anonymous_key,
        )
        app = App(
            control,
            registry,
            token,
            self.pages,
            registrar,
            signins,
            check_agent_token,
            issue_agent_token,
            list_agent_tokens,
            revoke_agent_tokens,
            metrics_token=metrics_need_token(host),
            public_url=public_url.rstrip("/"),
        )
        self.httpd = _BoundedHTTPServer(
            (host, port),
            app,
            request_seconds,
            max_connections,
            max_connections_per_client or max(1, max_connections // 2),
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        if not is_loopback(host):
            log.warning(
                "listen_not_loopback",
                host=host,
                port=self.port,
                hint="the control API (and /metrics, with the token) is reachable from the "
                "network; put a TLS proxy in front and firewall the port",
            )

    @property
    def active_connections(self) -> int:
        """Connections being served now, the health reserve's aside (at most
        ``max_connections``)."""
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
        stopper = threading.Thread(target=self.httpd.shutdown, name="http-stop", daemon=True)
        stopper.start()
        # serve_forever sees the stop request only between polls (every 0.5 s): a connection
        # to ourselves wakes it at once, until it has noticed.
        host = str(self.httpd.server_address[0])
        poke = _WILDCARD_TO_LOOPBACK.get(host, host)
        while stopper.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection((poke, self.port), timeout=0.2).close()
            stopper.join(0.05)
        self.httpd.server_close()


# Where to connect to reach a listener bound to every address.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 -- not a bind


def is_loopback(host: str) -> bool:
    """True for a listen host only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def metrics_need_token(host: str) -> bool:
    """True when ``/metrics`` answers only the admin token: on any listener but a loopback one.

    The metrics name every mailbox (the ``mailbox`` label), which ``/`` hides from anonymous
    visitors; on loopback only this machine's users can ask, as with ``emailsync status``.
    Prometheus sends the token natively (``authorization: credentials_file:``).
    """
    return not is_loopback(host)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, never more than ``max_connections`` at once (``per_client``
    of them from one address), plus the health reserve (see the module's docstring)."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of clients (a dashboard refresh, a
    # CRM's Start Sync fan-out) would see connections dropped by the kernel before the cap
    # above could answer them with a 503.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
        request_seconds: float,
        max_connections: int,
        per_client: int,
    ) -> None:
        self.app = app
        self.request_seconds = request_seconds
        self.probe_seconds = PROBE_SECONDS
        self._lock = threading.Lock()
        self.active = 0
        self._clients: Counter[str] = Counter()  # main slots held, by client address
        # The reserve's connections, oldest first: True once its request has arrived.
        self._reserve: dict[socket.socket, bool] = {}
        self._max_connections = max_connections
        self._per_client = per_client
        self._refused = 0  # since the last warning
        self._warned_at = float("-inf")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        dropped: socket.socket | None = None
        reserved: bool | None
        with self._lock:
            if self.active < self._max_connections and self._clients[client] < self._per_client:
                self.active += 1
                self._clients[client] += 1
                reserved = False
            else:
                reserved, dropped = self._take_reserve(request)
        if dropped is not None:
            _drop(dropped)
            self.note_refused(client)
        if reserved is None:
            _refuse(request)
            self.shutdown_request(request)
            self.note_refused(client)
            return
        try:
            threading.Thread(
                target=self._serve, args=(request, client_address, reserved), daemon=True
            ).start()
        except BaseException:
            self._release(request, client, reserved)
            raise

    def _take_reserve(self, request: socket.socket) -> tuple[bool | None, socket.socket | None]:
        """A reserve slot (True) or none (None), and the idle connection dropped to make room."""
        dropped = None
        if len(self._reserve) >= HEALTH_RESERVE_CONNECTIONS:
            dropped = next((s for s, asked in self._reserve.items() if not asked), None)
            if dropped is None:
                return None, None  # every reserve connection is being answered
            del self._reserve[dropped]
        self._reserve[request] = False
        return True, dropped

    def _serve(self, request: socket.socket, client_address: Any, reserved: bool) -> None:
        """What ``process_request_thread`` does, with the handler of the slot taken."""
        try:
            if reserved:
                _ProbeHandler(request, client_address, self)
            else:
                self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release(request, str(client_address[0]), reserved)
            self.shutdown_request(request)

    def _release(self, request: socket.socket, client: str, reserved: bool) -> None:
        with self._lock:
            if reserved:
                self._reserve.pop(request, None)  # (gone already when it was dropped)
                return
            self.active -= 1
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]

    def request_arrived(self, request: socket.socket) -> None:
        """A reserve connection sent its request: it is answered, never dropped for room."""
        with self._lock:
            if request in self._reserve:
                self._reserve[request] = True

    def note_refused(self, client: str) -> None:
        """Count a connection turned away; warn at most once per REFUSED_WARNING_SECONDS."""
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._warned_at < REFUSED_WARNING_SECONDS:
                return
            # One line per interval, not per connection: a flood must not flood the journal.
            count, self._refused, self._warned_at = self._refused, 0, now
        log.warning(
            "http_connections_refused",
            count=count,
            max_connections=self._max_connections,
            max_connections_per_client=self._per_client,
            last_client=client,
        )


def _drop(request: socket.socket) -> None:
    """End a reserve connection that has sent nothing (its own thread then closes it)."""
    with contextlib.suppress(OSError):
        request.send(BUSY_RESPONSE, socket.MSG_DONTWAIT)
        request.shutdown(socket.SHUT_RDWR)


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


class RequestHandler(BaseHTTPRequestHandler):
    """One request: read within the deadline, dispatched by the route table (``routes``).

    What it works with comes from the server: ``self.server.app`` (``ports.App``).
    """

    server: _BoundedHTTPServer
    server_version = "emailsync"
    sys_version = ""
    body = b""
    _seconds = REQUEST_SECONDS  # to read the request in (setup), then to write the answer
    health_only = False  # the health reserve's connections (see _ProbeHandler)

    @property
    def app(self) -> App:
        """The daemon's parts this request may call (the server's)."""
        return self.server.app

    def setup(self) -> None:
        super().setup()
        seconds = self.server.probe_seconds if self.health_only else self.server.request_seconds
        self._seconds = seconds
        self.connection.settimeout(seconds)
        deadline = time.monotonic() + seconds
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def end_headers(self) -> None:
        # The deadline covers reading the request; writing the answer gets its own time (a
        # request read just before the deadline would leave the socket a few ms).
        self.connection.settimeout(self._seconds)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        # The request line without its query (a login link carries a token there); never
        # headers (Authorization, Cookie) or bodies. (requestline is unset when the request
        # line itself timed out or was garbage.)
        request = getattr(self, "requestline", "")
        log.debug(
            "http_request",
            request=request.split("?", 1)[0],
            client=self.client_address[0],
            detail=(format % args).split("?", 1)[0],  # the status line or the error
        )

    if not TYPE_CHECKING:  # (for mypy, the handler keeps no catch-all attribute)

        def __getattr__(self, name: str) -> Any:
            # http.server answers the method X with do_X (501 when there is none): every
            # method comes here, and one the route table has no route with gets 405.
            if name.startswith("do_"):
                return lambda: self._dispatch(name.removeprefix("do_"))
            raise AttributeError(name)

    def _dispatch(self, method: str) -> None:
        if method not in routes.METHODS:  # HEAD, TRACE, QUERY, PATCH, …
            path = self.path.split("?", 1)[0]
            self.method_not_allowed(routes.allowed(path) or routes.NOT_ROUTED_ALLOW)
            return
        if self.health_only:
            self.server.request_arrived(self.connection)
            if method != "GET" or self.path.split("?", 1)[0] not in HEALTH_PATHS:
                self._busy()
                return
        try:
            if method != "GET" and not self._read_body():
                return
            routes.dispatch(self, method)
        except RefusedError as exc:
            retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            self.json(exc.status, {"error": exc.error}, retry)
        except KeyUnavailableError:
            self._key_unavailable()
        except Exception:
            self._failed()

    def _read_body(self) -> bool:
        length = _content_length(self.headers.get_all("Content-Length") or [])
        if length is None:
            self.json(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
            return False
        if length > MAX_BODY_BYTES:
            self.json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            return False
        self.body = self.rfile.read(length) if length else b""
        return True

    # -- who is asking, and where --------------------------------------------------------------

    def base_url(self) -> str:
        """This listener's URL as browsers reach it (links, the OAuth redirect URI).

        ``public_url`` when it is set, whatever the request says: behind a TLS proxy the Host
        header's ``http://`` would break the Office 365 redirect (Entra refuses a non-localhost
        http:// URI) and send tokens in clear (issue 19). Else the Host header when it is a
        plain host[:port] (the identity provider only redirects to a registered URI anyway),
        else the socket's own address.
        """
        if self.app.public_url:
            return self.app.public_url
        host = self.headers.get("Host") or ""
        if not _HOST_HEADER.fullmatch(host):
            address, port = self.connection.getsockname()[:2]
            if ":" in address:
                # RFC 3986 §3.2.2: an IPv6 literal in brackets (RFC 6874: a zone's % as %25).
                address = "[" + address.replace("%", "%25") + "]"
            host = f"{address}:{port}"
        return f"http://{host}"

    def login_link(self, token: str) -> str:
        """The link an agent logs in with (their token in it)."""
        return f"{self.base_url()}/login?token={token}"

    # -- answers -------------------------------------------------------------------------------

    def json(
        self,
        status: HTTPStatus,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send(status, json.dumps(payload).encode(), "application/json", headers)

    def text(self, status: HTTPStatus, text: str) -> None:
        self.send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def html(self, status: HTTPStatus, text: str, *, cookie: str | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self._page_headers(cookie)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, *, cookie: str | None = None) -> None:
        # 303: the browser follows with GET (POST-redirect-GET; a reload resends nothing).
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self._page_headers(cookie)
        self.end_headers()

    def _page_headers(self, cookie: str | None) -> None:
        for name, value in PAGE_HEADERS:
            self.send_header(name, value)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)

    def unauthorised(self) -> None:
        """401: no token, or not one we issued."""
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Bearer realm="emailsync"')
        body = b'{"error": "missing or wrong bearer token"}'
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def method_not_allowed(self, allow: str) -> None:
        """405 with the methods the path takes (a 501 would say we know no such method)."""
        self.close_connection = True
        body = b'{"error": "method not allowed"}'
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", allow)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _busy(self) -> None:
        # A reserve connection asked for more than health: the same 503 as beyond the cap.
        self.server.note_refused(str(self.client_address[0]))
        self.close_connection = True
        body = b"busy\n"
        self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _key_unavailable(self) -> None:
        # The server cannot check links (its registry key is unreadable): a 500 that says so,
        # never "your link expired" (issue 18). supervisor logged the file's problem.
        self.close_connection = True
        if self.path.startswith("/v1/"):
            self.json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": KEY_UNAVAILABLE})
            return
        page = self.app.pages.render("server_fault.html", None, message=KEY_UNAVAILABLE)
        self.html(HTTPStatus.INTERNAL_SERVER_ERROR, page)

    def _failed(self) -> None:
        # A bug in a route must cost a 500 and a log line, not the connection or a thread.
        log.exception("http_request_failed", request=self.requestline.split("?", 1)[0])
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})


class _ProbeHandler(RequestHandler):
    """The health reserve's connections: /healthz and /readyz only, ``PROBE_SECONDS`` to ask."""

    health_only = True


def _content_length(values: list[str]) -> int | None:
    """The body's length from the Content-Length header(s); 0 without one, None when invalid.

    RFC 9110 §8.6: ``1*DIGIT`` and nothing else (``int()`` would take ``+5``, ``-0``, ``1_0``).
    RFC 9112 §6.3: several differing values are a framing error, never a choice.
    """
    if not values:
        return 0
    value = values[0]
    if len(set(values)) > 1 or not (value.isascii() and value.isdigit()):
        return None
    # (A length of 19 digits or more is over any limit: no need to convert all of it.)
    return int(value) if len(value) <= 18 else 10**18


# A Host header that links may be built from: a plain host[:port], nothing else.
_HOST_HEADER = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
