"""APPEND→filed latency of the running daemon, against Dovecot's own IDLE notification delay.

The daemon runs as a subprocess with its sweep and poll an hour away, so only IDLE can
trigger a pass. Messages are APPENDed to Queue one at a time, each once the daemon is idle
again. For each, two clocks start when APPEND returns: one stops when a second connection's
``STATUS Queue (MESSAGES)`` (every POLL_SECONDS) sees the Queue empty (emailsync's latency),
the other when a bare imapclient IDLE client on the same Queue receives ``EXISTS`` (the
baseline: the server's notification delay, 0.5 s on Dovecot, DESIGN.md §2). Both clocks run
on the same message, so the difference is what emailsync adds on top of the server.

Dovecot arms a client's 0.5 s notification timer at the first change it sees in the mailbox,
so the next APPEND waits until the IDLE client has been told of the previous message's
EXPUNGE: otherwise that timer, already running, would announce the new message early.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imapclient
from corpus import BenchMessage, make_corpus
from daemonproc import DaemonProcess
from testbed import OWNER_ALIAS, BenchMailbox, Testbed, append_one, folder_counts
from throughput import expected_counts

from emailsync.dev.net import free_port
from emailsync.model import FolderRole

POLL_SECONDS = 0.01
GONE_TIMEOUT_SECONDS = 10.0
EXISTS_TIMEOUT_SECONDS = 5.0
IDLE_TIMEOUT_SECONDS = 10.0
# After the daemon reports "idle" it still has to send IDLE; give it that long.
SETTLE_SECONDS = 0.05
IDLE_CHECK_SECONDS = 0.2
FILED_COUNTERS = (
    "emailsync_messages_synced_total",
    "emailsync_messages_received_total",
    "emailsync_messages_failed_total",
)


@dataclass
class LatencyResult:
    """Per-message latencies (seconds) and what went wrong, if anything."""

    emailsync: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    # The daemon's own emailsync_filing_latency_seconds histogram: its sum / count.
    histogram_mean: float | None = None
    problems: list[str] = field(default_factory=list)


class IdleWatcher(threading.Thread):
    """A bare imapclient client IDLE on a folder (RFC 2177); timestamps every new EXISTS."""

    def __init__(self, mailbox: BenchMailbox, folder: str) -> None:
        super().__init__(name="idle-watcher", daemon=True)
        self.client = mailbox.client()
        self.exists = int(self.client.select_folder(folder, readonly=True)[b"EXISTS"])
        self.arrivals: queue.Queue[float] = queue.Queue()
        self.error: BaseException | None = None
        self.empty = threading.Event()  # set while the folder, as told to this client, is empty
        if self.exists == 0:
            self.empty.set()
        self._running = True

    def run(self) -> None:
        """IDLE until ``stop()``, putting the perf_counter time of each arrival in a queue."""
        try:
            self.client.idle()
            while self._running:
                self._take(self.client.idle_check(timeout=IDLE_CHECK_SECONDS))
            self.client.idle_done()
        except Exception as exc:  # reported by the bench, not raised in a thread
            self.error = exc

    def _take(self, responses: Sequence[Any]) -> None:
        now = time.perf_counter()
        for response in responses:
            if len(response) < 2 or not isinstance(response[0], int):
                continue
            if response[1] == b"EXISTS":
                if response[0] > self.exists:
                    self.arrivals.put(now)
                self.exists = response[0]
            elif response[1] == b"EXPUNGE":
                self.exists = max(0, self.exists - 1)
        if self.exists == 0:
            self.empty.set()
        else:
            self.empty.clear()

    def next_arrival(self, timeout: float) -> float | None:
        """The time of the next EXISTS, or None when none came within ``timeout``."""
        try:
            return self.arrivals.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Forget arrivals not yet taken."""
        while not self.arrivals.empty():
            self.arrivals.get_nowait()

    def stop(self) -> None:
        """Leave IDLE, log out and end the thread."""
        self._running = False
        self.join(IDLE_CHECK_SECONDS * 10)
        self.client.logout()


