"""MailboxWorker: one thread and one IMAP connection per mailbox, filing Queue as mail lands.

State machine (the ``mailbox_state`` metric shows the current state)::

                  ┌──────────────────── Start Sync / sweep / EXISTS / IDLE renewal ──┐
                  ▼                                                                  │
    start ─▶ connecting ──login ok──▶ syncing ──pass done──▶ idle ──────────────────┘
                  ▲  │                   │                    │
                  │  │ refused, timeout, │ connection lost,   │ connection lost, BYE,
                  │  │ TLS, BYE          │ store unavailable  │ no answer to DONE
                  │  ▼                   ▼                    ▼
                  └─ backoff ◀───────────┴────────────────────┘
                  │   (1 s → 5 min, full jitter; a server's suggested back-off wins)
                  │
                  └─ needs_reauth  (login refused: slow retry every reauth_retry_seconds,
                                    or at once on Start Sync / reload; never hammering)

    stop() from any state ─▶ stopped (the message batch in flight is finished, then LOGOUT)
    lease lost (LeaseLostError, PostgreSQL store) ─▶ stopped at once: connection dropped,
        nothing recorded or moved; parked until the lease keeper calls stop()

``trigger = "manual"`` mailboxes keep IDLE for queue depth but file only on Start Sync.
A server without IDLE is polled every ``poll_seconds``.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from emailsync.config import FolderSettings, MailboxSettings, Settings
from emailsync.errors import (
    AuthError,
    ConnectionLostError,
    FolderMissingError,
    LeaseLostError,
    StoreUnavailableError,
    UidValidityChangedError,
)
from emailsync.filing import Decision, Filer
from emailsync.imap.auth import Authenticator
from emailsync.imap.session import ImapSession
from emailsync.metrics import Metrics
from emailsync.model import Outcome
from emailsync.store.base import Store

log = structlog.get_logger(__name__)

BACKOFF_START_SECONDS = 1.0
# Reconnect this long before an OAuth access token expires: Exchange ends a session whose
# token expired ("* BYE Session invalidated - AccessTokenExpired"), and MSAL hands out a new
# token once less than 300 s are left, so the new login gets a fresh one.
TOKEN_RECONNECT_AHEAD_SECONDS = 240.0
RECONNECT = "reconnect"  # not a pass trigger: _wait's answer when the token runs out
# The cap on how long LOGOUT may take at shutdown (SIGTERM must exit within 10 s).
LOGOUT_TIMEOUT_SECONDS = 3.0


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
    last_sync: str | None = None
    last_error: str | None = None
    next_attempt: str | None = None
    filed: dict[str, int] = field(default_factory=dict)
    owner: str | None = None  # the instance running it, with a shared (PostgreSQL) store


def full_jitter_backoff(failures: int, cap: float, rng: random.Random) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, 1 s · 2^failures)]."""
    ceiling = min(cap, BACKOFF_START_SECONDS * (2 ** min(failures, 30)))
    return rng.uniform(0, ceiling)


