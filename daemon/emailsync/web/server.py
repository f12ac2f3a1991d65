"""The one HTTP listener and its limits.

Each request is read by ``emailsync.web.handler`` and answered from the route table,
``emailsync.web.routes`` (method, path, who may call, handler); the handlers are
``emailsync.web.api`` (health, metrics, /v1) and ``emailsync.web.pageroutes`` (the HTML). The
shape of the API is ``config/control-api.yaml`` (OpenAPI 3.1).

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
import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import weak_token_problem
from emailsync.web.handler import MAX_BODY_BYTES, ProbeHandler, RequestHandler
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
REFUSED_WARNING_SECONDS = 10.0  # at most one warning about refused connections this often
REFUSE_SECONDS = 0.5  # what writing a 503 to a connection beyond the cap may take at most
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
        self.httpd = BoundedHTTPServer(
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


class BoundedHTTPServer(ThreadingHTTPServer):
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
                ProbeHandler(request, client_address, self)
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
