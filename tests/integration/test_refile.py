"""Failed mail comes back by itself when its group appears (issue 22), with the built-in store.

A real daemon and a real Dovecot: mail filed to Failed for want of a group is filed to
Received (or Sent) once ``groups add``/``groups import`` links one of its addresses, by the
mailbox's own connection, with one event, and nothing else in Failed is touched.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from .conftest import MailUser, new_user
from .daemonproc import DaemonFactory, RunningDaemon, run_cli, wait_until
from .faultproxy import FaultProxy
from .test_filing import ROOT, build_message, folder_ids, folder_subjects, message_id, queue

pytestmark = pytest.mark.dovecot

CLIENT = "late.applicant@clients.example"
OTHER = "someone.else@clients.example"
NO_GROUP = "$EmailSyncNoGroup"
# What the issue asks: filed within 5 s of the link change.
FILED_WITHIN_SECONDS = 5.0


def events(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """The built-in store's timeline, as ``emailsync timeline --json`` prints it."""
    result = run_cli(daemon.config, "timeline", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def failed_for_no_group(user: MailUser, *subjects: str) -> bool:
    return folder_subjects(user, "Failed") == {subject: {NO_GROUP} for subject in subjects}


def log_events(daemon: RunningDaemon, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines of one event."""
    found = []
    for line in daemon.log().splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return [entry for entry in found if entry.get("event") == event]


def link(daemon: RunningDaemon, group: str, *addresses: str) -> None:
    result = run_cli(daemon.config, "groups", "add", group, *addresses)
    assert result.returncode == 0, result.stderr


def test_failed_mail_is_filed_once_its_address_is_linked_by_groups_add(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """Failed for no group → ``groups add`` → in Received within 5 s, one event, no keyword."""
    daemon = daemons.start([user])
    raw = build_message(CLIENT, user.address, "viewing request before the card")
    queue(user, raw, build_message(OTHER, user.address, "still nobody's"))
    wait_until(
        lambda: failed_for_no_group(user, "viewing request before the card", "still nobody's")
    )
    linked_at = time.monotonic()
    link(daemon, "Smith", CLIENT)
    wait_until(
        lambda: "viewing request before the card" in folder_subjects(user, "Received"),
        FILED_WITHIN_SECONDS,
        0.05,
    )
    print(f"link change → filed: {time.monotonic() - linked_at:.2f} s")
    assert folder_subjects(user, "Received") == {"viewing request before the card": set()}
    assert failed_for_no_group(user, "still nobody's")  # its address is not linked
    [event] = events(daemon)
    assert (event["group"], event["direction"], event["mailboxes"]) == (
        "Smith",
        "inbound",
        [user.address],
    )
    assert event["message_id"] == message_id(raw).strip("<>")
    # Counted once the daemon reads its MOVE's answer, a moment after another client sees it.
    wait_until(lambda: daemon.metric("emailsync_refiled_total", mailbox=user.address) == 1)
    wait_until(
        lambda: daemon.metric("emailsync_messages_received_total", mailbox=user.address) == 1
    )
    status, body = daemon.get(f"/v1/mailboxes/{user.address}")
    assert status == 200
    latest = json.loads(body)["recent"][0]
    assert (latest["subject"], latest["outcome"], latest["filed_later"]) == (
        "viewing request before the card",
        "received",
        True,
    )
    # The pass logs its count just after its MOVE: the message can be seen first.
    [refiled] = wait_until(
        lambda: [e for e in log_events(daemon, "messages_refiled") if e["count"]]
    )
    assert refiled["trigger"] == "link_change"
    # Linking it again is a change too, but nothing of it is left in Failed: no new event.
    link(daemon, "Smith", CLIENT)
    wait_until(lambda: len(log_events(daemon, "links_changed")) >= 2)
    assert len(events(daemon)) == 1


def test_the_same_counterpart_in_three_mailboxes_is_refiled_in_all_with_one_event(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """groups import links the address: all three mailboxes re-file it, one event via all."""
    agents = [user, new_user(user.server), new_user(user.server)]
    daemon = daemons.start(agents)
    raw = build_message(CLIENT, ", ".join(a.address for a in agents), "to the whole branch")
    for agent in agents:
        queue(agent, raw)
    for agent in agents:
        wait_until(lambda agent=agent: failed_for_no_group(agent, "to the whole branch"))
    rows = daemon.config.parent / "groups.csv"
    rows.write_text(f"group,address\nSmith,{CLIENT}\n", encoding="utf-8")
    result = run_cli(daemon.config, "groups", "import", str(rows))
    assert result.returncode == 0, result.stderr
    for agent in agents:
        wait_until(
            lambda agent=agent: folder_ids(agent, "Received") == {message_id(raw): 1},
            FILED_WITHIN_SECONDS,
            0.05,
        )
        assert folder_subjects(agent, "Failed") == {}
    [event] = events(daemon)
    assert sorted(event["mailboxes"]) == sorted(a.address for a in agents)
    assert all(v["direction"] == "inbound" for v in event["via"])


def test_a_link_change_for_an_address_without_failed_mail_costs_no_imap_command(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user], proxy=fault_proxy)
    queue(user, build_message(CLIENT, user.address, "waits for Smith"))
    wait_until(lambda: failed_for_no_group(user, "waits for Smith"))
    wait_until(lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle"))
    [connection] = fault_proxy.connections
    before = len(connection.commands)
    link(daemon, "Jones", OTHER)
    # Positive events first: the daemon saw the change; then a Start Sync's pass went through
    # and the worker is back in IDLE, so a re-file it had been asked for would be done by now.
    wait_until(lambda: log_events(daemon, "links_changed"))
    assert daemon.post(f"/v1/mailboxes/{user.address}/sync")[0] == 202
    wait_until(
        lambda: (
            daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="start_sync")
            == 1
        )
    )
    wait_until(lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle"))
    since = connection.commands[before:]
    assert not [c for c in since if "Failed" in c], since  # Failed never selected nor searched
    [seen] = log_events(daemon, "links_changed")
    assert seen["mailboxes"] == []
    assert fault_proxy.connections == [connection]
    assert failed_for_no_group(user, "waits for Smith")


def test_rejected_and_unparseable_mail_in_failed_is_never_refiled(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """Only $EmailSyncNoGroup mail comes back, also mail filed by an emailsync before the index.

    The daemon finds the older no-group mail by a scan of Failed at its first login; a message
    that also carries $EmailSyncRejected or $EmailSyncUnparseable stays where it is.
    """
    failed = f"{ROOT}.Failed"
    appended = {
        "older no group": [NO_GROUP],
        "older rejected": ["$EmailSyncRejected"],
        "older unparseable": ["$EmailSyncUnparseable"],
        "rejected after no group": [NO_GROUP, "$EmailSyncRejected"],
    }
    config = daemons.write([user])
    setup = run_cli(config, "setup", user.address)  # the tree, without a daemon
    assert setup.returncode == 0, setup.stderr
    with user.client() as client:
        for subject, keywords in appended.items():
            client.append(failed, build_message(CLIENT, user.address, subject), flags=keywords)
    restarted = daemons.start([user])
    [scan] = wait_until(lambda: log_events(restarted, "messages_refiled"))  # at its first login
    assert (scan["trigger"], scan["scanned"], scan["count"]) == ("scan", 2, 0)
    queue(user, build_message(CLIENT, user.address, "new no group"))
    wait_until(lambda: "new no group" in folder_subjects(user, "Failed"))
    link(restarted, "Smith", CLIENT)
    wait_until(
        lambda: folder_subjects(user, "Received").keys() == {"older no group", "new no group"},
        FILED_WITHIN_SECONDS,
    )
    assert folder_subjects(user, "Failed") == {
        "older rejected": {"$EmailSyncRejected"},
        "older unparseable": {"$EmailSyncUnparseable"},
        "rejected after no group": {NO_GROUP, "$EmailSyncRejected"},
    }
    assert sorted(e["subject"] for e in events(restarted)) == ["new no group", "older no group"]


def test_a_crash_in_the_middle_of_a_refile_files_the_message_exactly_once_after_restart(
    user: MailUser, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    """kill -9 once the events are recorded, as the keyword comes off: one copy, one event."""
    daemon = daemons.start([user], proxy=fault_proxy)
    raw = build_message(CLIENT, user.address, "crash mid refile")
    queue(user, raw)
    wait_until(lambda: failed_for_no_group(user, "crash mid refile"))

    def kill() -> None:
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(5)

    # The re-file's STORE -FLAGS goes out after its event was recorded; the MOVE never does.
    fault_proxy.before_client_command(rf"UID STORE \S+ -FLAGS\S* \(\{NO_GROUP}\)", kill)
    link(daemon, "Smith", CLIENT)
    wait_until(lambda: daemon.process.poll() is not None, 15)
    daemon.expected_exit = -signal.SIGKILL
    assert len(events(daemon)) == 1  # recorded before the crash
    assert folder_ids(user, "Failed") == {message_id(raw): 1}  # not moved
    fault_proxy.clear()
    restarted = daemons.start([user], proxy=fault_proxy)
    wait_until(lambda: folder_ids(user, "Received") == {message_id(raw): 1}, 15)
    assert folder_ids(user, "Failed") == {}
    [event] = events(restarted)
    assert event["subject"] == "crash mid refile"
    assert restarted.metric("emailsync_refiled_total", mailbox=user.address) == 1
