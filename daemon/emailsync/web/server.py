"""The one HTTP listener: /metrics, /healthz, /readyz, the /v1 control API, and the pages.

The HTML (the status page and the self-service pages) is served by ``emailsync.web.pageroutes``: the
request handler here derives from its ``PageRoutes`` and adds everything else.

Its shape is written down in ``config/control-api.yaml`` (OpenAPI 3.1); keep the two in step.

Hostile clients: at most ``MAX_CONNECTIONS`` connections are served at once, and one client
address holds at most half of them, so a single client cannot lock the others out. Each
connection gets one request (HTTP/1.0) and ``REQUEST_SECONDS`` in all to send it (a deadline
over the whole request, not a timeout per read, so a client trickling a byte a second is cut
off too). A connection beyond the caps goes to a small reserve that answers only ``/healthz``
and ``/readyz`` (anything else: ``503`` with ``Retry-After``); it has ``PROBE_SECONDS`` to send
its request, and when the reserve is full the oldest connection that has sent nothing yet is
dropped to make room. Idle connections, however many, never keep a liveness probe from its
answer (issue 19: a restart of a healthy daemon). Beyond the reserve: ``503`` at once.
"""

from __future__ import annotations

import contextlib
import gzip
import hmac
import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qs, unquote

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from emailsync.config import SECURITIES, TRIGGERS, weak_token_problem
from emailsync.errors import KeyUnavailableError, RegistrationError
from emailsync.runtime.worker import trim_malloc
from emailsync.state.agenttoken import token_json
from emailsync.telemetry.metrics import exposition
from emailsync.timeline.crm import signing
from emailsync.timeline.crm.callback import GROUPS_CHANGED_PATH, GroupsChangedHandler
from emailsync.web.pageroutes import (
    AGENT_TOKEN_PREFIXES,
    BRANCH_NAME,
    HOST_NAME,
    OFFICE365_CALLBACK,
    PAGE_GET_PATHS,
    PageRoutes,
    RefusedError,
    mailbox_address,
    page_allowed_method,
    status_page,
)
from emailsync.web.pages import Pages, Principal, SessionStore
from emailsync.web.ports import (
    AgentTokenCheck,
    AgentTokenIssue,
    AgentTokenList,
    AgentTokenRevoke,
    Control,
    Registrar,
    SelfService,
)

log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_SCRAPE_LOCK = threading.Lock()  # see _get: one /metrics at a time
# /metrics compressed when the scraper accepts it (Prometheus always does): the text of 2,000
# mailboxes is ~1.7 MB and compresses ~25-fold; level 6 costs ~6 ms of CPU on it, level 9 more
# for a few per cent fewer bytes.
GZIP_LEVEL = 6

