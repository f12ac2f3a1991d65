"""The worker pool alone: its steps driven by hand, as the supervisor's tick would, with
stand-in worker threads (no IMAP, no supervisor, no main loop).

Each test plays the main loop's part (``reap``, ``restart_dead``, ``start_pending``) at the
moments it chooses, so the ordering rules are checked without timing races.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import MailboxSettings, ServerSettings, Settings
from emailsync.imap.auth import Authenticator
from emailsync.runtime import workerpool
from emailsync.runtime.worker import WorkerStatus
from emailsync.runtime.workerpool import WorkerPool
from emailsync.state.base import Store
from emailsync.telemetry.metrics import Metrics

from .clocks import wait_for

SERVER = ServerSettings(host="127.0.0.1", port=1, security="none", allow_insecure=True)


def mailbox(n: int, **changes: Any) -> MailboxSettings:
    return MailboxSettings(address=f"agent{n}@example.com", server=SERVER, **changes)


class PoolWorker(threading.Thread):
    """Idles until asked to stop; then ends once ``may_end`` is set (at once by default), or
    ends by itself at once when it ``crash``-es. Counts how many of its mailbox are alive."""

    def __init__(self, box: MailboxSettings, store: Store, rig: Rig, *, crash: bool) -> None:
        super().__init__(name=f"pool-{box.address}", daemon=True)
        self.mailbox = box
        self.store = store
        self.rig = rig
        self.crash = crash
        self.authenticator: Authenticator = None  # type: ignore[assignment]  # never used here
        self.first_attempt_done = threading.Event()
        self.may_end = threading.Event()
        self.may_end.set()
        self.stopping = threading.Event()
        self.jobs: list[str] = []

    def run(self) -> None:
        self.rig.born(self.mailbox.address)
        try:
            self.first_attempt_done.set()
            if self.crash:
                return
            self.stopping.wait()
            self.may_end.wait()
        finally:
            self.rig.died(self.mailbox.address)

    def stop(self) -> None:
        self.stopping.set()

    def snapshot(self) -> WorkerStatus:
        return WorkerStatus(self.mailbox.address, "idle", self.mailbox.trigger)

    def request_pass(self, trigger: str) -> None:
        self.jobs.append(trigger)

    def release_stuck(self) -> None:
        self.jobs.append("release_stuck")

    def refresh_gauges(self) -> None:
        self.jobs.append("gauges")

    def refresh_token(self, ahead_seconds: float) -> None:
        self.jobs.append("token")


@dataclass
class Rig:
    """A pool with stand-in workers, every worker it made, and the most alive per mailbox."""

    crash: Callable[[str], bool] = lambda address: False
    slow: Callable[[str], bool] = lambda address: False
    before_start: Callable[[MailboxSettings], None] = lambda box: None
    made: list[PoolWorker] = field(default_factory=list)
    alive: dict[str, int] = field(default_factory=dict)
    most_alive: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)
    store: Store = field(default_factory=object)  # type: ignore[arg-type]
    pool: WorkerPool = field(init=False)

    def __post_init__(self) -> None:
        metrics = Metrics(CollectorRegistry())
        self.pool = WorkerPool(
            self.factory,
            settings=lambda: Settings.__new__(Settings),
            authenticator=lambda box: None,  # type: ignore[arg-type,return-value]
            metrics=metrics,
            store=self.store,
            wake=self.wake,
            rng=random.Random(7),
        )

    def factory(
        self,
        box: MailboxSettings,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        authenticator: Authenticator,
    ) -> PoolWorker:
        self.before_start(box)
        worker = PoolWorker(box, store, self, crash=self.crash(box.address))
        if self.slow(box.address):
            worker.may_end.clear()
        self.made.append(worker)
        return worker

    def born(self, address: str) -> None:
        with self.lock:
            self.alive[address] = self.alive.get(address, 0) + 1
            self.most_alive[address] = max(self.most_alive.get(address, 0), self.alive[address])

    def died(self, address: str) -> None:
        with self.lock:
            self.alive[address] -= 1

    def of(self, address: str) -> list[PoolWorker]:
        return [w for w in self.made if w.mailbox.address == address]

    def tick(self) -> None:
        """One main-loop tick's share of the pool's work."""
        self.pool.reap()
        self.pool.restart_dead()
        self.pool.start_pending()

    def stop_all(self) -> None:
        for worker in self.made:
            worker.may_end.set()
        assert self.pool.shutdown(time.monotonic() + 5.0) == 0


@pytest.fixture
def rig_of() -> Any:
    rigs: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        rigs.append(Rig(**kwargs))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.stop_all()


def test_a_dead_worker_comes_back_after_a_growing_back_off(
    rig_of: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that ends unasked shows ``backoff`` and is not restarted before its delay
    (0.2 s here, then 0.4 s: each at least half its ceiling); each death is logged with the
    count in a row; the mailbox beside it keeps its one worker."""
    monkeypatch.setattr(workerpool, "RESTART_START_SECONDS", 0.2)
    monkeypatch.setattr(workerpool, "DEAD_SCAN_SECONDS_PER_WORKER", 0.0)
    rig = rig_of(crash=lambda address: address == mailbox(0).address)
    crashing, steady = mailbox(0), mailbox(1)
    rig.pool.start_all([crashing, steady], marked=())
    rig.tick()
    deaths: list[float] = []
    with structlog.testing.capture_logs() as logs:
        for round_ in (1, 2):
            wait_for(lambda: not rig.of(crashing.address)[-1].is_alive())
            rig.tick()  # sees it dead: a back-off, no new worker
            deaths.append(time.monotonic())
            assert crashing.address in rig.pool.restarting
            status = next(s for s in rig.pool.statuses() if s.address == crashing.address)
            assert status.state == "backoff"
            assert status.next_attempt is not None
            floor = 0.2 * 2 ** (round_ - 1) / 2
            while time.monotonic() - deaths[-1] < floor * 0.9:
                rig.tick()
                assert len(rig.of(crashing.address)) == round_, "restarted before its back-off"
                time.sleep(0.01)
            while len(rig.of(crashing.address)) == round_:  # restarted once it is due
                assert time.monotonic() - deaths[-1] < 5.0
                rig.tick()
                time.sleep(0.01)
    died = [e for e in logs if e["event"] == "worker_died"]
    assert [e["restarts"] for e in died] == [1, 2]
    assert len(rig.of(steady.address)) == 1