class MailboxWorker(threading.Thread):
    """Owns one mailbox's connection and runs its state machine until ``stop()``."""

    def __init__(
        self,
        mailbox: MailboxSettings,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        authenticator: Authenticator,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name=f"worker-{mailbox.address}", daemon=True)
        self.mailbox = mailbox
        self.daemon_settings = settings.daemon
        self.folders: FolderSettings = settings.folders
        self.store = store
        self.metrics = metrics
        self.authenticator = authenticator
        self.rng = rng or random.Random()  # noqa: S311 -- jitter, not cryptography
        self.log = log.bind(mailbox=mailbox.address)
        self.filer = Filer(
            mailbox, store, batch_size=settings.daemon.fetch_batch, on_filed=self._on_filed
        )
        self.first_attempt_done = threading.Event()
        self._running = True
        self._lock = threading.Lock()
        self._pending: list[str] = []  # pass triggers asked for by other threads
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_closed = False
        self._sleep = threading.Event()  # interrupts back-off and poll waits
        self._session: ImapSession | None = None
        self._failures = 0
        self._lease_lost = False
        self._oldest_queued: datetime | None = None
        self.state = State.CONNECTING
        self.status = WorkerStatus(mailbox.address, State.CONNECTING.value, mailbox.trigger)
        metrics.init_mailbox(mailbox.address)
        metrics.set_state(mailbox.address, State.CONNECTING.value)

    # -- called from other threads --------------------------------------------------------------

    def request_pass(self, trigger: str) -> None:
        """Ask for a sync pass (``start_sync`` or ``sweep``); returns at once."""
        with self._lock:
            if trigger not in self._pending:
                self._pending.append(trigger)
        if trigger == "start_sync" and self.state is State.NEEDS_REAUTH:
            self._failures = 0
        self._wake()

    def stop(self) -> None:
        """Ask the worker to finish the batch in flight, LOG OUT and end."""
        self._running = False
        self._wake()

    def snapshot(self) -> WorkerStatus:
        """A copy of the current status, safe to serialise from any thread."""
        with self._lock:
            return WorkerStatus(**{**self.status.__dict__, "filed": dict(self.status.filed)})

    def _stop_requested(self) -> bool:
        # A method, not the attribute, so that type narrowing does not assume it unchanged.
        return not self._running

    def _wake(self) -> None:
        self._sleep.set()
        with self._lock:
            if self._pipe_closed:
                return  # the thread has ended; its descriptor numbers may belong to others now
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    # -- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        """The state machine; never raises (errors go to back-off and logs)."""
        try:
            while self._running:
                self._attempt()
        finally:
            self._set_state(State.STOPPED)
            self.first_attempt_done.set()
            with self._lock:
                self._pipe_closed = True
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _attempt(self) -> None:
        delay: float | None = None
        error: str | None = None
        try:
            self._set_state(State.CONNECTING)
            session = self._connect()
            self.first_attempt_done.set()
            if self._serve(session) == RECONNECT:
                self.log.info("token_expiring_reconnect")
                self._session = None
                session.logout()
                return
        except AuthError as exc:
            self.metrics.auth_failures.labels(mailbox=self.mailbox.address).inc()
            self._set_state(State.NEEDS_REAUTH, error=str(exc))
            self.log.error(  # noqa: TRY400 -- a refused login is expected; no traceback
                "login_refused",
                error=str(exc),
                action="emailsync auth login / fix the password, then emailsync setup",
            )
            delay = self.daemon_settings.reauth_retry_seconds
        except ConnectionLostError as exc:
            self.metrics.connection_errors.labels(mailbox=self.mailbox.address, kind=exc.kind).inc()
            error = str(exc)
            # Exchange ends sessions whose token expired; a new login gets a fresh one at once.
            expired = "AccessTokenExpired" in error
            delay = 0.0 if expired else self._backoff_delay(exc.retry_after)
            self.log.warning(
                "connection_lost", kind=exc.kind, error=str(exc), retry_in=round(delay, 2)
            )
        except (FolderMissingError, UidValidityChangedError) as exc:
            # Reconnecting re-creates the tree and re-selects Queue; a short pause stops a loop.
            # UIDs seen before mean nothing under a new UIDVALIDITY (RFC 3501 §2.3.1.1).
            self.filer.first_seen.clear()
            error = str(exc)
            delay = self._backoff_delay(None)
            self.log.warning("folder_changed", error=str(exc), retry_in=round(delay, 2))
        except LeaseLostError as exc:
            # Another instance may own the mailbox now (emailsync.lease): move nothing more,
            # drop the connection and wait, parked, for the lease keeper to stop us.
            error = str(exc)
            self.log.warning("lease_lost_parked", error=error)
            self._lease_lost = True
        except StoreUnavailableError as exc:
            error = str(exc)
            delay = self._backoff_delay(None)
            self.log.warning("store_unavailable", error=str(exc), retry_in=round(delay, 2))
        except Exception as exc:  # the top of a worker loop: log, back off, go on
            error = repr(exc)
            delay = self._backoff_delay(None)
            self.log.exception("worker_error", error=repr(exc), retry_in=round(delay, 2))
        finally:
            self._close_session()
            self.first_attempt_done.set()
        if self._lease_lost:
            self._set_state(State.STOPPED, error=error)
            while self._running:
                self._sleep.wait(1.0)
                self._sleep.clear()
            return
        if delay is not None and self._running:
            if self.state is not State.NEEDS_REAUTH:
                self._set_state(State.BACKOFF, error=error)
            self._pause(delay)

    def _backoff_delay(self, suggested: float | None) -> float:
        self._failures += 1
        delay = full_jitter_backoff(
            self._failures, self.daemon_settings.max_backoff_seconds, self.rng
        )
        if suggested is not None:
            delay = max(delay, suggested)  # the server knows its own load best
        with self._lock:
            self.status.next_attempt = _iso(datetime.now(UTC).timestamp() + delay)
        return delay

    def _pause(self, seconds: float) -> None:
        """Sleep through back-off or needs_reauth; only stop() or a Start Sync cut it short.

        A sweep does not: it would turn the slow re-auth retry into one every sweep.
        """
        deadline = time.monotonic() + seconds
        while self._running:
            with self._lock:
                if "start_sync" in self._pending:
                    return
                self._sleep.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._sleep.wait(remaining)

    def _connect(self) -> ImapSession:
        session = ImapSession.open(
            self.mailbox,
            self.folders,
            self.authenticator,
            timeout_seconds=self.daemon_settings.timeout_seconds,
        )
        self._session = session
        self._update_token_expiry()
        session.ensure_folders()
        session.select_queue()
        self._set_queue(session.exists)
        self._failures = 0
        with self._lock:
            self.status.last_error = None
            self.status.next_attempt = None
        self.log.info("connected", idle=session.has("IDLE"), move=session.has("MOVE"))
        return session

    def _serve(self, session: ImapSession) -> str | None:
        """Pass, IDLE, pass… until stop() or the token needs a new login (returns RECONNECT)."""
        trigger: str | None = "startup"
        use_idle = session.has("IDLE")
        while self._running:
            if trigger is not None:
                self._sync(session, trigger)
            # Re-select: EXISTS is then exact (the pass's own MOVEs expunged messages), and mail
            # that landed after the pass's last search shows up here instead of waiting for
            # the next sweep, since IDLE will not announce it again.
            # One SEARCH serves both the gauges and the check for unseen mail.
            uids = session.queue_uids() if session.select_queue() else []
            self._update_queue_gauges(session, uids)
            if self._stop_requested():
                return None
            if self._unseen_waiting(uids):
                trigger = "idle"  # landed after the pass's last search: file it now
                continue
            self._set_state(State.IDLE)
            trigger = self._wait(session) if use_idle else self._poll_wait(session)
            if trigger == RECONNECT:
                return RECONNECT
        return None

    def _unseen_waiting(self, uids: Sequence[int]) -> bool:
        """True when an auto mailbox's Queue holds a message the last pass did not try.

        Messages a pass tried and could not move stay in Queue; they wait for the next
        trigger instead of spinning this loop.
        """
        if self.mailbox.trigger != "auto":
            return False
        return bool(set(uids) - self.filer.attempted)

    def _token_deadline(self) -> float:
        """Monotonic time at which to reconnect for a fresh token (inf for passwords)."""
        expiry = self.authenticator.token_expiry()
        if expiry is None:
            return float("inf")
        left = expiry.timestamp() - time.time() - TOKEN_RECONNECT_AHEAD_SECONDS
        return time.monotonic() + max(left, 0.0)

    def _files_on(self, trigger: str) -> bool:
        """Manual mailboxes file only on Start Sync; auto ones on anything."""
        return self.mailbox.trigger == "auto" or trigger == "start_sync"

    def _sync(self, session: ImapSession, trigger: str) -> None:
        """Run a pass if this trigger files for this mailbox."""
        if not self._files_on(trigger):
            return
        self._set_state(State.SYNCING)
        started = time.monotonic()
        self.filer.run_pass(session, stopping=self._stop_requested)
        elapsed = time.monotonic() - started
        address = self.mailbox.address
        self.metrics.sync_passes.labels(mailbox=address, trigger=trigger).inc()
        self.metrics.sync_pass_seconds.labels(mailbox=address).observe(elapsed)
        now = time.time()
        self.metrics.last_sync.labels(mailbox=address).set(now)
        with self._lock:
            self.status.last_sync = _iso(now)
        self.log.debug("sync_pass", trigger=trigger, seconds=round(elapsed, 3))

    def _take_pending(self) -> str | None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return None
        return "start_sync" if "start_sync" in pending else pending[0]

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _wait(self, session: ImapSession) -> str | None:
        """IDLE until new mail, a request, or the renewal time; returns the pass trigger."""
        pending = self._take_pending()
        if pending is not None:
            return pending
        token_deadline = self._token_deadline()
        if token_deadline <= time.monotonic():
            return RECONNECT
        session.idle_begin()
        # RFC 2177: re-issue IDLE before the server's 30-minute limit.
        deadline = min(time.monotonic() + self.daemon_settings.idle_renew_seconds, token_deadline)
        trigger: str | None = None
        while self._running and trigger is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            update = session.idle_wait(remaining, self._wake_r)
            if update.woken:
                self._drain_wake()
                trigger = self._take_pending()
            if update.new_mail:
                trigger = trigger or "idle"
            self._set_queue(session.exists)
        # DONE also on shutdown, so LOGOUT is not sent inside IDLE; an error here propagates
        # (a server that does not answer DONE within the timeout is dead).
        if session.idle_end().new_mail and trigger is None:
            trigger = "idle"
        if trigger is None and time.monotonic() >= token_deadline:
            return RECONNECT
        if trigger is None and self._running and session.noop().new_mail:
            # Renewal: NOOP proves the connection still answers before IDLE again, and mail
            # that landed between DONE and NOOP is announced only here.
            trigger = "idle"
        return trigger

    def _poll_wait(self, session: ImapSession) -> str | None:
        """For servers without IDLE: wait poll_seconds (or a request), then a poll pass."""
        self._sleep.clear()
        token_deadline = self._token_deadline()
        pending = self._take_pending()
        if pending is None:
            wait = min(self.daemon_settings.poll_seconds, token_deadline - time.monotonic())
            self._sleep.wait(max(0.0, wait))
            self._drain_wake()
            pending = self._take_pending()
        if pending is None and time.monotonic() >= token_deadline:
            return RECONNECT
        return pending or "poll"

    # -- metrics and status ---------------------------------------------------------------------

    def _on_filed(self, decisions: Sequence[Decision], new_events: int) -> None:
        address = self.mailbox.address
        now = datetime.now(UTC)
        for decision in decisions:
            if decision.outcome is Outcome.SENT:
                self.metrics.messages_synced.labels(mailbox=address).inc()
            elif decision.outcome is Outcome.RECEIVED:
                self.metrics.messages_received.labels(mailbox=address).inc()
            else:
                self.metrics.messages_failed.labels(
                    mailbox=address, reason=decision.outcome.value
                ).inc()
            if decision.queued_at is not None:
                latency = (now - decision.queued_at).total_seconds()
                self.metrics.filing_latency_seconds.observe(max(0.0, latency))
        self.metrics.timeline_events.labels(mailbox=address).inc(new_events)
        with self._lock:
            for decision in decisions:
                key = decision.outcome.value
                self.status.filed[key] = self.status.filed.get(key, 0) + 1

    def _update_queue_gauges(self, session: ImapSession, uids: Sequence[int]) -> None:
        self._set_queue(session.exists)
        self._oldest_queued = session.oldest_queued(uids)
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        """Recompute the age of the oldest queued message (the scheduler calls this)."""
        oldest = self._oldest_queued
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self.metrics.queue_oldest_age.labels(mailbox=self.mailbox.address).set(max(0.0, age))

    def refresh_token(self, ahead_seconds: float) -> None:
        """Refresh an OAuth access token that expires within ``ahead_seconds`` (scheduler job)."""
        refresh = getattr(self.authenticator, "refresh_if_needed", None)
        if refresh is None or self.state is State.STOPPED:
            return
        try:
            refresh(ahead_seconds)
        except (AuthError, ConnectionLostError) as exc:
            # The worker meets the same error at its next login and acts on it there.
            self.log.warning("token_refresh_failed", error=str(exc))
            return
        self._update_token_expiry()

    def _set_queue(self, depth: int) -> None:
        self.metrics.queue_messages.labels(mailbox=self.mailbox.address).set(depth)
        with self._lock:
            self.status.queue = depth

    def _update_token_expiry(self) -> None:
        expiry = self.authenticator.token_expiry()
        if expiry is not None:
            self.metrics.token_expiry.labels(mailbox=self.mailbox.address).set(expiry.timestamp())

    def _set_state(self, state: State, *, error: str | None = None) -> None:
        if state is not self.state:
            self.log.info("state", state=state.value)
        self.state = state
        self.metrics.set_state(self.mailbox.address, state.value)
        with self._lock:
            self.status.state = state.value
            if error is not None:
                self.status.last_error = error

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if self._running:
            session.close()  # the connection failed: nothing to say goodbye to
            return
        # Shutdown: LOGOUT, but never wait long for it.
        with contextlib.suppress(OSError):
            session.client.socket().settimeout(LOGOUT_TIMEOUT_SECONDS)
        session.logout()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


WorkerFactory = Callable[[MailboxSettings], MailboxWorker]
