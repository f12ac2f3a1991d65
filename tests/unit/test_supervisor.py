"""The supervisor with stand-in workers: reload, restarts, shutdown and its own failures.

The workers here are threads that only pretend to hold a connection (no IMAP), so a test
can make one slow to stop or crash at once; the supervisor, its main loop, the listener's
``healthy()`` and the scheduler jobs are the real ones.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry

from emailsync.cluster.lease import LeaseKeeper, LeaseTable, OwedStartSync
from emailsync.cluster.membership import Cluster
from emailsync.config import ClusterSettings, MailboxSettings, Settings, load_settings
from emailsync.dev.net import free_port
from emailsync.imap.auth import Authenticator
from emailsync.model import Fence
from emailsync.runtime import workerpool
from emailsync.runtime.worker import WorkerStatus
from emailsync.service import supervisor as supervisor_module
from emailsync.service.supervisor import ClusterFactory, Supervisor
from emailsync.state.base import RegisteredBranch, RegisteredMailbox, Registry, Store
from emailsync.state.postgres import PostgresStore
from emailsync.telemetry.metrics import ClusterMetrics, Metrics
from emailsync.telemetry.systemd import Notifier
from emailsync.timeline import open_store

from .clocks import wait_for

RUN_TIMEOUT_SECONDS = 30.0


@dataclass
class Life:
    """One fake worker's life: when it started and ended (monotonic), and its generation."""

    address: str
    generation: int
    started: float
    ended: float | None = None


@dataclass
class Census:
    """Every fake worker's life, and the most that were ever alive at once per mailbox."""

    lives: list[Life] = field(default_factory=list)
    alive: dict[str, int] = field(default_factory=dict)
    most_alive: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def born(self, address: str) -> Life:
        with self.lock:
            generation = sum(1 for life in self.lives if life.address == address) + 1
            life = Life(address, generation, time.monotonic())
            self.lives.append(life)
            self.alive[address] = self.alive.get(address, 0) + 1
            self.most_alive[address] = max(self.most_alive.get(address, 0), self.alive[address])
            return life

    def died(self, life: Life) -> None:
        with self.lock:
            life.ended = time.monotonic()
            self.alive[life.address] -= 1

    def of(self, address: str) -> list[Life]:
        with self.lock:
            return [life for life in self.lives if life.address == address]

    def running(self, address: str, generation: int) -> bool:
        return any(
            life.generation >= generation and life.ended is None for life in self.of(address)
        )


class FakeWorker(threading.Thread):
    """Pretends to be idle on its mailbox; takes ``stop_seconds`` to stop, or crashes at once.

    Like ``MailboxWorker`` it writes its state to the metrics, ``stopped`` last of all:
    the late write that must never land on a replacement's state.
    """

    def __init__(
        self,
        mailbox: MailboxSettings,
        metrics: Metrics,
        authenticator: Authenticator,
        census: Census,
        *,
        stop_seconds: float = 0.0,
        crash: bool = False,
        raises_in_jobs: bool = False,
    ) -> None:
        super().__init__(name=f"fake-{mailbox.address}", daemon=True)
        self.mailbox = mailbox
        self.authenticator = authenticator
        self.metrics = metrics
        self.census = census
        self.stop_seconds = stop_seconds
        self.crash = crash
        self.raises_in_jobs = raises_in_jobs
        self.first_attempt_done = threading.Event()
        self.store: Store | None = None  # what the supervisor handed it
        self.jobs: list[str] = []
        self.state = "connecting"
        self._stopping = threading.Event()
        metrics.init_mailbox(mailbox.address)
        metrics.set_state(mailbox.address, "connecting")

    def run(self) -> None:
        life = self.census.born(self.mailbox.address)
        try:
            if self.crash:
                return  # a thread that ends without being asked: the supervisor sees it dead
            self._set_state("idle")
            self.first_attempt_done.set()
            self._stopping.wait()
            time.sleep(self.stop_seconds)  # finishing a batch, LOGOUT to a slow server…
            self._set_state("stopped")
        finally:
            self.first_attempt_done.set()
            self.census.died(life)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_state(self.mailbox.address, state)

    def stop(self) -> None:
        self._stopping.set()

    def snapshot(self) -> WorkerStatus:
        return WorkerStatus(self.mailbox.address, self.state, self.mailbox.trigger)

    def _job(self, name: str) -> None:
        self.jobs.append(name)
        if self.raises_in_jobs:
            raise RuntimeError(f"{name} broke for {self.mailbox.address}")

    def request_pass(self, trigger: str) -> None:
        self._job(trigger)

    def release_stuck(self) -> None:
        self._job("release_stuck")

    def refresh_gauges(self) -> None:
        self._job("gauges")

    def refresh_token(self, ahead_seconds: float) -> None:
        self._job("token")


