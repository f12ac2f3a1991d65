"""The daemon under trouble: a server that stops answering, no IDLE, IDLE renewal, folders
deleted under it. Each test runs ``emailsync run`` as a subprocess against real Dovecot."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailsync.dev.dovecot import Dovecot, DovecotOptions

from .conftest import MailUser, new_user
from .daemonproc import RunningDaemon, run_cli, wait_until
from .faultproxy import FaultProxy
from .test_daemon import DaemonFactory, imap_pids, wait_filed
from .test_filing import ROOT, build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot

GROUPS = {"Smith": ["john@clients.example"]}


@pytest.fixture
def dovecot_without_idle() -> Iterator[Dovecot]:
    server = Dovecot(None, DovecotOptions(without_capabilities=("IDLE",)))
    server.start()
    yield server
    server.close()


def folder_names(user: MailUser) -> set[str]:
    with user.client() as client:
        return {name for _, _, name in client.list_folders()}


def delete_folder(user: MailUser, folder: str) -> None:
    """Delete a folder of the tree behind the daemon's back."""
    with user.client() as client:
        client.delete_folder(f"{ROOT}.{folder}")


def state_is(daemon_metric: object, address: str, state: str) -> bool:
    return daemon_metric("emailsync_mailbox_state", mailbox=address, state=state) == 1  # type: ignore[operator]


def idle_daemon(daemons: DaemonFactory, user: MailUser, **options: Any) -> RunningDaemon:
    """A daemon (``options`` for ``DaemonFactory.start``) whose mailbox has gone idle."""
    daemon = daemons.start([user], groups=GROUPS, **options)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    return daemon


def test_a_server_that_stops_answering_is_dropped_and_reconnected(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start(
        [user], groups=GROUPS, idle_renew_seconds=1, timeout_seconds=2, max_backoff_seconds=1
    )
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    (frozen,) = imap_pids(user.server, user.address)
    os.kill(int(frozen), signal.SIGSTOP)  # the connection stays open but nothing answers
    try:
        wait_until(
            lambda: daemon.metric(
                "emailsync_connection_errors_total", mailbox=user.address, kind="timeout"
            ),
            timeout=20,
        )
        queue(user, build_message("john@clients.example", user.address, "after the freeze"))
        wait_filed(user, "Received", "after the freeze", timeout=20)
    finally:
        os.kill(int(frozen), signal.SIGKILL)


def test_a_server_without_idle_is_polled(
    dovecot_without_idle: Dovecot, daemons: DaemonFactory
) -> None:
    user = new_user(dovecot_without_idle)
    daemon = idle_daemon(daemons, user, poll_seconds=1)
    queue(user, build_message("john@clients.example", user.address, "polled"))
    wait_filed(user, "Received", "polled", timeout=10)
    # The pass is counted when it ends, a moment after its MOVE is visible to another client.
    wait_until(
        lambda: (
            daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="poll") >= 1
        )
    )
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="idle") == 0


