"""A scripted mail server, store and clock for unit tests of the worker's state machine.

Everything runs in virtual time on the test's own thread: ``FakeClock.wait`` jumps to the
next scheduled event (a Start Sync, new mail, a dropped connection, stop) instead of
sleeping, so minutes of back-off take microseconds and every interleaving is repeatable.
No IMAP is spoken here: the state machine is the unit under test; IMAP behaviour is tested
against the real Dovecot in tests/integration.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import MailboxSettings, Settings, parse_settings
from emailsync.errors import (
    AuthError,
    ConnectionLostError,
    LeaseLostError,
    MailboxError,
    StoreUnavailableError,
)
from emailsync.filing.sessions import QueueSession
from emailsync.imap.idle import IdleUpdate
from emailsync.model import FetchedMessage, FolderRole, Group
from emailsync.runtime.clock import Clock
from emailsync.runtime.wakeup import Wakeup
from emailsync.runtime.worker import MailboxWorker
from emailsync.telemetry.metrics import Metrics

ADDRESS = "agent@example.com"
EPOCH = 1_800_000_000.0  # the wall clock at virtual time 0
LOGIN_SECONDS = 0.01  # a login takes a moment, so virtual time moves on every attempt


class LoginStormError(BaseException):
    """More logins than a test allows; a BaseException so the worker's catch-all lets it out."""


