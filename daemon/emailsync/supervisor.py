"""The supervisor: one worker per mailbox, signals, reload, scheduled jobs, systemd, shutdown.

The main loop (``run``) ticks every TICK_SECONDS and never waits on a worker: restarting a
worker means asking it to stop ("retiring" it) and starting its replacement on a later tick,
once the old thread has ended. So a mailbox never has two live workers (two filers on one
Queue, two connections where providers cap them), the old worker's last writes (``stopped``)
land before the new one's first, and ``/healthz`` and the watchdog keep being answered while
2,000 workers log out. The lock guards the bookkeeping only: no one joins a thread, logs,
touches a file or calls into a worker under it (any of these hands the GIL to 2,000 busy
threads and can keep the lock, and so /healthz, for seconds).

A mailbox is in at most one of: ``workers`` (running), ``_pending`` (to start once no retiring
worker of it is left), ``_starting`` (being started by the main loop, outside the lock),
``_restarting`` (its worker died: restart after a back-off) and ``_stopped``; ``_retiring``
(asked to stop, not yet ended) may hold it beside any of these but ``workers``.

Mailboxes come from the config file and from the store's registry (registered at run time
through the API or the self-service pages). Registering, changing or forgetting one queues,
restarts or retires just that worker, by the same rules; a reload (SIGHUP) compares the
config file's only.
With a shared (PostgreSQL) store, a ``Cluster`` decides which mailboxes this instance runs:
its lease keeper calls ``run_mailbox`` with a store fenced by the lease (kept in ``_stores``
and reused by restarts and reloads, so no worker of a cluster runs without its fence) and
``drop_mailboxes`` when a lease is handed back or lost, which retires the workers like removed
mailboxes at once; the keeper waits for them to end (on a thread of its own, renewing
meanwhile) before it releases the lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import signal
import threading
import time
from collections.abc import Callable, Container, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from emailsync.agenttoken import AgentTokens, ledger_for
from emailsync.config import (
    WORKER_STOP_SECONDS,
    MailboxSettings,
    ServerSettings,
    Settings,
    load_settings,
)
from emailsync.control import control_token
from emailsync.crm.callback import Answer
from emailsync.errors import (
    ConfigError,
    ControlError,
    KeyUnavailableError,
    StoreError,
)
from emailsync.imap.auth import (
    Authenticator,
    PasswordAuthenticator,
    make_authenticator,
)
from emailsync.keycheck import bind_key_check
from emailsync.linkwatch import LinkChanges
from emailsync.metrics import Metrics
from emailsync.pages import MAX_SESSIONS
from emailsync.registrar import MailboxRegistrar
from emailsync.secret import Secret
from emailsync.signins import MAX_FLOWS, MemorySignInFlows, SignIns
from emailsync.store.base import (
    IssuedToken,
    RegisteredMailbox,
    Registry,
    Store,
)
from emailsync.store.failedindex import failed_index
from emailsync.store.sessions_sql import SqlSessions
from emailsync.store.signins_sql import SqlSignInFlows
from emailsync.store.sqlcore import SqlEngine
from emailsync.store.tokencache_sql import token_caches_for
from emailsync.systemd import Notifier
from emailsync.throttle import LoginThrottle, ThrottledAuthenticator
from emailsync.vault import Vault
from emailsync.web import WebServer
from emailsync.worker import MailboxWorker, WorkerStatus

if TYPE_CHECKING:
    from emailsync.cluster import Cluster

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.5
# While workers are being stopped the loop ticks this often, so a replacement follows its
# predecessor's end closely.
BUSY_TICK_SECONDS = 0.05
# Starting a worker (a thread, a pipe, metric series) takes a millisecond or, while hundreds
# of others log in, much longer: a tick starts them (outside the lock) for at most this long
# and the next tick goes on at once, so the watchdog and /healthz are never kept waiting.
START_BUDGET_SECONDS = 0.1
SHUTDOWN_SECONDS = WORKER_STOP_SECONDS  # SIGTERM must end the process within 10 s
GAUGE_SECONDS = 15.0
TOKEN_CHECK_SECONDS = 300.0
TOKEN_REFRESH_AHEAD_SECONDS = 900.0  # refresh an access token this long before it expires
# HKDF info of the anonymous visitors' CSRF key (its own label: no other use of the vault key).
ANONYMOUS_CSRF_INFO = b"emailsync pages anonymous csrf"
SETUP_LOGOUT_SECONDS = 4.0  # First Time Setup's LOGOUT: the work is done, do not wait long
RECENT_OUTCOMES_NONE: list[dict[str, str | None]] = []
# A worker thread that ended without being asked (a bug, not a mailbox error: those are
# backed off inside the worker) is restarted after 1 s, 2 s, 4 s … 5 min, each jittered down
# by up to half so that many do not come back at once; a worker that ran this long before
# dying starts the count again.
RESTART_START_SECONDS = 1.0
RESTART_MAX_SECONDS = 300.0
RESTART_RESET_SECONDS = 600.0
# Looking for dead worker threads costs ~1 µs a worker; on every tick it was most of what an
# idle daemon of 2,000 mailboxes spent (issue 23). So the look comes at most once per this
# many seconds a worker (every tick for a few workers, every 5 s for 2,000: ~0.05 % of a
# core); restarts back off 1 s or more anyway, and /healthz looks at every thread itself.
DEAD_SCAN_SECONDS_PER_WORKER = 0.0025

AuthenticatorFactory = Callable[[MailboxSettings, Settings], Authenticator]
ClusterFactory = Callable[["Supervisor"], "Cluster"]


class Worker(Protocol):
    """What the supervisor needs of a mailbox worker (``MailboxWorker``; tests use fakes)."""

    mailbox: MailboxSettings
    authenticator: Authenticator
    first_attempt_done: threading.Event

    def start(self) -> None:
        """Start the thread."""

    def stop(self) -> None:
        """Ask the thread to end soon; returns at once."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end."""

    def is_alive(self) -> bool:
        """True until the thread has ended."""

    def snapshot(self) -> WorkerStatus:
        """A copy of the current status."""

    def request_pass(self, trigger: str) -> None:
        """Ask for a sync pass."""

    def release_stuck(self) -> None:
        """Have the next pass release the messages quarantined in Queue."""

    def refresh_gauges(self) -> None:
        """Recompute time-based gauges."""

    def refresh_token(self, ahead_seconds: float) -> None:
        """Refresh an OAuth token that expires soon."""