class RecordingNotifier(Notifier):
    """Records sd_notify messages instead of sending them; can fail a few watchdog pings."""

    def __init__(self, *, watchdog_seconds: float = 0.2, watchdog_failures: int = 0) -> None:
        super().__init__()
        self.socket_path = ""
        self.watchdog_seconds = watchdog_seconds
        self.watchdog_failures = watchdog_failures
        self.messages: list[tuple[float, str]] = []

    def notify(self, message: str) -> None:
        self.messages.append((time.monotonic(), message))

    def watchdog(self) -> None:
        if self.watchdog_failures > 0:
            self.watchdog_failures -= 1
            raise RuntimeError("the notify socket went away")
        super().watchdog()

    def pings(self, since: float = 0.0) -> int:
        return sum(1 for at, m in list(self.messages) if m == "WATCHDOG=1" and at >= since)


@dataclass
class Rig:
    """A config on disk, a supervisor with fake workers, and what they did."""

    config: Path
    supervisor: Supervisor
    notifier: RecordingNotifier
    census: Census
    registry: CollectorRegistry
    workers: list[FakeWorker]
    addresses: list[str]

    def state(self, address: str, state: str) -> float | None:
        return self.registry.get_sample_value(
            "emailsync_mailbox_state", {"mailbox": address, "state": state}
        )

    def reload_changed_daemon_section(self) -> float:
        """Change [daemon] (which restarts every worker) and ask for a reload; when it was
        asked (``time.monotonic()``)."""
        text = self.config.read_text()
        self.config.write_text(text.replace("fetch_batch = 50", "fetch_batch = 60"))
        asked = time.monotonic()
        self.supervisor.request_reload()
        return asked

    def run(self, driver: Callable[[], None], timeout: float = RUN_TIMEOUT_SECONDS) -> None:
        """Run the real main loop in this (the main) thread while ``driver`` runs beside it.

        The loop stops when the driver returns or fails (or after ``timeout``); the driver's
        failure is raised here.
        """
        errors: list[BaseException] = []

        def drive() -> None:
            try:
                driver()
            except BaseException as exc:  # handed to the test thread, raised there
                errors.append(exc)
            finally:
                self.supervisor.request_stop()

        thread = threading.Thread(target=drive, name="driver", daemon=True)
        watchdog = threading.Timer(timeout, self.supervisor.request_stop)
        thread.start()
        watchdog.start()
        try:
            assert self.supervisor.run() == 0
        finally:
            watchdog.cancel()
            thread.join(timeout)
        if errors:
            raise errors[0]