def test_a_replacement_starts_only_after_its_predecessor_ended(
    rig_of: Callable[..., Rig],
) -> None:
    """Changing a mailbox's settings retires its worker; however many ticks pass, the new one
    is not made while the old thread lives, and it starts on the tick after it ended."""
    box = mailbox(0)
    rig = rig_of(slow=lambda address: True)
    rig.pool.start_all([box], marked=())
    rig.tick()
    old = rig.made[0]
    wait_for(old.first_attempt_done.is_set)
    rig.pool.replace(mailbox(0, trigger="manual"))
    assert old.stopping.is_set()
    for _ in range(20):
        rig.tick()
        time.sleep(0.005)
    assert rig.made == [old]
    assert rig.pool.ready() is False  # the replacement still waits
    old.may_end.set()
    old.join(5)
    rig.tick()
    assert len(rig.made) == 2
    assert rig.made[1].mailbox.trigger == "manual"
    assert rig.most_alive[box.address] == 1
    assert not rig.pool.retiring


def test_a_stop_while_the_worker_is_being_started_retires_it(
    rig_of: Callable[..., Rig],
) -> None:
    """Stop Email Sync that comes in while ``start_pending`` makes the worker (outside the
    lock) takes the claim back: the new worker is asked to stop at once, never listed as
    running, and the mailbox shows stopped."""
    box = mailbox(0)
    holder: list[Rig] = []

    def stop_meanwhile(started: MailboxSettings) -> None:
        pool = holder[0].pool
        assert started.address in pool.starting
        pool.retire(started.address)
        pool.mark_stopped(started)

    rig = rig_of(before_start=stop_meanwhile)
    holder.append(rig)
    rig.pool.start_all([box], marked=())
    rig.tick()
    assert len(rig.made) == 1
    made = rig.made[0]
    assert made.stopping.is_set()
    assert box.address not in rig.pool.workers
    assert [s.state for s in rig.pool.statuses()] == ["stopped"]
    made.join(5)
    rig.tick()
    assert not rig.pool.retiring
    assert len(rig.made) == 1  # nothing restarted it