WorkerFactory = Callable[[MailboxSettings, Settings, Store, Metrics, Authenticator], Worker]


def credential_expiry(settings: Settings) -> datetime | None:
    """When the Office 365 app credential expires: the configured date, else the certificate's."""
    office365 = settings.office365
    if office365 is None:
        return None
    if office365.client_secret_expires is not None:
        return office365.client_secret_expires
    if office365.client_certificate is not None:
        with contextlib.suppress(ConfigError):  # check-config reports an unreadable file
            return office365.read_client_certificate().expires
    return None


def restart_delay(restarts: int, rng: random.Random) -> float:
    """How long to wait before the ``restarts``-th restart in a row of a dead worker.

    Exponential from RESTART_START_SECONDS to RESTART_MAX_SECONDS with "equal jitter"
    (uniform in the upper half of the ceiling), so below the cap no delay is shorter than
    the one before.
    """
    ceiling = min(RESTART_MAX_SECONDS, RESTART_START_SECONDS * 2 ** min(restarts - 1, 30))
    return rng.uniform(ceiling / 2, ceiling)


@dataclasses.dataclass
class _Retiring:
    """A worker asked to stop whose thread has not ended yet."""

    worker: Worker
    since: float  # monotonic
    warned: bool = False


@dataclasses.dataclass
class _Restart:
    """A mailbox whose worker died, waiting for its restart back-off."""

    mailbox: MailboxSettings
    due: float  # monotonic
    status: WorkerStatus


def state_of(store: object) -> object:
    """The state database behind a timeline: itself, or the one a CRM's store keeps its in."""
    state = getattr(store, "state", None)  # an HttpStore
    opened = state() if callable(state) else None
    return opened if opened is not None else store