def write_config(tmp_path: Path, count: int) -> Path:
    """A config with ``count`` mailboxes on an unused branch (fake workers never connect)."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "token").write_text("a-test-control-token-long-enough-for-the-rule\n")
    parts = [
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'store = "sqlite:///{tmp_path / "state" / "emailsync.db"}"\n'
        f'listen = "127.0.0.1:{free_port()}"\ncontrol_token_file = "{tmp_path / "token"}"\n'
        "sweep_seconds = 3600\nfetch_batch = 50\n",
        '[branches.b0]\nhost = "127.0.0.1"\nport = 1\nsecurity = "none"\nallow_insecure = true\n',
    ]
    for n in range(count):
        address = f"agent{n}@example.com"
        (tmp_path / "secrets" / address).write_text("pw\n")
        parts.append(
            f'[[mailboxes]]\naddress = "{address}"\nbranch = "b0"\n'
            f'password_file = "secrets/{address}"\n'
        )
    path = tmp_path / "emailsync.toml"
    path.write_text("\n".join(parts))
    return path


@pytest.fixture
def signals_restored() -> Iterator[None]:
    """``Supervisor.run`` installs signal handlers in the test process: put them back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    saved[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def make_rig(tmp_path: Path, store: Store, signals_restored: None) -> Callable[..., Rig]:
    def make(
        count: int,
        *,
        stop_seconds: Callable[[str, int], float] = lambda address, generation: 0.0,
        crash: Callable[[str], bool] = lambda address: False,
        raises_in_jobs: Callable[[str], bool] = lambda address: False,
        watchdog_failures: int = 0,
        before_start: Callable[[str, int], None] = lambda address, generation: None,
        cluster_factory: ClusterFactory | None = None,
    ) -> Rig:
        config = write_config(tmp_path, count)
        settings = load_settings(config)
        census = Census()
        workers: list[FakeWorker] = []
        registry = CollectorRegistry()
        notifier = RecordingNotifier(watchdog_failures=watchdog_failures)

        def factory(
            mailbox: MailboxSettings,
            settings: Settings,
            store: Store,
            metrics: Metrics,
            authenticator: Authenticator,
        ) -> FakeWorker:
            generation = len([w for w in workers if w.mailbox.address == mailbox.address]) + 1
            before_start(mailbox.address, generation)
            worker = FakeWorker(
                mailbox,
                metrics,
                authenticator,
                census,
                stop_seconds=stop_seconds(mailbox.address, generation),
                crash=crash(mailbox.address),
                raises_in_jobs=raises_in_jobs(mailbox.address),
            )
            worker.store = store
            workers.append(worker)
            return worker

        supervisor = Supervisor(
            settings,
            store,
            registry=registry,
            notifier=notifier,
            worker_factory=factory,
            cluster_factory=cluster_factory,
        )
        addresses = [m.address for m in settings.mailboxes]
        return Rig(config, supervisor, notifier, census, registry, workers, addresses)

    return make


def tick_passed(rig: Rig) -> None:
    """Wait until no worker is retiring, then for the end of the tick that reaped the last
    (or a later one): a worker that tick would start is made (by the factory) before it ends."""
    wait_for(lambda: not rig.supervisor.pool.retiring)
    since = time.monotonic()
    wait_for(lambda: rig.supervisor._last_tick > since)


def all_running(rig: Rig, generation: int) -> bool:
    return all(rig.census.running(a, generation) for a in rig.addresses)


def test_reload_keeps_health_answering_and_the_loop_ticking_while_workers_stop_slowly(
    make_rig: Callable[..., Rig],
) -> None:
    """A [daemon] change restarts 20 workers that take 0.4 s each to stop: /healthz's
    ``healthy()`` answers at once throughout, and the watchdog keeps being pinged."""
    rig = make_rig(20, stop_seconds=lambda address, generation: 0.4)
    probes: list[float] = []

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1))
        reloaded = rig.reload_changed_daemon_section()
        while time.monotonic() - reloaded < 2.0:
            started = time.monotonic()
            assert rig.supervisor.healthy()
            probes.append(time.monotonic() - started)
            time.sleep(0.05)
        assert rig.notifier.pings(since=reloaded + 0.5) >= 2  # the loop went on ticking
        wait_for(lambda: all_running(rig, 2))

    rig.run(driver)
    assert len(probes) > 10
    assert max(probes) < 0.3, f"healthy() took {max(probes):.2f} s during the reload"
    assert len(rig.census.lives) == 40