class FakeClock:
    """Virtual monotonic and wall time with scheduled actions; waits jump ahead."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return EPOCH + self.now

    def at(self, when: float, action: Callable[[], object]) -> None:
        """Run ``action`` when virtual time reaches ``when``."""
        heapq.heappush(self._timers, (when, next(self._order), action))

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, running what was scheduled meanwhile."""
        target = self.now + seconds
        while self._timers and self._timers[0][0] <= target:
            self._fire()
        self.now = max(self.now, target)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Return at once when set; else jump to the next scheduled action or the timeout.

        Returning early after an action that did not set the event is allowed by the Clock
        contract (a spurious wake-up), and every caller in the worker loops on its deadline.
        """
        if event.is_set():
            return True
        end = self.now + max(0.0, timeout)
        if self._timers and self._timers[0][0] <= end:
            self._fire()
            return event.is_set()
        self.now = end
        return event.is_set()

    def _fire(self) -> None:
        when, _, action = heapq.heappop(self._timers)
        self.now = max(self.now, when)
        action()


@dataclass
class Login:
    """One login attempt the server saw."""

    at: float
    outcome: str


HEADER = (
    b"From: stranger@else.example\r\nTo: agent@example.com\r\n"
    b"Subject: hello\r\nMessage-ID: <{uid}@else.example>\r\n\r\n"
)


class FakeStore:
    """A store with no groups that can be switched unavailable, or its lease lost."""

    def __init__(self) -> None:
        self.down = False
        self.lease_lost = False  # as a FencedStore whose lease another instance now holds
        self.lookups = 0

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        self.lookups += 1
        if self.lease_lost:
            raise LeaseLostError("lease on agent@example.com (generation 1) expired or was lost")
        if self.down:
            raise StoreUnavailableError("store: connection refused")
        return []

    def record_events(self, events: Sequence[Any]) -> int:
        if self.down:
            raise StoreUnavailableError("store: connection refused")
        return 0


class FakeAuthenticator:
    """Password-like (no token) unless ``token_seconds`` is set: then each login gets a token
    that lives that long."""

    def __init__(self, clock: FakeClock, token_seconds: float | None = None) -> None:
        self.clock = clock
        self.token_seconds = token_seconds
        self.expiry: datetime | None = None

    def issue(self) -> None:
        if self.token_seconds is not None:
            self.expiry = datetime.fromtimestamp(self.clock.time() + self.token_seconds, UTC)

    def login(self, client: object) -> None:  # the fake server logs in by itself
        raise NotImplementedError

    def token_expiry(self) -> datetime | None:
        return self.expiry

    def forget(self) -> None:
        self.expiry = None


class FakeServer:
    """One mailbox's server: scripted login outcomes, a Queue, and the current session."""

    def __init__(self, clock: FakeClock, *, has_idle: bool = True, max_logins: int = 300) -> None:
        self.clock = clock
        self.has_idle = has_idle
        self.max_logins = max_logins
        # Outcomes of the next logins, in order; once empty every login succeeds. Each is
        # "ok", "refused", "lost" or ("throttled", seconds).
        self.outcomes: deque[str | tuple[str, float]] = deque()
        self.logins: list[Login] = []
        self.queue: list[int] = []
        self.filed: list[int] = []
        self.session: FakeSession | None = None
        self.sessions: list[FakeSession] = []
        self.on_login: Callable[[FakeSession], None] | None = None
        # Commands that fail on every session, e.g. {"fetch": ...} for a message whose FETCH
        # gets BYE each time.
        self.failing: dict[str, ConnectionLostError] = {}
        self._uids = itertools.count(1)

    def connect(
        self,
        mailbox: MailboxSettings,
        folders: object,
        authenticator: FakeAuthenticator,
        *,
        timeout_seconds: float,
    ) -> FakeSession:
        """The SessionFactory the worker calls."""
        if len(self.logins) >= self.max_logins:
            raise LoginStormError(f"{len(self.logins)} logins by t={self.clock.now:.2f}")
        self.clock.advance(LOGIN_SECONDS)
        outcome = self.outcomes.popleft() if self.outcomes else "ok"
        label = outcome if isinstance(outcome, str) else outcome[0]
        self.logins.append(Login(self.clock.now, label))
        if outcome == "refused":
            raise AuthError(f"{mailbox.address}: login refused by the server")
        if outcome == "lost":
            raise ConnectionLostError("connect: connection refused", kind="refused")
        if isinstance(outcome, tuple):
            raise ConnectionLostError(
                f"login: NO Request is throttled. Suggested Backoff Time: {int(outcome[1] * 1000)}"
                " milliseconds",
                kind="protocol",
                retry_after=outcome[1],
            )
        authenticator.issue()
        self.session = FakeSession(self)
        self.sessions.append(self.session)
        if self.on_login is not None:
            self.on_login(self.session)
        return self.session

    def deliver(self) -> int:
        """A message lands in Queue."""
        uid = next(self._uids)
        self.queue.append(uid)
        return uid

    def drop(
        self, text: str = "connection reset by peer", retry_after: float | None = None
    ) -> None:
        """The current connection dies; the worker sees it at its next command or wait."""
        if self.session is not None and not self.session.closed:
            self.session.broken = ConnectionLostError(text, kind="bye", retry_after=retry_after)

    def successful_logins(self) -> list[float]:
        return [login.at for login in self.logins if login.outcome == "ok"]


