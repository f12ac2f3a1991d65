"""The daemon under trouble: a server that stops answering, no IDLE, IDLE renewal, folders
deleted under it. Each test runs ``emailsync run`` as a subprocess against real Dovecot."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from emailsync.devserver import Dovecot, DovecotOptions

from .conftest import MailUser, new_user
from .daemonproc import wait_until
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


def state_is(daemon_metric: object, address: str, state: str) -> bool:
    return daemon_metric("emailsync_mailbox_state", mailbox=address, state=state) == 1  # type: ignore[operator]


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
    daemon = daemons.start([user], groups=GROUPS, poll_seconds=1)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    queue(user, build_message("john@clients.example", user.address, "polled"))
    wait_filed(user, "Received", "polled", timeout=10)
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="poll") >= 1
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="idle") == 0


def test_idle_is_renewed_and_mail_still_arrives(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    # The proxy injects nothing here: it counts the daemon's commands.
    daemon = daemons.start([user], groups=GROUPS, idle_renew_seconds=1, proxy=fault_proxy)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
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
    daemon = daemons.start([user], groups=GROUPS, max_backoff_seconds=1)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    with user.client() as client:
        client.delete_folder(f"{ROOT}.Failed")
    queue(user, build_message("nobody@else.example", user.address, "needs failed"))
    wait_filed(user, "Failed", "needs failed", timeout=15)
    assert folder_subjects(user, "Queue") == {}


def test_a_deleted_queue_is_recreated_and_watched_again(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user], groups=GROUPS, max_backoff_seconds=1)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    with user.client() as client:
        client.delete_folder(f"{ROOT}.Queue")
    wait_until(lambda: f"{ROOT}.Queue" in folder_names(user), timeout=15)
    wait_until(lambda: state_is(daemon.metric, user.address, "idle"))
    queue(user, build_message("john@clients.example", user.address, "new queue"))
    wait_filed(user, "Received", "new queue", timeout=15)
