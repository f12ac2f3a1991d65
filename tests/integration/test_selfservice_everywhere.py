"""Self-service in every deployment (issue 20 #3): the same API walk on each state database
(SQLite, PostgreSQL) with each timeline (the built-in tables, the reference CRM), and across
a cluster: set up through one instance, run by the lease's owner, stopped through another.

Real daemons, a real Dovecot (``doveadm who`` counts the IMAP sessions), a real PostgreSQL
and the reference CRM.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot
from emailsync.timeline import open_store

from .daemonproc import RunningDaemon, daemon_config_extra, new_port, run_cli, wait_until
from .faultproxy import FaultProxy
from .mailenv import MailUser, new_user, write_config
from .test_cluster import LEASE_SECONDS, Cluster
from .test_crm import CLIENT_A, crm_table
from .test_daemon import imap_pids
from .test_filing import build_message, folder_subjects, queue
from .test_selfservice_api import call

pytestmark = pytest.mark.dovecot

STOP_SECONDS = 5.0  # Stop Email Sync ends the owner's IMAP session within this, anywhere
# The cluster's leases: long enough that a heartbeat (a third) comes after STOP_SECONDS, so
# only the registry's notification can end or restart a worker that fast.
CLUSTER_LEASE_SECONDS = 30
# A mailbox set up in a cluster runs once a heartbeat has registered its lease and an
# instance claimed it: a few heartbeats at most.
CLAIM_SECONDS = CLUSTER_LEASE_SECONDS + 15


class Deployment:
    """One daemon on a state database (``sqlite`` or a PostgreSQL URL) with a timeline (the
    built-in tables, or ``crm``); reads the state's registry tables behind the daemon's back."""

    def __init__(
        self, tmp_path: Path, users: list[MailUser], pg_url: str | None, crm: DevCrm | None
    ) -> None:
        self.tmp_path = tmp_path
        self.pg_url = pg_url
        self.crm = crm
        port = new_port()
        token = secrets.token_urlsafe(24)
        token_file = tmp_path / "control-token"
        token_file.write_text(token + "\n")
        keys: dict[str, object] = {"state": pg_url} if pg_url else {}
        extra = daemon_config_extra(port, token_file, max_backoff_seconds=1, **keys)
        if pg_url:  # a cluster of one: its leases as short as allowed
            extra += f'\n\n[cluster]\ninstance_id = "solo"\nlease_seconds = {LEASE_SECONDS}\n'
        if crm is not None:
            extra += "\n" + crm_table(tmp_path, crm)
        self.config = write_config(tmp_path, users, extra=extra)
        if crm is None:
            result = run_cli(self.config, "groups", "add", "Smith", CLIENT_A)
            assert result.returncode == 0, result.stderr
        self.daemon = RunningDaemon(self.config, port, token, tmp_path)
        self.daemon.wait_ready()

    def secrets(self) -> list[bytes]:
        """Every secret in the registry table, as stored."""
        sql = "SELECT secret FROM registered_mailboxes WHERE secret IS NOT NULL"
        if self.pg_url:
            with psycopg.connect(self.pg_url) as conn:
                return [bytes(row[0]) for row in conn.execute(sql).fetchall()]
        with sqlite3.connect(self.tmp_path / "state" / "emailsync.db") as conn:
            return [bytes(row[0]) for row in conn.execute(sql).fetchall()]

    def rows(self) -> int:
        """Rows of the registry's mailboxes table."""
        sql = "SELECT count(*) FROM registered_mailboxes"
        if self.pg_url:
            with psycopg.connect(self.pg_url) as conn:
                row = conn.execute(sql).fetchone()
        else:
            with sqlite3.connect(self.tmp_path / "state" / "emailsync.db") as conn:
                row = conn.execute(sql).fetchone()
        assert row is not None
        return int(row[0])

    def secret_anywhere(self, blob: bytes) -> bool:
        """Whether the ciphertext is still readable: SQLite, anywhere in its files (database,
        WAL); PostgreSQL, in any live row of the table."""
        if self.pg_url:
            return blob in self.secrets()
        path = self.tmp_path / "state" / "emailsync.db"
        files = [path, path.with_name(path.name + "-wal")]
        return any(
            blob in f.read_bytes() or blob[-16:] in f.read_bytes() for f in files if f.exists()
        )

    def filed_subjects(self) -> set[str]:
        """Subjects of the events the timeline holds (built-in tables or the CRM)."""
        if self.crm is not None:
            return {str(event["subject"]) for event in self.crm.events()}
        store = open_store(
            self.pg_url or f"sqlite:///{self.tmp_path / 'state' / 'emailsync.db'}",
            self.tmp_path / "state",
        )
        try:
            return {event.subject for event in store.list_events()}
        finally:
            store.close()


