"""A TCP fault proxy between the daemon and Dovecot: forwards IMAP and breaks it on demand.

The proxy listens on 127.0.0.1 and forwards every connection to one upstream port. It runs an
asyncio loop in its own thread, so a test drives it from ordinary blocking code::

    with FaultProxy(dovecot.port) as proxy:
        # point the daemon's branch at proxy.port instead of dovecot.port
        proxy.reset_on(r"UID FETCH", after_bytes=200)   # RST in the middle of a FETCH answer
        ...
        assert proxy.logins(user.address) <= 3

Faults, all switchable while connections are open:

- ``drop()``: close every open connection now (FIN to both sides);
- ``refuse(True)``: accept new connections and close them at once;
- ``stall()`` / ``resume()``: stop forwarding in both directions, keep every socket open
  (no FIN, no RST: the peer sees silence, as with a dead middlebox); ``stall_open()``
  stalls only the connections open now, so a reconnect gets through;
- ``half_close()``: FIN towards the client on every open connection while its writes are
  still accepted (and thrown away);
- ``trickle(delay)``: the server's bytes go to the client one at a time, ``delay`` apart;
- ``reset_after(nbytes)``: RST (``SO_LINGER`` 0) once ``nbytes`` more server bytes went to
  each open connection;
- ``reset_on(pattern, after_bytes=…, forward=…)``, ``stall_on(pattern)``,
  ``drop_on(pattern)``: the same faults, but on the connection where a client command line
  matching ``pattern`` (a regex, searched case-insensitively) is seen: mid-LOGIN, mid-FETCH,
  mid-IDLE, mid-MOVE;
- ``answer_on(pattern, answer)``: answer a matching command in the server's place (e.g.
  ``NO [OVERQUOTA]``) without forwarding it;
- ``cut_reply_on(pattern)``, ``garble_reply_on(pattern, garbage)``: on the server's side,
  where its bytes match ``pattern`` (a bytes regex, within one line): forward them up to the
  end of the match, then close (FIN) the connection, so the client reads a line cut short;
  or put ``garbage`` in the match's place;
- ``before_client_command(pattern, callback)``: run ``callback()`` (blocking code, in a
  thread) before a matching client line is forwarded; e.g. APPEND a message with another
  connection in the instant before IDLE reaches the server.

Every ``*_on`` rule fires ``times`` times (default once; ``None`` for always). ``clear()``
removes every fault and rule. The proxy counts connections, client commands per connection
(``LOGIN`` arguments redacted) and ``LOGIN``/``AUTHENTICATE`` commands per user, and every fault
it injected by kind (``faults``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

_LINE_LIMIT = 16 * 1024 * 1024  # a client line may carry a long UID set
_CHUNK = 65536
_BACKLOG = 1024  # hundreds of mailboxes connect at once when a daemon starts
# RFC 3501 §4.3 / RFC 7888: a line ending in {n} or {n+} is followed by n bytes of literal.
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r?\n$")
_LOGIN = re.compile(r"^(\S+\s+LOGIN\s+)(\S+)\s.*$", re.IGNORECASE)
_LOGOUT = re.compile(r"^\S+\s+LOGOUT\s*$", re.IGNORECASE)
_AUTHENTICATE = re.compile(r"^\S+\s+AUTHENTICATE\s+(\S+)(?:\s+(\S+))?", re.IGNORECASE)


@dataclass
class Rule:
    """One command-triggered fault or hook."""

    pattern: re.Pattern[str]
    action: str  # "reset", "stall", "drop", "half_close", "answer" or "callback"
    times: int | None = 1  # None: every match
    after_bytes: int = 0  # reset: server bytes still let through after the command
    forward: bool = True  # reset/drop: forward the matching line first
    callback: Callable[[], object] | None = None
    answer: str = ""
    fired: int = 0


@dataclass
class ReplyRule:
    """One fault on the server's bytes, where they match ``pattern``."""

    pattern: re.Pattern[bytes]
    action: str  # "cut" or "garble"
    times: int | None = 1  # None: every match
    garbage: bytes = b""
    fired: int = 0