REQUEST_SECONDS = 10.0  # headers and body of one request, in all; then the client is dropped
MAX_CONNECTIONS = 64  # served at once; beyond, 503 at once (a thread each: keep it small)
# Beyond the caps, this many more connections may ask for /healthz or /readyz only.
HEALTH_RESERVE_CONNECTIONS = 8
PROBE_SECONDS = 1.0  # what a reserve connection has to send its request (a probe sends at once)
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY_BYTES = 64 * 1024
REFUSED_WARNING_SECONDS = 10.0  # at most one warning about refused connections this often
REFUSE_SECONDS = 0.5  # what writing a 503 to a connection beyond the cap may take at most
NO_SUCH_MAILBOX = {"error": "no such mailbox"}
KEY_UNAVAILABLE = (
    "This server cannot check sign-in links right now: it cannot read its registry key or "
    "its state database. Please tell IT (the daemon's log says which and why)."
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
        registrar: Registrar | None = None,
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
        selfservice = SelfService(
            registrar,
            check_agent_token,
            issue_agent_token,
            self.pages,
            list_agent_tokens,
            revoke_agent_tokens,
        )
        metrics_token = metrics_need_token(host)
        handler = _handler_class(
            control,
            registry,
            token,
            request_seconds,
            selfservice,
            metrics_token=metrics_token,
            public_url=public_url.rstrip("/"),
        )
        probe_handler = _handler_class(
            control, registry, token, PROBE_SECONDS, selfservice, health_only=True
        )
        self.httpd = _BoundedHTTPServer(
            (host, port),
            handler,
            probe_handler,
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
        handler: type[BaseHTTPRequestHandler],
        probe_handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        per_client: int,
    ) -> None:
        self._probe_handler = probe_handler
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
        super().__init__(address, handler)

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
                self._probe_handler(request, client_address, self)
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


FORBIDDEN_FOR_AGENT = "this token is for one mailbox only"


def _handler_class(
    control: Control,
    registry: CollectorRegistry,
    token: str,
    request_seconds: float,
    selfservice: SelfService,
    *,
    health_only: bool = False,
    metrics_token: bool = False,
    public_url: str = "",
) -> type[BaseHTTPRequestHandler]:
    """The request handler; ``health_only`` for the health reserve's connections,
    ``metrics_token`` when ``/metrics`` needs the admin token, ``public_url`` (``[daemon]
    public_url``, no trailing slash) for links and the OAuth redirect."""
    expected = f"Bearer {token}".encode()
    pages = selfservice.pages

    # BaseHTTPRequestHandler named again (PageRoutes derives from it): linters then see that
    # do_GET and friends are http.server's names.
    class Handler(PageRoutes, BaseHTTPRequestHandler):
        server_version = "emailsync"
        sys_version = ""
        timeout = request_seconds
        body = b""
        # For the page routes (emailsync.web.pageroutes).
        _control = control
        _pages = pages
        _selfservice = selfservice
        _token = token

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
            # The request line without its query (a login link carries a token there); never
            # headers (Authorization, Cookie) or bodies. (requestline is unset when the
            # request line itself timed out or was garbage.)
            request = getattr(self, "requestline", "")
            log.debug(
                "http_request",
                request=request.split("?", 1)[0],
                client=self.client_address[0],
                detail=(format % args).split("?", 1)[0],  # the status line or the error
            )

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            if health_only:
                cast("_BoundedHTTPServer", self.server).request_arrived(self.connection)
                if method != "GET" or self.path.split("?", 1)[0] not in HEALTH_PATHS:
                    self._busy()
                    return
            try:
                if method != "GET" and not self._read_body():
                    return
                path = self.path.split("?", 1)[0]
                allowed = _allowed_method(path)
                if (allowed is not None and method not in allowed.split(", ")) or (
                    allowed is None and method in ("PUT", "DELETE")
                ):
                    self._method_not_allowed()
                elif method == "GET":
                    self._get()
                elif path.startswith("/v1/") or allowed is None:
                    self._api(method)
                else:
                    self._page_post()
            except RefusedError as exc:
                retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                self._json(exc.status, {"error": exc.error}, retry)
            except KeyUnavailableError:
                self._key_unavailable()
            except Exception:
                self._failed()

        def _busy(self) -> None:
            # A reserve connection asked for more than health: the same 503 as beyond the cap.
            cast("_BoundedHTTPServer", self.server).note_refused(str(self.client_address[0]))
            self.close_connection = True
            body = b"busy\n"
            self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _read_body(self) -> bool:
            length = _content_length(self.headers.get_all("Content-Length") or [])
            if length is None:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
                return False
            if length > MAX_BODY_BYTES:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return False
            self.body = self.rfile.read(length) if length else b""
            return True

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
                # every other method (HEAD, TRACE, QUERY, PATCH, …) gets 405 instead.
                if name.startswith("do_"):
                    return self._method_not_allowed
                raise AttributeError(name)

        def _key_unavailable(self) -> None:
            # The server cannot check links (its registry key is unreadable): a 500 that says
            # so, never "your link expired" (issue 18). supervisor logged the file's problem.
            self.close_connection = True
            if self.path.startswith("/v1/"):
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": KEY_UNAVAILABLE})
                return
            page = self._pages.render("server_fault.html", None, message=KEY_UNAVAILABLE)
            self._html(HTTPStatus.INTERNAL_SERVER_ERROR, page)

        def _failed(self) -> None:
            # A bug in a route must cost a 500 and a log line, not the connection or a thread.
            log.exception("http_request_failed", request=self.requestline.split("?", 1)[0])
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

        # -- GET --------------------------------------------------------------------------

        def _get(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                if metrics_token and self._admin() is None:
                    return
                # One scrape at a time, its garbage given back after: at 2,000 mailboxes a
                # scrape peaks at ~30 MB, and overlapping ones (a client that gave up and
                # asked again) would stack up (issue 10).
                with _SCRAPE_LOCK:
                    body = exposition(registry)
                headers = {"Vary": "Accept-Encoding"}
                if accepts_gzip(self.headers.get("Accept-Encoding")):
                    body = gzip_body(body)
                    headers["Content-Encoding"] = "gzip"
                self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST, headers)
                del body
                trim_malloc()
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
                detailed = self._principal() == Principal.ADMIN
                self._send(
                    HTTPStatus.OK,
                    status_page(control.statuses(), detailed=detailed).encode(),
                    "text/html; charset=utf-8",
                )
            elif path == "/v1/mailboxes":
                principal = self._authorised()
                if principal is not None:
                    # vars(), not asdict(): json.dumps only reads them, and asdict's deep copy
                    # was two thirds of the call's CPU at 2,000 mailboxes (issue 23).
                    statuses = [vars(s) for s in control.statuses() if principal.may_see(s.address)]
                    self._json(HTTPStatus.OK, {"mailboxes": statuses})
            elif path == "/v1/branches":
                if self._admin() is not None:
                    self._json(HTTPStatus.OK, {"branches": self._registrar().branches()})
            elif path == "/v1/tokens":
                if self._admin() is not None:
                    now = datetime.now(UTC)
                    issued = self._token_admin(selfservice.list_agent_tokens)()
                    self._json(HTTPStatus.OK, {"tokens": [token_json(t, now) for t in issued]})
            elif path.startswith("/v1/mailboxes/"):
                principal = self._authorised()
                if principal is not None:
                    address = self._visible_address(path, principal)
                    detail = self._registrar().mailbox_detail(address)
                    if detail is None:
                        raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX["error"])
                    self._json(HTTPStatus.OK, detail)
            elif path in PAGE_GET_PATHS or _allowed_method(path) == "GET":
                self._page_get(path, query)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        # -- the /v1 API beyond GET ---------------------------------------------------------

        def _api(self, method: str) -> None:
            if self.path.split("?", 1)[0] == GROUPS_CHANGED_PATH:
                self._groups_changed()  # the CRM's call: signed, no bearer token
                return
            principal = self._authorised()
            if principal is None:
                return
            path, _, query = self.path.partition("?")
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if method == "PUT" and len(parts) == 3 and parts[:2] == ["v1", "branches"]:
                self._require_admin(principal)
                self._put_branch(parts[2])
                return
            if method == "POST" and parts == ["v1", "tokens"]:
                self._require_admin(principal)
                self._issue_token()
                return
            if method == "DELETE" and len(parts) == 3 and parts[:2] == ["v1", "tokens"]:
                self._require_admin(principal)
                self._revoke_tokens(parts[2])
                return
            if len(parts) == 3 and parts[:2] == ["v1", "mailboxes"] and method in ("PUT", "DELETE"):
                address = self._visible_address(path, principal)
                if method == "PUT":
                    self._put_mailbox(address, principal)
                    return
                try:
                    forgotten = self._registrar().forget_mailbox(address)
                except RegistrationError as exc:
                    raise RefusedError(exc.status, str(exc)) from None
                if not forgotten:
                    raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX["error"])
                self._json(HTTPStatus.OK, {"stopped": address})
                return
            if (
                len(parts) == 5
                and parts[:2] == ["v1", "mailboxes"]
                and parts[3:] == ["office365", "start"]
            ):
                address = self._visible_address(path, principal)
                data = self._json_body() if self.body.strip() else {}
                branch, trigger = data.get("branch"), data.get("trigger", "auto")
                if (
                    set(data) - {"branch", "trigger"}
                    or not (branch is None or (isinstance(branch, str) and 0 < len(branch) <= 1024))
                    or trigger not in TRIGGERS
                ):
                    raise RefusedError(
                        HTTPStatus.BAD_REQUEST, "expected {branch?, trigger? (auto, manual)}"
                    )
                url = self._office365_start(address, branch, trigger)
                self._json(HTTPStatus.OK, {"authorize_url": url})
                return
            include_stuck = _include_stuck(query)
            if include_stuck is None:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "include_stuck must be true or false"})
                return
            if parts == ["v1", "sync"]:
                self._require_admin(principal)
                control.start_sync(None, include_stuck=include_stuck)
                self._json(HTTPStatus.ACCEPTED, {"sync": "all"})
                return
            if len(parts) == 4 and parts[:2] == ["v1", "mailboxes"] and parts[3] in MAILBOX_ACTIONS:
                action = parts[3]
                target = mailbox_address(parts[2])
                act = {
                    "sync": lambda a: control.start_sync(a, include_stuck=include_stuck),
                    "stop": control.stop_mailbox,
                    "start": control.start_mailbox,
                }
                # An invalid address answers exactly like an unknown one, and no path is ever
                # built from it (stop markers are named by a hash). An agent's token sees no
                # mailbox but its own.
                if target is not None and principal.may_see(target) and act[action](target):
                    self._json(HTTPStatus.ACCEPTED, {action: target})
                else:
                    self._json(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
                return
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _groups_changed(self) -> None:
            """``POST /v1/groups:changed``: a CRM says whose links changed (crm/callback.py)."""
            header = self.headers.get(signing.HEADER)
            if not header:  # unsigned: refused alike whether a CRM is configured or not
                raise RefusedError(
                    HTTPStatus.UNAUTHORIZED, f"signature refused: no {signing.HEADER}"
                )
            if not isinstance(control, GroupsChangedHandler):
                raise RefusedError(HTTPStatus.NOT_FOUND, "not found")
            # Signed over the request-target as it arrived, as the CRM sent it.
            status, answer, headers = control.groups_changed_call(header, self.path, self.body)
            self._json(status, answer, headers or None)

        def _put_branch(self, name: str) -> None:
            if not BRANCH_NAME.fullmatch(name):
                raise RefusedError(HTTPStatus.BAD_REQUEST, "branch name: letters, digits, . _ -")
            data = self._json_body()
            host, security = data.get("host"), data.get("security")
            port = _integer(data.get("port"))
            ca_file = data.get("ca_file")
            unknown = set(data) - {"host", "port", "security", "ca_file"}
            if (
                unknown
                or not isinstance(host, str)
                or not HOST_NAME.fullmatch(host)
                or port is None
                or not 1 <= port <= 65535
                or security not in SECURITIES
                or not (ca_file is None or (isinstance(ca_file, str) and ca_file.startswith("/")))
            ):
                raise RefusedError(
                    HTTPStatus.BAD_REQUEST,
                    "expected {host, port (1-65535), security (ssl, starttls, none), ca_file?}",
                )
            try:
                created = self._registrar().put_branch(name, host, port, security, ca_file)
            except RegistrationError as exc:
                raise RefusedError(exc.status, str(exc)) from None
            branch = {"name": name, "host": host, "port": port, "security": security}
            self._json(HTTPStatus.CREATED if created else HTTPStatus.OK, branch)

        def _put_mailbox(self, address: str, principal: Principal) -> None:
            data = self._json_body()
            values = [data.get(k) for k in ("branch", "username", "password")]
            trigger = data.get("trigger", "auto")
            if (
                not {"branch", "username", "password"} <= set(data) <= PUT_MAILBOX_FIELDS
                or not all(isinstance(v, str) and v and len(v) <= MAX_FIELD_CHARS for v in values)
                or trigger not in TRIGGERS
            ):
                raise RefusedError(
                    HTTPStatus.BAD_REQUEST,
                    "expected {branch, username, password} (strings), trigger? (auto, manual)",
                )
            branch, username, password = (str(v) for v in values)
            try:
                self._registrar().setup_mailbox(
                    address,
                    branch,
                    username,
                    password,
                    trigger,
                    agent=principal != Principal.ADMIN,
                    client=self.client_address[0],
                )
            except RegistrationError as exc:
                raise RefusedError(exc.status, str(exc), retry_after=exc.retry_after) from None
            self._json(HTTPStatus.OK, self._detail(address))

        def _issue_token(self) -> None:
            data = self._json_body()
            address = data.get("address")
            days = _integer(data.get("expires_days"))
            if (
                set(data) - {"address", "expires_days"}
                or not isinstance(address, str)
                or len(address) > MAX_ADDRESS_CHARS
                or (mailbox_address(address) is None)
                or (data.get("expires_days") is not None and days is None)
                or (days is not None and not 1 <= days <= MAX_TOKEN_DAYS)
            ):
                raise RefusedError(
                    HTTPStatus.BAD_REQUEST,
                    f"expected {{address, expires_days? (1-{MAX_TOKEN_DAYS})}}",
                )
            issue = selfservice.issue_agent_token
            if issue is None:
                raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, "agent tokens are not enabled")
            normalised = mailbox_address(address) or ""  # checked above: never empty
            token, issued = issue(normalised, days, "api")
            expires = issued.expires_at
            self._json(
                HTTPStatus.CREATED,
                {
                    "address": normalised,
                    "token": token,
                    "link": self._login_link(token),
                    "id": issued.id,
                    "expires_at": expires.isoformat() if expires is not None else None,
                },
            )

        def _revoke_tokens(self, which: str) -> None:
            """``DELETE /v1/tokens/{id}``: one token, or (an address) every token of a mailbox."""
            revoke = self._token_admin(selfservice.revoke_agent_tokens)
            try:
                revoked = revoke(which)
            except ValueError:
                revoked = []  # neither an id nor an address: no such token either
            if not revoked:
                raise RefusedError(HTTPStatus.NOT_FOUND, "no such token")
            now = datetime.now(UTC)
            self._json(HTTPStatus.OK, {"revoked": [token_json(t, now) for t in revoked]})

        def _token_admin(self, call: _T | None) -> _T:
            if call is None:
                raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, "agent tokens are not enabled")
            return call

        def _office365_start(self, address: str, branch: str | None, trigger: str = "auto") -> str:
            try:
                return self._registrar().office365_start(
                    address, branch, self._base_url() + OFFICE365_CALLBACK, trigger
                )
            except RegistrationError as exc:
                raise RefusedError(exc.status, str(exc)) from None

        def _base_url(self) -> str:
            """This listener's URL as browsers reach it (links, the OAuth redirect URI).

            ``public_url`` when it is set, whatever the request says: behind a TLS proxy the
            Host header's ``http://`` would break the Office 365 redirect (Entra refuses a
            non-localhost http:// URI) and send tokens in clear (issue 19). Else the Host
            header when it is a plain host[:port] (the identity provider only redirects to a
            registered URI anyway), else the socket's own address.
            """
            if public_url:
                return public_url
            host = self.headers.get("Host") or ""
            if not _HOST_HEADER.fullmatch(host):
                address, port = self.connection.getsockname()[:2]
                if ":" in address:
                    # RFC 3986 §3.2.2: an IPv6 literal in brackets (RFC 6874: a zone's % as %25).
                    address = "[" + address.replace("%", "%25") + "]"
                host = f"{address}:{port}"
            return f"http://{host}"

        def _login_link(self, token: str) -> str:
            """The link an agent logs in with (their token in it)."""
            return f"{self._base_url()}/login?token={token}"

        def _json_body(self) -> dict[str, Any]:
            try:
                data = json.loads(self.body or b"null")
            except (ValueError, UnicodeDecodeError):
                data = None
            if not isinstance(data, dict):
                raise RefusedError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
            return data

        def _detail(self, address: str) -> dict[str, Any]:
            detail = self._registrar().mailbox_detail(address)
            if detail is None:
                raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX["error"])
            return detail

        def _registrar(self) -> Registrar:
            if selfservice.registrar is None:
                raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, "self-service is not enabled")
            return selfservice.registrar

        def _visible_address(self, path: str, principal: Principal) -> str:
            """The mailbox a /v1/mailboxes/{address}… path names, if this caller may see it."""
            raw = unquote(path.strip("/").split("/")[2])
            address = mailbox_address(raw)
            if address is None or not principal.may_see(address):
                raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX["error"])
            return address

        # -- who is asking ---------------------------------------------------------------

        def _principal(self) -> Principal | None:
            """Who the Authorization header names: the admin, an agent, or nobody."""
            given = self.headers.get("Authorization") or ""
            if hmac.compare_digest(given.encode("utf-8", "replace"), expected):
                return Principal.ADMIN
            check = selfservice.check_agent_token
            bearer = given.removeprefix("Bearer ")
            if check is not None and bearer != given and bearer.startswith(AGENT_TOKEN_PREFIXES):
                address = check(bearer)
                if address is not None:
                    return Principal(address)
            return None

        def _authorised(self) -> Principal | None:
            principal = self._principal()
            if principal is not None:
                return principal
            self.send_response(HTTPStatus.UNAUTHORIZED)
            self.send_header("WWW-Authenticate", 'Bearer realm="emailsync"')
            body = b'{"error": "missing or wrong bearer token"}'
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

        def _admin(self) -> Principal | None:
            principal = self._authorised()
            if principal is not None:
                self._require_admin(principal)
            return principal

        def _require_admin(self, principal: Principal) -> None:
            if principal != Principal.ADMIN:
                raise RefusedError(HTTPStatus.FORBIDDEN, FORBIDDEN_FOR_AGENT)

        # -- answers ----------------------------------------------------------------------

        def _json(
            self,
            status: HTTPStatus,
            payload: dict[str, Any],
            headers: dict[str, str] | None = None,
        ) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", headers)

        def _text(self, status: HTTPStatus, text: str) -> None:
            self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

        def _send(
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

    return Handler


def accepts_gzip(header: str | None) -> bool:
    """True when an ``Accept-Encoding`` value accepts gzip (RFC 9110 §12.5.3).

    ``gzip`` (or ``x-gzip``) or ``*`` listed with a weight above 0; an explicit ``gzip;q=0``
    refuses it whatever ``*`` says.
    """
    weights: dict[str, float] = {}
    for item in (header or "").split(","):
        coding, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights.setdefault(coding.strip().lower(), weight)
    for coding in ("gzip", "x-gzip"):
        if coding in weights:
            return weights[coding] > 0
    return weights.get("*", 0.0) > 0


def gzip_body(body: bytes) -> bytes:
    """``body`` gzipped for ``Content-Encoding: gzip`` (no file name or time in the header)."""
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


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


def _include_stuck(query: str) -> bool | None:
    """``include_stuck`` of a Start Sync query string; None when its value is not a boolean."""
    values = parse_qs(query, keep_blank_values=True).get("include_stuck", ["false"])
    return {"true": True, "1": True, "false": False, "0": False}.get(values[-1].lower())


GET_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/v1/mailboxes", "/v1/branches"})
MAILBOX_ACTIONS = ("sync", "stop", "start")
_HOST_HEADER = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
MAX_FIELD_CHARS = 1024
PUT_MAILBOX_FIELDS = frozenset({"branch", "username", "password", "trigger"})
MAX_TOKEN_DAYS = 3660
MAX_ADDRESS_CHARS = 254  # RFC 5321 §4.5.3.1.3: a path holds at most 256 octets with its <>


def _allowed_method(path: str) -> str | None:
    """The methods a known path answers (the Allow header), or None for a path we do not serve."""
    if path in GET_PATHS:
        return "GET"
    if path == GROUPS_CHANGED_PATH:
        return "POST"
    parts = path.strip("/").split("/")
    if parts == ["v1", "sync"]:
        return "POST"
    if parts == ["v1", "tokens"]:
        return "GET, POST"
    if len(parts) == 3 and parts[:2] == ["v1", "tokens"] and parts[2]:
        return "DELETE"
    if len(parts) == 3 and parts[:2] == ["v1", "branches"] and parts[2]:
        return "PUT"
    if len(parts) == 3 and parts[:2] == ["v1", "mailboxes"] and parts[2]:
        return "GET, PUT, DELETE"
    if len(parts) == 5 and parts[:2] == ["v1", "mailboxes"] and parts[3:] == ["office365", "start"]:
        return "POST"
    if len(parts) == 4 and parts[:2] == ["v1", "mailboxes"] and parts[3] in MAILBOX_ACTIONS:
        return "POST"
    return page_allowed_method(path)


def _integer(value: object) -> int | None:
    """A JSON integer (``2`` or ``2.0``: JSON Schema counts both as integers), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None
