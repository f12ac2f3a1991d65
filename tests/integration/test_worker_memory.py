"""Issue 23, memory at scale: a worker waiting in IDLE holds no connection to the state database.

A SQLite connection holds ~160 KB (its parsed schema and page cache): with one kept per
thread, 2,000 idle workers that had each filed a message or looked at the Failed index held
~300 MB of them. SqliteStore lends a thread a pooled connection for one block only, and keeps
a few idle ones: fewer than one a worker, also when the events go to a CRM and only the
Failed index is in the state database.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot

from .daemonproc import DaemonFactory, RunningDaemon, wait_until
from .mailenv import MailUser, new_user
from .test_crm import CLIENT_A, crm, launched, start_daemon
from .test_filing import build_message, folder_subjects, queue

__all__ = ["crm", "launched"]  # fixtures, found by pytest by name

pytestmark = pytest.mark.dovecot

MAILBOXES = 6


def open_descriptors(pid: int, path: Path) -> int:
    """How many descriptors the process has open on ``path``."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd) == str(path)
    return count


def idle(daemon: RunningDaemon, user: MailUser) -> bool:
    return daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1


def file_one_each(daemon: RunningDaemon, users: list[MailUser], sender: str) -> None:
    """Each worker files one message in IDLE (it records an event), then waits again."""
    wait_until(lambda: all(idle(daemon, user) for user in users), 30)
    for user in users:
        queue(user, build_message(sender, user.address, "filed in IDLE"))
    wait_until(
        lambda: all("filed in IDLE" in folder_subjects(user, "Received") for user in users), 30
    )
    wait_until(lambda: all(idle(daemon, user) for user in users), 30)


def state_connections(daemon: RunningDaemon, state_dir: Path) -> int:
    """The daemon's SQLite connections that have read the state database: those with its
    write-ahead log open. (Not the database file: SQLite keeps a closed connection's
    descriptor on it while another connection of the process holds a POSIX lock there,
    which closing it would drop.)"""
    return open_descriptors(daemon.process.pid, state_dir / "emailsync.db-wal")


def test_idle_workers_hold_no_state_connection(
    dovecot: Dovecot, daemons: DaemonFactory, tmp_path: Path
) -> None:
    users = [new_user(dovecot) for _ in range(MAILBOXES)]
    daemon = daemons.start(users, groups={"Smith": ["john@clients.example"]})
    file_one_each(daemon, users, "john@clients.example")
    assert state_connections(daemon, tmp_path / "state") < MAILBOXES


def test_idle_workers_filing_to_a_crm_hold_no_state_connection(
    dovecot: Dovecot, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    users = [new_user(dovecot) for _ in range(MAILBOXES)]
    daemon = start_daemon(tmp_path, users, crm, launched)
    file_one_each(daemon, users, CLIENT_A)
    assert state_connections(daemon, tmp_path / "state") < MAILBOXES
