"""The one HTTP listener: /metrics, /healthz, /readyz, a status page and the /v1 control API."""

from __future__ import annotations

import hmac
import html
import json
import threading
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from emailsync.worker import WorkerStatus

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT_SECONDS = 10.0  # a client that stalls mid-request is dropped
MAX_BODY_BYTES = 64 * 1024


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
        self, host: str, port: int, control: Control, registry: CollectorRegistry, token: str
    ) -> None:
        handler = _handler_class(control, registry, token)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

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


def _handler_class(
    control: Control, registry: CollectorRegistry, token: str
) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "emailsync"
        sys_version = ""
        timeout = REQUEST_TIMEOUT_SECONDS

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http_request", request=self.requestline, client=self.client_address[0])

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
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
                self._send(
                    HTTPStatus.OK,
                    _status_page(control.statuses()).encode(),
                    "text/html; charset=utf-8",
                )
            elif path == "/v1/mailboxes":
                if self._authorised():
                    self._json(
                        HTTPStatus.OK, {"mailboxes": [asdict(s) for s in control.statuses()]}
                    )
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:
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
                address, action = parts[2], parts[3]
                act = {
                    "sync": lambda a: control.start_sync(a, include_stuck=include_stuck),
                    "stop": control.stop_mailbox,
                    "start": control.start_mailbox,
                }
                if act[action](address):
                    self._json(HTTPStatus.ACCEPTED, {action: address})
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no mailbox {address}"})
                return
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _authorised(self) -> bool:
            given = (self.headers.get("Authorization") or "").encode()
            if hmac.compare_digest(given, expected):
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


def _status_page(statuses: list[WorkerStatus]) -> str:
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                s.address,
                s.state,
                s.trigger,
                s.queue,
                s.stuck,
                s.last_sync or "never",
                ", ".join(f"{k}: {n}" for k, n in sorted(s.filed.items())) or "-",
                s.last_error or "",
            )
        )
        + "</tr>"
        for s in statuses
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>emailsync</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>emailsync</h1>
<table><tr><th>mailbox</th><th>state</th><th>trigger</th><th>queue</th><th>stuck</th>
<th>last sync</th>
<th>filed</th><th>last error</th></tr>
{rows}
</table><p><a href="/metrics">/metrics</a></p></body></html>
"""