class Supervisor:
    """Owns the workers, the HTTP listener and the scheduler; runs in the main thread."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        registry: CollectorRegistry | None = None,
        authenticator_factory: AuthenticatorFactory = make_authenticator,
        notifier: Notifier | None = None,
        worker_factory: WorkerFactory = MailboxWorker,
        cluster_factory: ClusterFactory | None = None,
        state: object | None = None,
    ) -> None:
        self.settings = settings
        # The timeline (groups, events: the state database's tables, or the CRM) and the state
        # database (emailsync's own data); the same object unless a [crm] is the timeline.
        self.store = store
        self.state: object = state if state is not None else state_of(store)
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry, settings.daemon.metrics_detail)
        store.register_metrics(self.registry)
        self.authenticator_factory = authenticator_factory
        self.notifier = notifier or Notifier()
        self.worker_factory = worker_factory
        self.workers: dict[str, Worker] = {}
        self._started_at: dict[str, float] = {}  # monotonic, per running worker
        self._pending: dict[str, MailboxSettings] = {}
        self._starting: dict[str, MailboxSettings] = {}
        self._retiring: dict[str, _Retiring] = {}
        self._restarting: dict[str, _Restart] = {}
        self._restarts: dict[str, int] = {}  # dead-worker restarts in a row, per mailbox
        self._sync_on_start: set[str] = set()  # Start Sync asked while no worker ran
        self._release_on_start: set[str] = set()  # ... with include_stuck
        self._stopped: dict[str, WorkerStatus] = {}
        self._stores: dict[str, Store] = {}  # in a cluster: each owned mailbox's fenced store
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._rng = random.Random()  # noqa: S311 -- jitter, not cryptography
        self._stop_requested = False
        self._reload_requested = False
        self._sync_all_requested = False
        self._reload_started: float | None = None  # monotonic; READY=1 is due when it is done
        self._ready_sent = False
        self._last_tick = time.monotonic()
        self._last_watchdog = 0.0
        self._next_dead_scan = 0.0  # monotonic; see _restart_dead_workers
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.web: WebServer | None = None
        self.mailbox_registry: Registry | None = (
            self.state if isinstance(self.state, Registry) else None
        )
        self.vault = Vault(settings.daemon.state_dir)
        bind_key_check(self.state, self.vault)  # exit 78 if another instance's key set it up
        # Delegated Office 365 token caches: the shared state's rows in a cluster (the instance
        # that finished a sign-in is seldom the one running the mailbox), else state_dir files.
        self.token_caches = token_caches_for(self.state, self.vault, settings.daemon.state_dir)
        if authenticator_factory is make_authenticator:
            self.authenticator_factory = functools.partial(
                make_authenticator, token_caches=self.token_caches
            )
        # The pages' logins: rows of the state database, so every instance and the next start
        # honour them (None: in memory, when there is no SQL state).
        self.page_sessions: SqlSessions | None = (
            SqlSessions(self.state, self.vault, max_sessions=MAX_SESSIONS)
            if isinstance(self.state, SqlEngine)
            else None
        )
        self._tokens: AgentTokens | None = None  # see _agent_tokens
        self._tokens_lock = threading.Lock()
        self._close_ledger: Callable[[], None] = lambda: None
        # Refused logins per mailbox (set-ups and workers together) and per set-up client.
        self.throttle = LoginThrottle()
        # Branches and mailboxes registered at run time, Stop Email Sync (registrar.py).
        self.registrar = MailboxRegistrar(
            self,
            self.mailbox_registry,
            self.vault,
            self.throttle,
            self.authenticator_factory,
        )
        # Office 365 browser sign-ins (signins.py): the pending flows in the state database, so
        # that the provider's redirect may come back to any instance.
        self.signins = SignIns(
            lambda: self.settings,
            lambda mailbox: self.authenticator_factory(mailbox, self.settings),
            self._branch_server,
            self._register_office365,
            SqlSignInFlows(self.state, self.vault, max_flows=MAX_FLOWS)
            if isinstance(self.state, SqlEngine)
            else MemorySignInFlows(),
            mailbox_lock=self.registrar.locked,
        )
        expiry = credential_expiry(settings)
        if expiry is not None:
            self.metrics.client_secret_expiry.set(expiry.timestamp())
        # With a shared store, leases decide which mailboxes this instance runs (cluster.py).
        self.cluster = cluster_factory(self) if cluster_factory is not None else None
        # Failed mail comes back by itself when its group appears (issue 22, linkwatch.py).
        index = failed_index(self.state)
        self.links = (
            LinkChanges(
                settings,
                store,
                index,
                self._refile_local,
                lambda: list(self.workers),
                shared=self.cluster is not None,
            )
            if index is not None
            else None
        )

    # -- Control (for the HTTP listener) ----------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        """Every configured mailbox's status: running, about to (re)start, or stopped."""
        with self._lock:
            workers = list(self.workers.values())
            starting = [
                WorkerStatus(a, "connecting", m.trigger)
                for a, m in [*self._pending.items(), *self._starting.items()]
            ]
            restarting = [r.status for r in self._restarting.values()]
            stopped = list(self._stopped.values())
        running = [w.snapshot() for w in workers]
        listed = sorted([*running, *starting, *restarting, *stopped], key=lambda s: s.address)
        if self.cluster is not None:
            listed = self._with_owners(listed, self.cluster)
        return listed

    def _with_owners(self, listed: list[WorkerStatus], cluster: Cluster) -> list[WorkerStatus]:
        """Name each mailbox's owner; list the ones other instances run as ``remote``."""
        try:
            owners = cluster.owners()
        except StoreError:
            owners = {}
        local = {s.address for s in listed}
        # Copies: the restarting and stopped statuses are the supervisor's own objects.
        named = [dataclasses.replace(s, owner=cluster.instance_id) for s in listed]
        stopped = self.registrar.stopped()
        shared = [*(m for m in self.settings.mailboxes if m.enabled), *self.registrar.runnable()]
        named += [
            WorkerStatus(m.address, "stopped", m.trigger)
            if m.address in stopped
            else WorkerStatus(m.address, "remote", m.trigger, owner=owners.get(m.address))
            for m in shared
            if m.address not in local
        ]
        return sorted(named, key=lambda s: s.address)

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for one mailbox (False if unknown or stopped) or all.

        ``include_stuck``: the pass first releases the messages quarantined in Queue.
        In a cluster, a mailbox another instance runs gets it through the database.
        """
        done = self.start_sync_local(address, include_stuck=include_stuck)
        if self.cluster is None or (done and address is not None):
            return done
        if address is not None and not any(
            m.address == address.lower() and m.enabled for m in self.settings.mailboxes
        ):
            return False
        try:
            self.cluster.publish_sync(
                None if address is None else address.lower(), include_stuck=include_stuck
            )
        except StoreError as exc:
            log.warning("start_sync_not_published", mailbox=address, error=str(exc))
            return done
        return True

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for a mailbox whose worker runs in this process (or all of them).

        A mailbox whose worker is being (re)started gets it as soon as the worker runs.
        """
        with self._lock:
            waiting = {*self._pending, *self._starting, *self._restarting}
            if address is None:
                workers = list(self.workers.values())
                self._sync_on_start |= waiting
                if include_stuck:
                    self._release_on_start |= waiting
        if address is None:
            for each in workers:
                if include_stuck:
                    each.release_stuck()
                each.request_pass("start_sync")
            return True
        with self._lock:
            address = address.lower()
            worker = self.workers.get(address)
            if worker is None:
                if address not in waiting:
                    return False
                self._sync_on_start.add(address)
                if include_stuck:
                    self._release_on_start.add(address)
                return True
        if include_stuck:
            worker.release_stuck()
        worker.request_pass("start_sync")
        return True

    def stop_mailbox(self, address: str) -> bool:
        """Stop Email Sync: stop the worker, forget its tokens, mark it stopped.

        A registered mailbox is forgotten with its credentials (``forget_mailbox``).
        """
        address = address.lower()
        if self.registrar.is_registered(address):
            return self.forget_mailbox(address)
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None:
            return False
        # A row of the state database: it holds on every instance (the lease's owner ends its
        # worker on the notification) and across restarts.
        self.registrar.record_stop(address)
        self._stop_local(mailbox, forget_tokens=True)
        return True

    def _stop_local(self, mailbox: MailboxSettings, *, forget_tokens: bool) -> None:
        """End a stopped config file's mailbox's worker here (waiting for its LOGOUT when
        ``forget_tokens``: a person asked) and show it stopped."""
        address = mailbox.address
        with self._lock:
            worker = self._retire(address)
            retiring = self._retiring.get(address)
        if worker is not None:
            worker.stop()
        if forget_tokens:
            if worker is not None:
                worker.authenticator.forget()
            else:
                self.authenticator_factory(mailbox, self.settings).forget()
        if retiring is not None and forget_tokens:
            # The caller (the CLI) waits for the LOGOUT; the main loop does not.
            retiring.worker.join(max(0.0, retiring.since + SHUTDOWN_SECONDS - time.monotonic()))
        self._mark_stopped(mailbox)
        if forget_tokens:
            log.info("mailbox_stopped", mailbox=address)

    def start_mailbox(self, address: str) -> bool:
        """Start a stopped mailbox again (``emailsync setup`` calls this)."""
        address = address.lower()
        registered = self.registrar.registered_mailboxes().get(address)
        if registered is not None:
            return self.registrar.start_registered(registered)
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None or not mailbox.enabled:
            return False
        self.registrar.clear_stop(address)
        self.resume_configured(mailbox)
        return True

    def resume_configured(self, mailbox: MailboxSettings) -> None:
        """Start a config file's mailbox that was stopped (in a cluster: under its lease)."""
        address = mailbox.address
        if self.cluster is not None:
            # Only under its lease; another instance may be the owner (then it runs there).
            with self._lock:
                local = address in self.workers or address in self._starting
                local = local or address in self._pending
            if not local:
                with self._lock:
                    self._stopped.pop(address, None)
                self.cluster.resume(address)
            return
        with self._lock:
            self._restarting.pop(address, None)  # an operator's start does not wait
            if address not in self.workers and address not in self._starting:
                self._stopped.pop(address, None)
                self._pending[address] = mailbox
        self._wake.set()

    def stop_configured(self, mailbox: MailboxSettings) -> None:
        """Stop Email Sync of a config file's mailbox recorded by another instance."""
        self._stop_local(mailbox, forget_tokens=False)

    def check_agent_token(self, token: str) -> str | None:
        """The mailbox an agent token is for, or None (invalid, expired, unknown, revoked).

        Raises KeyUnavailableError when the registry key or the state database cannot be
        read: that is this server's fault, and must not pass for a bad token.
        """
        try:
            granted = self._agent_tokens().check(token)
        except ConfigError as exc:
            log.error("agent_token_unchecked", problems=exc.problems)  # noqa: TRY400 -- no traceback needed
            raise KeyUnavailableError("; ".join(exc.problems)) from None
        except StoreError as exc:
            log.error("agent_token_unchecked", problems=[str(exc)])  # noqa: TRY400 -- no traceback needed
            raise KeyUnavailableError(str(exc)) from None
        return granted.address if granted is not None else None

    def issue_agent_token(
        self, address: str, days: int | None, issued_by: str
    ) -> tuple[str, IssuedToken]:
        """A token for one mailbox's set-up, Start Sync, Stop and status, and its record.

        ``days`` None: ``[daemon] agent_token_days`` (read at each issue: a reload applies).
        """
        if days is None:
            days = self.settings.daemon.agent_token_days
        token, issued = self._agent_tokens().issue(address, days, issued_by)
        expires = issued.expires_at and issued.expires_at.isoformat()
        log.info(
            "agent_token_issued",
            mailbox=address,
            token_id=issued.id,
            issued_by=issued_by,
            expires=expires,
        )
        return token, issued

    def agent_tokens_issued(self) -> list[IssuedToken]:
        """Every agent token issued (the state database's list), newest first."""
        return self._agent_tokens().issued()

    def revoke_agent_tokens(self, which: str) -> list[IssuedToken]:
        """Revoke a token by id, or every token of a mailbox by address; the tokens concerned.

        ``ValueError`` when ``which`` is neither.
        """
        return self._agent_tokens().revoke(which)

    def _agent_tokens(self) -> AgentTokens:
        """The tokens, opened on first use (a store without a tokens table, the CRM's, gets
        the SQLite file of state_dir, which is then opened only when tokens are used)."""
        with self._tokens_lock:  # not self._lock: this may open a file
            if self._tokens is None:
                ledger, self._close_ledger = ledger_for(self.state, self.settings.daemon.state_dir)
                self._tokens = AgentTokens(
                    self.vault, ledger, default_days=self.settings.daemon.agent_token_days
                )
            return self._tokens

    def healthy(self) -> bool:
        """The main loop ticked recently and every running worker thread is alive."""
        with self._lock:
            alive = all(w.is_alive() for w in self.workers.values())
        if self.cluster is not None and not self.cluster.healthy():
            return False
        return alive and time.monotonic() - self._last_tick < 10 * TICK_SECONDS + 5

    def ready(self) -> bool:
        """Every mailbox has been started and had its first connect attempt."""
        with self._lock:
            if self._pending or self._starting:
                return False
            started = all(w.first_attempt_done.is_set() for w in self.workers.values())
        return started and (self.cluster is None or self.cluster.ready())

    # -- Cluster (the lease keeper starts and stops workers) ----------------------------------

    def run_mailbox(self, address: str, store: Store) -> bool:
        """Queue the mailbox's worker with its own (fenced) store; False if not configured.

        A worker of it that still runs is retired first: the new one starts on a later tick,
        once that one has ended.
        """
        configured = next((m for m in self.settings.mailboxes if m.address == address), None)
        mailbox = configured or self.registrar.registered.get(address)
        if mailbox is None or not mailbox.enabled:
            return False
        # Stop Email Sync holds on every instance (a row): a lease claimed just before it
        # shows the mailbox stopped, and the keeper hands the lease back.
        stopped = self.registrar.is_stopped(address) if configured else False
        with self._lock:
            worker = self._retire(address)
            self._stores[address] = store
            self._start_or_mark(mailbox, marked_stopped=stopped)
        if worker is not None:
            worker.stop()
        self._wake.set()
        return True

    def drop_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        """Retire these workers like removed mailboxes; returns at once.

        The answer waits up to its argument (seconds) for them to end and says whether they
        did: the lease keeper releases a lease only after that, since the next owner's worker
        must not connect while ours still does, and meanwhile it keeps renewing its leases.
        """
        with self._lock:
            workers = [self._retire(address) for address in addresses]
            retiring = [r.worker for a in addresses if (r := self._retiring.get(a)) is not None]
            for address in addresses:
                self._stores.pop(address, None)
                self._stopped.pop(address, None)
                self._restarts.pop(address, None)
                self._sync_on_start.discard(address)
                self._release_on_start.discard(address)
                self._forget_if_gone(address)
        for worker in workers:
            if worker is not None:
                worker.stop()
        self._wake.set()  # the main loop reaps them and forgets their metric series

        def wait(timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            for worker in retiring:
                worker.join(max(0.0, deadline - time.monotonic()))
            self._wake.set()
            return not any(worker.is_alive() for worker in retiring)

        return wait

    # -- lifetime -------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, then shut down. Returns the exit code."""
        self._install_signals()
        token = control_token(self.settings, create=True)
        daemon = self.settings.daemon
        try:
            self.web = WebServer(
                daemon.listen_host,
                daemon.listen_port,
                self,
                self.registry,
                token,
                registrar=self,
                check_agent_token=self.check_agent_token,
                issue_agent_token=self.issue_agent_token,
                list_agent_tokens=self.agent_tokens_issued,
                revoke_agent_tokens=self.revoke_agent_tokens,
                public_url=daemon.public_url,
                sessions=self.page_sessions,
                anonymous_key=self.anonymous_key,
            )
        except OSError as exc:
            where = f"{daemon.listen_host}:{daemon.listen_port}"
            raise ControlError(
                f"cannot listen on {where} (daemon.listen): {exc.strerror}"
            ) from None
        self.web.start()
        log.info("listening", address=f"{daemon.listen_host}:{self.web.port}")
        if self.cluster is not None:
            # The lease keeper decides which mailboxes run here, registered ones included.
            self.registrar.load()
            self.cluster.start()
        else:
            self.registrar.load()  # queues the registered mailboxes that can log in
            marked = self.registrar.stopped()
            with self._lock:
                for mailbox in self.settings.mailboxes:
                    self._start_or_mark(mailbox, mailbox.address in marked)
        if self.links is not None:
            self.links.start()
        self._schedule_jobs()
        self.scheduler.start()
        try:
            while not self._stop_requested:
                self._wake.clear()
                try:
                    self._tick()
                except Exception as exc:  # the top of the supervisor loop: log and go on
                    log.exception("supervisor_error", error=repr(exc))
                self._wake.wait(self._tick_wait())
        finally:
            self.shutdown()
        return 0

    def _tick(self) -> None:
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        if self._sync_all_requested:
            self._sync_all_requested = False
            self.start_sync(None)
        self._reap_retiring()
        self._restart_dead_workers()
        self._start_pending()
        self._finish_reload()
        if not self._ready_sent and self.ready():
            self._ready_sent = True
            self.notifier.ready(self.summary())
            log.info("ready", summary=self.summary())
        # Only a tick that got this far counts: one that fails every time turns /healthz
        # red and stops the watchdog pings, so systemd restarts the daemon.
        now = self._last_tick = time.monotonic()
        interval = self.notifier.watchdog_seconds / 2 if self.notifier.watchdog_seconds else 0
        if interval and now - self._last_watchdog >= interval and self.healthy():
            self._last_watchdog = now
            self.notifier.watchdog()
            self.notifier.status(self.summary())

    def _tick_wait(self) -> float:
        """How long the loop sleeps: short while workers come and go, else until the next tick."""
        if self._pending or self._retiring:
            with self._lock:
                startable = any(a not in self._retiring for a in self._pending)
            return 0.0 if startable else BUSY_TICK_SECONDS
        with self._lock:
            due = min((r.due for r in self._restarting.values()), default=float("inf"))
        return max(0.0, min(TICK_SECONDS, due - time.monotonic()))

    def summary(self) -> str:
        """The one-line STATUS=: how many mailboxes are in which state, and the queue."""
        counts: dict[str, int] = {}
        queued = 0
        for status in self.statuses():
            counts[status.state] = counts.get(status.state, 0) + 1
            queued += status.queue
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no mailboxes"
        return f"{states}; {queued} queued"

    def shutdown(self) -> None:
        """Stop workers (batch in flight finished, LOGOUT), the scheduler and the listener.

        Every worker is asked first and then all are waited for together, within one
        SHUTDOWN_SECONDS for all of them.
        """
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        self.notifier.stopping()
        log.info("stopping")
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        if self.links is not None:
            self.links.stop()
        if self.cluster is not None:
            self.cluster.stop()  # its workers first, then the leases go back at once
        with self._lock:
            running = [self._retire(address) for address in list(self.workers)]
            self._pending.clear()
            self._restarting.clear()
            retiring = [r.worker for r in self._retiring.values()]
        for worker in running:
            if worker is not None:
                worker.stop()
        for worker in retiring:
            worker.join(max(0.0, deadline - time.monotonic()))
        left = sum(1 for worker in retiring if worker.is_alive())
        if left:
            log.warning("workers_still_stopping", count=left, waited=SHUTDOWN_SECONDS)
        if self.web is not None:
            self.web.stop()
        self._close_ledger()
        self.token_caches.close()
        log.info("stopped")

    def request_stop(self) -> None:
        """Ask the main loop to shut down (what SIGTERM does)."""
        self._stop_requested = True
        self._wake.set()

    def request_reload(self) -> None:
        """Ask the main loop to re-read the config (what SIGHUP does)."""
        self._reload_requested = True
        self._wake.set()

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config: start new mailboxes, stop removed ones, restart changed ones.

        Returns at once: changed and removed workers are asked to stop, and the main loop
        starts each replacement once its predecessor has ended (READY=1 follows then).
        """
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.path)
        except ConfigError as exc:
            log.error("reload_failed", problems=exc.problems)  # noqa: TRY400 -- no traceback needed
            self.notifier.ready(self.summary())
            return
        old = self.settings
        everything_changed = (
            new.daemon != old.daemon or new.folders != old.folders or new.office365 != old.office365
        )
        if new.crm != old.crm:
            # The store (the CRM connector) is opened once at start, with its secret.
            log.warning("crm_change_needs_restart", action="systemctl restart emailsync")
        if new.daemon.metrics_detail != old.daemon.metrics_detail:
            # The metrics' families are registered once at start, at one detail.
            log.warning("metrics_detail_change_needs_restart", action="systemctl restart emailsync")
        if new.cluster != old.cluster:
            # The lease keeper is made once at start, with its instance id and lease length.
            log.warning("cluster_change_needs_restart", action="systemctl restart emailsync")
        if self.cluster is not None:
            self._reload_cluster(old, new, everything_changed=everything_changed)
            return
        self._apply_mailbox_changes(old, new, everything_changed=everything_changed, cluster=False)

    def _reload_cluster(self, old: Settings, new: Settings, *, everything_changed: bool) -> None:
        """Restart this instance's changed mailboxes under their leases; the keeper does the rest.

        A changed mailbox restarts with the new settings and the same fenced store once its
        worker has ended; a removed one is retired here and its lease handed back by the
        keeper's next heartbeat, which also claims added ones.
        """
        self._apply_mailbox_changes(old, new, everything_changed=everything_changed, cluster=True)

    def _apply_mailbox_changes(
        self, old: Settings, new: Settings, *, everything_changed: bool, cluster: bool
    ) -> None:
        """Adopt ``new``: retire removed mailboxes, restart changed ones, queue added ones.

        Restarting retires the worker; the main loop starts the replacement once it has ended.
        With ``everything_changed`` every mailbox counts as changed. In a ``cluster`` only the
        mailboxes running here restart (registered ones too), each only with its lease's fenced
        store, and added ones are left to the lease keeper.
        """
        old_by_address = {m.address: m for m in old.mailboxes}
        new_by_address = {m.address: m for m in new.mailboxes}
        self.settings = new
        marked = self.registrar.stopped()
        retired: list[Worker | None] = []
        events: list[tuple[str, str]] = []
        with self._lock:
            for address, mailbox in old_by_address.items():
                local = any(
                    address in each
                    for each in (self.workers, self._pending, self._starting, self._restarting)
                )
                new_mailbox = new_by_address.get(address)
                if new_mailbox is None:
                    retired.append(self._retire(address))
                    self._stopped.pop(address, None)
                    self._stores.pop(address, None)
                    self._restarts.pop(address, None)
                    self._sync_on_start.discard(address)
                    self._release_on_start.discard(address)
                    self._forget_if_gone(address)
                    events.append(("mailbox_removed", address))
                elif (everything_changed or new_mailbox != mailbox) and (local or not cluster):
                    retired.append(self._retire(address))
                    self._stopped.pop(address, None)  # a no-op for a local mailbox
                    if address in self._stores or not cluster:
                        self._start_or_mark(new_mailbox, address in marked)
                    events.append(("mailbox_restarted", address))
            for address, mailbox in new_by_address.items():
                if address not in old_by_address and not cluster:
                    self._start_or_mark(mailbox, address in marked)
                    events.append(("mailbox_added", address))
            if everything_changed:  # a registered worker keeps its fenced store (_stores)
                for address, mailbox in self.registrar.registered.items():
                    if address in self.workers or address in self._pending:
                        retired.append(self._retire(address))
                        self._pending[address] = mailbox
                        events.append(("mailbox_restarted", address))
            self._reload_started = time.monotonic()
        for worker in retired:
            if worker is not None:
                worker.stop()
        for event, address in events:
            log.info(event, mailbox=address)

    def _finish_reload(self) -> None:
        """READY=1 once every restart of a reload is done (or SHUTDOWN_SECONDS have passed)."""
        if self._reload_started is None:
            return
        took = time.monotonic() - self._reload_started
        with self._lock:
            waiting = len(self._pending) + len(self._retiring)
        if waiting and took < SHUTDOWN_SECONDS:
            return
        self._reload_started = None
        log.info("reloaded", seconds=round(took, 2), still_stopping=waiting)
        self.notifier.ready(self.summary())

    # -- the registry (self-service: registrar.py; these delegate, for the web layer) -----------

    def branches(self) -> list[dict[str, Any]]:
        """Every branch: the config file's (read-only) and the registered ones, by name."""
        return self.registrar.branches()

    def put_branch(
        self, name: str, host: str, port: int, security: str, ca_file: str | None = None
    ) -> bool:
        """Register (or change) a branch's IMAP server; True when new (``MailboxRegistrar``)."""
        return self.registrar.put_branch(name, host, port, security, ca_file)

    def setup_mailbox(
        self,
        address: str,
        branch: str,
        username: str,
        password: str,
        trigger: str = "auto",
        *,
        agent: bool,
        client: str | None,
    ) -> None:
        """First Time Setup (Basic): log in, create the folders, store the password, start."""
        self.registrar.setup_mailbox(
            address, branch, username, password, trigger, agent=agent, client=client
        )

    def forget_mailbox(self, address: str) -> bool:
        """Stop Email Sync for a registered mailbox: its worker ends, it and its secret go."""
        return self.registrar.forget_mailbox(address)

    def mailbox_detail(self, address: str) -> dict[str, Any] | None:
        """Status, source, branch and the latest filed/failed messages of one mailbox."""
        return self.registrar.mailbox_detail(address)

    # -- the worker lifecycle the registrar asks for (registrar.Workers) ----------------------

    def replace_worker(self, mailbox: MailboxSettings) -> bool:
        """(Re)start a registered mailbox's worker with these settings, without a reload.

        In a cluster only under its lease, where it is held (the keeper starts it elsewhere).
        """
        if self.cluster is not None:
            with self._lock:
                self._stopped.pop(mailbox.address, None)  # runs here or on another instance
            return self.cluster.resume(mailbox.address)
        return self._replace_worker_here(mailbox)

    def queue_worker(self, mailbox: MailboxSettings) -> bool:
        """Start a registered mailbox's worker unless one runs or is starting."""
        if self.cluster is not None:
            with self._lock:
                if mailbox.address in self.workers or mailbox.address in self._starting:
                    return True
                self._stopped.pop(mailbox.address, None)
            return self.cluster.resume(mailbox.address)
        with self._lock:
            self._restarting.pop(mailbox.address, None)
            if mailbox.address not in self.workers and mailbox.address not in self._starting:
                self._stopped.pop(mailbox.address, None)
                self._pending[mailbox.address] = mailbox
        self._wake.set()
        return True

    def end_worker(self, address: str, *, forget: bool, wait: bool) -> None:
        """Stop a mailbox's worker; ``forget``: the mailbox is gone (status and metrics go once
        the worker has ended); ``wait``: until its LOGOUT (bounded by SHUTDOWN_SECONDS)."""
        with self._lock:
            worker = self._retire(address)
            retiring = self._retiring.get(address)
            if forget:
                self._stopped.pop(address, None)
                self._restarts.pop(address, None)
                self._sync_on_start.discard(address)
                self._release_on_start.discard(address)
        if worker is not None:
            worker.stop()
        if wait and retiring is not None:
            # The caller (the API, a page) waits for the LOGOUT; the main loop does not.
            retiring.worker.join(max(0.0, retiring.since + SHUTDOWN_SECONDS - time.monotonic()))
        if forget:
            with self._lock:
                self._forget_if_gone(address)  # else the reaper does once the worker has ended
        self._wake.set()

    def mark_stopped(self, mailbox: MailboxSettings) -> None:
        """Show a mailbox stopped (no worker)."""
        self._mark_stopped(mailbox)

    def status_of(self, address: str) -> WorkerStatus | None:
        """The mailbox's status as ``statuses`` lists it, or None."""
        return next((s for s in self.statuses() if s.address == address), None)

    def recent_outcomes(self, address: str) -> list[dict[str, str | None]]:
        """The latest filed and failed messages of the mailbox's worker, if it runs here."""
        with self._lock:
            worker = self.workers.get(address)
        recent: list[dict[str, str | None]] = getattr(
            worker, "recent_outcomes", lambda: RECENT_OUTCOMES_NONE
        )()
        return recent

    def wanted_mailboxes(self) -> list[str]:
        """The mailboxes a cluster shares (the lease keeper's heartbeat reads them afresh)."""
        return self.registrar.wanted()

    def registry_notified(self, address: str | None) -> None:
        """A registry row changed on some instance (None: the listener reconnected)."""
        if address is None:
            self.registrar.refresh_all()
        else:
            self.registrar.refresh(address)

    def anonymous_key(self) -> bytes:
        """The key of the login form's CSRF token: every instance with this registry key derives
        the same, so a form one served is accepted by another."""
        return self.vault.derived_key(ANONYMOUS_CSRF_INFO)

    # -- Office 365 browser sign-ins (signins.py; these delegate, for the web layer) ------------

    def office365_available(self) -> bool:
        """True when browser sign-in can be offered: ``[office365]`` in delegated mode."""
        return self.signins.available()

    def office365_start(
        self, address: str, branch: str | None, redirect_uri: str, trigger: str = "auto"
    ) -> str:
        """First Time Setup (Office 365): the provider's sign-in page (``SignIns.start``)."""
        return self.signins.start(address, branch, redirect_uri, trigger)

    def office365_finish(self, params: dict[str, str]) -> str:
        """The provider's callback, on any instance (``SignIns.finish``): the mailbox address."""
        return self.signins.finish(params)

    def _register_office365(self, mailbox: MailboxSettings) -> None:
        """A finished sign-in: the mailbox into the registry (its tokens are cached), started."""
        record = RegisteredMailbox(
            mailbox.address,
            mailbox.branch or "",
            "office365",
            mailbox.address,
            False,
            False,
            mailbox.trigger,
        )
        self._registry().put_mailbox(record, None)
        self._replace_worker(mailbox)

    def _registry(self) -> Registry:
        return self.registrar.require_registry()

    def _branch_server(self, name: str) -> ServerSettings:
        return self.registrar.branch_server(name)

    def _replace_worker(self, mailbox: MailboxSettings) -> bool:
        """After a registry row of ``mailbox`` was written here: act on it (registrar)."""
        self.registrar.refresh(mailbox.address)
        return True

    def _replace_worker_here(self, mailbox: MailboxSettings) -> bool:
        """(Re)start a registered mailbox's worker in this process, without a reload.

        The old worker (if any) is retired and the new one queued: the main loop starts it
        once the old thread has ended.
        """
        address = mailbox.address
        with self._lock:
            old = self._retire(address)
            self._stopped.pop(address, None)
            self._pending[address] = mailbox
        if old is not None:
            old.stop()
        self._wake.set()
        return True

    def _authenticator(self, mailbox: MailboxSettings) -> Authenticator:
        registry = self.mailbox_registry
        if (
            registry is not None
            and mailbox.auth == "password"
            and mailbox.address in self.registrar.registered
            and mailbox.password is None
        ):
            address = mailbox.address

            def read() -> Secret:
                blob = registry.mailbox_secret(address)
                if blob is None:
                    raise ConfigError([f"{address}: no stored password (Stop Email Sync)"])
                return self.vault.decrypt(blob, address)

            # Its refused logins and its set-ups' share one budget (the account's lockout).
            inner = PasswordAuthenticator(mailbox, password=read)
            return ThrottledAuthenticator(inner, self.throttle, address)
        return self.authenticator_factory(mailbox, self.settings)

    # -- internals (the callers hold the lock where it says so) --------------------------------

    def _start_or_mark(self, mailbox: MailboxSettings, marked_stopped: bool) -> None:
        """Queue a mailbox's worker to start, or mark it stopped; under the lock."""
        if not mailbox.enabled or marked_stopped:
            self._mark_stopped(mailbox)
        else:
            self._stopped.pop(mailbox.address, None)
            self._pending[mailbox.address] = mailbox

    def _retire(self, address: str) -> Worker | None:
        """Move a mailbox's worker to ``_retiring`` and drop anything queued; under the lock.

        Returns the worker, which the caller must ``stop()`` once it has released the lock.
        Nothing of this mailbox starts until that worker has ended.
        """
        self._pending.pop(address, None)
        self._starting.pop(address, None)  # the main loop retires it once it has started
        self._restarting.pop(address, None)
        self._started_at.pop(address, None)
        worker = self.workers.pop(address, None)
        if worker is not None:
            self._retiring[address] = _Retiring(worker, time.monotonic())
        return worker

    def _reap_retiring(self) -> None:
        """Forget retired workers whose thread has ended; warn once about slow ones."""
        now = time.monotonic()
        slow: list[tuple[str, float]] = []
        with self._lock:
            for address, retiring in list(self._retiring.items()):
                if retiring.worker.is_alive():
                    if not retiring.warned and now - retiring.since > SHUTDOWN_SECONDS:
                        retiring.warned = True
                        slow.append((address, now - retiring.since))
                    continue
                del self._retiring[address]
                self._forget_if_gone(address)
        for address, seconds in slow:
            log.warning("worker_slow_to_stop", mailbox=address, seconds=round(seconds, 1))

    def _forget_if_gone(self, address: str) -> None:
        """Remove a mailbox's metric series once it is out of the config and its worker ended."""
        known: list[Container[str]] = [self.workers, self._pending, self._starting]
        known += [self._restarting, self._stopped, self._retiring]
        if not any(address in each for each in known):
            self.metrics.forget_mailbox(address)

    def _start_pending(self) -> None:
        """Start queued workers whose predecessor has ended, for up to START_BUDGET_SECONDS.

        Each is claimed under the lock and made and started outside it; a Stop Email Sync or
        reload that comes in meanwhile takes the claim back, and the new worker is retired.
        """
        with self._lock:
            startable = [a for a in self._pending if a not in self._retiring]
        deadline = time.monotonic() + START_BUDGET_SECONDS
        for address in startable:
            if time.monotonic() > deadline:
                return  # the rest on the next tick, which follows at once
            with self._lock:
                mailbox = None if address in self._retiring else self._pending.pop(address, None)
                if mailbox is None:
                    continue
                self._starting[address] = mailbox
                store = self._stores.get(address, self.store)
            worker = self._make_worker(mailbox, store)
            restart: tuple[int, float] | None = None
            with self._lock:
                claimed = self._starting.pop(address, None) is not None
                if worker is None:
                    if claimed:
                        status = WorkerStatus(address, "backoff", mailbox.trigger)
                        restart = self._schedule_restart(mailbox, status)
                elif claimed:
                    self.workers[address] = worker
                    self._started_at[address] = time.monotonic()
                    if address in self._release_on_start:
                        self._release_on_start.discard(address)
                        worker.release_stuck()
                    if address in self._sync_on_start:
                        self._sync_on_start.discard(address)
                        worker.request_pass("start_sync")
                else:
                    self._retiring[address] = _Retiring(worker, time.monotonic())
            if worker is not None and not claimed:
                worker.stop()  # stopped or removed while it was being made
            if restart is not None:
                _log_restart(address, *restart)

    def _make_worker(self, mailbox: MailboxSettings, store: Store) -> Worker | None:
        """Make and start a mailbox's worker (no other of it is alive); None if that failed."""
        try:
            worker = self.worker_factory(
                mailbox,
                self.settings,
                store,
                self.metrics,
                self._authenticator(mailbox),
            )
            worker.start()
        except Exception as exc:  # one mailbox's broken start must not stop the others
            log.exception("worker_start_failed", mailbox=mailbox.address, error=repr(exc))
            return None
        return worker

    def _mark_stopped(self, mailbox: MailboxSettings) -> None:
        self.metrics.init_mailbox(mailbox.address)
        self.metrics.set_state(mailbox.address, "stopped")
        with self._lock:
            self._pending.pop(mailbox.address, None)
            self._restarting.pop(mailbox.address, None)
            self._sync_on_start.discard(mailbox.address)
            self._release_on_start.discard(mailbox.address)
            self._stopped[mailbox.address] = WorkerStatus(
                mailbox.address, "stopped", mailbox.trigger
            )

    def _restart_dead_workers(self) -> None:
        """Workers that ended unasked are restarted after a growing back-off, not at once."""
        now = time.monotonic()
        died: list[tuple[Worker, int, float]] = []
        scan = now >= self._next_dead_scan
        if scan:
            self._next_dead_scan = now + DEAD_SCAN_SECONDS_PER_WORKER * len(self.workers)
        with self._lock:
            for address, worker in list(self.workers.items()) if scan else []:
                if worker.is_alive():
                    continue
                del self.workers[address]
                if now - self._started_at.pop(address, now) >= RESTART_RESET_SECONDS:
                    self._restarts.pop(address, None)
                # Its status as it ended; the thread is gone, so its lock is free.
                died.append((worker, *self._schedule_restart(worker.mailbox, worker.snapshot())))
            for address, restart in list(self._restarting.items()):
                if restart.due <= now:
                    del self._restarting[address]
                    self._pending[address] = restart.mailbox
        for worker, restarts, delay in died:
            _log_restart(worker.mailbox.address, restarts, delay)

    def _schedule_restart(self, mailbox: MailboxSettings, last: WorkerStatus) -> tuple[int, float]:
        """Restart a mailbox's worker after its back-off; under the lock.

        Returns (restarts in a row, delay) for the caller to log once it released the lock.
        """
        address = mailbox.address
        restarts = self._restarts[address] = self._restarts.get(address, 0) + 1
        delay = restart_delay(restarts, self._rng)
        next_attempt = datetime.fromtimestamp(time.time() + delay, UTC)
        status = dataclasses.replace(
            last,
            state="backoff",
            last_error="worker ended unexpectedly; see the log",
            next_attempt=next_attempt.isoformat(timespec="seconds"),
        )
        self._restarting[address] = _Restart(mailbox, time.monotonic() + delay, status)
        self.metrics.set_state(address, "backoff")
        return restarts, delay

    def _schedule_jobs(self) -> None:
        daemon = self.settings.daemon
        jobs: tuple[tuple[Callable[[], object], float, str], ...] = (
            (self._sweep, daemon.sweep_seconds, "sweep"),
            (self._refresh_gauges, GAUGE_SECONDS, "gauges"),
            (self._refresh_tokens, TOKEN_CHECK_SECONDS, "tokens"),
        )
        if self.links is not None and daemon.refile_check_seconds > 0:
            jobs += ((self.links.check.tick, self.links.check.tick_seconds, "refile_check"),)
        for job, seconds, name in jobs:
            self.scheduler.add_job(
                job, "interval", seconds=seconds, id=name, max_instances=1, coalesce=True
            )

    # -- Failed mail coming back (issue 22) -------------------------------------------------

    def _refile_local(self, address: str) -> bool:
        """Ask the mailbox's worker, if it runs here, for a re-file pass; False if none runs."""
        with self._lock:
            worker = self.workers.get(address)
        if worker is None:
            return False
        worker.request_pass("refile")
        return True

    def groups_changed_call(self, header: str | None, path: str, body: bytes) -> Answer:
        """A CRM's ``POST /v1/groups:changed`` (emailsync.crm.callback): checked, marked, 202."""
        if self.links is None:
            return HTTPStatus.NOT_FOUND, {"error": "no state database keeps Failed mail"}, {}
        return self.links.call(header, path, body)

    def links_notified(self) -> None:
        """Another instance logged a link change (NOTIFY): look for mail it made due."""
        if self.links is not None:
            self.links.watch.poke()

    def _for_each_worker(self, job: str, call: Callable[[Worker], object]) -> None:
        """Run a scheduler job's step for every running worker; one failing skips no other."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            try:
                call(worker)
            except Exception as exc:  # a scheduler job's loop: log, go on with the next
                log.exception(
                    "scheduler_job_failed", job=job, mailbox=worker.mailbox.address, error=repr(exc)
                )

    def _sweep(self) -> None:
        """Safety sweep: a pass over every Queue, for anything IDLE did not announce."""
        self._for_each_worker("sweep", lambda worker: worker.request_pass("sweep"))

    def _refresh_gauges(self) -> None:
        self._for_each_worker("gauges", lambda worker: worker.refresh_gauges())

    def _refresh_tokens(self) -> None:
        """Refresh OAuth tokens ahead of expiry (and keep refresh tokens alive)."""
        self._for_each_worker(
            "tokens", lambda worker: worker.refresh_token(TOKEN_REFRESH_AHEAD_SECONDS)
        )

    def _install_signals(self) -> None:
        def on_stop(signum: int, _: FrameType | None) -> None:
            self._stop_requested = True
            self._wake.set()

        def on_reload(signum: int, _: FrameType | None) -> None:
            self._reload_requested = True
            self._wake.set()

        def on_sync(signum: int, _: FrameType | None) -> None:
            self._sync_all_requested = True
            self._wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
        signal.signal(signal.SIGUSR1, on_sync)


def _log_restart(address: str, restarts: int, delay: float) -> None:
    log.error("worker_died", mailbox=address, restarts=restarts, restart_in=round(delay, 2))


def _one_line(text: str) -> str:
    return " ".join(text.split())
