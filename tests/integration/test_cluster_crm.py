"""The production shape (issue 20): a CRM timeline with a shared PostgreSQL state, several
instances. Mail reaches the CRM exactly once, a killed owner's mailboxes are filed elsewhere
within the lease, and a paused owner woken after its lease moved delivers nothing to the CRM
and moves nothing."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot

from .conftest import MailUser, new_user
from .daemonproc import wait_until
from .faultproxy import FaultProxy
from .test_cluster import (
    LEASE_SECONDS,
    Cluster,
    balanced,
    imap_connections,
    parked,
    pause_mid_batch,
)
from .test_crm import CLIENT_A, crm_table
from .test_filing import build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot


def crm_cluster(tmp_path: Path, users: list[MailUser], pg_url: str, crm: DevCrm) -> Cluster:
    """Instances sharing a PostgreSQL state, filing to the reference CRM."""
    return Cluster(tmp_path, users, pg_url, tables=crm_table(tmp_path, crm))


def crm_subjects(crm: DevCrm) -> Counter[str]:
    """Events in the CRM, by subject: each must be there exactly once."""
    return Counter(str(event["subject"]) for event in crm.events())


def test_a_crm_cluster_files_each_message_once_and_fails_over_within_the_lease(
    tmp_path: Path, dovecot: Dovecot, pg_url: str, reference_crm: DevCrm
) -> None:
    """Three instances, PostgreSQL state, CRM timeline: every queued message is one event in
    the CRM; kill -9 of an owner → its mailboxes IDLE elsewhere within lease + 15 s and the
    mail queued meanwhile reaches the CRM once."""
    users = [new_user(dovecot, prefix="cc") for _ in range(6)]
    cluster = crm_cluster(tmp_path, users, pg_url, reference_crm)
    with cluster:
        cluster.start_all(["a", "b", "c"])
        wait_until(lambda: balanced(cluster, ["a", "b", "c"], 6), timeout=40, interval=0.5)
        for user in users:
            queue(user, build_message(CLIENT_A, user.address, f"first {user.address}"))
        for user in users:
            wait_until(
                lambda u=user: f"first {u.address}" in folder_subjects(u, "Received"),
                timeout=15,
            )
        owners = cluster.owners("a")
        victim_name = owners[users[0].address]
        assert victim_name in ("a", "b", "c")
        orphans = cluster.owned(victim_name)
        victim = cluster.daemons[victim_name]
        victim.process.kill()
        killed = time.monotonic()
        victim.process.wait(5)
        survivors = [n for n in ("a", "b", "c") if n != victim_name]
        by_address = {u.address: u for u in users}
        for address in orphans:
            queue(by_address[address], build_message(CLIENT_A, address, f"while down {address}"))

        def taken_over() -> bool:
            owners = cluster.owners(survivors[0])
            return all(
                owners[a] in survivors
                and any(
                    cluster.daemons[n].metric("emailsync_mailbox_state", mailbox=a, state="idle")
                    == 1
                    for n in survivors
                )
                for a in orphans
            )

        wait_until(taken_over, timeout=LEASE_SECONDS + 15, interval=0.5)
        failover = time.monotonic() - killed
        for address in orphans:
            wait_until(
                lambda a=address: f"while down {a}" in folder_subjects(by_address[a], "Received"),
                timeout=15,
            )
        filed = time.monotonic() - killed
        subjects = crm_subjects(reference_crm)
        assert all(subjects[f"first {u.address}"] == 1 for u in users), subjects
        assert all(subjects[f"while down {a}"] == 1 for a in orphans), subjects
        assert sum(subjects.values()) == len(users) + len(orphans)
        counts = imap_connections(dovecot)
        assert all(counts[a] == 1 for a in by_address)
        print(
            f"CRM cluster failover (kill -9 → {len(orphans)} mailboxes IDLE elsewhere):"
            f" {failover:.1f} s, their mail in the CRM after {filed:.1f} s"
            f" (lease {LEASE_SECONDS} s)"
        )


def test_a_paused_crm_instance_delivers_nothing_and_moves_nothing_after_its_lease_moved(
    tmp_path: Path, dovecot: Dovecot, pg_url: str, reference_crm: DevCrm
) -> None:
    """SIGSTOP past the lease while "a"'s worker waits for a header FETCH of a queued
    message; "b" takes the mailbox; woken, "a" delivers nothing to the CRM and moves
    nothing; Start Sync through "b" files the message, one event."""
    users = [new_user(dovecot, prefix="cp") for _ in range(2)]
    cluster = crm_cluster(tmp_path, users, pg_url, reference_crm)
    with cluster, FaultProxy(dovecot.port) as proxy:
        paused, other, user = pause_mid_batch(cluster, proxy, CLIENT_A)
        mailbox = user.address
        proxy.clear()
        paused.signal(signal.SIGCONT)
        wait_until(lambda: parked(paused, mailbox), timeout=15)
        sent = [line for conn in proxy.connections for line in conn.commands]
        assert not [line for line in sent if "MOVE" in line.upper()], sent
        assert folder_subjects(user, "Queue") == {"fenced": set()}
        assert crm_subjects(reference_crm)["fenced"] == 0
        status, _ = other.post(f"/v1/mailboxes/{mailbox}/sync")
        assert status == 202
        wait_until(lambda: "fenced" in folder_subjects(user, "Received"), timeout=15)
        assert crm_subjects(reference_crm)["fenced"] == 1
