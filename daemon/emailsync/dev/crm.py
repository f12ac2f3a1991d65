"""A reference CRM for the demo and the tests: config/crm-api.yaml served over HTTP on loopback.

It is a real server (stdlib ``http.server``, one thread per connection, keep-alive) with its
own SQLite file. It verifies every request's signature (forged or stale ones get 401), stores
groups and idempotent timeline events, and can be told to misbehave (``Faults``) so tests can
show what the daemon does when a CRM fails. Given emailsync's ``POST /v1/groups:changed``
URL (``changed_url``), it calls it, signed, whenever it links addresses, as a CRM should.
It is not a production CRM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from emailsync.dev.net import LocalServer
from emailsync.state.csvimport import read_group_csv
from emailsync.timeline.crm import signing

LOOKUP_PATH = "/groups:lookup"
EVENTS_PATH = "/timeline-events"
MAX_ITEMS = 1000
MAX_BODY_BYTES = 64 * 1024 * 1024
EXCHANGES_KEPT = 1000  # requests a server keeps for tests to read, the latest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS group_addresses (
    group_id TEXT NOT NULL REFERENCES groups (id), address TEXT NOT NULL,
    PRIMARY KEY (group_id, address));
CREATE TABLE IF NOT EXISTS events (
    key TEXT PRIMARY KEY, group_id TEXT NOT NULL, direction TEXT NOT NULL,
    subject TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS event_via (
    key TEXT NOT NULL REFERENCES events (key), mailbox TEXT NOT NULL,
    direction TEXT, PRIMARY KEY (key, mailbox));
"""


@dataclass
class Faults:
    """How the reference CRM misbehaves; change the fields at any time (tests do).

    ``status``: answer every request to ``status_paths`` (both endpoints unless narrowed)
    with this HTTP status (503, 429…) and change nothing;
    ``retry_after``: the Retry-After header sent with it; ``delay_seconds``: sleep this long
    before handling a request (longer than the client's timeout = a timeout; the request is
    still handled after the sleep, as a slow CRM would); ``reject_subjects``: reject events of
    messages with this subject (HTTP 200, status ``rejected``) with ``reject_reason``;
    ``drop_after_commit``: for this many event requests, commit and then close the connection
    without an answer.
    """

    status: int | None = None
    status_paths: set[str] = field(default_factory=lambda: {LOOKUP_PATH, EVENTS_PATH})
    retry_after: str | None = None
    delay_seconds: float = 0.0
    reject_subjects: set[str] = field(default_factory=set)
    reject_reason: str = "group is archived"
    drop_after_commit: int = 0
    max_age: int | None = None  # Cache-Control: max-age on lookup answers


@dataclass(frozen=True)
class Exchange:
    """One request and its answer, kept for tests that check them against the document."""

    path: str
    request_headers: dict[str, str]
    request_body: bytes
    status: int
    response_headers: dict[str, str]
    response_body: bytes