def test_a_slow_to_stop_worker_never_runs_beside_its_replacement_nor_overwrites_its_state(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker needs 2.5 s to stop, beyond the (shortened) stop deadline of 0.5 s:
    the replacement starts only once it has ended, and its late ``stopped`` lands before
    the replacement's ``idle``."""
    monkeypatch.setattr(supervisor_module, "SHUTDOWN_SECONDS", 0.5)
    rig = make_rig(1, stop_seconds=lambda address, generation: 2.5 if generation == 1 else 0.0)
    address = rig.addresses[0]

    def driver() -> None:
        wait_for(lambda: rig.state(address, "idle") == 1)
        rig.reload_changed_daemon_section()
        wait_for(lambda: len(rig.census.of(address)) == 2 and rig.census.running(address, 2))
        # The old worker has ended (its late ``stopped`` is written before that) and the
        # replacement has written its ``idle``: any overwrite would show now.
        wait_for(lambda: rig.census.of(address)[0].ended is not None)
        wait_for(lambda: rig.workers[1].state == "idle")
        assert rig.state(address, "idle") == 1
        assert not rig.state(address, "stopped")  # 0, or absent at the "summary" detail
        assert [s.state for s in rig.supervisor.statuses()] == ["idle"]

    rig.run(driver)
    assert rig.census.most_alive[address] == 1
    first, second = rig.census.of(address)
    assert first.ended is not None
    assert second.started >= first.ended


def test_restarting_many_slow_workers_takes_one_stop_time_not_their_sum(
    make_rig: Callable[..., Rig],
) -> None:
    """30 workers that need 0.5 s each to stop are all replaced within about one of those
    0.5 s (they stop in parallel), and shutdown straight after waits for the replacements."""
    rig = make_rig(30, stop_seconds=lambda address, generation: 0.5)
    took: list[float] = []

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1))
        started = rig.reload_changed_daemon_section()
        wait_for(lambda: all_running(rig, 2), timeout=20)
        took.append(time.monotonic() - started)

    stop_started = time.monotonic()
    rig.run(driver)
    assert took[0] < 2.5, f"30 restarts took {took[0]:.1f} s"
    assert time.monotonic() - stop_started - took[0] < 5.0
    assert len(rig.census.lives) == 60
    assert all(life.ended is not None for life in rig.census.lives)  # every one was waited for
    assert all(n == 1 for n in rig.census.most_alive.values())


def test_a_crashing_worker_is_restarted_with_growing_delays(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies at once is restarted after 0.1, 0.2, 0.4, 0.8 s (±jitter, scaled
    down from 1 s → 5 min), not on every tick; each death is logged ``worker_died``; the
    mailbox beside it is left alone and the daemon stays healthy meanwhile."""
    monkeypatch.setattr(supervisor_module, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(workerpool, "RESTART_START_SECONDS", 0.2)
    rig = make_rig(2, crash=lambda address: address == "agent0@example.com")
    crashing, steady = rig.addresses

    healthy: list[bool] = []

    def driver() -> None:
        wait_for(lambda: len(rig.census.of(crashing)) >= 5, timeout=10)
        # A tick has seen the fifth one dead (its restart is > 0.8 s away).
        wait_for(lambda: crashing in rig.supervisor.pool.restarting)
        healthy.append(rig.supervisor.healthy())

    with structlog.testing.capture_logs() as logs:
        rig.run(driver)
    starts = [life.started for life in rig.census.of(crashing)]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.2 s · 2^(n-1), jittered down to no less than half of it.
    for n, gap in enumerate(gaps[:4], start=1):
        assert gap >= 0.1 * 2 ** (n - 1) * 0.95, f"restart {n} came after {gap:.2f} s: {gaps}"
    assert gaps[3] > gaps[0] * 2
    died = [e for e in logs if e["event"] == "worker_died" and e.get("mailbox") == crashing]
    assert len(died) >= 4
    assert "restart_in" in died[0]
    assert len(rig.census.of(steady)) == 1
    assert healthy == [True]  # one mailbox's crashes are not the daemon's ill health


def test_an_exception_in_the_tick_is_logged_and_the_loop_goes_on(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog ping raises twice: logged with its traceback, the loop carries on (pings
    resume), and the daemon shuts down normally with exit code 0."""
    monkeypatch.setattr(supervisor_module, "TICK_SECONDS", 0.1)
    rig = make_rig(2, watchdog_failures=2)

    def driver() -> None:
        wait_for(lambda: rig.notifier.pings() >= 3, timeout=10)

    with structlog.testing.capture_logs() as logs:
        rig.run(driver)
    errors = [e for e in logs if e["event"] == "supervisor_error"]
    assert len(errors) == 2
    assert errors[0]["log_level"] == "error"
    assert errors[0].get("exc_info")
    assert rig.notifier.pings() >= 3


def test_one_raising_mailbox_in_a_scheduler_job_does_not_skip_the_others(
    make_rig: Callable[..., Rig],
) -> None:
    """The first mailbox's token refresh, gauges and sweep raise: the other two still get
    theirs, and each failure is logged with its mailbox."""
    rig = make_rig(3, raises_in_jobs=lambda address: address == "agent0@example.com")

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1))
        # The scheduler's jobs, called as apscheduler calls them.
        rig.supervisor._refresh_tokens()
        rig.supervisor._refresh_gauges()
        rig.supervisor._sweep()

    with structlog.testing.capture_logs() as logs:
        rig.run(driver)
    for worker in rig.workers:
        assert worker.jobs == ["token", "gauges", "sweep"], worker.mailbox.address
    failed = [e for e in logs if e["event"] == "scheduler_job_failed"]
    assert [(e["job"], e["mailbox"]) for e in failed] == [
        ("tokens", "agent0@example.com"),
        ("gauges", "agent0@example.com"),
        ("sweep", "agent0@example.com"),
    ]