def test_idle_is_renewed_and_mail_still_arrives(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    # The proxy injects nothing here: it counts the daemon's commands.
    daemon = idle_daemon(daemons, user, idle_renew_seconds=1, proxy=fault_proxy)
    (pid_before,) = imap_pids(user.server, user.address)
    idles_before = fault_proxy.commands(r"^\S+ IDLE$")
    time.sleep(3.5)  # three renewals: DONE, NOOP, IDLE again on the same connection
    renewals = fault_proxy.commands(r"^\S+ IDLE$") - idles_before
    assert renewals >= 2, fault_proxy.connections[-1].commands[-12:]  # 3 due; 1 of slack
    assert fault_proxy.commands(r"^DONE$") >= renewals
    assert len(fault_proxy.connections) == 1
    assert imap_pids(user.server, user.address) == {pid_before}
    assert (
        daemon.metric("emailsync_connection_errors_total", mailbox=user.address, kind="timeout")
        == 0
    )
    queue(user, build_message("john@clients.example", user.address, "after renewals"))
    wait_filed(user, "Received", "after renewals", timeout=10)


def test_a_folder_deleted_while_running_is_recreated(
    user: MailUser, daemons: DaemonFactory
) -> None:
    idle_daemon(daemons, user, max_backoff_seconds=1)
    delete_folder(user, "Failed")
    queue(user, build_message("nobody@else.example", user.address, "needs failed"))
    wait_filed(user, "Failed", "needs failed", timeout=15)
    assert folder_subjects(user, "Queue") == {}


def test_a_deleted_queue_is_recreated_and_watched_again(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = idle_daemon(daemons, user, max_backoff_seconds=1)
    delete_folder(user, "Queue")
    wait_until(lambda: f"{ROOT}.Queue" in folder_names(user), timeout=15)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    queue(user, build_message("john@clients.example", user.address, "new queue"))
    wait_filed(user, "Received", "new queue", timeout=15)


def refused_logins_in_dovecot_log(server: Dovecot, address: str) -> int:
    """Failed logins of one user in Dovecot's log, which the whole session shares."""
    text = server.log_path.read_text(encoding="utf-8", errors="replace")
    return sum(
        1 for line in text.splitlines() if f"user=<{address}>" in line and "auth failed" in line
    )


def test_start_sync_on_a_refused_login_causes_one_login_not_a_storm(
    user: MailUser, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Issue 7 defect 1: the password was changed elsewhere; Start Sync (CLI, API, SIGUSR1,
    in a burst) brings at most one login forward, and none before the back-off slot."""
    daemon = idle_daemon(daemons, user, max_backoff_seconds=1, reauth_retry_seconds=3600)
    (tmp_path / "secrets" / user.address).write_text("changed-elsewhere\n")
    user.server.kick(user.address)
    wait_until(lambda: state_is(daemon.metric, user.address, "needs_reauth"))
    assert daemon.metric("emailsync_auth_failures_total", mailbox=user.address) == 1

    result = run_cli(daemon.config, "start-sync", user.address)
    assert result.returncode == 0, result.stderr
    # The one login it may cause comes within the back-off slot (max_backoff_seconds = 1).
    wait_until(lambda: daemon.metric("emailsync_auth_failures_total", mailbox=user.address) == 2, 5)
    for _ in range(5):
        assert daemon.post(f"/v1/mailboxes/{user.address}/sync")[0] == 202
    daemon.signal(signal.SIGUSR1)
    assert run_cli(daemon.config, "start-sync", user.address).returncode == 0
    time.sleep(3)  # three back-off slots go by

    # No more logins, though the daemon saw the burst (the positive signal).
    assert refused_logins_in_dovecot_log(user.server, user.address) == 2
    assert daemon.metric("emailsync_auth_failures_total", mailbox=user.address) == 2
    assert daemon.log().count('"start_sync_waits"') >= 3
    assert state_is(daemon.metric, user.address, "needs_reauth")


def test_mail_that_lands_just_before_idle_is_filed_at_once(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    """Issue 7 defect 8: Dovecot announces mail that landed before IDLE right after
    ``+ idling``, often in the same read; it must be filed at once, not at the next sweep."""
    appended: list[float] = []

    def append_before_idle() -> None:
        queue(user, build_message("john@clients.example", user.address, "just before idle"))
        appended.append(time.monotonic())

    daemon = daemons.start([user], groups=GROUPS, proxy=fault_proxy)
    wait_until(lambda: fault_proxy.commands(r" IDLE$") == 1)  # the first IDLE is under way
    fault_proxy.before_client_command(r" IDLE$", append_before_idle)
    # Start Sync: a pass, then IDLE again, which the proxy holds for the APPEND.
    assert daemon.post(f"/v1/mailboxes/{user.address}/sync")[0] == 202
    wait_until(lambda: appended, timeout=10)
    wait_filed(user, "Received", "just before idle", timeout=10)
    assert time.monotonic() - appended[0] < 3.0
    assert fault_proxy.faults["callback"] == 1
    # The pass is counted once it ends, a moment after its MOVE shows in Received.
    wait_until(
        lambda: (
            daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="idle") >= 1
        ),
        timeout=5,
    )
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="sweep") == 0