class DevCrm(LocalServer):
    """The reference CRM: start(), link groups, look at the events, set ``faults``."""

    def __init__(
        self,
        secret: bytes,
        db_path: Path | str = ":memory:",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        base_path: str = "/crm/v1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.secret = secret
        self.base_path = base_path.rstrip("/")
        self.faults = Faults()
        self.calls: Counter[str] = Counter()  # endpoint path → requests that reached a handler
        self.arrived: Counter[str] = Counter()  # path → requests read, before any delay or check
        # The latest requests and answers, for tests to read; capped, so a demo or a bench
        # that runs for hours does not keep every event body it was sent.
        self.exchanges: deque[Exchange] = deque(maxlen=EXCHANGES_KEPT)
        self.refused: list[str] = []  # why signatures were refused, in order
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(event_via)")}
        if "direction" not in columns:  # a file from before directions were kept per mailbox
            self._db.execute("ALTER TABLE event_via ADD COLUMN direction TEXT")
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_class(self))
        self._server.daemon_threads = True
        self.scheme = "http"
        if ssl_context is not None:
            # HTTPS, so tests can show that TLS is verified (and a private CA via ca_file).
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None
        # emailsync's POST /v1/groups:changed, called after each link (None: not called).
        self.changed_url: str | None = None

    @property
    def url(self) -> str:
        """The base URL to configure as ``[crm] url``."""
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"{self.scheme}://{name}:{port}{self.base_path}"

    def start(self) -> DevCrm:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the database."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._db.close()

    # -- data -----------------------------------------------------------------------------------

    def link(self, group_id: str, name: str, addresses: Iterable[str]) -> None:
        """Create or rename a group and link addresses to it; tell emailsync when asked to.

        emailsync is told after the commit (its re-file looks the groups up at once), and a
        failed call is only printed: a CRM's link never depends on emailsync being up.
        """
        addresses = [a.strip().lower() for a in addresses]
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO groups (id, name) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (group_id, name),
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO group_addresses (group_id, address) VALUES (?, ?)",
                [(group_id, a) for a in addresses],
            )
        if self.changed_url is not None and addresses:
            status = self.groups_changed(addresses)
            if status != HTTPStatus.ACCEPTED:
                print(f"devcrm: POST {self.changed_url} answered {status}", file=sys.stderr)

    def groups_changed(self, addresses: Iterable[str], *, now: float | None = None) -> int:
        """POST the addresses to emailsync's ``changed_url``, signed; the HTTP status.

        ``now`` signs with another time (tests: a stale call). 0: no answer at all.
        """
        if self.changed_url is None:
            raise ValueError("no changed_url: emailsync's POST /v1/groups:changed URL")
        body = json.dumps({"addresses": list(addresses)}).encode()
        request = urllib.request.Request(  # noqa: S310 -- the URL a test or an operator gave
            self.changed_url, data=body, method="POST"
        )
        path = urllib.parse.urlsplit(self.changed_url).path
        request.add_header("Content-Type", "application/json")
        request.add_header(signing.HEADER, signing.sign(self.secret, "POST", path, body, now=now))
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 -- as above
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def events(self) -> list[dict[str, Any]]:
        """Every event as stored, oldest first, with ``via``: each mailbox that filed it and
        the direction seen from that mailbox, ``[{"mailbox": …, "direction": …}]``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, payload FROM events ORDER BY created_at, rowid"
            ).fetchall()
            via = self._db.execute(
                "SELECT key, mailbox, direction FROM event_via ORDER BY mailbox"
            ).fetchall()
        by_key: dict[str, list[dict[str, str | None]]] = {}
        for key, mailbox, direction in via:
            by_key.setdefault(key, []).append({"mailbox": mailbox, "direction": direction})
        result = []
        for key, payload in rows:
            event = json.loads(payload)
            event["via"] = by_key.get(key, [])
            result.append(event)
        return result

    # -- the API --------------------------------------------------------------------------------

    def lookup(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``POST /groups:lookup``."""
        refused = _refused_array(request, "addresses", str, "strings")
        if refused is not None:
            return refused
        addresses: list[str] = request["addresses"]
        results = []
        with self._lock:
            for address in addresses:
                rows = self._db.execute(
                    "SELECT g.id, g.name FROM group_addresses AS a JOIN groups AS g"
                    " ON g.id = a.group_id WHERE a.address = ? ORDER BY g.name, g.id",
                    (address.strip().lower(),),
                ).fetchall()
                results.append(
                    {"address": address, "groups": [{"id": i, "name": n} for i, n in rows]}
                )
        return 200, {"results": results}

    def deliver(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``POST /timeline-events``: each event created, already there, or rejected."""
        refused = _refused_array(request, "events", dict, "objects")
        if refused is not None:
            return refused
        events: list[dict[str, Any]] = request["events"]
        for event in events:
            missing = [k for k in ("key", "group_id", "direction", "mailboxes") if k not in event]
            if missing:
                return 400, {"error": f"event without {', '.join(missing)}"}
        results = []
        with self._lock, self._transaction():
            for event in events:
                results.append(self._deliver_one(event))
        return 200, {"results": results}

    def _deliver_one(self, event: dict[str, Any]) -> dict[str, Any]:
        key = str(event["key"])
        if event.get("subject") in self.faults.reject_subjects:
            return {"key": key, "status": "rejected", "reason": self.faults.reject_reason}
        known = self._db.execute("SELECT 1 FROM groups WHERE id = ?", (event["group_id"],))
        if known.fetchone() is None:
            return {"key": key, "status": "rejected", "reason": "unknown group"}
        cursor = self._db.execute(
            "INSERT INTO events (key, group_id, direction, subject, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (
                key,
                event["group_id"],
                event["direction"],
                str(event.get("subject", "")),
                json.dumps(event, ensure_ascii=False),
                time.time(),
            ),
        )
        # The request's direction is the one seen from each of its mailboxes (crm-api.yaml).
        self._db.executemany(
            "INSERT INTO event_via (key, mailbox, direction) VALUES (?, ?, ?)"
            " ON CONFLICT (key, mailbox) DO UPDATE SET direction = excluded.direction"
            " WHERE event_via.direction IS NULL",
            [(key, str(m), str(event["direction"])) for m in event["mailboxes"]],
        )
        return {"key": key, "status": "created" if cursor.rowcount == 1 else "exists"}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _refused_array(
    request: dict[str, Any], name: str, kind: type, kinds: str
) -> tuple[int, dict[str, Any]] | None:
    """The answer refusing a request's ``name`` array (400: missing or not an array of
    ``kind``; 413: more than MAX_ITEMS), or None when it is fine."""
    items = request.get(name)
    if not isinstance(items, list) or not all(isinstance(item, kind) for item in items):
        return 400, {"error": f"{name} must be an array of {kinds}"}
    if len(items) > MAX_ITEMS:
        return 413, {"error": f"at most {MAX_ITEMS} {name} per request"}
    return None


def _handler_class(crm: DevCrm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read ``crm.calls`` and ``crm.exchanges`` instead."""

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._answer(413, {"error": "request too large"}, b"")
                self.close_connection = True
                return
            body = self.rfile.read(length)
            path = self.path.removeprefix(crm.base_path)
            with crm._lock:
                crm.arrived[path] += 1
            faults = crm.faults
            if faults.delay_seconds:
                time.sleep(faults.delay_seconds)
            try:
                signing.verify(
                    crm.secret, self.headers.get(signing.HEADER), self.command, self.path, body
                )
            except signing.SignatureError as exc:
                crm.refused.append(str(exc))
                self._answer(401, {"error": f"signature refused: {exc}"}, body)
                return
            if path not in (LOOKUP_PATH, EVENTS_PATH):
                self._answer(404, {"error": f"no endpoint {self.path}"}, body)
                return
            with crm._lock:
                crm.calls[path] += 1
            if faults.status is not None and path in faults.status_paths:
                extra = {"Retry-After": faults.retry_after} if faults.retry_after else {}
                self._answer(faults.status, {"error": "the CRM is failing on purpose"}, body, extra)
                return
            try:
                request = json.loads(body)
            except ValueError:
                self._answer(400, {"error": "body is not JSON"}, body)
                return
            if not isinstance(request, dict):
                self._answer(400, {"error": "body is not a JSON object"}, body)
                return
            if path == LOOKUP_PATH:
                status, answer = crm.lookup(request)
                extra = {"Cache-Control": f"max-age={faults.max_age}"} if faults.max_age else {}
                self._answer(status, answer, body, extra)
                return
            status, answer = crm.deliver(request)
            if status == 200 and faults.drop_after_commit > 0:
                faults.drop_after_commit -= 1
                # Committed, and the answer is lost: the client must retry with the same keys.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(2)
                return
            self._answer(status, answer, body)

        def _answer(
            self,
            status: int,
            payload: dict[str, Any],
            request_body: bytes,
            extra: dict[str, str] | None = None,
        ) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            headers = {"Content-Type": "application/json", **(extra or {})}
            # Logged before the answer goes out: a client that has its answer finds the
            # exchange already there (a test reading it at once used to race this thread).
            exchange = Exchange(
                path=self.path,
                request_headers=dict(self.headers.items()),
                request_body=request_body,
                status=status,
                response_headers=headers,
                response_body=data,
            )
            crm.exchanges.append(exchange)
            try:
                self.send_response(HTTPStatus(status))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True
                # The client is gone (killed, timed out): no answer was delivered.
                crm.exchanges.remove(exchange)

    return Handler