def test_stop_email_sync_during_a_restart_leaves_the_mailbox_stopped_without_a_replacement(
    make_rig: Callable[..., Rig],
) -> None:
    """Stop Email Sync arrives while the reloaded worker is still stopping (1.5 s): no
    replacement starts, and the mailbox shows ``stopped`` in status and metrics."""
    rig = make_rig(
        2,
        stop_seconds=lambda address, generation: 1.5 if address == "agent0@example.com" else 0,
    )
    stopped, other = rig.addresses

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1))
        rig.reload_changed_daemon_section()
        wait_for(lambda: rig.census.running(other, 2), timeout=10)  # the reload is under way
        assert rig.supervisor.stop_mailbox(stopped)
        wait_for(lambda: all(life.ended is not None for life in rig.census.of(stopped)))
        tick_passed(rig)  # a replacement would have been made by now
        assert rig.census.running(other, 2)

    rig.run(driver)
    assert len(rig.census.of(stopped)) == 1
    assert rig.state(stopped, "stopped") == 1
    assert {s.address: s.state for s in rig.supervisor.statuses()}[stopped] == "stopped"


def test_restart_delays_double_from_one_second_without_shrinking_up_to_the_cap() -> None:
    rng = random.Random(5)
    for _ in range(50):
        delays = [workerpool.restart_delay(n, rng) for n in range(1, 16)]
        assert 0.5 <= delays[0] <= 1.0
        assert all(a <= b for a, b in itertools.pairwise(delays[:9]))  # 1 s … 256 s
        assert all(150.0 <= d <= 300.0 for d in delays[9:])


def test_a_worker_being_started_when_stop_email_sync_arrives_is_stopped_at_once(
    make_rig: Callable[..., Rig],
) -> None:
    """Stop Email Sync while the main loop is making the mailbox's worker (outside the lock):
    the worker it then starts is retired at once, and the mailbox stays stopped."""
    entered, release = threading.Event(), threading.Event()

    def before_start(address: str, generation: int) -> None:
        entered.set()
        release.wait(10)

    rig = make_rig(1, before_start=before_start)
    address = rig.addresses[0]

    def driver() -> None:
        assert entered.wait(10)
        threading.Timer(0.5, release.set).start()
        assert rig.supervisor.stop_mailbox(address)
        wait_for(lambda: len(rig.census.of(address)) == 1)
        wait_for(lambda: rig.census.of(address)[0].ended is not None)
        tick_passed(rig)  # a new one would have been made by now
        assert len(rig.workers) == 1
        assert [s.state for s in rig.supervisor.statuses()] == ["stopped"]
        assert rig.state(address, "stopped") == 1

    rig.run(driver)
    assert len(rig.census.of(address)) == 1