def quiet_logs() -> Iterator[None]:
    """An autouse fixture's body: the worker logs every state change, so keep test output
    to failures; the logging configuration is put back after the test."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    yield
    structlog.configure(**saved)


class FiledNow:
    """The PendingFiling of a fake session, which moves at once: ``file`` has run, error kept."""

    def __init__(self, session: QueueSession, *args: Any, **kwargs: Any) -> None:
        self.error: MailboxError | None = None
        try:
            session.file(*args, **kwargs)
        except MailboxError as exc:
            self.error = exc

    def wait(self) -> None:
        """Raise what ``file`` raised, if anything."""
        if self.error is not None:
            raise self.error


class FilesAtOnce:
    """The filing half of a fake ``QueueSession`` that answers at once: a whole message is
    what ``fetch_headers`` gives, and ``file_later`` has filed by the time it returns. A fake
    gives ``fetch_headers`` and ``move`` (its UID MOVE, raising what the server refuses)."""

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        raise NotImplementedError

    def move(self, uids: Sequence[int], role: FolderRole) -> None:
        raise NotImplementedError

    def fetch_full(self, uids: Sequence[int], *_: object) -> list[FetchedMessage]:
        """The whole messages: sizes and body plans make no difference here."""
        return self.fetch_headers(uids)

    def file(
        self,
        uids: Sequence[int],
        role: FolderRole,
        *_: object,
        confirm: Callable[[], None] | None = None,
    ) -> None:
        """``confirm()``, then ``move``; the keyword is not set (no fake reads it)."""
        if confirm is not None:
            confirm()
        self.move(uids, role)

    def file_later(self, *args: Any, **kwargs: Any) -> FiledNow:
        """``file`` (the same arguments), now; what it raised waits for ``wait``."""
        return FiledNow(self, *args, **kwargs)


@dataclass
class FakeSession(FilesAtOnce):
    """A logged-in connection to FakeServer; every command fails once it is broken."""

    server: FakeServer
    exists: int = 0
    uidvalidity: int | None = 1
    broken: ConnectionLostError | None = None
    closed: bool = False
    logged_out: bool = False
    commands: list[str] = field(default_factory=list)

    def _command(self, name: str) -> None:
        self.commands.append(name)
        if self.closed:
            raise AssertionError(f"{name} on a closed session")
        if self.broken is not None:
            raise self.broken
        if name in self.server.failing:
            self.broken = self.server.failing[name]
            raise self.broken

    def has(self, capability: str) -> bool:
        return capability != "IDLE" or self.server.has_idle

    def ensure_folders(self) -> list[str]:
        self._command("ensure_folders")
        return []

    def select_queue(self) -> int:
        self._command("select")
        self.exists = len(self.server.queue)
        return self.exists

    def queue_uids(self) -> list[int]:
        self._command("search")
        return sorted(self.server.queue)

    def keyword_uids(self, keyword: str) -> list[int]:
        self._command("search")
        return []  # this server never refuses a message, so nothing is ever quarantined

    def set_keyword(self, uids: Sequence[int], keyword: str, *, on: bool) -> bool:
        self._command("store")
        return True

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        self._command("fetch")
        return [
            FetchedMessage(uid, HEADER.replace(b"{uid}", str(uid).encode()), None, 100)
            for uid in uids
            if uid in self.server.queue
        ]

    def prefetch_headers(self, uids: Sequence[int]) -> None:
        pass  # answers at once anyway

    def move(self, uids: Sequence[int], role: FolderRole) -> None:
        self._command("move")
        for uid in uids:
            if uid in self.server.queue:
                self.server.queue.remove(uid)
                self.server.filed.append(uid)
        self.exists = len(self.server.queue)

    def oldest_queued(self, uids: Sequence[int]) -> datetime | None:
        return None

    def _update(self, woken: bool = False) -> IdleUpdate:
        count = len(self.server.queue)
        update = IdleUpdate(new_mail=count > self.exists, woken=woken, exists=count)
        self.exists = count
        return update

    def noop(self) -> IdleUpdate:
        self._command("noop")
        return self._update()

    def idle_begin(self) -> None:
        self._command("idle")

    def idle_wait(self, timeout_seconds: float, wake: Wakeup) -> IdleUpdate:
        if self.broken is not None:
            raise self.broken
        if len(self.server.queue) > self.exists:
            return self._update()
        woken = wake.wait(timeout_seconds)
        if self.broken is not None:
            raise self.broken
        return self._update(woken)

    def idle_end(self) -> IdleUpdate:
        self._command("done")
        return self._update()

    def logout(self, timeout_seconds: float | None = None) -> None:
        self.logged_out = True
        self.closed = True

    def close(self) -> None:
        self.closed = True


def settings(tmp_path: Path, *, trigger: str = "auto", **daemon: object) -> Settings:
    """Settings for one mailbox on a server that is never contacted."""
    values: dict[str, object] = {"state_dir": str(tmp_path)}
    values.update(daemon)
    return parse_settings(
        {
            "daemon": values,
            "branches": {
                "b": {
                    "host": "127.0.0.1",
                    "port": 143,
                    "security": "none",
                    "allow_insecure": True,
                }
            },
            "mailboxes": [
                {"address": ADDRESS, "branch": "b", "password_env": "UNUSED", "trigger": trigger}
            ],
        },
        tmp_path / "emailsync.toml",
    )


@dataclass
class Rig:
    """A worker wired to fakes, and what the test watches."""

    clock: FakeClock
    server: FakeServer
    store: FakeStore
    auth: FakeAuthenticator
    registry: CollectorRegistry
    worker: MailboxWorker
    delays: list[tuple[float, float]]  # (when, seconds) of every back-off the worker drew
    passes: list[tuple[float, float | None]]  # (started, completed or None) of every pass
    # When each pass served without the filer was counted done (an empty Queue's startup
    # pass or sweep, answered by the SELECT alone).
    counted: list[float]

    def run_until(self, seconds: float) -> None:
        """Run the worker on this thread until it is stopped at ``seconds`` (virtual)."""
        self.clock.at(seconds, self.worker.stop)
        self.worker.run()

    def passes_total(self, trigger: str) -> float:
        value = self.registry.get_sample_value(
            "emailsync_sync_passes_total", {"mailbox": ADDRESS, "trigger": trigger}
        )
        return value or 0.0

    def auth_failures(self) -> float:
        value = self.registry.get_sample_value(
            "emailsync_auth_failures_total", {"mailbox": ADDRESS}
        )
        return value or 0.0


def rig(
    tmp_path: Path,
    *,
    trigger: str = "auto",
    token_seconds: float | None = None,
    has_idle: bool = True,
    seed: int = 1,
    max_logins: int = 300,
    worker_clock: Clock | None = None,
    **daemon: object,
) -> Rig:
    """A worker on a FakeServer, with its back-off draws and passes recorded.

    ``worker_clock`` replaces virtual time for the worker (e.g. the real clock, for a test
    that runs the worker in its own thread); the server then keeps virtual time to itself.
    """
    clock = FakeClock()
    server = FakeServer(clock, has_idle=has_idle, max_logins=max_logins)
    store = FakeStore()
    auth = FakeAuthenticator(clock, token_seconds)
    registry = CollectorRegistry()
    config = settings(tmp_path, trigger=trigger, **daemon)
    worker = MailboxWorker(
        config.mailboxes[0],
        config,
        store,  # type: ignore[arg-type]
        Metrics(registry, detail="mailbox"),  # passes by trigger per mailbox
        auth,  # type: ignore[arg-type]
        rng=random.Random(seed),
        clock=worker_clock or clock,
        connect=server.connect,  # type: ignore[arg-type]
    )
    delays: list[tuple[float, float]] = []
    passes: list[tuple[float, float | None]] = []
    backoff = worker._backoff
    draw = backoff.next_delay

    def recorded_draw(suggested: float | None = None) -> float:
        delay = draw(suggested)
        delays.append((clock.now, delay))
        return delay

    backoff.next_delay = recorded_draw  # type: ignore[method-assign]
    run_pass = worker.filer.run_pass

    def recorded_pass(*args: Any, **kwargs: Any) -> Any:
        started = clock.now
        index = len(passes)
        passes.append((started, None))
        result = run_pass(*args, **kwargs)
        passes[index] = (started, clock.now)
        return result

    worker.filer.run_pass = recorded_pass  # type: ignore[method-assign]
    counted: list[float] = []
    filer_passes = [0]  # the filer's passes when the last pass was counted
    pass_done = worker.report.pass_done

    def recorded_pass_done(trigger: str, seconds: float) -> None:
        if len(passes) == filer_passes[0]:  # no filer pass since the last count
            counted.append(clock.now)
        filer_passes[0] = len(passes)
        pass_done(trigger, seconds)

    worker.report.pass_done = recorded_pass_done  # type: ignore[method-assign]
    return Rig(clock, server, store, auth, registry, worker, delays, passes, counted)
