"""The test helpers themselves can fail: a doubled message, a dead /metrics, a crashed daemon."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from .conftest import MailUser
from .daemonproc import DaemonFactory
from .test_filing import ROOT, build_message, folder_ids, folder_subjects, message_id

pytestmark = pytest.mark.dovecot


def test_a_message_filed_twice_is_seen_twice(user: MailUser) -> None:
    raw = build_message("john@clients.example", user.address, "doubled")
    with user.client() as client:
        client.create_folder(f"{ROOT}.Received")
        client.append(f"{ROOT}.Received", raw)
        client.append(f"{ROOT}.Received", raw)
    assert folder_ids(user, "Received") == Counter({message_id(raw): 2})
    with pytest.raises(AssertionError, match="more than once"):
        folder_subjects(user, "Received")  # a dict by subject used to show one entry


def test_metric_raises_when_metrics_does_not_answer(user: MailUser, daemons: DaemonFactory) -> None:
    daemon = daemons.start([user])
    assert daemon.metric("emailsync_mailbox_state", mailbox="nobody@else.example") is None
    assert daemon.stop() == 0
    with pytest.raises(AssertionError, match="/metrics answered 0"):
        daemon.metric("emailsync_mailbox_state", mailbox="nobody@else.example")


def test_stop_all_fails_for_a_daemon_that_did_not_exit_cleanly(
    user: MailUser, tmp_path: Path
) -> None:
    factory = DaemonFactory(tmp_path)
    daemon = factory.start([user])
    daemon.signal(signal.SIGKILL)  # stands in for a crash at shutdown
    daemon.process.wait(10)
    with pytest.raises(AssertionError, match="daemon exited -9, expected 0"):
        factory.stop_all()
