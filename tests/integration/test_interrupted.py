"""Passes interrupted on purpose: stop and reload mid-pass, SIGTERM during a MOVE, UIDVALIDITY
changed under the daemon, the needs_reauth slow retry, and many HTTP clients at once.

The fault proxy's hooks make the timing exact: a callback runs when the daemon sends a given
command, so "during a pass" means during one, not "probably, after a sleep".
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import MailUser
from .daemonproc import DaemonFactory, RunningDaemon, run_cli, wait_until
from .faultproxy import Connection, FaultProxy
from .mailenv import session_log
from .test_daemon import imap_pids
from .test_filing import ROOT, build_message, everywhere, folder_ids, message_id, queue

pytestmark = pytest.mark.dovecot

CLIENT = "john@clients.example"
GROUPS = {"Smith": [CLIENT]}


def inbound(user: MailUser, count: int, label: str) -> list[bytes]:
    """``count`` linked inbound messages (they go to Received)."""
    return [build_message(CLIENT, user.address, f"{label} {i}") for i in range(count)]


def queued(daemons: DaemonFactory, user: MailUser, count: int, label: str) -> list[bytes]:
    """``count`` linked inbound messages waiting in Queue before the daemon starts (its folder
    tree made by ``emailsync setup``)."""
    messages = inbound(user, count, label)
    result = run_cli(daemons.write([user]), "setup", user.address)
    assert result.returncode == 0, result.stderr
    queue(user, *messages)
    return messages


def each_once(user: MailUser, messages: list[bytes]) -> None:
    assert everywhere(user) == Counter(message_id(raw) for raw in messages)


def idle(daemon: RunningDaemon, user: MailUser) -> bool:
    return daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1


def not_overlapping(connections: list[Connection]) -> bool:
    """True when each of these connections was opened after the one before sent LOGOUT (or
    was closed): never two sessions at work at the same time."""
    spans = sorted((c.opened, c.logout_at or c.closed or float("inf")) for c in connections)
    return all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


def test_sigterm_between_fetch_batches_finishes_the_batch_and_leaves_the_rest(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    messages = queued(daemons, user, 10, "batched")

    # SIGTERM arrives while the first batch's FETCH is on its way to the server (the
    # callback runs in the proxy once the daemon below is started). The proxy holds that
    # FETCH (and what is pipelined behind it) for a second, so the stop has reached the
    # worker before any answer does, however loaded the machine: without the hold, a worker
    # faster than the signal's way through the main loop could file more batches first.
    def stop_then_hold() -> None:
        daemon.signal(signal.SIGTERM)
        time.sleep(1.0)

    fault_proxy.before_client_command(r"UID FETCH", stop_then_hold, times=1)
    daemon = daemons.start([user], groups=GROUPS, proxy=fault_proxy, fetch_batch=3, ready=False)
    assert daemon.process.wait(20) == 0
    assert fault_proxy.faults["callback"] == 1
    received = folder_ids(user, "Received")
    assert sum(received.values()) == 3  # the batch in flight, and no more
    assert sum(folder_ids(user, "Queue").values()) == 7
    each_once(user, messages)
    (conn,) = fault_proxy.connections
    assert conn.commands[-1].endswith("LOGOUT")


def test_sigterm_during_a_move_ends_within_the_timeout_and_nothing_doubles(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemons.start([user], groups=GROUPS, proxy=fault_proxy, timeout_seconds=2)
    wait_until(lambda: idle(daemon, user))
    fault_proxy.stall_on(r"UID MOVE")  # the server moves; its answer never comes
    messages = inbound(user, 3, "moving")
    queue(user, *messages)
    wait_until(lambda: fault_proxy.faults["stall_on"] == 1)
    started = time.monotonic()
    code = daemon.stop()
    assert code == 0
    assert time.monotonic() - started < 2 + 5  # the MOVE's timeout, then out
    # Started again without faults: whatever state the MOVE left, each message is filed once.
    fault_proxy.clear()
    again = daemons.start([user], groups=GROUPS, proxy=fault_proxy)
    wait_until(lambda: idle(again, user))
    wait_until(lambda: not folder_ids(user, "Queue"))
    each_once(user, messages)
    timeline = run_cli(again.config, "timeline", "--json")
    assert timeline.returncode == 0
    assert len(timeline.stdout.splitlines()) == 3


def test_reload_during_a_pass_restarts_the_mailbox_without_two_live_connections(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    messages = queued(daemons, user, 12, "reloaded")

    def change_and_reload() -> None:  # in the proxy, once the daemon below is started
        text = daemon.config.read_text()
        section = f'address = "{user.address}"'
        daemon.config.write_text(text.replace(section, f'{section}\naliases = ["x@y.example"]'))
        daemon.signal(signal.SIGHUP)

    fault_proxy.before_client_command(r"UID FETCH", change_and_reload, times=1)
    daemon = daemons.start([user], groups=GROUPS, proxy=fault_proxy, fetch_batch=2, ready=False)
    daemon.wait_ready()
    wait_until(lambda: daemon.notify.seen("RELOADING=1"))
    wait_until(lambda: not folder_ids(user, "Queue"), 20)
    wait_until(lambda: idle(daemon, user))
    each_once(user, messages)
    assert daemon.mailboxes()[user.address]["state"] == "idle"
    assert len(fault_proxy.connections) == 2  # the changed mailbox restarted, once
    assert not_overlapping(fault_proxy.connections)  # never two workers on one Queue
    assert fault_proxy.connections[0].commands[-1].endswith("LOGOUT")


def set_uidvalidity(user: MailUser, value: int) -> None:
    user.server.doveadm(
        "mailbox", "update", "-u", user.address, "--uid-validity", str(value), f"{ROOT}.Queue"
    )


def queue_uidvalidity(user: MailUser) -> int:
    with user.client() as client:
        return int(client.folder_status(f"{ROOT}.Queue", ["UIDVALIDITY"])[b"UIDVALIDITY"])


def test_uidvalidity_changed_between_passes_is_noticed_and_mail_still_filed_once(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    daemon = daemons.start(
        [user], groups=GROUPS, proxy=fault_proxy, max_backoff_seconds=1, idle_renew_seconds=1
    )
    wait_until(lambda: idle(daemon, user))
    first = inbound(user, 2, "before the change")
    queue(user, *first)
    wait_until(lambda: sum(folder_ids(user, "Received").values()) == 2)
    old = queue_uidvalidity(user)
    set_uidvalidity(user, old + 1000)
    assert queue_uidvalidity(user) == old + 1000
    # Dovecot refuses a session whose selected mailbox changed UIDVALIDITY when it next syncs
    # it (BYE, or "IMAP session state is inconsistent" to the next command: the renewal is
    # within a second); had it not, the daemon's re-select after a pass would
    # (folder_changed). Either way: one new session; the old UIDs are not trusted.
    wait_until(lambda: fault_proxy.logins(user.address) == 2)
    log = daemon.log()
    assert "folder_changed" in log or "connection_lost" in log
    later = inbound(user, 2, "after the change")
    queue(user, *later)
    wait_until(lambda: sum(folder_ids(user, "Received").values()) == 4, 15)
    wait_until(lambda: idle(daemon, user))
    assert fault_proxy.logins(user.address) == 2
    each_once(user, first + later)


def test_uidvalidity_changed_mid_pass_files_each_message_once(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    messages = queued(daemons, user, 8, "mid-pass change")
    old = queue_uidvalidity(user)
    fault_proxy.before_client_command(r"UID MOVE", lambda: set_uidvalidity(user, old + 7), times=1)
    daemon = daemons.start(
        [user], groups=GROUPS, proxy=fault_proxy, fetch_batch=2, max_backoff_seconds=1
    )
    wait_until(lambda: fault_proxy.faults["callback"] == 1)
    wait_until(lambda: not folder_ids(user, "Queue"), 20)
    wait_until(lambda: idle(daemon, user))
    assert queue_uidvalidity(user) == old + 7
    each_once(user, messages)


def test_the_needs_reauth_slow_retry_fires_and_recovers_without_a_start_sync(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemons.start(
        [user], groups=GROUPS, proxy=fault_proxy, reauth_retry_seconds=1, max_backoff_seconds=1
    )
    wait_until(lambda: idle(daemon, user))
    password_file = tmp_path / "secrets" / user.address
    password_file.write_text("wrong-password\n")
    fault_proxy.drop()
    wait_until(
        lambda: (
            daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="needs_reauth")
            == 1
        )
    )
    failures = daemon.metric("emailsync_auth_failures_total", mailbox=user.address) or 0
    time.sleep(4.5)  # slow retries due every second (plus the refused LOGIN's own time)
    retried = (daemon.metric("emailsync_auth_failures_total", mailbox=user.address) or 0) - failures
    assert retried >= 2  # the slow retry fires ...
    opened = [c.opened for c in fault_proxy.connections[1:]]  # after the drop: the retries
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert min(gaps) >= 0.95, gaps  # ... and only on its schedule, never hammering
    # The password is fixed; the next slow retry logs in without anyone pressing Start Sync.
    password_file.write_text(user.password + "\n")
    queue(user, *inbound(user, 1, "after the retry"))
    wait_until(lambda: idle(daemon, user), 5)
    wait_until(lambda: sum(folder_ids(user, "Received").values()) == 1, 5)


def test_many_concurrent_http_clients_are_all_answered(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """48 clients at once (below any sane cap): every request 200. 128 at once: each one
    answered, 200 or 503 with Retry-After (a cap's answer), never a dropped connection."""
    daemon = daemons.start([user])
    wait_until(lambda: idle(daemon, user))
    paths = ["/healthz", "/readyz", "/metrics", "/v1/mailboxes"]

    def call(i: int) -> tuple[str, int]:
        path = paths[i % len(paths)]
        token = None if path in ("/healthz", "/readyz", "/metrics") else "default"
        return path, daemon.get(path, token=token)[0]

    for clients, allowed in ((48, {200}), (128, {200, 503})):
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            answers = list(pool.map(call, range(clients * 8)))
        assert time.monotonic() - started < 30
        wrong = [a for a in answers if a[1] not in allowed]  # 0: no HTTP answer at all
        assert not wrong, f"{len(wrong)} of {len(answers)} with {clients} clients: {wrong[:5]}"
    status = json.loads(daemon.get("/v1/mailboxes")[1])
    assert status["mailboxes"][0]["state"] == "idle"
    assert daemon.process.poll() is None
    (pid,) = imap_pids(user.server, user.address)  # the IMAP side never noticed
    assert not any("Disconnected" in line for line in session_log(user.server, user.address, pid))
