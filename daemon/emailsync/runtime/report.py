"""What a mailbox worker tells the outside: its metrics and the status ``status`` shows."""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from emailsync.filing.decision import Decision
from emailsync.model import Outcome
from emailsync.runtime.clock import Clock
from emailsync.telemetry.metrics import Metrics

log = structlog.get_logger(__name__)

RECENT_OUTCOMES = 10  # the latest filed/failed messages a mailbox's status page shows


class State(enum.Enum):
    """The worker's state; the value is the ``mailbox_state`` label."""

    CONNECTING = "connecting"
    IDLE = "idle"
    SYNCING = "syncing"
    BACKOFF = "backoff"
    NEEDS_REAUTH = "needs_reauth"
    STOPPED = "stopped"


@dataclass
class WorkerStatus:
    """What ``status`` and ``/v1/mailboxes`` show for a mailbox (never a secret)."""

    address: str
    state: str
    trigger: str
    queue: int = 0
    stuck: int = 0  # quarantined in Queue ($EmailSyncStuck), skipped by passes
    last_sync: str | None = None
    last_error: str | None = None
    next_attempt: str | None = None
    filed: dict[str, int] = field(default_factory=dict)
    owner: str | None = None  # the instance running it, with a shared (PostgreSQL) store


class WorkerReport:
    """One mailbox's metrics and status; every method is safe to call from any thread."""

    def __init__(self, address: str, trigger: str, metrics: Metrics, clock: Clock) -> None:
        self.address = address
        self.metrics = metrics
        self.clock = clock
        self.log = log.bind(mailbox=address)
        self.state = State.CONNECTING
        self._lock = threading.Lock()
        self._status = WorkerStatus(address, State.CONNECTING.value, trigger)
        self._oldest_queued: datetime | None = None
        self._recent: deque[dict[str, str | bool | None]] = deque(maxlen=RECENT_OUTCOMES)
        self.series = metrics.init_mailbox(address)
        self.series.set_state(State.CONNECTING.value)

    def snapshot(self) -> WorkerStatus:
        """A copy of the current status, safe to serialise from any thread."""
        with self._lock:
            return WorkerStatus(**{**self._status.__dict__, "filed": dict(self._status.filed)})

    def set_state(self, state: State, *, error: str | None = None) -> None:
        """Enter a state (the ``mailbox_state`` gauge), recording an error when there is one."""
        if state is not self.state:
            self.log.info("state", state=state.value)
        self.state = state
        self.series.set_state(state.value)
        with self._lock:
            self._status.state = state.value
            if error is not None:
                self._status.last_error = error

    def connected(self) -> None:
        """A login went through: clear the error and the planned retry."""
        with self._lock:
            self._status.last_error = None
            self._status.next_attempt = None

    def next_attempt_in(self, seconds: float) -> None:
        """Show when the next attempt is planned."""
        with self._lock:
            self._status.next_attempt = _iso(self.clock.time() + seconds)

    def auth_failed(self) -> None:
        """Count a refused login."""
        self.series.auth_failure()

    def connection_error(self, kind: str) -> None:
        """Count a lost or refused connection by kind (timeout, refused, tls, bye, protocol)."""
        self.series.connection_error(kind)

    def pass_done(self, trigger: str, seconds: float) -> None:
        """Count a completed sync pass and its duration."""
        now = self.clock.time()
        self.series.pass_done(trigger, seconds, now)
        with self._lock:
            self._status.last_sync = _iso(now)

    def recorded(self, new_events: int) -> None:
        """Count timeline events the store took as new (de-duplicated ones are not)."""
        self.series.timeline_events(new_events)

    def refiled(self, decisions: Sequence[Decision], trigger: str) -> None:
        """Count messages filed from Failed once their group appeared, shown as filed later.

        ``trigger`` (link_change, periodic, scan) is for the log, which names it already.
        """
        del trigger
        self.series.refiled(len(decisions))
        self.filed(decisions, later=True)

    def filed(self, decisions: Sequence[Decision], *, later: bool = False) -> None:
        """Count filed messages by outcome and their latency (``later``: from Failed)."""
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        for decision in decisions:
            self.series.filed(decision.outcome.value)
            if decision.queued_at is not None:
                latency = (now - decision.queued_at).total_seconds()
                self.metrics.filing_latency_seconds.observe(max(0.0, latency))
        with self._lock:
            for decision in decisions:
                key = decision.outcome.value
                self._status.filed[key] = self._status.filed.get(key, 0) + 1
                if decision.outcome is Outcome.REJECTED:
                    # The store's reason, so `emailsync status` shows why it went to Failed.
                    self._status.last_error = f"uid {decision.uid}: {decision.message.problem}"
                self._recent.appendleft(
                    {
                        "at": now.isoformat(timespec="seconds"),
                        "outcome": key,
                        "subject": decision.message.subject,
                        "reason": decision.message.problem
                        or ("no group for its addresses" if key == "no_group" else None),
                        "filed_later": later,
                    }
                )

    def recent(self) -> list[dict[str, str | bool | None]]:
        """The latest filed or failed messages, newest first: time, outcome, subject, reason,
        and whether it was filed later (from Failed, once its group appeared)."""
        with self._lock:
            return [dict(entry) for entry in self._recent]

    def stuck(self, count: int) -> None:
        """The number of messages quarantined in Queue ($EmailSyncStuck)."""
        self.series.set_stuck(count)
        with self._lock:
            self._status.stuck = count

    def queue_depth(self, depth: int) -> None:
        """The number of messages waiting in Queue."""
        self.series.set_queue(depth)
        with self._lock:
            self._status.queue = depth

    def oldest_queued(self, oldest: datetime | None) -> None:
        """When the oldest waiting message landed (None: Queue is empty)."""
        self._oldest_queued = oldest
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Recompute the age of the oldest queued message (the scheduler calls this)."""
        oldest = self._oldest_queued
        if oldest is None:  # most mailboxes, every 15 s: no clock, no datetime (issue 23)
            self.series.set_oldest_age(0.0)
            return
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        self.series.set_oldest_age(max(0.0, (now - oldest).total_seconds()))

    def token_expiry(self, expiry: datetime | None) -> None:
        """The access token's expiry (Office 365), when there is one."""
        if expiry is not None:
            self.series.set_token_expiry(expiry.timestamp())


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
