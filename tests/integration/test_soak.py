"""Soak: many mailboxes receive mail continuously while the fault proxy breaks connections.

``make test`` runs a short version (20 mailboxes, 20 s); ``make soak`` runs issue 7's full one
(200 mailboxes, 10 minutes) through the environment variables below. The short one makes the
same checks on ~80 messages and ~8 faults, the kinds drawn without repeats until each has come
once (``Bag``), so that it meets nearly every kind of fault each run. Mail is appended
straight to Dovecot; the daemon reaches Dovecot only through ``FaultProxy``, which injects a
random fault every few seconds. At the end, with faults off, every Queue must drain and:

- nothing lost, nothing doubled: per mailbox, the multiset of Message-IDs across Sent,
  Received, Failed and Queue equals what was appended, each once;
- LOGINs per mailbox within the budget: those of the start plus one per connection the
  proxy broke (no reconnect without a cause, no retry storm);
- the daemon's RSS at the end within 10 % of its RSS after the warm-up (minute 2 of 10, or
  the middle of a shorter run).

The figures (messages, faults by kind, LOGINs, RSS) are printed and written to
``soak-report.json`` in the test's directory.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import imapclient
import pytest

from emailsync.dev.dovecot import Dovecot

from .conftest import MailUser, new_user
from .daemonproc import DaemonFactory, RunningDaemon, wait_until
from .faultproxy import FaultProxy
from .test_filing import ROOT, build_message, message_id

pytestmark = pytest.mark.dovecot

SECONDS = float(os.environ.get("EMAILSYNC_SOAK_SECONDS", "20"))
MAILBOXES = int(os.environ.get("EMAILSYNC_SOAK_MAILBOXES", "20"))
MESSAGES_PER_SECOND = float(os.environ.get("EMAILSYNC_SOAK_RATE", "4"))
# Messages per FETCH batch (0: the default). A small one with a high rate keeps several
# batches' FETCHes and MOVEs in flight under the faults (issue 23's pipelining).
FETCH_BATCH = int(os.environ.get("EMAILSYNC_SOAK_BATCH", "0"))
FAULT_EVERY_SECONDS = (1.0, 4.0)  # uniform gap between two faults
# RSS is compared from minute 2 (of 10); a short run compares from its middle.
WARMUP_SECONDS = min(120.0, SECONDS / 2)
RSS_TOLERANCE = 0.10
SWEEP_SECONDS = 20.0  # the safety net for anything IDLE did not announce
DRAIN_SECONDS = SWEEP_SECONDS + 40.0
CLIENT = "john@clients.example"
FOLDERS = ("Sent", "Received", "Failed", "Queue")


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Background:
    """Work on a daemon thread of its own (``_run``), from ``start()`` until ``stop()``."""

    def __init__(self, name: str, join_seconds: float = 30.0) -> None:
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._join_seconds = join_seconds

    def start(self) -> None:
        self._running.set()
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait for it (the step under way finishes)."""
        self._running.clear()
        self._thread.join(self._join_seconds)

    def _run(self) -> None:
        raise NotImplementedError

    def _pause(self, rng: random.Random, seconds: tuple[float, float]) -> bool:
        """Sleep a random time within ``seconds``; False (at once, or after) once stopping."""
        if not self._running.is_set():
            return False
        time.sleep(rng.uniform(*seconds))
        return self._running.is_set()


class MailSource(Background):
    """Appends mail to random mailboxes' Queues, straight to Dovecot, at a steady rate."""

    def __init__(self, users: list[MailUser], rate: float, rng: random.Random) -> None:
        super().__init__("mail-source")
        self.users = users
        self.rate = rate
        self.rng = rng
        self.appended: dict[str, list[str]] = {u.address: [] for u in users}
        self.subjects: list[str] = []  # of the messages appended, in order
        self._clients: dict[str, imapclient.IMAPClient] = {}
        self.errors: list[str] = []

    def stop(self) -> None:
        super().stop()
        for client in self._clients.values():
            try:
                client.logout()
            except (imapclient.exceptions.IMAPClientError, OSError):
                client.shutdown()

    def total(self) -> int:
        return sum(len(ids) for ids in self.appended.values())

    def _run(self) -> None:
        kinds: dict[str, Callable[[MailUser, str], bytes]] = {
            "out": lambda u, subject: build_message(u.address, CLIENT, subject),
            "in": lambda u, subject: build_message(CLIENT, u.address, subject),
            "stray": lambda u, subject: build_message("stranger@else.example", u.address, subject),
        }
        n = 0
        while self._running.is_set():
            user = self.rng.choice(self.users)
            n += 1
            kind = self.rng.choice(list(kinds))
            subject = f"soak {n} {kind}"
            raw = kinds[kind](user, subject)
            try:
                self._client(user).append(f"{ROOT}.Queue", raw)
            except (imapclient.exceptions.IMAPClientError, OSError) as exc:
                self.errors.append(repr(exc))
                self._clients.pop(user.address, None)
                continue
            self.appended[user.address].append(message_id(raw))
            self.subjects.append(subject)
            time.sleep(self.rng.expovariate(self.rate))

    def _client(self, user: MailUser) -> imapclient.IMAPClient:
        if user.address not in self._clients:
            self._clients[user.address] = user.client()
        return self._clients[user.address]