def main(argv: list[str] | None = None) -> int:
    """``python -m emailsync.dev.crm``: serve the reference CRM until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="emailsync.dev.crm", description=__doc__)
    parser.add_argument("--secret-file", type=Path, required=True, help="the shared secret")
    parser.add_argument("--db", type=Path, default=Path("devcrm.db"), help="its SQLite file")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument(
        "--link",
        nargs=3,
        action="append",
        default=[],
        metavar=("ID", "NAME", "ADDRESSES"),
        help="link comma-separated addresses to a group (repeatable)",
    )
    parser.add_argument(
        "--groups-csv", type=Path, help="link group,address rows (the group name is its id)"
    )
    parser.add_argument(
        "--changed-url",
        help="emailsync's POST /v1/groups:changed URL, called after each link",
    )
    args = parser.parse_args(argv)
    secret = args.secret_file.read_text(encoding="utf-8").rstrip("\r\n").encode()
    crm = DevCrm(secret, args.db, port=args.port)
    crm.changed_url = args.changed_url
    for group_id, name, addresses in args.link:
        crm.link(group_id, name, addresses.split(","))
    if args.groups_csv is not None:
        by_group: dict[str, list[str]] = {}
        for group, address in read_group_csv(args.groups_csv):
            by_group.setdefault(group, []).append(address)
        for group, addresses in by_group.items():
            crm.link(group, group, addresses)
    print(f"reference CRM at {crm.url}", file=sys.stderr)
    crm.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        crm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
