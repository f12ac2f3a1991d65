"""Failed mail comes back when the CRM says its group appeared (``POST /v1/groups:changed``).

The reference CRM (emailsync.dev.crm) calls the daemon, signed, when it links addresses, as a
CRM implementing config/crm-api.yaml would; forged, stale and replayed calls are refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from emailsync.dev.crm import DevCrm
from emailsync.timeline.crm import signing

from .conftest import MailUser
from .daemonproc import RunningDaemon, wait_until
from .test_crm import SECRET, assert_conforms, crm, events_by_subject, launched, start_daemon
from .test_filing import build_message, folder_subjects, queue
from .test_refile import FILED_WITHIN_SECONDS, NO_GROUP, failed_for_no_group, log_events

__all__ = ["crm", "launched"]  # fixtures, found by pytest by name

pytestmark = pytest.mark.dovecot

LATE = "late.landlord@clients.example"
CHANGED = "/v1/groups:changed"


def changed_url(daemon: RunningDaemon) -> str:
    return f"http://127.0.0.1:{daemon.port}{CHANGED}"


def post(daemon: RunningDaemon, body: bytes, header: str) -> int:
    """A raw call to the daemon's groups:changed, with this signature header."""
    headers = {"Content-Type": "application/json", signing.HEADER: header}
    return requests.post(changed_url(daemon), data=body, headers=headers, timeout=10).status_code


def test_failed_mail_is_filed_once_the_crm_calls_groups_changed(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    """The CRM links the address and calls back: Received within 5 s, one event at the CRM.

    The daemon's lookup cache holds "no group" for the address (60 s): the call forgets it.
    """
    daemon = start_daemon(tmp_path, [user], crm, launched)
    crm.changed_url = changed_url(daemon)
    queue(user, build_message(LATE, user.address, "landlord wrote first"))
    wait_until(lambda: failed_for_no_group(user, "landlord wrote first"))
    linked_at = time.monotonic()
    crm.link("g-late", "Late", [LATE])  # and calls POST /v1/groups:changed
    wait_until(
        lambda: "landlord wrote first" in folder_subjects(user, "Received"),
        FILED_WITHIN_SECONDS,
        0.05,
    )
    print(f"CRM call → filed: {time.monotonic() - linked_at:.2f} s")
    assert folder_subjects(user, "Failed") == {}
    [event] = events_by_subject(crm)["landlord wrote first"]
    assert (event["group_id"], event["via"]) == (
        "g-late",
        [{"mailbox": user.address, "direction": "inbound"}],
    )
    assert daemon.metric("emailsync_refiled_total", mailbox=user.address) == 1
    [received] = log_events(daemon, "groups_changed_received")
    assert received["addresses"] == 1
    assert daemon.stop() == 0
    assert_conforms(crm)


def test_forged_stale_and_replayed_calls_are_refused(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    daemon = start_daemon(tmp_path, [user], crm, launched)
    queue(user, build_message(LATE, user.address, "waits for a real call"))
    wait_until(lambda: failed_for_no_group(user, "waits for a real call"))
    crm.link("g-late", "Late", [LATE])  # no changed_url yet: emailsync is not told
    body = json.dumps({"addresses": [LATE]}).encode()
    now = time.time()
    refused = [
        # another secret
        signing.sign(b"not the shared secret", "POST", CHANGED, body),
        # the right secret, signed for another endpoint (a captured lookup, replayed here)
        signing.sign(SECRET.encode(), "POST", "/crm/v1/groups:lookup", body),
        # outside the window (300 s)
        signing.sign(SECRET.encode(), "POST", CHANGED, body, now=now - 600),
        # the old v1 scheme
        f"t={int(now)},v1=" + "0" * 64,
    ]
    assert [post(daemon, body, header) for header in refused] == [401, 401, 401, 401]
    assert post(daemon, b'{"addresses": ["not an address"]}', "") == 401  # unsigned
    wait_until(lambda: len(log_events(daemon, "groups_changed_refused")) == len(refused))
    assert failed_for_no_group(user, "waits for a real call")
    signed = signing.sign(SECRET.encode(), "POST", CHANGED, body)
    assert post(daemon, body, signed) == 202
    wait_until(
        lambda: "waits for a real call" in folder_subjects(user, "Received"),
        FILED_WITHIN_SECONDS,
    )
    assert post(daemon, body, signed) == 401  # the same call again: a replay
    [replayed] = log_events(daemon, "groups_changed_refused")[len(refused) :]
    assert replayed["reason"] == "replayed"
    assert len(crm.events()) == 1
    assert daemon.stop() == 0


def test_mail_the_crm_rejected_stays_in_failed_when_its_group_changes(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    """Only $EmailSyncNoGroup mail comes back: a rejected event's message stays, keyword and all."""
    daemon = start_daemon(tmp_path, [user], crm, launched, group_cache_seconds=0)
    queue(user, build_message(LATE, user.address, "no group yet"))
    wait_until(lambda: failed_for_no_group(user, "no group yet"))
    crm.link("g-late", "Late", [LATE])  # emailsync not told: the first message stays
    crm.faults.reject_subjects = {"archived"}
    queue(user, build_message(LATE, user.address, "archived"))
    wait_until(lambda: "archived" in folder_subjects(user, "Failed"))
    assert folder_subjects(user, "Failed") == {
        "no group yet": {NO_GROUP},
        "archived": {"$EmailSyncRejected"},
    }
    crm.faults.reject_subjects = set()  # the CRM would take it now: it must not be asked
    crm.changed_url = changed_url(daemon)
    assert crm.groups_changed([LATE]) == 202
    wait_until(lambda: "no group yet" in folder_subjects(user, "Received"), FILED_WITHIN_SECONDS)
    assert folder_subjects(user, "Failed") == {"archived": {"$EmailSyncRejected"}}
    assert set(events_by_subject(crm)) == {"no group yet"}
    assert daemon.stop() == 0


def test_without_a_call_the_periodic_check_files_the_mail_of_addresses_linked_since(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    """A CRM that cannot call back: the periodic re-check looks the addresses up again."""
    daemon = start_daemon(
        tmp_path,
        [user],
        crm,
        launched,
        group_cache_seconds=1,
        daemon_keys={"refile_check_seconds": 3},
    )
    queue(user, build_message(LATE, user.address, "found by the check"))
    wait_until(lambda: failed_for_no_group(user, "found by the check"))
    crm.link("g-late", "Late", [LATE])  # no changed_url: emailsync is not told
    wait_until(lambda: "found by the check" in folder_subjects(user, "Received"), 20)
    # The pass logs its count just after its MOVE: the message can be seen first.
    [refiled] = wait_until(
        lambda: [e for e in log_events(daemon, "messages_refiled") if e["count"]]
    )
    assert refiled["trigger"] == "periodic"
    assert log_events(daemon, "refile_check_done")
    assert daemon.stop() == 0