class Bag:
    """Random draws that repeat nothing until every item has come once (then a new round):
    a short run meets as many kinds as it has draws, where ``random.choice`` could draw the
    same kind three times and never another."""

    def __init__(self, items: tuple[str, ...], rng: random.Random) -> None:
        self.items = items
        self.rng = rng
        self._left: list[str] = []

    def draw(self) -> str:
        if not self._left:
            self._left = list(self.items)
            self.rng.shuffle(self._left)
        return self._left.pop()


class FaultInjector(Background):
    """Every few seconds, one random fault on one random connection (or a short trickle)."""

    def __init__(self, proxy: FaultProxy, rng: random.Random) -> None:
        super().__init__("faults")
        self.proxy = proxy
        self.rng = rng
        self.kinds = Bag(IMAP_FAULTS, rng)
        self.injected: Counter[str] = Counter()

    def stop(self) -> None:
        super().stop()
        self.proxy.clear()

    def _run(self) -> None:
        while self._pause(self.rng, FAULT_EVERY_SECONDS):
            self.injected[inject_fault(self.proxy, self.rng, self.kinds.draw())] += 1


IMAP_FAULTS = (
    "drop",
    "stall",
    "half_close",
    "reset",
    "trickle",
    "reset_mid_fetch",
    "reset_mid_idle",
    "reset_mid_move",
    "reset_mid_login",
)


def inject_fault(proxy: FaultProxy, rng: random.Random, kind: str | None = None) -> str:
    """One IMAP fault (``kind``, else a random one) on one random logged-in connection of
    ``proxy``; returns its kind.

    Rules of an earlier fault are cleared first (one at a time; a stall lasts until noticed).
    """
    proxy.clear(resume=False)
    kind = kind or rng.choice(IMAP_FAULTS)
    conns = [c for c in proxy.connections if not c.done and c.users]
    target = rng.choice(conns) if conns else None
    if kind == "drop":
        proxy.drop(target)
    elif kind == "stall":
        proxy.stall_open(target)
    elif kind == "half_close":
        proxy.half_close(target)
    elif kind == "reset":
        proxy.reset_after(rng.randint(0, 200), target)
    elif kind == "trickle":
        proxy.trickle(0.001)
        time.sleep(1)
        proxy.trickle(None)
    elif kind == "reset_mid_fetch":
        proxy.reset_on(r"UID FETCH", after_bytes=rng.randint(0, 500))
    elif kind == "reset_mid_idle":
        proxy.reset_on(r"^\S+ IDLE$")
    elif kind == "reset_mid_move":
        proxy.reset_on(r"UID MOVE")
    elif kind == "reset_mid_login":
        proxy.reset_on(r"^\S+ LOGIN ", forward=False)
        if target is not None:
            proxy.drop(target)  # its reconnect's LOGIN gets the reset
    return kind


def tree_ids(client: imapclient.IMAPClient) -> Counter[str]:
    """Message-ID → copies across the four folders of one mailbox."""
    total: Counter[str] = Counter()
    for folder in FOLDERS:
        client.select_folder(f"{ROOT}.{folder}", readonly=True)
        uids = client.search(["ALL"])
        if uids:
            for data in client.fetch(uids, ["ENVELOPE"]).values():
                total[(data[b"ENVELOPE"].message_id or b"").decode()] += 1
    return total


def queue_empty(client: imapclient.IMAPClient) -> bool:
    return bool(client.select_folder(f"{ROOT}.Queue", readonly=True)[b"EXISTS"] == 0)


