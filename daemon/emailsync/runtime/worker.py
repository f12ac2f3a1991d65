"""MailboxWorker: one thread and one IMAP connection per mailbox, filing Queue as mail lands.

State machine (the ``mailbox_state`` metric shows the current state)::

                 ┌────── Start Sync / sweep / EXISTS / poll / IDLE renewal ──────┐
                 ▼                                                               │
    start ─▶ connecting ──login ok──▶ syncing ──pass done──▶ idle ───────────────┘
              ▲  ▲  │  │               │                     │
              │  │  │  │ timeout, TLS, │ connection lost,    │ connection lost, BYE,
              │  │  │  │ BYE,          │ folder gone,        │ no answer to DONE
              │  │  │  │ throttled     │ UIDVALIDITY changed │
              │  │  │  ▼               ▼                     ▼
              │  └──┼─ backoff ◀───────┴─────────────────────┘
              │     │   (1 s → max_backoff_seconds, full jitter; a server's suggested
              │     │    back-off wins; a Start Sync waits for its end)
              │     │ login refused
              │     ▼
              └─ needs_reauth (slow retry every reauth_retry_seconds; a Start Sync brings
                               it forward to the end of the back-off slot, once per retry)

    syncing ──store unavailable──▶ backoff, still logged in ──▶ syncing (the same pass again)
    idle ──access token near its end──▶ LOGOUT ──▶ connecting (at once)
    stop() from any state ─▶ stopped (the message batch in flight is finished, then LOGOUT)
    lease lost (LeaseLostError, PostgreSQL store) ─▶ stopped at once: connection dropped,
        nothing recorded or moved; parked until the lease keeper calls stop()

The back-off restarts from 1 s only after a pass completed (``Backoff.progress()``), never on
a mere login, so a failure right after login cannot turn into a reconnect every second. An
``AccessTokenExpired`` BYE reconnects at once, but only once in a row (another within
``TOKEN_RECONNECT_FLOOR_SECONDS`` backs off).

Triggers (Start Sync, sweep, …) are consumed from the ``Wakeup`` when they are acted on. One
that arrives while the worker is not connected is owed to the first pass after the next
login; that login serves every trigger asked for before it (and while it was in flight), so
a burst of Start Syncs never becomes a burst of logins. The startup pass of a Queue that is
empty at login (EXISTS 0 on the SELECT) is served without a command: the worker goes
straight to IDLE (issue 10); every other trigger gets a real pass.

``trigger = "manual"`` mailboxes keep IDLE for queue depth but file only on Start Sync.
A server without IDLE is polled every ``poll_seconds``.

Failed mail whose group appeared is re-filed on the same connection, between IDLEs
(``emailsync.filing.refile``): after every login (the index says what is due; nothing due costs no
command), on a ``REFILE`` trigger (a link change, from the supervisor), and when indexing
found a message due at once. A re-file pass takes at most ``refile_per_pass`` messages, then
the Queue gets its look before the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random
import resource
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

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
from emailsync.filing.queuepass import Filer
from emailsync.filing.refile import FailedSession, Refiler
from emailsync.filing.sessions import QueueSession
from emailsync.imap.auth import Authenticator
from emailsync.imap.idle import IdleUpdate, WakeSource
from emailsync.imap.session import ImapSession
from emailsync.runtime.backoff import Backoff, full_jitter_backoff
from emailsync.runtime.clock import Clock, SystemClock
from emailsync.runtime.connectgate import ConnectGate, Turn, connect_gate
from emailsync.runtime.report import State, WorkerReport, WorkerStatus
from emailsync.runtime.wakeup import Trigger, Wakeup
from emailsync.state.base import Store
from emailsync.state.failedindex import failed_index
from emailsync.telemetry.metrics import Metrics

__all__ = [
    "MailboxWorker",
    "State",
    "Trigger",
    "WorkerStatus",
    "full_jitter_backoff",
    "token_reconnect_delay",
]

log = structlog.get_logger(__name__)

# Exchange ends a session whose token expired ("* BYE Session invalidated -
# AccessTokenExpired"), so log in again ahead of expiry, by this much at most…
TOKEN_RECONNECT_AHEAD_SECONDS = 240.0
# …and by at most this fraction of the token's remaining life, so a token that lives less
# than the above (a tenant policy, a test identity provider) does not mean "reconnect now"…
TOKEN_RECONNECT_FRACTION = 0.1
# …and never sooner than this after the previous token reconnect, whatever the token says.
TOKEN_RECONNECT_FLOOR_SECONDS = 30.0
# The cap on how long LOGOUT may take (SIGTERM must exit within 10 s).
LOGOUT_TIMEOUT_SECONDS = 3.0
# A parked worker (lease lost) only waits for stop(), which wakes it at once; this bounds each wait.
PARK_WAIT_SECONDS = 3600.0
# Which label a pass gets when it serves several triggers at once.
_LABEL_ORDER = (Trigger.START_SYNC, Trigger.STARTUP, Trigger.IDLE, Trigger.SWEEP, Trigger.POLL)


class WorkerSession(QueueSession, FailedSession, Protocol):
    """What the worker needs of a logged-in connection (``ImapSession`` in the daemon)."""

    exists: int

    def has(self, capability: str) -> bool:
        """True when the server announced a capability."""
        ...

    def ensure_folders(self) -> list[str]:
        """Create and subscribe the folder tree where missing."""
        ...

    def oldest_queued(self, uids: Sequence[int]) -> datetime | None:
        """When the oldest of these Queue messages landed there."""
        ...

    def noop(self) -> IdleUpdate:
        """NOOP, reporting new mail among its untagged responses."""
        ...

    def idle_begin(self) -> None:
        """Enter IDLE on the selected Queue."""
        ...

    def idle_wait(self, timeout_seconds: float, wake: WakeSource) -> IdleUpdate:
        """Wait in IDLE for the server, a wake-up or the timeout."""
        ...

    def idle_end(self) -> IdleUpdate:
        """Leave IDLE."""
        ...

    def logout(self, timeout_seconds: float | None = None) -> None:
        """LOGOUT and close; never raises."""
        ...

    def close(self) -> None:
        """Close without LOGOUT."""
        ...


class SessionFactory(Protocol):
    """Opens a logged-in session (``ImapSession.open``); raises ConnectionLostError/AuthError."""

    def __call__(
        self,
        mailbox: MailboxSettings,
        folders: FolderSettings,
        authenticator: Authenticator,
        *,
        timeout_seconds: float,
    ) -> WorkerSession: ...


def token_reconnect_delay(seconds_left: float, since_last_reconnect: float | None) -> float:
    """Seconds from now until logging in again for a fresh access token.

    ``seconds_left`` is the life the session's token has left; ``since_last_reconnect`` the
    seconds since the previous token reconnect (None: there was none).
    """
    ahead = min(TOKEN_RECONNECT_AHEAD_SECONDS, TOKEN_RECONNECT_FRACTION * max(0.0, seconds_left))
    delay = max(0.0, seconds_left - ahead)
    if since_last_reconnect is not None:
        delay = max(delay, TOKEN_RECONNECT_FLOOR_SECONDS - since_last_reconnect)
    return delay


# Stack of each thread the daemon starts (threading.stack_size, set before the workers start):
# 8 MiB by default, of which a worker touches little; 512 KiB still lets the stdlib parser
# hit Python's recursion limit (RecursionError, handled) on mail nested 3,000 deep, where
# 256 KiB crashed the process (tests/unit/test_worker_stack.py).
WORKER_STACK_BYTES = 512 * 1024
# glibc malloc arenas: by default up to 8 per core, and with a thread per mailbox each arena
# keeps its own free memory; 2 cut the RSS of 300 idle mailboxes from 118 to 102 MB (bench).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt(3) parameter number, from glibc's <malloc.h>
# A worker waiting for its turn to connect is woken by stop() at once; this is the longest it
# waits before looking for itself (a safety net, not the way a stop arrives).
TURN_CHECK_SECONDS = 5.0
# A connect that fails so says the server or the host struggles: the gate lowers its limit.
OVERLOAD_KINDS = frozenset({"timeout", "bye"})


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Ask glibc for at most ``count`` malloc arenas (mallopt(3)); False where not glibc.

    Call it before the worker threads start: arenas already created stay.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, count))
    except (OSError, AttributeError):
        return False


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (setrlimit(2)); the new soft limit.

    A mailbox holds two descriptors (its IMAP socket and its wake-up eventfd), and systemd
    starts a service with a soft limit of 1,024 (hard 524,288), leaving the raise to programs
    that do not use select(): at ~500 mailboxes the next connection would fail with EMFILE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def trim_malloc() -> bool:
    """Give glibc's free heap pages back to the system (malloc_trim(3)); False where not glibc.

    A /metrics scrape of 2,000 mailboxes allocates ~30 MB of short-lived samples and text;
    freed, most of it would stay in the process's RSS (issue 10).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class MailboxWorker(threading.Thread):
    """Owns one mailbox's connection and runs its state machine until ``stop()``.

    Timing and signalling are small objects it holds: ``Backoff`` (how long to wait after
    failures), ``Wakeup`` (triggers and stop from other threads), ``WorkerReport`` (metrics
    and status). ``clock`` and ``connect`` are seams for tests; the daemon uses the defaults.
    """

    def __init__(
        self,
        mailbox: MailboxSettings,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        authenticator: Authenticator,
        *,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        connect: SessionFactory | None = None,
    ) -> None:
        super().__init__(name=f"worker-{mailbox.address}", daemon=True)
        self.mailbox = mailbox
        self.daemon_settings = settings.daemon
        self.folders: FolderSettings = settings.folders
        self.store = store
        self.metrics = metrics
        self.authenticator = authenticator
        self.clock: Clock = clock or SystemClock()
        self.log = log.bind(mailbox=mailbox.address)
        self.report = WorkerReport(mailbox.address, mailbox.trigger, metrics, self.clock)
        index = failed_index(store)
        self.filer = Filer(
            mailbox,
            store,
            batch_size=settings.daemon.fetch_batch,
            on_filed=self.report.filed,
            on_recorded=self.report.recorded,
            stuck_after=settings.daemon.stuck_after_attempts,
            index=index,
        )
        self.refiler = (
            Refiler(
                self.filer,
                index,
                per_pass=settings.daemon.refile_per_pass,
                on_refiled=self.report.refiled,
            )
            if index is not None
            else None
        )
        # A re-file pass is owed (a link change, a login, mail indexed as due at once).
        self._refile_wanted = False
        self.first_attempt_done = threading.Event()
        self._connect: SessionFactory = connect or ImapSession.open
        self._wakeup = Wakeup(self.clock)
        self._backoff = Backoff(settings.daemon.max_backoff_seconds, rng=rng)
        self._session: WorkerSession | None = None
        # Triggers consumed but not yet served by a completed pass.
        self._owed: set[Trigger] = set()
        # In needs_reauth a Start Sync may bring the next login forward once per slow retry.
        self._reauth_shortcut = True
        self._expired_reconnect_at: float | None = None
        self._token_reconnected_at: float | None = None
        # The turn this worker waits for in the connect gate, so stop() can take it back.
        self._turn: tuple[ConnectGate, Turn] | None = None

    @property
    def state(self) -> State:
        """The current state."""
        return self.report.state

    # -- called from other threads --------------------------------------------------------------

    def request_pass(self, trigger: Trigger | str) -> None:
        """Ask for a sync pass (``Trigger.START_SYNC``, ``"sweep"``…); returns at once."""
        self._wakeup.post(Trigger(trigger))

    def release_stuck(self) -> None:
        """Have the next pass release the messages quarantined in Queue (include_stuck)."""
        self.filer.release_stuck()

    def stop(self) -> None:
        """Ask the worker to finish the batch in flight, LOG OUT and end."""
        self._wakeup.stop()
        waiting = self._turn
        if waiting is not None:
            waiting[0].cancel(waiting[1])  # a turn not granted yet: leave the queue now

    def snapshot(self) -> WorkerStatus:
        """A copy of the current status, safe to serialise from any thread."""
        return self.report.snapshot()

    def recent_outcomes(self) -> list[dict[str, str | bool | None]]:
        """The latest filed or failed messages, newest first (for the Email Sync page)."""
        return self.report.recent()

    def refresh_gauges(self) -> None:
        """Recompute the age of the oldest queued message (the scheduler calls this)."""
        self.report.refresh_gauges()

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
        self.report.token_expiry(self.authenticator.token_expiry())

    def _stopping(self) -> bool:
        return self._wakeup.stopping

    # -- the thread -----------------------------------------------------------------------------

    def run(self) -> None:
        """The state machine; never raises (errors go to back-off and logs)."""
        try:
            while not self._stopping():
                self._attempt()
        finally:
            self.report.set_state(State.STOPPED)
            self.first_attempt_done.set()
            self._wakeup.close()

    def _attempt(self) -> None:
        """One connection: log in, serve until it ends, then wait as the way it ended asks."""
        self.report.set_state(State.CONNECTING)
        gate = connect_gate(self.daemon_settings.connect_concurrency)
        turn = self._take_turn(gate)
        if turn is None:
            return  # stopped while waiting for a turn to connect
        # This login serves every trigger asked for so far, Start Syncs included.
        self._owed |= self._wakeup.consume()
        polite = False
        wait: Callable[[], None] | None = None
        try:
            session = self._open(gate, turn)
            self.first_attempt_done.set()
            self._serve(session)
            polite = True  # stop, or a new login for a fresh token
        except AuthError as exc:
            # Start Syncs that came while this login was in flight were served by it.
            self._owed |= self._wakeup.consume()
            self.report.auth_failed()
            self.report.set_state(State.NEEDS_REAUTH, error=str(exc))
            self.log.error(  # noqa: TRY400 -- a refused login is expected; no traceback
                "login_refused",
                error=str(exc),
                action="emailsync auth login / fix the password, then emailsync setup",
            )
            wait = self._wait_for_reauth
        except ConnectionLostError as exc:
            self.report.connection_error(exc.kind)
            wait = self._wait_after_connection_lost(exc)
        except LeaseLostError as exc:
            # Another instance may own the mailbox now (emailsync.cluster.lease): move nothing more,
            # drop the connection (no LOGOUT: nothing more is said on it) and wait, parked,
            # for the lease keeper to stop us.
            self.log.warning("lease_lost_parked", error=str(exc))
            wait = functools.partial(self._park, str(exc))
        except (FolderMissingError, UidValidityChangedError) as exc:
            # Reconnecting re-creates the tree and re-selects Queue; back-off stops a loop.
            # UIDs seen before mean nothing under a new UIDVALIDITY (RFC 3501 §2.3.1.1).
            self.filer.first_seen.clear()
            wait = self._wait_backoff(str(exc), "folder_changed")
        except Exception as exc:  # the top of a worker loop: log, back off, go on
            self.log.exception("worker_error", error=repr(exc))
            wait = self._wait_backoff(repr(exc), "worker_error")
        finally:
            self._close_session(polite=polite)
            self.first_attempt_done.set()
        if wait is not None and not self._stopping():
            wait()

    def _park(self, error: str) -> None:
        """Lease lost: ``stopped`` until stop(); triggers are dropped, the new owner serves them."""
        self.report.set_state(State.STOPPED, error=error)
        while not self._stopping():
            self._wakeup.consume()
            self._wakeup.wait(PARK_WAIT_SECONDS)

    def _wait_for_reauth(self) -> None:
        """needs_reauth: the slow retry, which one Start Sync per retry may bring forward.

        Never sooner than the back-off slot: a Start Sync right after a refused login waits
        for it, and Start Syncs while the earlier one is pending change nothing.
        """
        slot = self._backoff.next_delay()
        shortcut = slot if self._reauth_shortcut else None
        seconds = max(self.daemon_settings.reauth_retry_seconds, slot)
        self._reauth_shortcut = not self._pause(seconds, start_sync_after=shortcut)

    def _wait_after_connection_lost(self, exc: ConnectionLostError) -> Callable[[], None]:
        # Exchange ends sessions whose token expired; a new login gets a fresh one at once,
        # but only once in a row: another within TOKEN_RECONNECT_FLOOR_SECONDS backs off like
        # any loss (a token that expires again at once is not fixed by logging in faster).
        now = self.clock.monotonic()
        last = self._expired_reconnect_at
        if "AccessTokenExpired" in str(exc) and (
            last is None or now - last >= TOKEN_RECONNECT_FLOOR_SECONDS
        ):
            self._expired_reconnect_at = now
            self.log.warning("connection_lost", kind=exc.kind, error=str(exc), retry_in=0.0)
            return lambda: None
        return self._wait_backoff(str(exc), "connection_lost", exc.retry_after, kind=exc.kind)

    def _wait_backoff(
        self, error: str, event: str, suggested: float | None = None, **context: str
    ) -> Callable[[], None]:
        delay = self._backoff.next_delay(suggested)
        self.log.warning(event, error=error, retry_in=round(delay, 2), **context)

        def wait() -> None:
            self.report.set_state(State.BACKOFF, error=error)
            self._pause(delay)

        return wait

    def _pause(self, seconds: float, *, start_sync_after: float | None = None) -> bool:
        """Wait ``seconds``; triggers that come meanwhile are owed to the next pass.

        Only stop() ends the wait early, and, when ``start_sync_after`` is given, the first
        Start Sync: the wait then ends ``start_sync_after`` seconds after it began (at once if
        that has passed). Returns True when a Start Sync shortened it.
        """
        began = self.clock.monotonic()
        deadline = began + seconds
        shortened = False
        self.report.next_attempt_in(seconds)
        while not self._stopping():
            taken = self._wakeup.consume()
            self._owed |= taken
            if Trigger.START_SYNC in taken:
                if start_sync_after is not None and not shortened:
                    shortened = True
                    deadline = min(deadline, began + start_sync_after)
                    self.report.next_attempt_in(max(0.0, deadline - self.clock.monotonic()))
                left = round(max(0.0, deadline - self.clock.monotonic()), 2)
                # Served by the next login, which is not brought forward again (issue 7 #1).
                self.log.info("start_sync_waits", retry_in=left, brought_forward=shortened)
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            self._wakeup.wait(remaining)
        return shortened

    def _take_turn(self, gate: ConnectGate) -> Turn | None:
        """Wait for a turn to connect (``runtime.connectgate``); None when stopped meanwhile."""
        turn = gate.enter()
        self._turn = (gate, turn)
        try:
            if self._stopping():  # stop() came before it could see the turn
                gate.cancel(turn)
            while not turn.wait(TURN_CHECK_SECONDS):
                if turn.cancelled:
                    return None
                if self._stopping():
                    gate.cancel(turn)
        finally:
            self._turn = None
        if self._stopping():
            gate.done(turn, ok=False)
            return None
        return turn

    def _open(self, gate: ConnectGate, turn: Turn) -> WorkerSession:
        """Connect and log in (holding a connect turn, given back here), then ready Queue.

        The gate learns how the login went: its time, or a failure that says the server or
        host is overloaded (a timeout, BYE), which lowers the connects allowed at once.
        """
        try:
            session = self._connect(
                self.mailbox,
                self.folders,
                self.authenticator,
                timeout_seconds=self.daemon_settings.timeout_seconds,
            )
        except ConnectionLostError as exc:
            gate.done(turn, ok=False, overloaded=exc.kind in OVERLOAD_KINDS)
            raise
        except BaseException:
            gate.done(turn, ok=False)
            raise
        gate.done(turn, ok=True)
        self._session = session
        self._reauth_shortcut = True
        self.report.token_expiry(self.authenticator.token_expiry())
        session.ensure_folders()
        session.select_queue()
        self.report.queue_depth(session.exists)
        self.report.connected()
        self.log.info("connected", idle=session.has("IDLE"), move=session.has("MOVE"))
        return session

    def _serve(self, session: WorkerSession) -> None:
        """Pass, IDLE, pass… until stop() or the access token needs a new login."""
        self._owed.add(Trigger.STARTUP)
        # Every login looks at the index: a re-file a crash or a missed wake-up left owed.
        self._refile_wanted = self.refiler is not None
        use_idle = session.has("IDLE")
        reconnect_at = self._token_reconnect_at()
        self._take_refile()
        skipped = self._skip_empty_startup_pass(session)
        while not self._stopping():
            uids: list[int] = []
            self._take_refile()
            fresh, skipped = skipped, False  # fresh: Queue is known empty and selected
            if not fresh and self._owed == {Trigger.SWEEP}:
                fresh = self._skip_empty_sweep(session)
            if not fresh and self._owed:
                self._pass(session)
            if self._refile(session):
                fresh = False  # Failed is selected now
            if not fresh:
                # Re-select: EXISTS is then exact (the pass's own MOVEs expunged messages), and
                # mail that landed after the pass's last search shows up here instead of
                # waiting for the next sweep, since IDLE will not announce it again.
                # One SEARCH serves both the gauges and the check for unseen mail.
                uids = session.queue_uids() if session.select_queue() else []
                self.report.queue_depth(session.exists)
                # Quarantined messages have their own gauge; they must not make Queue look stale.
                stuck = self.filer.stuck_uids
                self.report.oldest_queued(
                    session.oldest_queued([u for u in uids if u not in stuck])
                )
            self._backoff.progress()
            if self._stopping():
                return
            if self._unseen_waiting(uids):
                self._owed.add(Trigger.IDLE)  # landed after the pass's last search: file it now
                continue
            if self._refile_wanted:
                continue  # more due than one re-file pass takes, or indexed as due meanwhile
            self.report.set_state(State.IDLE)
            waited = (
                self._idle(session, reconnect_at) if use_idle else self._poll(session, reconnect_at)
            )
            if waited is None:
                self.log.info("token_expiring_reconnect")
                self._token_reconnected_at = self.clock.monotonic()
                return
            self._owed |= waited

    def _skip_empty_startup_pass(self, session: WorkerSession) -> bool:
        """Serve the login's startup pass without a command when Queue is empty (issue 10).

        The SELECT ``_open`` just made says EXISTS 0 (RFC 3501 §7.3.1), so the pass, the
        re-SELECT and the SEARCHes after it would find nothing: at 2,000 mailboxes that is
        ~4 commands each for nothing. Only the startup trigger is served so: a Start Sync
        (or any other trigger) owed at login, or a requested release of stuck messages, runs
        a real pass. The skipped pass counts as the empty pass it stands for (sync_passes,
        last sync), so metrics, status and alerts read as before.
        """
        if self._owed != {Trigger.STARTUP} or session.exists != 0 or self.filer.release_requested:
            return False
        self._owed.clear()
        if self._files_on(Trigger.STARTUP):
            self.report.stuck(0)
            self.report.pass_done(Trigger.STARTUP.value, 0.0)
        self.report.oldest_queued(None)
        self.log.debug("startup_pass_skipped", queue=0)
        return True

    def _skip_empty_sweep(self, session: WorkerSession) -> bool:
        """Serve a sweep with one SELECT when it says Queue is empty (issue 23); True if so.

        The sweep looks for mail IDLE did not announce; the SELECT's EXISTS (RFC 3501
        §7.3.1) answers that for an empty Queue, where a pass and the re-SELECT and SEARCHes
        after it would find nothing: at 2,000 mailboxes, ~5 commands each every sweep_seconds.
        A Queue with anything in it (quarantined messages too) gets a real pass.
        """
        if self.filer.release_requested or session.select_queue() != 0:
            return False
        self._owed.clear()
        if self._files_on(Trigger.SWEEP):
            self.report.stuck(0)
            self.report.pass_done(Trigger.SWEEP.value, 0.0)
        self.report.queue_depth(0)
        self.report.oldest_queued(None)
        return True

    def _pass(self, session: WorkerSession) -> None:
        """A pass for the owed triggers; a store outage waits with back-off, same session."""
        while not self._stopping():
            trigger = next(t for t in _LABEL_ORDER if t in self._owed)
            try:
                self._sync(session, trigger)
            except LeaseLostError:
                raise  # a StoreUnavailableError too, but retrying cannot help: park (_attempt)
            except StoreUnavailableError as exc:
                # The IMAP session is fine: keep it, and keep the messages in Queue. A CRM's
                # Retry-After wins over the drawn delay, as a server's hint does.
                delay = self._backoff.next_delay(exc.retry_after)
                self.report.set_state(State.BACKOFF, error=str(exc))
                self.log.warning("store_unavailable", error=str(exc), retry_in=round(delay, 2))
                self._pause(delay)
                continue
            self._owed.clear()
            return

    def _take_refile(self) -> None:
        """A REFILE trigger asks for a re-file pass, not a Queue pass: take it out of the owed."""
        if Trigger.REFILE in self._owed:
            self._owed.discard(Trigger.REFILE)
            self._refile_wanted = self.refiler is not None
        if self.filer.refile_owed:
            self.filer.refile_owed = False
            self._refile_wanted = self.refiler is not None

    def _refile(self, session: WorkerSession) -> bool:
        """A re-file pass over Failed if one is owed; True when it selected Failed.

        A store outage waits with back-off on the same session, as a Queue pass does; a pass
        that left due messages (``refile_per_pass``) is owed again after the Queue's look.
        """
        if self.refiler is None or not self._refile_wanted:
            return False
        selected = False
        while not self._stopping():
            try:
                result = self.refiler.run(session, stopping=self._stopping)
            except LeaseLostError:
                raise
            except StoreUnavailableError as exc:
                selected = True  # it may have selected Failed before the store failed
                delay = self._backoff.next_delay(exc.retry_after)
                self.report.set_state(State.BACKOFF, error=str(exc))
                self.log.warning("store_unavailable", error=str(exc), retry_in=round(delay, 2))
                self._pause(delay)
                continue
            self._refile_wanted = result.more
            return selected or result.trigger is not None
        return selected

    def _unseen_waiting(self, uids: Sequence[int]) -> bool:
        """True when an auto mailbox's Queue holds a message the last pass did not try.

        Messages a pass tried and could not move stay in Queue; they wait for the next
        trigger instead of spinning this loop.
        """
        if self.mailbox.trigger != "auto":
            return False
        return bool(set(uids) - self.filer.attempted)

    def _token_reconnect_at(self) -> float:
        """Monotonic time at which to log in again for a fresh token (inf for passwords).

        Taken once per connection: the session lives on the token it logged in with, even
        when the scheduler refreshes the cached one meanwhile.
        """
        expiry = self.authenticator.token_expiry()
        if expiry is None:
            return float("inf")
        now = self.clock.monotonic()
        since = None if self._token_reconnected_at is None else now - self._token_reconnected_at
        return now + token_reconnect_delay(expiry.timestamp() - self.clock.time(), since)

    def _files_on(self, trigger: Trigger) -> bool:
        """Manual mailboxes file only on Start Sync; auto ones on anything."""
        return self.mailbox.trigger == "auto" or trigger is Trigger.START_SYNC

    def _sync(self, session: WorkerSession, trigger: Trigger) -> None:
        """Run a pass if this trigger files for this mailbox."""
        if not self._files_on(trigger):
            self.log.debug("pass_waits_for_start_sync", trigger=trigger.value)
            return
        self.report.set_state(State.SYNCING)
        started = self.clock.monotonic()
        self.filer.run_pass(session, stopping=self._stopping)
        elapsed = self.clock.monotonic() - started
        self.report.stuck(self.filer.stuck)
        self.report.pass_done(trigger.value, elapsed)
        self.log.debug("sync_pass", trigger=trigger.value, seconds=round(elapsed, 3))

    def _idle(self, session: WorkerSession, reconnect_at: float) -> frozenset[Trigger] | None:
        """IDLE until new mail, a request, or the renewal time; None: log in again (token)."""
        triggers = self._wakeup.consume()
        if triggers:
            return triggers
        if self.clock.monotonic() >= reconnect_at:
            return None
        session.idle_begin()
        # RFC 2177: re-issue IDLE before the server's 30-minute limit.
        deadline = min(
            self.clock.monotonic() + self.daemon_settings.idle_renew_seconds, reconnect_at
        )
        new_mail = False
        while not self._stopping() and not triggers and not new_mail:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            update = session.idle_wait(remaining, self._wakeup)
            if update.woken:
                triggers = self._wakeup.consume()
            new_mail = update.new_mail
            self.report.queue_depth(session.exists)
        # DONE also on shutdown, so LOGOUT is not sent inside IDLE; an error here propagates
        # (a server that does not answer DONE within the timeout is dead).
        if session.idle_end().new_mail or new_mail:
            triggers |= {Trigger.IDLE}
        if not triggers and self.clock.monotonic() >= reconnect_at:
            return None
        if not triggers and not self._stopping() and session.noop().new_mail:
            # Renewal: NOOP proves the connection still answers before IDLE again, and mail
            # that landed between DONE and NOOP is announced only here.
            triggers = frozenset({Trigger.IDLE})
        return triggers

    def _poll(self, session: WorkerSession, reconnect_at: float) -> frozenset[Trigger] | None:
        """For servers without IDLE: wait poll_seconds (or a request), then a poll pass."""
        deadline = min(self.clock.monotonic() + self.daemon_settings.poll_seconds, reconnect_at)
        triggers = self._wakeup.consume()
        while not triggers and not self._stopping():
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                break
            self._wakeup.wait(remaining)
            triggers = self._wakeup.consume()
        if triggers:
            return triggers
        if self.clock.monotonic() >= reconnect_at:
            return None
        return frozenset({Trigger.POLL})

    def _close_session(self, *, polite: bool) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if polite or self._stopping():
            session.logout(LOGOUT_TIMEOUT_SECONDS)  # never wait long for a goodbye
        else:
            session.close()  # the connection failed: nothing to say goodbye to


WorkerFactory = Callable[[MailboxSettings], MailboxWorker]
