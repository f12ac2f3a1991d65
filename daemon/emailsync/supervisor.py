"""The supervisor: one worker per mailbox, signals, reload, scheduled jobs, systemd, shutdown."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from types import FrameType
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from emailsync.config import MailboxSettings, Settings, load_settings
from emailsync.control import control_token, stopped_marker
from emailsync.errors import ConfigError, ControlError, StoreError
from emailsync.imap.auth import Authenticator, make_authenticator
from emailsync.metrics import Metrics
from emailsync.store.base import Store
from emailsync.systemd import Notifier
from emailsync.web import WebServer
from emailsync.worker import MailboxWorker, WorkerStatus

if TYPE_CHECKING:
    from emailsync.cluster import Cluster

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.5
SHUTDOWN_SECONDS = 8.0  # SIGTERM must end the process within 10 s
GAUGE_SECONDS = 15.0
TOKEN_CHECK_SECONDS = 300.0
TOKEN_REFRESH_AHEAD_SECONDS = 900.0  # refresh an access token this long before it expires

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
        cluster_factory: ClusterFactory | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.authenticator_factory = authenticator_factory
        self.notifier = notifier or Notifier()
        self.workers: dict[str, MailboxWorker] = {}
        self._stopped: dict[str, WorkerStatus] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._sync_all_requested = False
        self._ready_sent = False
        self._last_tick = time.monotonic()
        self._last_watchdog = 0.0
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.web: WebServer | None = None
        expiry = credential_expiry(settings)
        if expiry is not None:
            self.metrics.client_secret_expiry.set(expiry.timestamp())
        # With a shared store, leases decide which mailboxes this instance runs (cluster.py).
        self.cluster = cluster_factory(self) if cluster_factory is not None else None

    # -- Control (for the HTTP listener) ----------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        """Every configured mailbox's status, running or stopped (or run by another instance)."""
        with self._lock:
            running = [w.snapshot() for w in self.workers.values()]
            listed = sorted([*running, *self._stopped.values()], key=lambda s: s.address)
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
        for status in listed:
            status.owner = cluster.instance_id
        for mailbox in self.settings.mailboxes:
            if mailbox.enabled and mailbox.address not in local:
                listed.append(
                    WorkerStatus(
                        mailbox.address,
                        "remote",
                        mailbox.trigger,
                        owner=owners.get(mailbox.address),
                    )
                )
        return sorted(listed, key=lambda s: s.address)

    def start_sync(self, address: str | None) -> bool:
        """Start Sync for one mailbox (False if unknown or stopped) or all.

        In a cluster, a mailbox another instance runs gets it through the database.
        """
        done = self.start_sync_local(address)
        if self.cluster is None or (done and address is not None):
            return done
        if address is not None and not any(
            m.address == address.lower() and m.enabled for m in self.settings.mailboxes
        ):
            return False
        try:
            self.cluster.publish_sync(None if address is None else address.lower())
        except StoreError as exc:
            log.warning("start_sync_not_published", mailbox=address, error=str(exc))
            return done
        return True

    def start_sync_local(self, address: str | None) -> bool:
        """Start Sync for a mailbox whose worker runs in this process (or all of them)."""
        with self._lock:
            if address is None:
                for each in self.workers.values():
                    each.request_pass("start_sync")
                return True
            worker = self.workers.get(address.lower())
        if worker is None:
            return False
        worker.request_pass("start_sync")
        return True

    def stop_mailbox(self, address: str) -> bool:
        """Stop Email Sync: stop the worker, forget its tokens, mark it stopped."""
        address = address.lower()
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None:
            return False
        marker = stopped_marker(self.settings, address)
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()
        with self._lock:
            worker = self.workers.pop(address, None)
        if worker is not None:
            worker.stop()
            worker.authenticator.forget()
            worker.join(SHUTDOWN_SECONDS)
        else:
            self.authenticator_factory(mailbox, self.settings).forget()
        self._mark_stopped(mailbox)
        log.info("mailbox_stopped", mailbox=address)
        return True

    def start_mailbox(self, address: str) -> bool:
        """Start a stopped mailbox again (``emailsync setup`` calls this)."""
        address = address.lower()
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None or not mailbox.enabled:
            return False
        stopped_marker(self.settings, address).unlink(missing_ok=True)
        if self.cluster is not None:
            # Only under its lease; another instance may be the owner (then it runs there).
            with self._lock:
                running = address in self.workers
            if not running:
                self.cluster.resume(address)
            return True
        with self._lock:
            if address not in self.workers:
                self._start_worker(mailbox)
        return True

    def healthy(self) -> bool:
        """The main loop ticked recently and every worker thread is alive."""
        with self._lock:
            alive = all(w.is_alive() for w in self.workers.values())
        if self.cluster is not None and not self.cluster.healthy():
            return False
        return alive and time.monotonic() - self._last_tick < 10 * TICK_SECONDS + 5

    def ready(self) -> bool:
        """Every mailbox has had its first connect attempt."""
        with self._lock:
            started = all(w.first_attempt_done.is_set() for w in self.workers.values())
        return started and (self.cluster is None or self.cluster.ready())

    # -- Cluster (the lease keeper starts and stops workers) ----------------------------------

    def run_mailbox(self, address: str, store: Store) -> bool:
        """Start the mailbox's worker with its own (fenced) store; False if not configured."""
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None or not mailbox.enabled:
            return False
        with self._lock:
            self._stop_worker(address)
            self._start_worker(mailbox, store)
        return True

    def drop_mailboxes(self, addresses: Sequence[str]) -> None:
        """Stop these workers together, wait for them, and forget them here."""
        with self._lock:
            workers = [w for a in addresses if (w := self.workers.pop(a, None)) is not None]
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            self.metrics.forget_mailbox(worker.mailbox.address)

    # -- lifetime -------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, then shut down. Returns the exit code."""
        self._install_signals()
        token = control_token(self.settings, create=True)
        daemon = self.settings.daemon
        try:
            self.web = WebServer(daemon.listen_host, daemon.listen_port, self, self.registry, token)
        except OSError as exc:
            where = f"{daemon.listen_host}:{daemon.listen_port}"
            raise ControlError(
                f"cannot listen on {where} (daemon.listen): {exc.strerror}"
            ) from None
        self.web.start()
        log.info("listening", address=f"{daemon.listen_host}:{self.web.port}")
        if self.cluster is not None:
            self.cluster.start()
        else:
            with self._lock:
                for mailbox in self.settings.mailboxes:
                    self._start_or_mark(mailbox)
        self._schedule_jobs()
        self.scheduler.start()
        try:
            while not self._stop_requested:
                self._tick()
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
        finally:
            self.shutdown()
        return 0

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        if self._sync_all_requested:
            self._sync_all_requested = False
            self.start_sync(None)
        self._restart_dead_workers()
        if not self._ready_sent and self.ready():
            self._ready_sent = True
            self.notifier.ready(self.summary())
            log.info("ready", summary=self.summary())
        now = time.monotonic()
        interval = self.notifier.watchdog_seconds / 2 if self.notifier.watchdog_seconds else 0
        if interval and now - self._last_watchdog >= interval and self.healthy():
            self._last_watchdog = now
            self.notifier.watchdog()
            self.notifier.status(self.summary())

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
        """Stop workers (batch in flight finished, LOGOUT), the scheduler and the listener."""
        self.notifier.stopping()
        log.info("stopping")
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        if self.cluster is not None:
            self.cluster.stop()  # its workers first, then the leases go back at once
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self.web is not None:
            self.web.stop()
        log.info("stopped")

    def request_stop(self) -> None:
        """Ask the main loop to shut down (what SIGTERM does)."""
        self._stop_requested = True
        self._wake.set()

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config: start new mailboxes, stop removed ones, restart changed ones."""
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.path)
        except ConfigError as exc:
            log.error("reload_failed", problems=exc.problems)  # noqa: TRY400 -- no traceback needed
            self.notifier.ready(self.summary())
            return
        old = self.settings
        if self.cluster is not None:
            self._reload_cluster(old, new)
            return
        everything_changed = (
            new.daemon != old.daemon or new.folders != old.folders or new.office365 != old.office365
        )
        old_by_address = {m.address: m for m in old.mailboxes}
        new_by_address = {m.address: m for m in new.mailboxes}
        self.settings = new
        with self._lock:
            for address, mailbox in old_by_address.items():
                if address not in new_by_address:
                    self._stop_worker(address)
                    self._stopped.pop(address, None)
                    self.metrics.forget_mailbox(address)
                    log.info("mailbox_removed", mailbox=address)
                elif everything_changed or new_by_address[address] != mailbox:
                    self._stop_worker(address)
                    self._stopped.pop(address, None)
                    self._start_or_mark(new_by_address[address])
                    log.info("mailbox_restarted", mailbox=address)
            for address, mailbox in new_by_address.items():
                if address not in old_by_address:
                    self._start_or_mark(mailbox)
                    log.info("mailbox_added", mailbox=address)
        self.notifier.ready(self.summary())

    def _reload_cluster(self, old: Settings, new: Settings) -> None:
        """Restart changed mailboxes under their leases; the lease keeper does the rest.

        A changed mailbox restarts here with the new settings and the same fence; a removed
        one's lease is handed back and a new one is claimed on a following heartbeat.
        """
        everything_changed = (
            new.daemon != old.daemon or new.folders != old.folders or new.office365 != old.office365
        )
        new_by_address = {m.address: m for m in new.mailboxes}
        self.settings = new
        with self._lock:
            changed = [
                address
                for address, worker in self.workers.items()
                if everything_changed or new_by_address.get(address) != worker.mailbox
            ]
            for address in changed:
                self._stop_worker(address)
        for address in changed:
            if address in new_by_address and self.cluster is not None:
                self.cluster.resume(address)  # same lease, new settings
            log.info("mailbox_restarted", mailbox=address)
        self.notifier.ready(self.summary())

    # -- internals ------------------------------------------------------------------------------

    def _start_or_mark(self, mailbox: MailboxSettings) -> None:
        if not mailbox.enabled or stopped_marker(self.settings, mailbox.address).exists():
            self._mark_stopped(mailbox)
        else:
            self._start_worker(mailbox)

    def _start_worker(self, mailbox: MailboxSettings, store: Store | None = None) -> None:
        self._stopped.pop(mailbox.address, None)
        worker = MailboxWorker(
            mailbox,
            self.settings,
            store or self.store,
            self.metrics,
            self.authenticator_factory(mailbox, self.settings),
        )
        self.workers[mailbox.address] = worker
        worker.start()

    def _stop_worker(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is not None:
            worker.stop()
            worker.join(SHUTDOWN_SECONDS)

    def _mark_stopped(self, mailbox: MailboxSettings) -> None:
        self.metrics.init_mailbox(mailbox.address)
        self.metrics.set_state(mailbox.address, "stopped")
        with self._lock:
            self._stopped[mailbox.address] = WorkerStatus(
                mailbox.address, "stopped", mailbox.trigger
            )

    def _restart_dead_workers(self) -> None:
        with self._lock:
            dead = [
                a
                for a, w in self.workers.items()
                if not w.is_alive() and w.first_attempt_done.is_set()
            ]
            for address in dead:
                log.error("worker_died", mailbox=address)
                dead_worker = self.workers.pop(address)
                self._start_worker(dead_worker.mailbox, dead_worker.store)

    def _schedule_jobs(self) -> None:
        daemon = self.settings.daemon
        jobs = (
            (self._sweep, daemon.sweep_seconds, "sweep"),
            (self._refresh_gauges, GAUGE_SECONDS, "gauges"),
            (self._refresh_tokens, TOKEN_CHECK_SECONDS, "tokens"),
        )
        for job, seconds, name in jobs:
            self.scheduler.add_job(
                job, "interval", seconds=seconds, id=name, max_instances=1, coalesce=True
            )

    def _sweep(self) -> None:
        """Safety sweep: a pass over every Queue, for anything IDLE did not announce."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_pass("sweep")

    def _refresh_gauges(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.refresh_gauges()

    def _refresh_tokens(self) -> None:
        """Refresh OAuth tokens ahead of expiry (and keep refresh tokens alive)."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.refresh_token(TOKEN_REFRESH_AHEAD_SECONDS)

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