@pytest.mark.timeout(SECONDS + DRAIN_SECONDS + 300)
def test_soak_under_random_faults_loses_and_doubles_nothing(
    dovecot: Dovecot, fault_proxy: FaultProxy, daemons: DaemonFactory, tmp_path: Path
) -> None:
    rng = random.Random(int(os.environ.get("EMAILSYNC_SOAK_SEED", "7")))
    users = [new_user(dovecot, "soak") for _ in range(MAILBOXES)]
    daemon = daemons.start(
        users,
        groups={"Smith": [CLIENT]},
        proxy=fault_proxy,
        timeout_seconds=10,
        idle_renew_seconds=10,
        max_backoff_seconds=5,
        sweep_seconds=SWEEP_SECONDS,
        **({"fetch_batch": FETCH_BATCH} if FETCH_BATCH else {}),
    )
    wait_until(lambda: all_idle(daemon, users), 120, 0.5)
    # Hundreds of logins at once can time out before any fault: counted, not held against
    # the budget (the start-up storm is issue 7 defect 4's business).
    logins_at_start = {u.address: fault_proxy.logins(u.address) for u in users}

    source = MailSource(users, MESSAGES_PER_SECOND, rng)
    faults = FaultInjector(fault_proxy, rng)
    started = time.monotonic()
    source.start()
    faults.start()
    time.sleep(WARMUP_SECONDS)
    rss_warm = rss_kib(daemon.process.pid)
    time.sleep(max(0.0, started + SECONDS - time.monotonic()))
    faults.stop()
    source.stop()
    rss_end = rss_kib(daemon.process.pid)

    # Drain: with faults off, every Queue empties on its own (IDLE, or at worst a sweep).
    clients = {u.address: u.client() for u in users}
    try:
        wait_until(lambda: all(queue_empty(c) for c in clients.values()), DRAIN_SECONDS, 1)
        found = {address: tree_ids(c) for address, c in clients.items()}
    finally:
        for c in clients.values():
            c.logout()

    lost = doubled = 0
    logins_over_budget: dict[str, tuple[int, int]] = {}
    for user in users:
        expected = Counter(source.appended[user.address])
        lost += sum((expected - found[user.address]).values())
        doubled += sum(n - 1 for n in found[user.address].values() if n > 1)
        seen = fault_proxy.logins(user.address)
        budget = logins_at_start[user.address] + fault_proxy.faulted(user.address)
        if seen > budget:
            logins_over_budget[user.address] = (seen, budget)
    logins = [fault_proxy.logins(u.address) for u in users]
    report = {
        "mailboxes": MAILBOXES,
        "seconds": SECONDS,
        "messages_appended": source.total(),
        "append_errors": len(source.errors),
        "lost": lost,
        "doubled": doubled,
        "faults_injected": dict(faults.injected),
        "faults_fired": dict(fault_proxy.faults),
        "connections": len(fault_proxy.connections),
        "logins_at_start_extra": sum(logins_at_start.values()) - MAILBOXES,
        "logins_total": sum(logins),
        "logins_per_mailbox_max": max(logins),
        "logins_per_mailbox_mean": round(sum(logins) / len(logins), 2),
        "mailboxes_over_login_budget": len(logins_over_budget),
        "rss_kib_warm": rss_warm,
        "rss_kib_end": rss_end,
        "rss_growth": round(rss_end / rss_warm - 1, 3),
    }
    (tmp_path / "soak-report.json").write_text(json.dumps(report, indent=2))
    print("\nsoak report:", json.dumps(report, indent=2))

    assert source.total() >= SECONDS * MESSAGES_PER_SECOND * 0.5  # mail really flowed
    assert sum(faults.injected.values()) >= SECONDS / FAULT_EVERY_SECONDS[1] * 0.5
    assert lost == 0
    assert doubled == 0
    assert not logins_over_budget, f"LOGINs (seen, budget) per mailbox: {logins_over_budget}"
    assert rss_end <= rss_warm * (1 + RSS_TOLERANCE)
    assert daemon.process.poll() is None


def all_idle(daemon: RunningDaemon, users: list[MailUser]) -> bool:
    idle = {
        labels["mailbox"]
        for labels, value in daemon.samples("emailsync_mailbox_state")
        if labels.get("state") == "idle" and value == 1
    }
    return idle >= {u.address for u in users}