@dataclass
class Connection:
    """One client connection through the proxy and what was seen on it."""

    number: int
    opened: float = field(default_factory=time.monotonic)
    closed: float | None = None
    logout_at: float | None = None  # when the client sent LOGOUT
    commands: list[str] = field(default_factory=list)  # client lines, LOGIN redacted
    users: list[str] = field(default_factory=list)  # one entry per LOGIN/AUTHENTICATE
    login_times: list[float] = field(default_factory=list)  # monotonic time of each of them
    faults: list[str] = field(default_factory=list)  # kinds injected on this connection
    trickle_epochs: set[int] = field(default_factory=set)
    stalled: bool = False
    half_closed: bool = False
    reset_budget: int | None = None  # server bytes left before an RST
    server_bytes: int = 0
    held: bytes = b""  # server bytes after the last LF, held while reply rules look
    client: asyncio.StreamWriter | None = None
    client_reader: asyncio.StreamReader | None = None
    upstream: asyncio.StreamWriter | None = None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False

    @property
    def logins(self) -> int:
        """LOGIN and AUTHENTICATE commands seen on this connection."""
        return len(self.users)


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 in its own thread; see the module docstring."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.connections: list[Connection] = []
        self.faults: Counter[str] = Counter()
        self._rules: list[Rule] = []
        self._reply_rules: list[ReplyRule] = []
        self._lock = threading.Lock()
        self._stalled = False
        self._refuse = False
        self._trickle: float | None = None
        self._trickle_epoch = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and start forwarding; returns self once the port is bound."""
        ready = threading.Event()

        async def listen() -> None:
            self._server = await asyncio.start_server(
                self._accept, self.host, 0, limit=_LINE_LIMIT, backlog=_BACKLOG
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Close the listener and every connection; end the thread."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self.connections):
                self._close(conn, reset=False)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        with contextlib.suppress(Exception):
            self._loop.close()

    def _call(self, func: Callable[[], object]) -> None:
        """Run ``func`` on the proxy's loop and wait for it (faults take effect at once)."""

        async def run() -> None:
            func()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    # -- faults ---------------------------------------------------------------------------

    def drop(self, only: Connection | None = None) -> None:
        """Close every open connection (or ``only`` that one) now with a FIN to both sides."""

        def run() -> None:
            for conn in self._targets(only):
                self._close(conn, reset=False, kind="drop")

        self._call(run)

    def refuse(self, on: bool = True) -> None:
        """While on, accept new connections and close them at once."""
        self._refuse = on

    def stall(self) -> None:
        """Stop forwarding on every connection, open or new; sockets stay open."""
        self.faults["stall"] += 1
        self._stalled = True

    def stall_open(self, only: Connection | None = None) -> None:
        """Stall only the connections open now (or ``only`` that one); new ones flow."""

        def run() -> None:
            for conn in self._targets(only):
                self._hit(conn, "stall")
                conn.stalled = True

        self._call(run)

    def resume(self) -> None:
        """Forward again after ``stall()`` (connections stalled by a rule stay stalled)."""
        self._stalled = False

        def run() -> None:
            for conn in self._open():
                conn.gate.set()

        self._call(run)

    def half_close(self, only: Connection | None = None) -> None:
        """Send FIN to the client on every open connection (or ``only``); its writes are then
        discarded."""

        def run() -> None:
            for conn in self._targets(only):
                self._half_close(conn)

        self._call(run)

    def trickle(self, delay: float | None) -> None:
        """Forward server bytes one at a time, ``delay`` seconds apart; None to stop."""
        if delay is not None:
            self.faults["trickle"] += 1
            self._trickle_epoch += 1
        self._trickle = delay

    def reset_after(self, nbytes: int, only: Connection | None = None) -> None:
        """RST each open connection (or ``only``) once ``nbytes`` more server bytes went to it."""

        def run() -> None:
            for conn in self._targets(only):
                conn.reset_budget = nbytes
                if nbytes <= 0:
                    self._close(conn, reset=True, kind="reset")

        self._call(run)

    def reset_on(
        self, pattern: str, *, after_bytes: int = 0, forward: bool = True, times: int | None = 1
    ) -> None:
        """RST the connection where a client line matches ``pattern``.

        With ``forward`` the line reaches the server first (the server acts on it, the client
        never hears the answer); ``after_bytes`` of the answer still reach the client.
        """
        self._add(Rule(_compile(pattern), "reset", times, after_bytes, forward))

    def stall_on(self, pattern: str, *, times: int | None = 1) -> None:
        """Forward a matching client line, then stall that connection (no FIN, no RST)."""
        self._add(Rule(_compile(pattern), "stall", times))

    def drop_on(self, pattern: str, *, forward: bool = True, times: int | None = 1) -> None:
        """Close (FIN) the connection where a client line matches ``pattern``."""
        self._add(Rule(_compile(pattern), "drop", times, forward=forward))

    def half_close_on(self, pattern: str, *, times: int | None = 1) -> None:
        """Forward a matching client line, then half-close that connection."""
        self._add(Rule(_compile(pattern), "half_close", times))

    def answer_on(self, pattern: str, answer: str, *, times: int | None = 1) -> None:
        """Answer a matching client command in the server's place with ``<tag> answer``.

        The command never reaches the server; e.g. ``NO [OVERQUOTA] Quota exceeded`` for a
        MOVE, which Dovecot itself never refuses within one quota root.
        """
        self._add(Rule(_compile(pattern), "answer", times, answer=answer))

    def cut_reply_on(self, pattern: bytes, *, times: int | None = 1) -> None:
        """Forward the server's bytes up to the end of a ``pattern`` match, then close (FIN).

        The client reads a line cut short, as when a server process dies mid-answer: e.g.
        ``rb"\\* \\d+ FETCH \\(UID 2 "`` cuts the FETCH line of UID 2 in its middle. The
        match must lie within one line (a lookahead can require more of the line).
        """
        self._add_reply(ReplyRule(re.compile(pattern), "cut", times))

    def garble_reply_on(self, pattern: bytes, garbage: bytes, *, times: int | None = 1) -> None:
        """Send ``garbage`` in place of the server's bytes that match ``pattern`` (one line)."""
        self._add_reply(ReplyRule(re.compile(pattern), "garble", times, garbage))

    def before_client_command(
        self, pattern: str, callback: Callable[[], object], *, times: int | None = 1
    ) -> None:
        """Run ``callback()`` in a thread before a matching client line is forwarded.

        The connection's client-to-server direction waits for the callback; the server's
        answers to earlier commands keep flowing.
        """
        self._add(Rule(_compile(pattern), "callback", times, callback=callback))

    def clear(self, *, resume: bool = True) -> None:
        """Remove every rule and fault; stalled connections (global or by rule) resume.

        With ``resume=False`` connections stalled one by one stay stalled (their client has
        to notice and give up) while rules, trickle and a global stall end.
        """
        with self._lock:
            self._rules.clear()
            self._reply_rules.clear()
        self._refuse = False
        self._trickle = None
        self._stalled = False
        if not resume:
            return

        def run() -> None:
            for conn in self._open():
                conn.stalled = False
                conn.reset_budget = None
                conn.gate.set()

        self._call(run)

    def _add(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _add_reply(self, rule: ReplyRule) -> None:
        with self._lock:
            self._reply_rules.append(rule)

    # -- what was seen --------------------------------------------------------------------

    def open_connections(self) -> int:
        """Connections open right now."""
        return len(self._open())

    def logins(self, user: str | None = None) -> int:
        """LOGIN/AUTHENTICATE commands seen so far, for one user or in all."""
        return sum(1 for c in list(self.connections) for u in c.users if user in (None, u))

    def commands(self, pattern: str, user: str | None = None) -> int:
        """Client lines seen matching ``pattern`` (on connections that logged in as ``user``)."""
        regex = _compile(pattern)
        return sum(
            1
            for c in list(self.connections)
            if user is None or user in c.users
            for line in list(c.commands)
            if regex.search(line)
        )

    def faulted(self, user: str) -> int:
        """Connections that logged in as ``user`` and had a fault injected."""
        return sum(1 for c in list(self.connections) if user in c.users and c.faults)

    def _open(self) -> list[Connection]:
        return [c for c in self.connections if not c.done]

    def _targets(self, only: Connection | None) -> list[Connection]:
        if only is None:
            return self._open()
        return [] if only.done else [only]

    def _hit(self, conn: Connection, kind: str) -> None:
        self.faults[kind] += 1
        conn.faults.append(kind)

    # -- forwarding ----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(len(self.connections) + 1, client=writer, client_reader=reader)
        conn.gate.set()
        self.connections.append(conn)
        if self._refuse:
            self.faults["refuse"] += 1
            self._close(conn, reset=False)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=_LINE_LIMIT)
        except OSError:
            self._close(conn, reset=False)
            return
        conn.upstream = up_writer
        upward = self._spawn(self._client_to_server(conn, reader, up_writer))
        downward = self._spawn(self._server_to_client(conn, up_reader, writer))
        await asyncio.wait([upward, downward], return_when=asyncio.FIRST_COMPLETED)
        # One direction ended. After a half-close the client's socket stays open until the
        # client itself closes it; otherwise the end of either side ends both.
        if conn.half_closed and not upward.done():
            await asyncio.wait([upward])
        self._close(conn, reset=False)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pass_gate(self, conn: Connection) -> None:
        """Wait while the connection is stalled; a client that gives up meanwhile ends it."""
        while self._stalled or conn.stalled:
            reader = conn.client_reader
            if reader is not None and (reader.at_eof() or reader.exception() is not None):
                self._close(conn, reset=False)
                break
            conn.gate.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.gate.wait(), 0.1)
        if conn.done:
            raise ConnectionError("closed by the proxy")

    async def _client_to_server(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        in_command = False  # the rest of a line after a literal is not a new command
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, OSError):
            while not conn.done:
                line = await reader.readline()
                if not line:
                    return
                await self._pass_gate(conn)
                rule = None
                if not in_command:
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    self._record(conn, text)
                    rule = self._match(text)
                literal = _LITERAL.search(line)
                in_command = literal is not None
                if rule is not None and rule.action == "callback" and rule.callback:
                    self._hit(conn, "callback")
                    await self._loop.run_in_executor(None, rule.callback)
                    rule = None
                if rule is not None and rule.action == "answer" and conn.client is not None:
                    self._hit(conn, "answer_on")
                    tag = line.split(b" ", 1)[0]
                    conn.client.write(tag + b" " + rule.answer.encode() + b"\r\n")
                    await conn.client.drain()
                    if literal:
                        await reader.readexactly(int(literal.group(1)))
                    in_command = False
                    continue
                if rule is not None and not rule.forward and rule.action in ("reset", "drop"):
                    self._close(conn, reset=rule.action == "reset", kind=f"{rule.action}_on")
                    return
                if conn.half_closed:
                    continue  # the client's writes go nowhere after a half-close
                writer.write(line)
                await writer.drain()
                if literal:
                    data = await reader.readexactly(int(literal.group(1)))
                    writer.write(data)
                    await writer.drain()
                if rule is not None:
                    self._apply(conn, rule)

    def _apply(self, conn: Connection, rule: Rule) -> None:
        kind = f"{rule.action}_on"
        if rule.action == "reset":
            if rule.after_bytes <= 0:
                self._close(conn, reset=True, kind=kind)
            else:
                self._hit(conn, kind)
                conn.reset_budget = rule.after_bytes
        elif rule.action == "drop":
            self._close(conn, reset=False, kind=kind)
        elif rule.action == "stall":
            self._hit(conn, kind)
            conn.stalled = True
        elif rule.action == "half_close":
            self._half_close(conn)

    async def _server_to_client(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not conn.done:
                data = await reader.read(_CHUNK)
                if not data:
                    if conn.held:
                        writer.write(conn.held)
                        await writer.drain()
                    return
                await self._pass_gate(conn)
                if conn.half_closed:
                    continue
                cut = False
                if self._reply_rules or conn.held:
                    data, cut = self._rewrite(conn, data)
                    if cut:
                        writer.write(data)
                        conn.server_bytes += len(data)
                        with contextlib.suppress(ConnectionError, OSError):
                            await writer.drain()
                        self._close(conn, reset=False, kind="cut_reply")
                        return
                    if not data:
                        continue
                budget = conn.reset_budget
                if budget is not None and len(data) >= budget:
                    writer.write(data[:budget])
                    conn.server_bytes += budget
                    with contextlib.suppress(ConnectionError, OSError):
                        await writer.drain()
                    self._close(conn, reset=True, kind="reset")
                    return
                if budget is not None:
                    conn.reset_budget = budget - len(data)
                conn.server_bytes += len(data)
                delay = self._trickle
                if delay is None:
                    writer.write(data)
                    await writer.drain()
                    continue
                if self._trickle_epoch not in conn.trickle_epochs:
                    conn.trickle_epochs.add(self._trickle_epoch)
                    conn.faults.append("trickle")
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(delay)
                    await self._pass_gate(conn)

    def _rewrite(self, conn: Connection, data: bytes) -> tuple[bytes, bool]:
        """Apply the reply rules to whole lines of ``data``; True when the connection is cut.

        The bytes after the last LF wait in ``conn.held`` for the rest of their line, so that
        a match never straddles two reads.
        """
        data = conn.held + data
        end = data.rfind(b"\n") + 1
        data, conn.held = data[:end], data[end:]
        with self._lock:
            rules = [r for r in self._reply_rules if r.times is None or r.fired < r.times]
        for rule in rules:
            match = rule.pattern.search(data)
            if match is None:
                continue
            rule.fired += 1
            if rule.action == "cut":
                conn.held = b""
                return data[: match.end()], True
            self._hit(conn, "garble_reply")
            data = data[: match.start()] + rule.garbage + data[match.end() :]
        return data, False

    def _record(self, conn: Connection, text: str) -> None:
        if _LOGOUT.match(text):
            conn.logout_at = time.monotonic()
        login = _LOGIN.match(text)
        if login:
            conn.users.append(_unquote(login.group(2)))
            conn.login_times.append(time.monotonic())
            text = f"{login.group(1)}{login.group(2)} <redacted>"
        auth = _AUTHENTICATE.match(text)
        if auth:
            conn.users.append(_sasl_user(auth.group(2) or ""))
            conn.login_times.append(time.monotonic())
            text = f"{text.split(auth.group(1))[0]}{auth.group(1)} <redacted>"
        conn.commands.append(text)

    def _match(self, text: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                if rule.pattern.search(text):
                    rule.fired += 1
                    return rule
        return None

    def _half_close(self, conn: Connection) -> None:
        if conn.client is None or conn.done or conn.half_closed:
            return
        conn.half_closed = True
        self._hit(conn, "half_close")
        with contextlib.suppress(OSError, RuntimeError):
            conn.client.write_eof()

    def _close(self, conn: Connection, *, reset: bool, kind: str | None = None) -> None:
        if conn.done:
            return
        if kind:
            self._hit(conn, kind)
        conn.done = True
        conn.closed = time.monotonic()
        conn.gate.set()
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
            else:
                writer.close()


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return word


def _sasl_user(initial: str) -> str:
    """The user in a SASL-IR initial response (PLAIN or XOAUTH2), or ``?``."""
    try:
        raw = base64.b64decode(initial, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return "?"
    if raw.startswith("user="):  # XOAUTH2: user=…^Aauth=Bearer …^A^A
        return raw[5:].split("\x01", 1)[0]
    parts = raw.split("\x00")  # PLAIN: authzid NUL authcid NUL password (RFC 4616)
    return parts[1] if len(parts) == 3 else "?"