def test_a_start_sync_during_a_restart_reaches_the_new_worker(
    make_rig: Callable[..., Rig],
) -> None:
    """Start Sync for a mailbox whose old worker is still stopping is accepted and handed to
    the replacement when it starts (a manual mailbox files only on Start Sync)."""
    # The old worker takes 3 s to stop: a window wide enough that a loaded machine's driver
    # thread still sees it (the replacement goes idle at once).
    rig = make_rig(1, stop_seconds=lambda address, generation: 3.0 if generation == 1 else 0.0)
    address = rig.addresses[0]

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1))
        rig.reload_changed_daemon_section()
        wait_for(lambda: [s.state for s in rig.supervisor.statuses()] == ["connecting"])
        assert len(rig.workers) == 1  # still restarting
        assert rig.workers[0].is_alive()
        assert rig.supervisor.start_sync(address)
        assert not rig.supervisor.start_sync("nobody@example.com")
        wait_for(lambda: len(rig.workers) == 2 and rig.workers[1].jobs == ["start_sync"])

    rig.run(driver)
    assert rig.workers[0].jobs == []


def test_a_registered_mailbox_restarts_on_a_branch_change_without_two_workers_at_once(
    make_rig: Callable[..., Rig], store: Store
) -> None:
    """A branch change restarts only the registered mailboxes on it, by the same rule as a
    reload: the replacement (with the new server) starts once the slow old worker ended;
    Stop Email Sync then retires it and forgets it."""
    rig = make_rig(1, stop_seconds=lambda address, generation: 1.0 if generation == 1 else 0.0)
    address, other = "self@example.com", rig.addresses[0]
    assert isinstance(store, Registry)
    store.put_branch(RegisteredBranch("high-street", "127.0.0.1", 1, "none"))
    blob = rig.supervisor.vault.encrypt("pw", address)
    store.put_mailbox(
        RegisteredMailbox(address, "high-street", "password", address, True, False), blob
    )

    def driver() -> None:
        wait_for(lambda: rig.census.running(address, 1) and rig.census.running(other, 1))
        assert rig.supervisor.registrar.put_branch("high-street", "127.0.0.2", 1, "none") is False
        wait_for(lambda: rig.census.running(address, 2))
        assert rig.workers[-1].mailbox.server.host == "127.0.0.2"
        assert len(rig.census.of(other)) == 1  # the config file's mailbox was left alone
        assert rig.supervisor.registrar.forget_mailbox(address) is True
        assert address not in [s.address for s in rig.supervisor.statuses()]
        assert store.mailbox_secret(address) is None

    rig.run(driver)


