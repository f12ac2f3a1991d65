"""The supervisor: one worker per mailbox, signals, reload, scheduled jobs, systemd, shutdown.

The main loop (``run``) ticks every TICK_SECONDS and never waits on a worker. The workers'
lifecycle and its rules (at most one live worker a mailbox, a replacement only once its
predecessor has ended, restarts after a back-off, nothing joined or logged under the lock)
are the ``WorkerPool``'s (workerpool.py); the supervisor decides when to start, restart or
retire which, and runs the pool's steps on each tick.

Mailboxes come from the config file and from the store's registry (registered at run time
through the API or the self-service pages). Registering, changing or forgetting one queues,
restarts or retires just that worker, by the same rules; a reload (SIGHUP) compares the
config file's only.
With a shared (PostgreSQL) store, a ``Cluster`` decides which mailboxes this instance runs:
its lease keeper calls ``run_mailbox`` with a store fenced by the lease (kept in the pool's
``stores`` and reused by restarts and reloads, so no worker of a cluster runs without its
fence) and ``drop_mailboxes`` when a lease is handed back or lost, which retires the workers
like removed mailboxes at once; the keeper waits for them to end (on a thread of its own,
renewing meanwhile) before it releases the lease. That glue stays here, a few lines each: it
is the settings and the registrar (which mailbox, stopped or not) put to the pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from http import HTTPStatus
from types import FrameType
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from emailsync.config import (
    MailboxSettings,
    ServerSettings,
    Settings,
    load_settings,
)
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
from emailsync.runtime.linkwatch import LinkChanges
from emailsync.runtime.registrar import MailboxRegistrar
from emailsync.runtime.signins import MAX_FLOWS, MemorySignInFlows, SignIns
from emailsync.runtime.throttle import LoginThrottle, ThrottledAuthenticator
from emailsync.runtime.worker import MailboxWorker, WorkerStatus
from emailsync.runtime.workerpool import (
    SHUTDOWN_SECONDS,
    Worker,
    WorkerFactory,
    WorkerPool,
)
from emailsync.secret import Secret
from emailsync.state.agenttoken import AgentTokens, ledger_for
from emailsync.state.base import (
    IssuedToken,
    RegisteredMailbox,
    Registry,
    Store,
)
from emailsync.state.failedindex import failed_index
from emailsync.state.keycheck import bind_key_check
from emailsync.state.sessions_sql import SqlSessions
from emailsync.state.signins_sql import SqlSignInFlows
from emailsync.state.sqlcore import SqlEngine
from emailsync.state.tokencache_sql import token_caches_for
from emailsync.state.vault import Vault
from emailsync.telemetry.metrics import Metrics
from emailsync.telemetry.systemd import Notifier
from emailsync.timeline.crm.callback import Answer
from emailsync.web.control import control_token
from emailsync.web.pages import MAX_SESSIONS
from emailsync.web.server import WebServer

if TYPE_CHECKING:
    from emailsync.cluster.membership import Cluster

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.5
GAUGE_SECONDS = 15.0
TOKEN_CHECK_SECONDS = 300.0
TOKEN_REFRESH_AHEAD_SECONDS = 900.0  # refresh an access token this long before it expires
# HKDF info of the anonymous visitors' CSRF key (its own label: no other use of the vault key).
ANONYMOUS_CSRF_INFO = b"emailsync pages anonymous csrf"
SETUP_LOGOUT_SECONDS = 4.0  # First Time Setup's LOGOUT: the work is done, do not wait long
RECENT_OUTCOMES_NONE: list[dict[str, str | None]] = []

AuthenticatorFactory = Callable[[MailboxSettings, Settings], Authenticator]
ClusterFactory = Callable[["Supervisor"], "Cluster"]


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
        self._wake = threading.Event()
        # The workers and their lifecycle (workerpool.py); made with settings read afresh.
        self.pool = WorkerPool(
            worker_factory,
            settings=lambda: self.settings,
            authenticator=self._authenticator,
            metrics=self.metrics,
            store=store,
            wake=self._wake,
        )
        self._stop_requested = False
        self._reload_requested = False
        self._sync_all_requested = False
        self._reload_started: float | None = None  # monotonic; READY=1 is due when it is done
        self._ready_sent = False
        self._last_tick = time.monotonic()
        self._last_watchdog = 0.0
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
                lambda: list(self.pool.workers),
                shared=self.cluster is not None,
            )
            if index is not None
            else None
        )

    # -- Control (for the HTTP listener) ----------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        """Every configured mailbox's status: running, about to (re)start, or stopped."""
        listed = self.pool.statuses()
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
        if address is not None and not self._known_anywhere(address.lower()):
            return False
        try:
            self.cluster.publish_sync(
                None if address is None else address.lower(), include_stuck=include_stuck
            )
        except StoreError as exc:
            log.warning("start_sync_not_published", mailbox=address, error=str(exc))
            return done
        return True

    def _known_anywhere(self, address: str) -> bool:
        """Whether a mailbox may run on some instance: an enabled one of the config file, or
        one set up through self-service (its registry row, read now)."""
        configured = any(m.address == address and m.enabled for m in self.settings.mailboxes)
        return configured or self.registrar.is_registered(address)

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for a mailbox whose worker runs in this process (or all of them).

        A mailbox whose worker is being (re)started gets it as soon as the worker runs.
        """
        return self.pool.start_sync(address, include_stuck=include_stuck)

    def stop_mailbox(self, address: str) -> bool:
        """Stop Email Sync: stop the worker, forget its tokens, mark it stopped.

        A registered mailbox is forgotten with its credentials (``forget_mailbox``).
        """
        address = address.lower()
        if self.registrar.is_registered(address):
            return self.registrar.forget_mailbox(address)
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
        retired = self.pool.retire(address)
        if forget_tokens:
            if retired.worker is not None:
                retired.worker.authenticator.forget()
            else:
                self.authenticator_factory(mailbox, self.settings).forget()
            retired.wait()  # the caller (the CLI) waits for the LOGOUT; the main loop does not
        self.pool.mark_stopped(mailbox)
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
            if not self.pool.runs(address, queued=True):
                self.pool.unmark(address)
                self.cluster.resume(address)
            return
        self.pool.queue(mailbox)

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
        with self._tokens_lock:  # not the pool's lock: this may open a file
            if self._tokens is None:
                ledger, self._close_ledger = ledger_for(self.state, self.settings.daemon.state_dir)
                self._tokens = AgentTokens(
                    self.vault, ledger, default_days=self.settings.daemon.agent_token_days
                )
            return self._tokens

    def healthy(self) -> bool:
        """The main loop ticked recently and every running worker thread is alive."""
        alive = self.pool.alive()
        if self.cluster is not None and not self.cluster.healthy():
            return False
        return alive and time.monotonic() - self._last_tick < 10 * TICK_SECONDS + 5

    def ready(self) -> bool:
        """Every mailbox has been started and had its first connect attempt."""
        return self.pool.ready() and (self.cluster is None or self.cluster.ready())

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
        self.pool.run_under(mailbox, store, marked=stopped)
        return True

    def drop_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        """Retire these workers like removed mailboxes; returns at once.

        The answer waits up to its argument (seconds) for them to end and says whether they
        did: the lease keeper releases a lease only after that, since the next owner's worker
        must not connect while ours still does, and meanwhile it keeps renewing its leases.
        """
        return self.pool.drop(addresses)

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
                registrar=self.registrar,
                signins=self.signins,
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
            self.pool.start_all(self.settings.mailboxes, self.registrar.stopped())
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
        self.pool.reap()
        self.pool.restart_dead()
        self.pool.start_pending()
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
        return self.pool.wait_seconds(TICK_SECONDS)

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
        left = self.pool.shutdown(deadline)
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
        self.settings = new
        events = self.pool.apply(
            old.mailboxes,
            new.mailboxes,
            marked=self.registrar.stopped(),
            changed=lambda before, after: everything_changed or after != before,
            cluster=cluster,
            registered=self.registrar.registered,
            restart_registered=everything_changed,
        )
        self._reload_started = time.monotonic()
        for event, address in events:
            log.info(event, mailbox=address)

    def _finish_reload(self) -> None:
        """READY=1 once every restart of a reload is done (or SHUTDOWN_SECONDS have passed)."""
        if self._reload_started is None:
            return
        took = time.monotonic() - self._reload_started
        waiting = self.pool.waiting()
        if waiting and took < SHUTDOWN_SECONDS:
            return
        self._reload_started = None
        log.info("reloaded", seconds=round(took, 2), still_stopping=waiting)
        self.notifier.ready(self.summary())

    # -- the worker lifecycle the registrar asks for (registrar.Workers) ----------------------

    def replace_worker(self, mailbox: MailboxSettings) -> bool:
        """(Re)start a registered mailbox's worker with these settings, without a reload.

        In a cluster only under its lease, where it is held (the keeper starts it elsewhere).
        """
        if self.cluster is not None:
            self.pool.unmark(mailbox.address)  # runs here or on another instance
            return self.cluster.resume(mailbox.address)
        self.pool.replace(mailbox)
        return True

    def queue_worker(self, mailbox: MailboxSettings) -> bool:
        """Start a registered mailbox's worker unless one runs or is starting."""
        if self.cluster is not None:
            if self.pool.runs(mailbox.address):
                return True
            self.pool.unmark(mailbox.address)
            return self.cluster.resume(mailbox.address)
        self.pool.queue(mailbox)
        return True

    def end_worker(self, address: str, *, forget: bool, wait: bool) -> None:
        """Stop a mailbox's worker; ``forget``: the mailbox is gone (status and metrics go once
        the worker has ended); ``wait``: until its LOGOUT (bounded by SHUTDOWN_SECONDS)."""
        self.pool.end(address, forget=forget, wait=wait)

    def mark_stopped(self, mailbox: MailboxSettings) -> None:
        """Show a mailbox stopped (no worker)."""
        self.pool.mark_stopped(mailbox)

    def status_of(self, address: str) -> WorkerStatus | None:
        """The mailbox's status as ``statuses`` lists it, or None."""
        return next((s for s in self.statuses() if s.address == address), None)

    def recent_outcomes(self, address: str) -> list[dict[str, str | None]]:
        """The latest filed and failed messages of the mailbox's worker, if it runs here."""
        worker = self.pool.worker(address)
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
        worker = self.pool.worker(address)
        if worker is None:
            return False
        worker.request_pass("refile")
        return True

    def groups_changed_call(self, header: str | None, path: str, body: bytes) -> Answer:
        """A CRM's ``POST /v1/groups:changed`` (``timeline.crm.callback``): checked, marked, 202."""
        if self.links is None:
            return HTTPStatus.NOT_FOUND, {"error": "no state database keeps Failed mail"}, {}
        return self.links.call(header, path, body)

    def links_notified(self) -> None:
        """Another instance logged a link change (NOTIFY): look for mail it made due."""
        if self.links is not None:
            self.links.watch.poke()

    def _for_each_worker(self, job: str, call: Callable[[Worker], object]) -> None:
        """Run a scheduler job's step for every running worker; one failing skips no other."""
        self.pool.for_each(job, call)

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


def _one_line(text: str) -> str:
    return " ".join(text.split())