def run_latency(testbed: Testbed, count: int, seed: int, log_dir: Path) -> LatencyResult:
    """Start the daemon on a fresh mailbox and time ``count`` messages one by one."""
    port = free_port()
    mailbox = testbed.new_mailbox(daemon_extra=_daemon_settings(port))
    rng = random.Random(seed)  # noqa: S311 -- test data, not cryptography
    corpus = make_corpus(count, OWNER_ALIAS, testbed.directory, rng)
    result = LatencyResult()
    with DaemonProcess(mailbox.config_path, port, log_dir / "daemon.log") as daemon:
        daemon.wait_ready()
        _time_messages(daemon, mailbox, corpus, result)
        result.problems.extend(_check_metrics(daemon, mailbox.address, corpus))
        result.histogram_mean = _histogram_mean(daemon)
        code = daemon.stop()
        if code != 0:
            result.problems.append(f"daemon exited {code} on SIGTERM:\n{daemon.log_tail()}")
    return result


def _daemon_settings(port: int) -> str:
    # The sweep and poll an hour away, so only IDLE starts a pass.
    return (
        f'listen = "127.0.0.1:{port}"\nsweep_seconds = 3600\npoll_seconds = 3600\n'
        'log_format = "json"\nlog_level = "info"\n'
    )


def _time_messages(
    daemon: DaemonProcess,
    mailbox: BenchMailbox,
    corpus: Sequence[BenchMessage],
    result: LatencyResult,
) -> None:
    queue_name = mailbox.tree.queue
    watcher = IdleWatcher(mailbox, queue_name)
    watcher.start()
    appender, poller = mailbox.client(), mailbox.client()
    try:
        for number, message in enumerate(corpus, start=1):
            if not watcher.empty.wait(EXISTS_TIMEOUT_SECONDS):
                result.problems.append(f"message {number}: no EXPUNGE at the IDLE client")
                return
            if not _wait_daemon_idle(daemon, mailbox.address):
                result.problems.append(f"message {number}: daemon not idle")
                return
            watcher.drain()
            append_one(appender, queue_name, message)
            appended = time.perf_counter()
            gone = _wait_gone(poller, queue_name)
            arrived = watcher.next_arrival(EXISTS_TIMEOUT_SECONDS)
            if gone is None:
                result.problems.append(f"message {number}: still in Queue after 10 s")
                return
            result.emailsync.append(gone - appended)
            if arrived is None:
                result.problems.append(f"message {number}: no EXISTS at the IDLE client")
            else:
                result.baseline.append(arrived - appended)
        result.problems.extend(_check_folders(poller, mailbox, corpus))
    finally:
        watcher.stop()
        if watcher.error is not None:
            result.problems.append(f"IDLE client failed: {watcher.error!r}")
        appender.logout()
        poller.logout()


def _wait_daemon_idle(daemon: DaemonProcess, address: str) -> bool:
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if daemon.metric("emailsync_mailbox_state", mailbox=address, state="idle") == 1:
            time.sleep(SETTLE_SECONDS)
            return True
        time.sleep(POLL_SECONDS)
    return False


def _wait_gone(poller: imapclient.IMAPClient, folder: str) -> float | None:
    """The perf_counter time at which STATUS first shows ``folder`` empty."""
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if int(poller.folder_status(folder, [b"MESSAGES"])[b"MESSAGES"]) == 0:
            return time.perf_counter()
        time.sleep(POLL_SECONDS)
    return None


def _check_folders(
    client: imapclient.IMAPClient, mailbox: BenchMailbox, corpus: Sequence[BenchMessage]
) -> list[str]:
    counts = folder_counts(client, mailbox.tree)
    want = expected_counts(corpus)
    return [
        f"latency: {counts[role]} in {role.value}, want {want[role]}"
        for role in FolderRole
        if counts[role] != want[role]
    ]


def _check_metrics(
    daemon: DaemonProcess, address: str, corpus: Sequence[BenchMessage]
) -> list[str]:
    filed = sum(
        value
        for (name, labels), value in daemon.metrics().items()
        if name in FILED_COUNTERS and ("mailbox", address) in labels
    )
    if filed != len(corpus):
        return [f"latency: daemon counted {filed:.0f} filed, want {len(corpus)}"]
    return []


def _histogram_mean(daemon: DaemonProcess) -> float | None:
    total = daemon.metric("emailsync_filing_latency_seconds_sum")
    count = daemon.metric("emailsync_filing_latency_seconds_count")
    return total / count if total is not None and count else None