class FakeCluster:
    """The cluster as the supervisor sees it; the test plays the lease keeper."""

    instance_id = "here"

    def __init__(self) -> None:
        self.published: list[tuple[str | None, bool]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def healthy(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def owners(self) -> dict[str, str | None]:
        return {"agent0@example.com": "there"}

    def resume(self, address: str) -> bool:
        return False

    def publish_sync(self, address: str | None, *, include_stuck: bool = False) -> None:
        self.published.append((address, include_stuck))


def test_lease_hooks_never_run_two_workers_and_each_worker_writes_through_its_fence(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """The keeper's run_mailbox for a mailbox whose worker is slow to stop starts the new one
    (with the new fenced store) only once the old one ended; drop_mailboxes' answer waits
    for the worker to end (the lease is released after it), the mailbox is then ``remote`` with its
    owner, and a Start Sync for it is published with include_stuck."""
    cluster = FakeCluster()
    rig = make_rig(
        1,
        stop_seconds=lambda address, generation: 0.6 if generation == 1 else 0.0,
        cluster_factory=lambda supervisor: cluster,
    )
    address = rig.addresses[0]
    fenced = [open_store(f"sqlite:///{tmp_path / f'fence{n}.db'}", tmp_path) for n in (1, 2)]

    def driver() -> None:
        assert rig.supervisor.run_mailbox(address, fenced[0])
        wait_for(lambda: rig.census.running(address, 1))
        assert rig.supervisor.run_mailbox(address, fenced[1])  # a new fence, same mailbox
        wait_for(lambda: rig.census.running(address, 2))
        assert [w.store for w in rig.workers] == fenced
        # Running, then IDLE a moment later (its state is set on its own thread).
        wait_for(
            lambda: [(s.state, s.owner) for s in rig.supervisor.statuses()] == [("idle", "here")]
        )
        assert rig.supervisor.drop_mailboxes([address])(5.0)  # asked at once, then waited for
        assert all(life.ended is not None for life in rig.census.of(address))
        assert [(s.state, s.owner) for s in rig.supervisor.statuses()] == [("remote", "there")]
        assert rig.supervisor.start_sync(address, include_stuck=True)
        assert cluster.published == [(address, True)]

    try:
        rig.run(driver)
    finally:
        for each in fenced:
            each.close()
    assert rig.census.most_alive[address] == 1
    first, second = rig.census.of(address)
    assert first.ended is not None
    assert second.started >= first.ended
    assert second.ended is not None  # forgotten: its worker stopped too


class Joiner:
    """A second instance's workers, as its lease keeper sees them: when each one started."""

    def __init__(self, mailboxes: list[str]) -> None:
        self.mailboxes = mailboxes
        self.started: dict[str, float] = {}

    def wanted_mailboxes(self) -> list[str]:
        return self.mailboxes

    def acquire_mailbox(self, address: str, fence: Fence, owed: OwedStartSync | None) -> None:
        self.started[address] = time.monotonic()

    def release_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        for address in addresses:
            self.started.pop(address, None)
        return lambda timeout: True


def test_a_slow_worker_stop_does_not_freeze_the_lease_keeper(
    make_rig: Callable[..., Rig], pg_url: str
) -> None:
    """Issue 19 #8: an instance hands two of its four leases to a joining one, and those
    workers need 4 s to stop, longer than the 3 s lease. The keeper keeps renewing meanwhile:
    none of the instance's leases expires (no loss, the two it keeps stay its own), and the
    other instance gets each handed-back mailbox only once its old worker has ended."""
    lease = 3.0
    store = PostgresStore(pg_url)
    cluster_registry = CollectorRegistry()
    made: list[Cluster] = []

    def cluster_factory(supervisor: Supervisor) -> Cluster:
        settings = ClusterSettings(instance_id="here", lease_seconds=lease)
        made.append(Cluster(store, supervisor, settings, cluster_registry))
        return made[0]

    rig = make_rig(
        4,
        stop_seconds=lambda address, generation: 4.0 if generation == 1 else 0.0,
        cluster_factory=cluster_factory,
    )
    joiner = Joiner(rig.addresses)
    other = LeaseKeeper(
        LeaseTable(store, "there", lease),
        joiner,
        ClusterMetrics(CollectorRegistry()),
        lease_seconds=lease,
        announce_first=False,
    )
    ended_before_taken: list[bool] = []

    def driver() -> None:
        wait_for(lambda: all_running(rig, 1), timeout=20)
        other.tick()  # "there" is live: "here"'s share drops to 2
        wait_for(lambda: len(made[0].keeper.owned()) == 2)
        kept = set(made[0].keeper.owned())
        while len(joiner.started) < 2:
            other.tick()
            time.sleep(0.2)
        for address, started in joiner.started.items():
            [life] = rig.census.of(address)
            ended_before_taken.append(life.ended is not None and life.ended <= started)
        assert set(joiner.started) == set(rig.addresses) - kept
        assert set(made[0].keeper.owned()) == kept
        assert all(made[0].keeper.holds(fence) for fence in made[0].keeper.owned().values())

    try:
        rig.run(driver, timeout=60)
        assert ended_before_taken == [True, True]
        assert cluster_registry.get_sample_value("emailsync_lease_losses_total") == 0
    finally:
        store.close()