@pytest.mark.parametrize("timeline", ["builtin", "crm"])
@pytest.mark.parametrize("state", ["sqlite", "postgresql"])
def test_the_self_service_walk_works_on_each_state_with_each_timeline(  # noqa: PLR0917 -- fixtures
    state: str,
    timeline: str,
    tmp_path: Path,
    dovecot: Dovecot,
    request: pytest.FixtureRequest,
    reference_crm: DevCrm,
) -> None:
    """Branch, agent token, a wrong password (422, nothing stored), the right one (IDLE, a
    queued message filed to the timeline on Start Sync), Stop Email Sync (the IMAP session
    ends within 5 s, the secret is gone from the state database)."""
    pg_url = request.getfixturevalue("pg_url") if state == "postgresql" else None
    witness = new_user(dovecot)
    deployment = Deployment(
        tmp_path, [witness], pg_url, reference_crm if timeline == "crm" else None
    )
    daemon = deployment.daemon
    try:
        agent = new_user(dovecot)
        path = f"/v1/mailboxes/{quote(agent.address)}"
        status, answer = call(
            daemon,
            "PUT",
            "/v1/branches/main",
            {"host": dovecot.host, "port": dovecot.port, "security": "none"},
        )
        assert status == 201, answer
        status, answer = call(daemon, "POST", "/v1/tokens", {"address": agent.address})
        assert status == 201, answer
        token = answer["token"]
        setup = {"branch": "main", "username": agent.address}

        status, answer = call(daemon, "PUT", path, {**setup, "password": "wrong"}, token=token)
        assert status == 422, answer
        assert deployment.rows() == 0

        status, answer = call(
            daemon, "PUT", path, {**setup, "password": agent.password}, token=token
        )
        assert status == 200, answer
        wait_until(
            lambda: call(daemon, "GET", path, token=token)[1]["state"] == "idle",
            timeout=CLAIM_SECONDS,
        )
        (blob,) = deployment.secrets()
        assert agent.password.encode() not in blob
        assert len(imap_pids(dovecot, agent.address)) == 1

        subject = f"walk {state} {timeline}"
        queue(agent, build_message(CLIENT_A, agent.address, subject))
        assert call(daemon, "POST", f"{path}/sync", token=token)[0] == 202
        wait_until(lambda: subject in folder_subjects(agent, "Received"))
        assert subject in deployment.filed_subjects()

        asked = time.monotonic()
        status, answer = call(daemon, "DELETE", path, token=token)
        assert (status, answer) == (200, {"stopped": agent.address})
        wait_until(lambda: not imap_pids(dovecot, agent.address), timeout=STOP_SECONDS)
        assert time.monotonic() - asked < STOP_SECONDS
        assert deployment.rows() == 0
        assert not deployment.secret_anywhere(blob)
        assert agent.address not in daemon.mailboxes()
        assert call(daemon, "GET", path, token=token)[0] == 404
    finally:
        daemon.stop()


# -- a cluster ---------------------------------------------------------------------------------


def registry_secret(pg_url: str, address: str) -> bytes | None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT secret FROM registered_mailboxes WHERE address = %s", (address,)
        ).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def owner_of(cluster: Cluster, address: str) -> str | None:
    """The instance running the mailbox's worker, as the instances list it."""
    for name, daemon in cluster.daemons.items():
        status = daemon.mailboxes().get(address)
        if status is not None and status.get("owner") == name and status["state"] == "idle":
            return name
    return None