def test_start_sync_asked_before_the_worker_runs_reaches_it_when_it_starts(
    rig_of: Callable[..., Rig],
) -> None:
    """Start Sync (with include_stuck) for a queued mailbox is kept and handed to its worker
    once it runs; Start Sync of all reaches a queued one too; an unknown mailbox is refused."""
    rig = rig_of()
    one, two = mailbox(0), mailbox(1)
    rig.pool.start_all([one], marked=())
    assert rig.pool.start_sync(one.address.upper(), include_stuck=True) is True
    assert rig.pool.start_sync("nobody@example.com") is False
    rig.tick()
    assert rig.made[0].jobs == ["release_stuck", "start_sync"]
    rig.pool.queue(two)
    assert rig.pool.start_sync(None) is True  # one runs: at once; two is queued: on its start
    assert rig.made[0].jobs == ["release_stuck", "start_sync", "start_sync"]
    rig.tick()
    assert rig.made[1].mailbox == two
    assert rig.made[1].jobs == ["start_sync"]


def test_statuses_list_each_mailbox_once_whatever_its_state(
    rig_of: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running, replaced while its old worker ends (retiring and queued), backing off after a
    death, stopped, disabled: one status each, sorted."""
    monkeypatch.setattr(workerpool, "DEAD_SCAN_SECONDS_PER_WORKER", 0.0)
    running, replaced, dying, stopped, disabled = (mailbox(n) for n in range(5))
    rig = rig_of(
        crash=lambda address: address == dying.address,
        slow=lambda address: address == replaced.address,
    )
    disabled = mailbox(4, enabled=False)
    rig.pool.start_all([running, replaced, dying, stopped, disabled], marked={stopped.address})
    rig.tick()
    rig.pool.replace(mailbox(1, trigger="manual"))
    wait_for(lambda: not rig.of(dying.address)[0].is_alive())
    rig.tick()
    assert replaced.address in rig.pool.retiring
    assert replaced.address in rig.pool.pending
    assert dying.address in rig.pool.restarting
    statuses = rig.pool.statuses()
    addresses = [s.address for s in statuses]
    assert addresses == sorted({m.address for m in (running, replaced, dying, stopped, disabled)})
    assert {s.address: s.state for s in statuses} == {
        running.address: "idle",
        replaced.address: "connecting",
        dying.address: "backoff",
        stopped.address: "stopped",
        disabled.address: "stopped",
    }


def test_a_lease_store_is_kept_for_restarts_and_dropped_with_the_lease(
    rig_of: Callable[..., Rig],
) -> None:
    """``run_under`` hands the worker the lease's fenced store, a replacement keeps it, and
    ``drop`` retires the worker and forgets it; its answer says whether the worker ended."""
    rig = rig_of(slow=lambda address: True)
    box = mailbox(0)
    fenced: Store = object()  # type: ignore[assignment]
    rig.pool.run_under(box, fenced, marked=False)
    rig.tick()
    rig.pool.replace(box)
    rig.made[0].may_end.set()
    rig.made[0].join(5)
    rig.tick()
    assert [w.store for w in rig.made] == [fenced, fenced]
    ended = rig.pool.drop([box.address])
    assert ended(0.05) is False  # slow to stop
    rig.made[1].may_end.set()
    assert ended(5.0) is True
    rig.tick()
    assert rig.pool.statuses() == []
    assert not rig.pool.stores
