"""The request handler: one request read within its deadline and its body cap, then answered
by the route table (``emailsync.web.routes``); the answers (JSON, text, pages, 401, 405).

What it works with comes from its server (``emailsync.web.server``): ``self.server.app``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

import structlog

from emailsync.errors import KeyUnavailableError
from emailsync.web import routes
from emailsync.web.call import RefusedError

if TYPE_CHECKING:
    from emailsync.web.ports import App
    from emailsync.web.server import BoundedHTTPServer

log = structlog.get_logger(__name__)

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY_BYTES = 64 * 1024
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

    server: BoundedHTTPServer
    server_version = "emailsync"
    sys_version = ""
    body = b""
    _seconds = 0.0  # to read the request in (setup), then to write the answer
    health_only = False  # the health reserve's connections (see ProbeHandler)

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


class ProbeHandler(RequestHandler):
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
