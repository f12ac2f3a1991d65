"""Issue 10, per-mailbox cost: a small read buffer per connection, and a mailbox whose Queue
is empty at login going from SELECT to IDLE with no pass between.

Dovecot logs every finished command here (``log_debug = event=imap_command_finished``), so
the test reads what each daemon session said; a second mailbox with mail queued before the
start shows that the same log does record a pass's SEARCH.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync import cli
from emailsync.dev.dovecot import Dovecot, DovecotOptions
from emailsync.imap.session import READ_BUFFER_BYTES

from .conftest import MailUser, new_user, settings_for, write_config
from .daemonproc import DaemonFactory, RunningDaemon, wait_until
from .mailenv import session_log
from .test_daemon import imap_pids
from .test_filing import build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot

_COMMAND = re.compile(r"Debug: Command finished: (?:UID )?(\w+)")


@pytest.fixture(scope="module")
def logged_dovecot() -> Iterator[Dovecot]:
    """A Dovecot that logs each IMAP command as it finishes."""
    server = Dovecot(None, DovecotOptions(extra_config="log_debug = event=imap_command_finished\n"))
    server.start()
    yield server
    server.close()


def commands(user: MailUser, pid: str) -> list[str]:
    """The commands of one IMAP session, in order (UID SEARCH counts as SEARCH)."""
    return [
        match.group(1)
        for line in session_log(user.server, user.address, pid)
        if (match := _COMMAND.search(line))
    ]


def idle(daemon: RunningDaemon, user: MailUser) -> bool:
    return daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1


def test_an_empty_queue_goes_from_select_to_idle(
    logged_dovecot: Dovecot, daemons: DaemonFactory, tmp_path: Path
) -> None:
    empty, busy = new_user(logged_dovecot), new_user(logged_dovecot)
    config = write_config(tmp_path, [empty, busy])
    for user in (empty, busy):
        assert cli.main(["--config", str(config), "setup", user.address]) == 0
    queue(busy, build_message("john@clients.example", busy.address, "queued before start"))
    daemon = daemons.start([empty, busy], groups={"Smith": ["john@clients.example"]})
    wait_until(lambda: idle(daemon, empty) and idle(daemon, busy))
    assert "queued before start" in folder_subjects(busy, "Received")
    pids = {user.address: imap_pids(logged_dovecot, user.address) for user in (empty, busy)}
    for user in (empty, busy):  # the startup pass counts for both (status, alerts)
        passes = daemon.metric(
            "emailsync_sync_passes_total", mailbox=user.address, trigger="startup"
        )
        assert passes == 1
    assert daemon.stop() == 0  # DONE ends IDLE: Dovecot logs IDLE once it finished

    def session(user: MailUser) -> list[str]:
        (pid,) = pids[user.address]
        return commands(user, pid)

    wait_until(lambda: "LOGOUT" in session(empty) and "LOGOUT" in session(busy), 5)
    # The busy mailbox's pass searched Queue: the log records SEARCH when there is one.
    assert "SEARCH" in session(busy)
    before_idle = session(empty)[: session(empty).index("IDLE")]
    assert "SEARCH" not in before_idle, session(empty)
    assert before_idle.count("SELECT") == 1, session(empty)
    assert len(before_idle) < session(busy).index("IDLE"), (session(empty), session(busy))


def test_a_session_reads_through_a_small_buffer_and_still_files_big_mail(
    user: MailUser, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """The reader after login is READ_BUFFER_BYTES, not imaplib's 8 KiB; a message with a
    header line and a body many times that size is filed whole through it."""
    settings = settings_for(tmp_path, [user])
    with cli.session_for(settings, user.address) as session:
        reader = session.client._imap.file
        # A BufferedReader's size includes its buffer (CPython's buffered_sizeof).
        assert sys.getsizeof(reader) < READ_BUFFER_BYTES + 1024 < 8192
        session.ensure_folders()
        assert session.select_queue() == 0
    long_cc = ", ".join(f"someone{n}@else.example" for n in range(120))  # one ~3 KB header
    body = "A long letter.\n" * 20_000  # ~300 KB
    queue(
        user,
        build_message("john@clients.example", user.address, "big one", cc=long_cc, body=body),
    )
    daemon = daemons.start([user], groups={"Smith": ["john@clients.example"]})
    wait_until(lambda: "big one" in folder_subjects(user, "Received"), 20)
    # Counted once the daemon reads its MOVE's answer, a moment after another client sees it.
    wait_until(
        lambda: daemon.metric("emailsync_messages_received_total", mailbox=user.address) == 1
    )
    assert daemon.metric("emailsync_timeline_events_total", mailbox=user.address) == 1
