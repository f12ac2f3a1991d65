"""The worker lifecycle: one worker per mailbox, started, retired, reaped and restarted.

Nothing here waits on a worker on the supervisor's main loop: restarting a worker means asking
it to stop ("retiring" it) and starting its replacement on a later tick (``start_pending``),
once the old thread has ended (``reap``). So a mailbox never has two live workers (two filers
on one Queue, two connections where providers cap them), the old worker's last writes
(``stopped``) land before the new one's first, and ``/healthz`` and the watchdog keep being
answered while 2,000 workers log out. The lock guards the bookkeeping only: no one joins a
thread, logs, touches a file or calls into a worker under it (any of these hands the GIL to
2,000 busy threads and can keep the lock, and so /healthz, for seconds).

A mailbox is in at most one of: ``workers`` (running), ``pending`` (to start once no retiring
worker of it is left), ``starting`` (being started by the main loop, outside the lock),
``restarting`` (its worker died: restart after a back-off) and ``stopped``; ``retiring``
(asked to stop, not yet ended) may hold it beside any of these but ``workers``.

In a cluster each owned mailbox's worker writes through a store fenced by its lease
(``stores``, reused by restarts and reloads); the others get the default store.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog

from emailsync.config import WORKER_STOP_SECONDS, MailboxSettings, Settings
from emailsync.imap.auth import Authenticator
from emailsync.runtime.worker import WorkerStatus
from emailsync.state.base import Store
from emailsync.telemetry.metrics import Metrics

log = structlog.get_logger(__name__)

SHUTDOWN_SECONDS = WORKER_STOP_SECONDS  # SIGTERM must end the process within 10 s
# While workers are being stopped the loop ticks this often, so a replacement follows its
# predecessor's end closely.
BUSY_TICK_SECONDS = 0.05
# Starting a worker (a thread, an eventfd, metric series) takes a millisecond or, while hundreds
# of others log in, much longer: a tick starts them (outside the lock) for at most this long
# and the next tick goes on at once, so the watchdog and /healthz are never kept waiting.
START_BUDGET_SECONDS = 0.1
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


@dataclasses.dataclass(frozen=True)
class Retired:
    """What ``WorkerPool.retire`` asked to stop: the running worker (None if none ran)."""

    worker: Worker | None
    _retiring: _Retiring | None

    def wait(self) -> None:
        """Until the retired worker has ended, at most SHUTDOWN_SECONDS after it was asked
        (for a caller that answers a person; never the main loop)."""
        if self._retiring is not None:
            since = self._retiring.since
            self._retiring.worker.join(max(0.0, since + SHUTDOWN_SECONDS - time.monotonic()))


class WorkerPool:
    """The workers of this process and every mailbox's place in their lifecycle."""

    def __init__(
        self,
        factory: WorkerFactory,
        *,
        settings: Callable[[], Settings],
        authenticator: Callable[[MailboxSettings], Authenticator],
        metrics: Metrics,
        store: Store,
        wake: threading.Event,
        rng: random.Random | None = None,
    ) -> None:
        self._factory = factory
        self._settings = settings
        self._authenticator = authenticator
        self._metrics = metrics
        self._store = store
        self._wake = wake  # set whenever the main loop has something to do
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not cryptography
        self.workers: dict[str, Worker] = {}
        self.pending: dict[str, MailboxSettings] = {}
        self.starting: dict[str, MailboxSettings] = {}
        self.retiring: dict[str, _Retiring] = {}
        self.restarting: dict[str, _Restart] = {}
        self.stopped: dict[str, WorkerStatus] = {}
        self.stores: dict[str, Store] = {}  # in a cluster: each owned mailbox's fenced store
        self._started_at: dict[str, float] = {}  # monotonic, per running worker
        self._restarts: dict[str, int] = {}  # dead-worker restarts in a row, per mailbox
        self._sync_on_start: set[str] = set()  # Start Sync asked while no worker ran
        self._release_on_start: set[str] = set()  # ... with include_stuck
        self._next_dead_scan = 0.0  # monotonic; see restart_dead
        self.lock = threading.RLock()

    # -- reading ------------------------------------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        """Each mailbox of this process once: running, about to (re)start, or stopped."""
        with self.lock:
            workers = list(self.workers.values())
            starting = [
                WorkerStatus(a, "connecting", m.trigger)
                for a, m in [*self.pending.items(), *self.starting.items()]
            ]
            restarting = [r.status for r in self.restarting.values()]
            stopped = list(self.stopped.values())
        running = [w.snapshot() for w in workers]
        return sorted([*running, *starting, *restarting, *stopped], key=lambda s: s.address)

    def worker(self, address: str) -> Worker | None:
        """The mailbox's running worker, or None."""
        with self.lock:
            return self.workers.get(address)

    def running(self) -> list[Worker]:
        """The running workers."""
        with self.lock:
            return list(self.workers.values())

    def runs(self, address: str, *, queued: bool = False) -> bool:
        """A worker of the mailbox runs or is being started (``queued``: or waits to start)."""
        with self.lock:
            held = address in self.workers or address in self.starting
            return held or (queued and address in self.pending)

    def alive(self) -> bool:
        """Every running worker's thread is alive."""
        with self.lock:
            return all(w.is_alive() for w in self.workers.values())

    def ready(self) -> bool:
        """Every queued worker has been started and had its first connect attempt."""
        with self.lock:
            if self.pending or self.starting:
                return False
            return all(w.first_attempt_done.is_set() for w in self.workers.values())

    def waiting(self) -> int:
        """How many mailboxes wait to start or for a worker to end."""
        with self.lock:
            return len(self.pending) + len(self.retiring)

    def wait_seconds(self, idle: float) -> float:
        """How long the main loop may sleep: 0 while a worker can start, short while workers
        end, else until the next restart is due (at most ``idle``)."""
        if self.pending or self.retiring:
            with self.lock:
                startable = any(a not in self.retiring for a in self.pending)
            return 0.0 if startable else BUSY_TICK_SECONDS
        with self.lock:
            due = min((r.due for r in self.restarting.values()), default=float("inf"))
        return max(0.0, min(idle, due - time.monotonic()))

    # -- asking -------------------------------------------------------------------------------

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for a mailbox whose worker runs in this process (or all of them).

        A mailbox whose worker is being (re)started gets it as soon as the worker runs.
        """
        with self.lock:
            waiting = {*self.pending, *self.starting, *self.restarting}
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
        with self.lock:
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

    def for_each(self, job: str, call: Callable[[Worker], object]) -> None:
        """Run a scheduler job's step for every running worker; one failing skips no other."""
        for worker in self.running():
            try:
                call(worker)
            except Exception as exc:  # a scheduler job's loop: log, go on with the next
                log.exception(
                    "scheduler_job_failed", job=job, mailbox=worker.mailbox.address, error=repr(exc)
                )

    # -- changing -----------------------------------------------------------------------------

    def queue(self, mailbox: MailboxSettings) -> None:
        """Start the mailbox's worker unless one runs or is starting (no back-off wait)."""
        with self.lock:
            self.restarting.pop(mailbox.address, None)  # an operator's start does not wait
            if mailbox.address not in self.workers and mailbox.address not in self.starting:
                self.stopped.pop(mailbox.address, None)
                self.pending[mailbox.address] = mailbox
        self._wake.set()

    def unmark(self, address: str) -> None:
        """No longer show the mailbox stopped here (it may run on another instance)."""
        with self.lock:
            self.stopped.pop(address, None)

    def start_all(self, mailboxes: Sequence[MailboxSettings], marked: Container[str]) -> None:
        """Queue these mailboxes' workers; the disabled ones and ``marked`` show stopped."""
        with self.lock:
            for mailbox in mailboxes:
                self._start_or_mark(mailbox, mailbox.address in marked)
        self._wake.set()

    def replace(self, mailbox: MailboxSettings) -> None:
        """(Re)start the mailbox's worker: the old one (if any) is retired and the new one
        starts once it has ended."""
        address = mailbox.address
        with self.lock:
            old = self._retire(address)
            self.stopped.pop(address, None)
            self.pending[address] = mailbox
        if old is not None:
            old.stop()
        self._wake.set()

    def run_under(self, mailbox: MailboxSettings, store: Store, *, marked: bool) -> None:
        """(Re)start the mailbox's worker writing through ``store`` (a lease's fenced store),
        or show it stopped when ``marked``; a running worker of it is retired first."""
        with self.lock:
            worker = self._retire(mailbox.address)
            self.stores[mailbox.address] = store
            self._start_or_mark(mailbox, marked)
        if worker is not None:
            worker.stop()
        self._wake.set()

    def retire(self, address: str, *, forget: bool = False) -> Retired:
        """Ask the mailbox's worker to stop (nothing of it starts until it has ended).

        ``forget``: the mailbox is gone: its stopped status, restart count and Start Sync
        asked ahead go too (its metrics once the worker has ended, or with ``forget_if_gone``).
        """
        with self.lock:
            worker = self._retire(address)
            retiring = self.retiring.get(address)
            if forget:
                self._drop_records(address)
        if worker is not None:
            worker.stop()
        self._wake.set()
        return Retired(worker, retiring)

    def end(self, address: str, *, forget: bool, wait: bool) -> None:
        """Stop a mailbox's worker; ``forget``: the mailbox is gone (status and metrics go once
        the worker has ended); ``wait``: until its LOGOUT (bounded by SHUTDOWN_SECONDS)."""
        retired = self.retire(address, forget=forget)
        if wait:
            retired.wait()  # the caller (the API, a page) waits for the LOGOUT; the loop does not
        if forget:
            self.forget_if_gone(address)  # else the reaper does once the worker has ended

    def drop(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        """Retire these workers like removed mailboxes (a lease handed back); returns at once.

        The answer waits up to its argument (seconds) for them to end and says whether they did.
        """
        with self.lock:
            workers = [self._retire(address) for address in addresses]
            retiring = [r.worker for a in addresses if (r := self.retiring.get(a)) is not None]
            for address in addresses:
                self.stores.pop(address, None)
                self._drop_records(address)
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

    def apply(
        self,
        old: Sequence[MailboxSettings],
        new: Sequence[MailboxSettings],
        *,
        marked: Container[str],
        changed: Callable[[MailboxSettings, MailboxSettings], bool],
        cluster: bool,
        registered: Mapping[str, MailboxSettings],
        restart_registered: bool,
    ) -> list[tuple[str, str]]:
        """Adopt a reload's mailboxes: retire removed ones, restart changed ones, queue added.

        Restarting retires the worker; ``start_pending`` starts the replacement once it has
        ended. In a ``cluster`` only the mailboxes running here restart, each only with its
        lease's fenced store, and added ones are left to the lease keeper.
        ``restart_registered``: the ``registered`` mailboxes running here restart too (keeping
        their fenced stores). Returns the events to log, (event, address).
        """
        old_by_address = {m.address: m for m in old}
        new_by_address = {m.address: m for m in new}
        retired: list[Worker | None] = []
        events: list[tuple[str, str]] = []
        with self.lock:
            for address, mailbox in old_by_address.items():
                local = any(
                    address in each
                    for each in (self.workers, self.pending, self.starting, self.restarting)
                )
                new_mailbox = new_by_address.get(address)
                if new_mailbox is None:
                    retired.append(self._retire(address))
                    self.stores.pop(address, None)
                    self._drop_records(address)
                    self._forget_if_gone(address)
                    events.append(("mailbox_removed", address))
                elif changed(mailbox, new_mailbox) and (local or not cluster):
                    retired.append(self._retire(address))
                    self.stopped.pop(address, None)  # a no-op for a local mailbox
                    if address in self.stores or not cluster:
                        self._start_or_mark(new_mailbox, address in marked)
                    events.append(("mailbox_restarted", address))
            for address, mailbox in new_by_address.items():
                if address not in old_by_address and not cluster:
                    self._start_or_mark(mailbox, address in marked)
                    events.append(("mailbox_added", address))
            if restart_registered:  # a registered worker keeps its fenced store (stores)
                for address, mailbox in registered.items():
                    if address in self.workers or address in self.pending:
                        retired.append(self._retire(address))
                        self.pending[address] = mailbox
                        events.append(("mailbox_restarted", address))
        for worker in retired:
            if worker is not None:
                worker.stop()
        self._wake.set()
        return events

    def mark_stopped(self, mailbox: MailboxSettings) -> None:
        """Show a mailbox stopped (no worker)."""
        self._metrics.init_mailbox(mailbox.address)
        self._metrics.set_state(mailbox.address, "stopped")
        with self.lock:
            self.pending.pop(mailbox.address, None)
            self.restarting.pop(mailbox.address, None)
            self._sync_on_start.discard(mailbox.address)
            self._release_on_start.discard(mailbox.address)
            self.stopped[mailbox.address] = WorkerStatus(
                mailbox.address, "stopped", mailbox.trigger
            )

    def forget_if_gone(self, address: str) -> None:
        """Remove a mailbox's metric series if nothing of it is left here."""
        with self.lock:
            self._forget_if_gone(address)

    def shutdown(self, deadline: float) -> int:
        """Ask every worker to stop and wait for all together until ``deadline`` (monotonic);
        how many are still alive then."""
        with self.lock:
            running = [self._retire(address) for address in list(self.workers)]
            self.pending.clear()
            self.restarting.clear()
            retiring = [r.worker for r in self.retiring.values()]
        for worker in running:
            if worker is not None:
                worker.stop()
        for worker in retiring:
            worker.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for worker in retiring if worker.is_alive())

    # -- the main loop's steps ----------------------------------------------------------------

    def reap(self) -> None:
        """Forget retired workers whose thread has ended; warn once about slow ones."""
        now = time.monotonic()
        slow: list[tuple[str, float]] = []
        with self.lock:
            for address, retiring in list(self.retiring.items()):
                if retiring.worker.is_alive():
                    if not retiring.warned and now - retiring.since > SHUTDOWN_SECONDS:
                        retiring.warned = True
                        slow.append((address, now - retiring.since))
                    continue
                del self.retiring[address]
                self._forget_if_gone(address)
        for address, seconds in slow:
            log.warning("worker_slow_to_stop", mailbox=address, seconds=round(seconds, 1))

    def restart_dead(self) -> None:
        """Workers that ended unasked are restarted after a growing back-off, not at once."""
        now = time.monotonic()
        died: list[tuple[Worker, int, float]] = []
        scan = now >= self._next_dead_scan
        if scan:
            self._next_dead_scan = now + DEAD_SCAN_SECONDS_PER_WORKER * len(self.workers)
        with self.lock:
            for address, worker in list(self.workers.items()) if scan else []:
                if worker.is_alive():
                    continue
                del self.workers[address]
                if now - self._started_at.pop(address, now) >= RESTART_RESET_SECONDS:
                    self._restarts.pop(address, None)
                # Its status as it ended; the thread is gone, so its lock is free.
                died.append((worker, *self._schedule_restart(worker.mailbox, worker.snapshot())))
            for address, restart in list(self.restarting.items()):
                if restart.due <= now:
                    del self.restarting[address]
                    self.pending[address] = restart.mailbox
        for worker, restarts, delay in died:
            _log_restart(worker.mailbox.address, restarts, delay)

    def start_pending(self) -> None:
        """Start queued workers whose predecessor has ended, for up to START_BUDGET_SECONDS.

        Each is claimed under the lock and made and started outside it; a Stop Email Sync or
        reload that comes in meanwhile takes the claim back, and the new worker is retired.
        """
        with self.lock:
            startable = [a for a in self.pending if a not in self.retiring]
        deadline = time.monotonic() + START_BUDGET_SECONDS
        for address in startable:
            if time.monotonic() > deadline:
                return  # the rest on the next tick, which follows at once
            with self.lock:
                mailbox = None if address in self.retiring else self.pending.pop(address, None)
                if mailbox is None:
                    continue
                self.starting[address] = mailbox
                store = self.stores.get(address, self._store)
            worker = self._make_worker(mailbox, store)
            restart: tuple[int, float] | None = None
            with self.lock:
                claimed = self.starting.pop(address, None) is not None
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
                    self.retiring[address] = _Retiring(worker, time.monotonic())
            if worker is not None and not claimed:
                worker.stop()  # stopped or removed while it was being made
            if restart is not None:
                _log_restart(address, *restart)

    # -- internals (the callers hold the lock) ------------------------------------------------

    def _make_worker(self, mailbox: MailboxSettings, store: Store) -> Worker | None:
        """Make and start a mailbox's worker (no other of it is alive); None if that failed."""
        try:
            worker = self._factory(
                mailbox, self._settings(), store, self._metrics, self._authenticator(mailbox)
            )
            worker.start()
        except Exception as exc:  # one mailbox's broken start must not stop the others
            log.exception("worker_start_failed", mailbox=mailbox.address, error=repr(exc))
            return None
        return worker

    def _start_or_mark(self, mailbox: MailboxSettings, marked_stopped: bool) -> None:
        """Queue a mailbox's worker to start, or mark it stopped; under the lock."""
        if not mailbox.enabled or marked_stopped:
            self.mark_stopped(mailbox)
        else:
            self.stopped.pop(mailbox.address, None)
            self.pending[mailbox.address] = mailbox

    def _retire(self, address: str) -> Worker | None:
        """Move a mailbox's worker to ``retiring`` and drop anything queued; under the lock.

        Returns the worker, which the caller must ``stop()`` once it has released the lock.
        Nothing of this mailbox starts until that worker has ended.
        """
        self.pending.pop(address, None)
        self.starting.pop(address, None)  # start_pending retires it once it has started
        self.restarting.pop(address, None)
        self._started_at.pop(address, None)
        worker = self.workers.pop(address, None)
        if worker is not None:
            self.retiring[address] = _Retiring(worker, time.monotonic())
        return worker

    def _drop_records(self, address: str) -> None:
        """Forget a gone mailbox's stopped status, restart count and Start Sync asked ahead."""
        self.stopped.pop(address, None)
        self._restarts.pop(address, None)
        self._sync_on_start.discard(address)
        self._release_on_start.discard(address)

    def _forget_if_gone(self, address: str) -> None:
        """Remove a mailbox's metric series once it is out of the config and its worker ended."""
        known: list[Collection[str]] = [self.workers, self.pending, self.starting]
        known += [self.restarting, self.stopped, self.retiring]
        if not any(address in each for each in known):
            self._metrics.forget_mailbox(address)

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
        self.restarting[address] = _Restart(mailbox, time.monotonic() + delay, status)
        self._metrics.set_state(address, "backoff")
        return restarts, delay


def _log_restart(address: str, restarts: int, delay: float) -> None:
    log.error("worker_died", mailbox=address, restarts=restarts, restart_in=round(delay, 2))