def test_a_mailbox_set_up_on_one_instance_runs_on_its_owner_and_stops_from_another(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """Three instances on one PostgreSQL: set up through a, the worker runs (one IMAP session)
    on whichever instance holds the lease; set up again through another, the owner restarts
    it (a new session); Stop Email Sync through a third instance than the owner ends the
    owner's session within 5 s and the secret is gone from the table. A config file's
    mailbox stopped through a non-owner stops too, and stays stopped over a restart. Start
    Sync through a non-owner reaches the owner."""
    witness = new_user(dovecot)
    cluster = Cluster(tmp_path, [witness], pg_url, lease_seconds=CLUSTER_LEASE_SECONDS)
    try:
        cluster.start_all(["a", "b", "c"])
        a = cluster.daemons["a"]
        agent = new_user(dovecot)
        path = f"/v1/mailboxes/{quote(agent.address)}"
        branch = {"host": dovecot.host, "port": dovecot.port, "security": "none"}
        assert call(a, "PUT", "/v1/branches/main", branch)[0] == 201
        setup = {"branch": "main", "username": agent.address, "password": agent.password}
        status, answer = call(a, "PUT", path, setup)
        assert status == 200, answer

        owner = wait_until(lambda: owner_of(cluster, agent.address), timeout=CLAIM_SECONDS)
        wait_until(lambda: len(imap_pids(dovecot, agent.address)) == 1)
        (first_session,) = imap_pids(dovecot, agent.address)
        others = [n for n in ("a", "b", "c") if n != owner]

        # Set up again through a non-owner: the owner's worker restarts, with one session.
        status, answer = call(cluster.daemons[others[0]], "PUT", path, setup)
        assert status == 200, answer
        wait_until(
            lambda: (
                (pids := imap_pids(dovecot, agent.address))
                and first_session not in pids
                and len(pids) == 1
            ),
            timeout=STOP_SECONDS,
        )
        wait_until(lambda: owner_of(cluster, agent.address) == owner)  # IDLE again, same owner
        assert registry_secret(pg_url, agent.address) is not None

        # Start Sync through a non-owner: published through the database, the owner runs it.
        owner_daemon = cluster.daemons[owner]
        assert call(cluster.daemons[others[0]], "POST", f"{path}/sync")[0] == 202
        wait_until(
            lambda: (
                owner_daemon.metric(
                    "emailsync_sync_passes_total", mailbox=agent.address, trigger="start_sync"
                )
                == 1
            ),
            timeout=STOP_SECONDS,
        )

        # Stop Email Sync through the last instance that is not the owner.
        asked = time.monotonic()
        status, answer = call(cluster.daemons[others[-1]], "DELETE", path)
        assert (status, answer) == (200, {"stopped": agent.address})
        wait_until(lambda: not imap_pids(dovecot, agent.address), timeout=STOP_SECONDS)
        assert time.monotonic() - asked < STOP_SECONDS
        assert registry_secret(pg_url, agent.address) is None
        for daemon in cluster.daemons.values():
            assert agent.address not in daemon.mailboxes()

        # A config file's mailbox stopped through a non-owner: its owner's session ends.
        keeper = wait_until(lambda: owner_of(cluster, witness.address), timeout=CLAIM_SECONDS)
        elsewhere = next(n for n in ("a", "b", "c") if n != keeper)
        asked = time.monotonic()
        stop_path = f"/v1/mailboxes/{quote(witness.address)}/stop"
        assert call(cluster.daemons[elsewhere], "POST", stop_path)[0] == 202
        wait_until(lambda: not imap_pids(dovecot, witness.address), timeout=STOP_SECONDS)
        assert time.monotonic() - asked < STOP_SECONDS
        cluster.daemons[keeper].stop()
        cluster.start(keeper)  # every instance knows it stopped: the row, not a file
        time.sleep(CLUSTER_LEASE_SECONDS / 3 * 2)  # two heartbeats: a claim would start it
        assert not imap_pids(dovecot, witness.address)
        for daemon in cluster.daemons.values():
            assert daemon.mailboxes()[witness.address]["state"] == "stopped"
    finally:
        cluster.stop_all()


# -- set-up and forget of one mailbox never interleave ------------------------------------------


def test_a_set_up_racing_a_forget_ends_as_the_later_one_says(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """A mailbox runs; DELETE asks its worker to log out, and while that LOGOUT is held up a
    PUT of the same mailbox comes in. Whichever answers last is what holds afterwards: PUT
    last, the mailbox is set up (secret stored, worker IDLE); DELETE last, it is forgotten
    (no secret, no worker, no session). Never a 200 for a PUT whose credentials the DELETE
    then erased, with its worker left running."""
    witness = new_user(dovecot)
    agent = new_user(dovecot)
    with FaultProxy(dovecot.port) as proxy:
        deployment = Deployment(tmp_path, [witness], None, None)
        daemon = deployment.daemon
        try:
            path = f"/v1/mailboxes/{quote(agent.address)}"
            branch = {"host": "127.0.0.1", "port": proxy.port, "security": "none"}
            assert call(daemon, "PUT", "/v1/branches/proxied", branch)[0] == 201
            setup = {"branch": "proxied", "username": agent.address, "password": agent.password}
            assert call(daemon, "PUT", path, setup)[0] == 200
            wait_until(lambda: call(daemon, "GET", path)[1]["state"] == "idle")

            answered: dict[str, tuple[float, int]] = {}

            def put_again() -> None:
                status, _ = call(daemon, "PUT", path, setup)
                answered["PUT"] = (time.monotonic(), status)

            racer = threading.Thread(target=put_again)
            put_done_during_logout: list[bool] = []

            def during_logout() -> None:
                # The worker's LOGOUT (the DELETE is waiting for it): the PUT goes now.
                racer.start()
                racer.join(3.0)
                put_done_during_logout.append(not racer.is_alive())

            proxy.before_client_command(r"^\S+ LOGOUT", during_logout)
            status, _ = call(daemon, "DELETE", path)
            answered["DELETE"] = (time.monotonic(), status)
            racer.join(30)
            assert not racer.is_alive()
            assert answered["DELETE"][1] == 200
            assert answered["PUT"][1] == 200
            # The lock: the PUT waited for the DELETE to finish.
            assert put_done_during_logout == [False]
            last = max(answered, key=lambda k: answered[k][0])
            check: Callable[[], bool]
            if last == "PUT":

                def check() -> bool:
                    detail = call(daemon, "GET", path)[1]
                    return (
                        detail is not None
                        and detail.get("state") == "idle"
                        and len(deployment.secrets()) == 1
                        and len(imap_pids(dovecot, agent.address)) == 1
                    )

            else:

                def check() -> bool:
                    return (
                        agent.address not in daemon.mailboxes()
                        and not deployment.secrets()
                        and not imap_pids(dovecot, agent.address)
                    )

            wait_until(check, timeout=10)
        finally:
            daemon.stop()
