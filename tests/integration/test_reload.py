"""A full restart under SIGHUP with many mailboxes: the daemon keeps answering, no mailbox
ever holds two connections, and every one is back in IDLE on a new connection."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pytest

from emailsync.dev.dovecot import Dovecot

from .conftest import new_user
from .daemonproc import DaemonFactory, RunningDaemon, wait_until

pytestmark = pytest.mark.dovecot

MAILBOXES = 60
PROBE_SECONDS = 0.2
T = TypeVar("T")


@dataclass
class Watch(Generic[T]):
    """Runs ``probe`` over and over in a thread until ``stop()``; keeps what it returned."""

    probe: Callable[[], T]
    pause: float
    results: list[T] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _running: bool = True

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            try:
                self.results.append(self.probe())
            except Exception as exc:  # reported by the test, not lost in the thread
                self.errors.append(exc)
            time.sleep(self.pause)

    def stop(self) -> list[T]:
        self._running = False
        self._thread.join(30)
        assert not self.errors, self.errors
        return self.results


def connections(server: Dovecot) -> Counter[str]:
    """IMAP connections per user, as Dovecot's anvil counts them (``doveadm who``)."""
    out = server.doveadm("who", "-1", check=False).stdout
    return Counter(line.split()[0] for line in out.splitlines()[1:] if line.strip())


def pids(server: Dovecot) -> dict[str, str]:
    """The imap process serving each connected user (one connection each, here)."""
    out = server.doveadm("who", "-1", check=False).stdout
    return {line.split()[0]: line.split()[-2] for line in out.splitlines()[1:] if line.strip()}


def all_idle(daemon: RunningDaemon, addresses: list[str]) -> bool:
    states = daemon.mailboxes()
    return all(states.get(a, {}).get("state") == "idle" for a in addresses)


def timed_health(daemon: RunningDaemon) -> tuple[float, int]:
    started = time.monotonic()
    status, _ = daemon.get("/healthz", token=None)
    return time.monotonic() - started, status


def test_sighup_restarting_every_mailbox_keeps_healthz_answering_and_one_connection_each(
    dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    users = [new_user(dovecot, prefix="reload") for _ in range(MAILBOXES)]
    addresses = [u.address for u in users]
    daemon = daemons.start(users)
    wait_until(lambda: all_idle(daemon, addresses), timeout=60, interval=0.5)
    before = pids(dovecot)
    assert all(a in before for a in addresses)

    health = Watch(lambda: timed_health(daemon), PROBE_SECONDS)
    who = Watch(lambda: connections(dovecot), 0.0)
    time.sleep(1.0)  # probes before the reload too
    text = daemon.config.read_text()
    assert "sweep_seconds = 3600" in text
    daemon.config.write_text(text.replace("sweep_seconds = 3600", "sweep_seconds = 3599"))
    daemon.signal(signal.SIGHUP)
    try:
        wait_until(lambda: daemon.log().count('"mailbox_restarted"') == MAILBOXES, timeout=30)
        # Back in IDLE, each on a new connection (a new imap process).
        wait_until(
            lambda: (
                all_idle(daemon, addresses)
                and all(pids(dovecot).get(a, before[a]) != before[a] for a in addresses)
            ),
            timeout=60,
            interval=0.5,
        )
        time.sleep(1.0)  # and probes after it
    finally:
        probes = health.stop()
        counts = who.stop()
    slowest = max(seconds for seconds, _ in probes)
    assert len(probes) >= 10
    assert slowest < 1.0, f"/healthz took {slowest:.2f} s during the reload"
    assert {status for _, status in probes} == {200}
    assert len(counts) >= 10  # doveadm who was looking all along
    most = Counter[str]()
    for seen in counts:
        for user, n in seen.items():
            most[user] = max(most[user], n)
    assert all(most[a] == 1 for a in addresses), {a: most[a] for a in addresses if most[a] != 1}
    assert '"reloaded"' in daemon.log()
