"""Several daemons share the mailboxes through a real PostgreSQL: one owner each, failover,
fencing of a paused owner, and Start Sync sent to an instance that does not own the mailbox."""

from __future__ import annotations

import json
import random
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Self

import psycopg
import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import share_registry_key
from emailsync.dev.postgres import Postgres
from emailsync.model import STUCK_KEYWORD
from emailsync.state.postgres import PostgresStore

from .conftest import MailUser, new_user, write_config
from .daemonproc import RunningDaemon, daemon_config_extra, new_port, run_cli, wait_until
from .faultproxy import FaultProxy
from .test_filing import ROOT, build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot

LEASE_SECONDS = 12  # the shortest lease the config allows (issue 19 #8)
CLIENT = "john@clients.example"
MANUAL = 'trigger = "manual"'  # a mailbox setting: filed on Start Sync only


@dataclass
class Cluster:
    """Daemon subprocesses of one test, each with its own directory, port and instance id.

    ``tables``: TOML tables every instance's config gets after [cluster] ([crm], …);
    ``token``: one control token for every instance (else one each).
    """

    tmp_path: Path
    users: list[MailUser]
    pg_url: str
    _: KW_ONLY
    tables: str = ""
    lease_seconds: float = LEASE_SECONDS
    token: str | None = None
    daemons: dict[str, RunningDaemon] = field(default_factory=dict, init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False)

    def config(
        self,
        name: str,
        mailbox_extra: str = "",
        *,
        proxy: FaultProxy | None = None,
        **daemon: object,
    ) -> Path:
        """Write ``name``'s config (again: same port and token, new mailbox settings).

        With ``proxy`` this instance reaches Dovecot through it; ``daemon`` adds [daemon] keys.
        """
        workdir = self.tmp_path / name
        workdir.mkdir(exist_ok=True)
        if name not in self.ports:
            self.ports[name] = new_port()
            (workdir / "control-token").write_text((self.token or secrets.token_urlsafe(16)) + "\n")
            share_registry_key(self.tmp_path / "registry-key", workdir / "state")
        extra = daemon_config_extra(
            self.ports[name], workdir / "control-token", store=self.pg_url, **daemon
        ) + (f'\n\n[cluster]\ninstance_id = "{name}"\nlease_seconds = {self.lease_seconds:g}\n')
        extra += f"\n{self.tables}\n" if self.tables else ""
        ports = None if proxy is None else {proxy.upstream[1]: proxy.port}
        # [cluster] and the tables follow the [daemon] keys; branches and mailboxes come after.
        return write_config(
            workdir, self.users, extra=extra, mailbox_extra=mailbox_extra, ports=ports
        )

    def start(
        self,
        name: str,
        mailbox_extra: str = "",
        *,
        proxy: FaultProxy | None = None,
        ready: bool = True,
        **daemon: object,
    ) -> RunningDaemon:
        """Start instance ``name`` and (``ready``) wait until it is ready.

        An instance is ready after its second heartbeat (the first only announces it): a
        third of a lease. Instances started with ``ready=False`` and then ``wait_ready()``
        take that wait together, and share the mailboxes from their first claims instead of
        the first one taking all and handing them back a few a heartbeat."""
        config = self.config(name, mailbox_extra, proxy=proxy, **daemon)
        token = (config.parent / "control-token").read_text().strip()
        daemon = RunningDaemon(config, self.ports[name], token, config.parent)
        self.daemons[name] = daemon
        if ready:
            daemon.wait_ready()
        return daemon

    def start_all(
        self, names: list[str], mailbox_extra: str = "", **daemon: object
    ) -> list[RunningDaemon]:
        """Start these instances together, the same settings each; wait until all are ready."""
        started = [self.start(n, mailbox_extra, ready=False, **daemon) for n in names]
        self.wait_ready()
        return started

    def wait_ready(self) -> None:
        """Wait until every instance started so far is ready."""
        for daemon in self.daemons.values():
            daemon.wait_ready()

    def owners(self, via: str) -> dict[str, str | None]:
        return {a: m.get("owner") for a, m in self.daemons[via].mailboxes().items()}

    def owned(self, name: str) -> set[str]:
        return {a for a, owner in self.owners(name).items() if owner == name}

    def stop_all(self) -> None:
        for daemon in self.daemons.values():
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
            daemon.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def smith_cluster(tmp_path: Path, users: list[MailUser], pg_url: str) -> Cluster:
    """A cluster of ``users`` whose shared store has the group Smith with ``CLIENT``."""
    made = Cluster(tmp_path, users, pg_url)
    result = run_cli(made.config("setup"), "groups", "add", "Smith", CLIENT)
    assert result.returncode == 0, result.stderr
    return made


# Issue 11's scenario: 3 instances sharing 60 mailboxes (a fourth joins later).
MAILBOXES = 60


@pytest.fixture
def many_users(dovecot: Dovecot) -> list[MailUser]:
    return [new_user(dovecot, prefix="cl") for _ in range(MAILBOXES)]


@pytest.fixture
def cluster(tmp_path: Path, many_users: list[MailUser], pg_url: str) -> Iterator[Cluster]:
    with smith_cluster(tmp_path, many_users, pg_url) as made:
        yield made


def imap_connections(server: Dovecot) -> Counter[str]:
    """IMAP connections per user, as Dovecot counts them (``doveadm who -1``)."""
    out = server.doveadm("who", "-1", check=False).stdout
    counts: Counter[str] = Counter()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "imap":
            counts[fields[0]] += 1
    return counts


def balanced(cluster: Cluster, names: list[str], total: int) -> bool:
    share = -(-total // len(names))
    counts = [cluster.daemons[n].metric("emailsync_owned_mailboxes") for n in names]
    return sum(c or 0 for c in counts) == total and all(
        c is not None and c <= share for c in counts
    )


def events_by_subject(pg_url: str) -> Counter[str]:
    store = PostgresStore(pg_url)
    try:
        return Counter(event.subject for event in store.list_events())
    finally:
        store.close()


def test_three_instances_run_each_mailbox_once_and_start_sync_reaches_the_owner(
    cluster: Cluster, many_users: list[MailUser], dovecot: Dovecot
) -> None:
    """60 manual mailboxes over 3 instances: 20 each, one IDLE connection per mailbox;
    Start Sync sent to a non-owner files the mailbox; status names each owner; a fourth
    instance joins and the shares re-balance with never two connections for a mailbox."""
    cluster.start_all(["a", "b", "c"], MANUAL)
    addresses = {u.address for u in many_users}
    wait_until(lambda: balanced(cluster, ["a", "b", "c"], MAILBOXES), timeout=40, interval=0.5)

    def one_idle_each() -> bool:
        counts = imap_connections(dovecot)
        return all(counts[a] == 1 for a in addresses)

    wait_until(one_idle_each, timeout=20, interval=0.5)
    owners = cluster.owners("a")
    assert set(owners) == addresses
    assert Counter(owners.values()) == {"a": 20, "b": 20, "c": 20}

    # Start Sync to "a" for a mailbox "b" owns: published, "b" files it.
    target = next(u for u in many_users if owners[u.address] == "b")
    queue(target, build_message(CLIENT, target.address, "sync via a"))
    owner = cluster.daemons["b"]
    wait_until(lambda: owner.metric("emailsync_queue_messages", mailbox=target.address) == 1)
    assert folder_subjects(target, "Queue") == {"sync via a": set()}  # manual: still waiting
    status, _ = cluster.daemons["a"].post(f"/v1/mailboxes/{target.address}/sync")
    assert status == 202
    wait_until(lambda: "sync via a" in folder_subjects(target, "Received"), timeout=10)
    assert (
        owner.metric("emailsync_sync_passes_total", mailbox=target.address, trigger="start_sync")
        == 1
    )
    # `emailsync status` on any instance names the owner of every mailbox.
    result = run_cli(cluster.daemons["c"].config, "status", "--json")
    assert result.returncode == 0, result.stderr
    shown = {s["address"]: s["owner"] for s in map(json.loads, result.stdout.splitlines())}
    assert shown == owners

    # A fourth instance joins: shares re-balance to 15 each, never two connections at once.
    most: Counter[str] = Counter()
    samples = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal samples
        while not done.is_set():
            for address, count in imap_connections(dovecot).items():
                most[address] = max(most[address], count)
            samples += 1
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        cluster.start("d", MANUAL)
        wait_until(
            lambda: balanced(cluster, ["a", "b", "c", "d"], MAILBOXES), timeout=40, interval=0.5
        )
        wait_until(one_idle_each, timeout=20, interval=0.5)
    finally:
        done.set()
        sampler.join()
    assert samples > 10
    assert max(most[a] for a in addresses) == 1
    assert sorted(Counter(cluster.owners("d").values()).values()) == [15, 15, 15, 15]


def test_a_killed_instance_s_mailboxes_are_taken_over_and_mail_queued_meanwhile_filed_once(
    cluster: Cluster, many_users: list[MailUser], dovecot: Dovecot, pg_url: str
) -> None:
    """kill -9 of one of 3: its mailboxes are IDLE elsewhere within lease + 15 s; the mail
    queued while nobody watched them is filed once."""
    cluster.start_all(["a", "b", "c"])
    wait_until(lambda: balanced(cluster, ["a", "b", "c"], MAILBOXES), timeout=40, interval=0.5)
    orphans = cluster.owned("c")
    assert len(orphans) == MAILBOXES // 3
    victim = cluster.daemons["c"]
    victim.process.kill()
    killed = time.monotonic()
    victim.process.wait(5)
    by_address = {u.address: u for u in many_users}
    for address in orphans:
        queue(by_address[address], build_message(CLIENT, address, f"while down {address}"))

    def taken_over() -> bool:
        owners = cluster.owners("a")
        states = {**cluster.daemons["a"].mailboxes(), **cluster.daemons["b"].mailboxes()}
        return all(
            owners[a] in ("a", "b")
            and any(
                cluster.daemons[n].metric("emailsync_mailbox_state", mailbox=a, state="idle") == 1
                for n in ("a", "b")
            )
            for a in orphans
        ) and bool(states)

    wait_until(taken_over, timeout=LEASE_SECONDS + 15, interval=0.5)
    failover = time.monotonic() - killed
    assert failover < LEASE_SECONDS + 15
    for address in orphans:
        wait_until(
            lambda a=address: f"while down {a}" in folder_subjects(by_address[a], "Received"),
            timeout=10,
        )
    events = events_by_subject(pg_url)
    assert all(events[f"while down {a}"] == 1 for a in orphans)
    assert all(folder_subjects(by_address[a], "Queue") == {} for a in orphans)
    # One session a mailbox, once Dovecot has let go of the killed instance's (it learns of
    # each as its socket closes) and the survivors' shares have settled.
    wait_until(lambda: all(imap_connections(dovecot)[a] == 1 for a in by_address), timeout=15)
    print(f"failover (kill -9 → {len(orphans)} mailboxes IDLE elsewhere): {failover:.1f} s")


def pause_mid_batch(
    cluster: Cluster, proxy: FaultProxy, sender: str
) -> tuple[RunningDaemon, RunningDaemon, MailUser]:
    """Instances "a" and "b" share ``cluster.users``; "a" is SIGSTOPped mid-batch until "b"
    owns every mailbox (its lease moved). Returns "a", "b" and the user of the mailbox.

    "a" talks to Dovecot through ``proxy`` and waits long for an answer; "b" files only on
    Start Sync, so the message "fenced" from ``sender``, queued in a mailbox of "a" whose
    header FETCH the proxy stalls, is still in Queue when "a" wakes (after ``proxy.clear()``
    and SIGCONT, which are the caller's).
    """
    paused = cluster.start("a", proxy=proxy, timeout_seconds=120, ready=False)
    other = cluster.start("b", MANUAL, ready=False)
    cluster.wait_ready()
    users = cluster.users
    wait_until(lambda: balanced(cluster, ["a", "b"], len(users)), timeout=40, interval=0.5)
    mailbox = sorted(cluster.owned("a"))[0]
    user = next(u for u in users if u.address == mailbox)
    proxy.stall_on(r"UID FETCH \d+ \(BODY\.PEEK\[HEADER\]")
    queue(user, build_message(sender, mailbox, "fenced"))
    wait_until(lambda: proxy.faults["stall_on"] == 1, timeout=10)  # mid-batch
    paused.signal(signal.SIGSTOP)
    wait_until(
        lambda: cluster.owned("b") == {u.address for u in users},
        timeout=LEASE_SECONDS + 15,
        interval=0.5,
    )
    return paused, other, user


def parked(daemon: RunningDaemon, mailbox: str) -> bool:
    """The worker of ``mailbox`` met the fence (LeaseLostError) and parked: its log says so."""
    return any(
        '"lease_lost_parked"' in line and f'"{mailbox}"' in line
        for line in daemon.log().splitlines()
    )


def test_a_paused_instance_records_nothing_and_moves_nothing_after_its_lease_expired(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """SIGSTOP past the lease while "a"'s worker is in the middle of a batch (the answer to its
    header FETCH comes only after the pause): woken, the worker goes on with that batch and
    meets the fence itself, whatever the keeper does meanwhile; it records nothing and moves
    nothing, and the new owner files the message once."""
    users = [new_user(dovecot, prefix="st") for _ in range(4)]
    cluster = smith_cluster(tmp_path, users, pg_url)
    with cluster, FaultProxy(dovecot.port) as proxy:
        paused, other, user = pause_mid_batch(cluster, proxy, CLIENT)
        mailbox = user.address
        proxy.clear()  # the FETCH answer waits in "a"'s socket
        paused.signal(signal.SIGCONT)
        wait_until(lambda: parked(paused, mailbox), timeout=15)  # it reached the fence
        wait_until(lambda: paused.metric("emailsync_lease_losses_total") == 2, timeout=15)
        assert folder_subjects(user, "Queue") == {"fenced": set()}  # moved nothing
        assert events_by_subject(pg_url)["fenced"] == 0  # recorded nothing
        assert paused.metric("emailsync_timeline_events_total", mailbox=mailbox) in (None, 0)
        status, _ = other.post(f"/v1/mailboxes/{mailbox}/sync")
        assert status == 202
        wait_until(lambda: "fenced" in folder_subjects(user, "Received"), timeout=15)
        assert events_by_subject(pg_url)["fenced"] == 1


def test_an_owner_paused_between_recording_and_moving_sends_no_move_once_its_lease_moved(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """Issue 19 #9: "a" waits on its server between deciding batch 1 and recording it and
    sending its MOVE: the answer to batch 2's header FETCH (sent ahead) is held back, the
    last wait before "a" records batch 1 and moves it (issue 23: nothing waits between the
    record and the MOVE any more). "a" is paused right there (SIGSTOP) until "b" has taken
    the mailbox and filed its mail. Woken, "a" checks its lease as the last thing before
    the MOVE: it sends no MOVE at all, and every message is filed once, by "b"."""
    user = new_user(dovecot, prefix="mv")
    cluster = smith_cluster(tmp_path, [user], pg_url)
    with user.client() as client:
        client.create_folder(ROOT)
        client.create_folder(f"{ROOT}.Queue")
    queue(
        user,
        build_message(CLIENT, user.address, "first"),
        build_message(CLIENT, user.address, "second"),
    )
    with cluster:
        with FaultProxy(dovecot.port) as proxy:
            # One message a batch: batch 1 (UID 1) sends UID 2's header FETCH ahead.
            proxy.stall_on(r"UID FETCH 2 \(BODY\.PEEK\[HEADER\]")
            paused = cluster.start("a", proxy=proxy, fetch_batch=1, timeout_seconds=120)
            wait_until(lambda: proxy.faults["stall_on"] == 1)
            paused.signal(signal.SIGSTOP)
            cluster.start("b")
            wait_until(
                lambda: cluster.owned("b") == {user.address},
                timeout=LEASE_SECONDS + 15,
                interval=0.5,
            )
            both = {"first": set(), "second": set()}
            wait_until(lambda: folder_subjects(user, "Received") == both, timeout=15)
            proxy.clear()
            paused.signal(signal.SIGCONT)
            wait_until(lambda: parked(paused, user.address), timeout=15)
            sent = [line for conn in proxy.connections for line in conn.commands]
            assert not [line for line in sent if "MOVE" in line.upper()], sent
        assert folder_subjects(user, "Received") == both  # once each
        assert folder_subjects(user, "Queue") == {}
        events = events_by_subject(pg_url)
        assert (events["first"], events["second"]) == (1, 1)


def listener_pids(pg_url: str, instance: str) -> list[int]:
    """The backends of ``instance``'s Start Sync listener (its LISTEN connection)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"emailsync-listen {instance}",),
        ).fetchall()
    return [pid for (pid,) in rows]


def test_a_start_sync_published_while_the_owner_s_listener_reconnects_is_not_lost(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """The owner's LISTEN connection is cut and a Start Sync for its (manual) mailbox is
    published through the other instance before it is back: NOTIFY reached nobody, yet the
    owner reads the request from the database once it listens again and files the mailbox."""
    users = [new_user(dovecot, prefix="ls") for _ in range(2)]
    cluster = smith_cluster(tmp_path, users, pg_url)
    with cluster:
        sender, owner = cluster.start_all(["a", "b"], MANUAL)
        wait_until(lambda: balanced(cluster, ["a", "b"], 2), timeout=30, interval=0.5)
        target = next(u for u in users if u.address in cluster.owned("b"))
        queue(target, build_message(CLIENT, target.address, "missed notify"))
        wait_until(lambda: owner.metric("emailsync_queue_messages", mailbox=target.address) == 1)
        assert owner.log().count('"start_sync_listening"') == 1

        [pid] = listener_pids(pg_url, "b")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        wait_until(lambda: pid not in listener_pids(pg_url, "b"), interval=0.02)
        status, _ = sender.post(f"/v1/mailboxes/{target.address}/sync")
        assert status == 202
        # Published while "b" was not listening (it retries after 2 s).
        assert owner.log().count('"start_sync_listening"') == 1
        assert folder_subjects(target, "Queue") == {"missed notify": set()}

        wait_until(lambda: '"start_sync_listener_lost"' in owner.log(), timeout=10)
        wait_until(lambda: owner.log().count('"start_sync_listening"') == 2, timeout=10)
        wait_until(lambda: "missed notify" in folder_subjects(target, "Received"), timeout=10)
        # The pass is counted once it ends, just after its move.
        passes = {"mailbox": target.address, "trigger": "start_sync"}
        wait_until(lambda: owner.metric("emailsync_sync_passes_total", **passes) == 1)
        assert '"missed": true' in owner.log()
        assert sender.metric("emailsync_timeline_events_total", mailbox=target.address) in (
            None,
            0,
        )


def test_a_start_sync_with_include_stuck_sent_while_the_mailbox_changes_hands_is_not_lost(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """Issue 19 #17: the owner of a manual mailbox is killed (-9); before its lease expires,
    Start Sync with include_stuck reaches the other instance, which does not run the mailbox
    yet (nobody can act on it then). Once it has taken the mailbox over it runs that request,
    include_stuck and all: the quarantined message waiting in Queue is filed, once."""
    users = [new_user(dovecot, prefix="hand") for _ in range(2)]
    cluster = smith_cluster(tmp_path, users, pg_url)
    with cluster:
        _, survivor = cluster.start_all(["a", "b"], MANUAL)
        wait_until(lambda: balanced(cluster, ["a", "b"], 2), timeout=30, interval=0.5)
        [mailbox] = cluster.owned("a")
        user = next(u for u in users if u.address == mailbox)
        idle = {"mailbox": mailbox, "state": "idle"}
        wait_until(lambda: cluster.daemons["a"].metric("emailsync_mailbox_state", **idle) == 1)
        queue(user, build_message(CLIENT, mailbox, "stuck in transit"))
        with user.client() as client:
            client.select_folder(f"{ROOT}.Queue")
            client.add_flags(client.search(["ALL"]), [STUCK_KEYWORD])
        victim = cluster.daemons["a"]
        victim.process.kill()
        victim.process.wait(5)
        status, _ = survivor.post(f"/v1/mailboxes/{mailbox}/sync?include_stuck=true")
        assert status == 202
        assert cluster.owners("b")[mailbox] == "a"  # still the dead one's: the request waits
        wait_until(
            lambda: "stuck in transit" in folder_subjects(user, "Received"),
            timeout=LEASE_SECONDS + 15,
            interval=0.5,
        )
        assert events_by_subject(pg_url)["stuck in transit"] == 1
        assert '"start_sync_owed"' in survivor.log()


def test_sighup_restarts_a_changed_mailbox_under_its_lease(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """A mailbox switched from manual to auto by SIGHUP runs again, here, and files by IDLE."""
    users = [new_user(dovecot, prefix="hup") for _ in range(2)]
    cluster = smith_cluster(tmp_path, users, pg_url)
    with cluster:
        daemon = cluster.start("a", MANUAL)
        wait_until(lambda: daemon.metric("emailsync_owned_mailboxes") == 2, timeout=15)
        user = users[0]
        cluster.config("a", 'trigger = "auto"')
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: '"mailbox_restarted"' in daemon.log(), timeout=10)
        wait_until(
            lambda: (
                daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
            ),
            timeout=15,
        )
        queue(user, build_message(CLIENT, user.address, "after reload"))
        wait_until(lambda: "after reload" in folder_subjects(user, "Received"), timeout=10)
        assert imap_connections(dovecot)[user.address] == 1
        assert daemon.metric("emailsync_owned_mailboxes") == 2


def test_instances_ride_out_a_postgresql_restart_without_a_double_owner(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """PostgreSQL down for 3 s and back: the instances reconnect, every mailbox ends with one
    connection (never two on the way), and mail queued around the restart is filed once."""
    server = Postgres()
    server.start()
    users = [new_user(dovecot, prefix="pgr") for _ in range(6)]
    pg_url = server.create_database()
    cluster = smith_cluster(tmp_path, users, pg_url)
    addresses = {u.address for u in users}
    most: Counter[str] = Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for address, count in imap_connections(dovecot).items():
                most[address] = max(most[address], count)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    try:
        cluster.start_all(["a", "b"])
        wait_until(lambda: balanced(cluster, ["a", "b"], 6), timeout=30, interval=0.5)
        sampler.start()
        server.stop()
        queue(users[0], build_message(CLIENT, users[0].address, "during outage"))
        time.sleep(3)
        server.start()
        queue(users[1], build_message(CLIENT, users[1].address, "after outage"))
        wait_until(lambda: balanced(cluster, ["a", "b"], 6), timeout=30, interval=0.5)
        wait_until(lambda: all(imap_connections(dovecot)[a] == 1 for a in addresses), timeout=20)
        for user, subject in ((users[0], "during outage"), (users[1], "after outage")):
            wait_until(lambda u=user, s=subject: s in folder_subjects(u, "Received"), timeout=30)
        events = events_by_subject(pg_url)
        assert events["during outage"] == 1
        assert events["after outage"] == 1
    finally:
        done.set()
        if sampler.is_alive():
            sampler.join()
        cluster.stop_all()
        server.close()
    # The test's own IMAP sessions (queue, folder checks) touch users 0 and 1 only.
    assert max(most[u.address] for u in users[2:]) == 1


# Issue 19 #1: outages of a few seconds, as seen from outside (2 of 7 left mailboxes unserved).
OUTAGES = 5
OUTAGE_SECONDS = 5


def served_by_one_owner(cluster: Cluster, names: list[str], addresses: set[str]) -> bool:
    """Every mailbox has an owner among ``names`` and is IDLE there."""
    owners = cluster.owners(names[0])
    return all(
        owners.get(a) in names
        and cluster.daemons[str(owners[a])].metric(
            "emailsync_mailbox_state", mailbox=a, state="idle"
        )
        == 1
        for a in addresses
    )


def test_a_worker_parked_while_its_renewal_was_slow_is_restarted_once_the_lease_is_renewed(
    tmp_path: Path, dovecot: Dovecot, pg_url: str
) -> None:
    """Issue 19 #1: the store is slow (a renewal waits on a lock) past the local deadline,
    and mail arrives: the worker meets the fence and parks (or is stopped on the keeper's own
    clock). When the renewal then goes through, the instance holds the lease again, so it must
    not leave the mailbox without a running worker: the mail is filed, here, and the mailbox
    is IDLE again, within a lease."""
    users = [new_user(dovecot, prefix="slow") for _ in range(2)]
    cluster = smith_cluster(tmp_path, users, pg_url)
    user = users[0]
    with cluster:
        daemon = cluster.start("a")
        wait_until(lambda: daemon.metric("emailsync_owned_mailboxes") == 2, timeout=30)
        wait_until(
            lambda: (
                daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
            ),
            timeout=15,
        )
        with psycopg.connect(pg_url) as blocker:
            # The next renewal waits on these row locks; the keeper is stuck in it.
            rows = blocker.execute(
                "SELECT extract(epoch FROM expires_at - now()) FROM mailbox_leases"
                " WHERE owner = 'a' FOR UPDATE"
            ).fetchall()
            assert len(rows) == 2
            # Past the local deadline (a tenth of the lease before the database's expiry).
            lapsed_in = min(float(left) for (left,) in rows) - LEASE_SECONDS * 0.1 + 0.3
            time.sleep(max(0.0, lapsed_in))
            queue(user, build_message(CLIENT, user.address, "while slow"))
            # The worker met the fence and parked, or the keeper stopped it on its own clock
            # (its deadline watcher does not wait for the stuck renewal).
            wait_until(
                lambda: '"lease_lost_parked"' in daemon.log() or '"lease_lost"' in daemon.log(),
                timeout=10,
            )
            assert folder_subjects(user, "Queue") == {"while slow": set()}
            blocker.rollback()  # the renewal goes through: the leases are still "a"'s
        wait_until(
            lambda: "while slow" in folder_subjects(user, "Received"),
            timeout=LEASE_SECONDS + 5,
            interval=0.5,
        )
        wait_until(
            lambda: served_by_one_owner(cluster, ["a"], {u.address for u in users}), timeout=10
        )
        assert events_by_subject(pg_url)["while slow"] == 1


def test_every_mailbox_is_served_again_after_each_of_repeated_short_postgresql_outages(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """PostgreSQL stopped (fast shutdown) for 5 s, five times, at varying points of the
    heartbeat: after each outage every mailbox is IDLE on its owner again and the mail queued
    after the outage is filed, once, within a lease and a few seconds. A worker that met the
    fence while the store was away must not stay parked while its instance renews the lease."""
    server = Postgres()
    server.start()
    users = [new_user(dovecot, prefix="out") for _ in range(4)]
    addresses = {u.address for u in users}
    pg_url = server.create_database()
    cluster = smith_cluster(tmp_path, users, pg_url)
    rng = random.Random()
    with cluster:
        cluster.start_all(["a", "b"])
        wait_until(lambda: balanced(cluster, ["a", "b"], 4), timeout=30, interval=0.5)
        for outage in range(OUTAGES):
            # A different phase of the heartbeat each time (not a wait for anything).
            time.sleep(rng.uniform(0, LEASE_SECONDS / 3))
            server.stop()
            time.sleep(OUTAGE_SECONDS)
            server.start()
            subject = f"after outage {outage}"
            for user in users:
                queue(user, build_message(CLIENT, user.address, subject))
            try:
                wait_until(
                    lambda s=subject: all(s in folder_subjects(u, "Received") for u in users),
                    timeout=LEASE_SECONDS + 15,
                    interval=0.5,
                )
                wait_until(
                    lambda: served_by_one_owner(cluster, ["a", "b"], addresses),
                    timeout=10,
                    interval=0.5,
                )
            except AssertionError:
                states = {n: d.mailboxes() for n, d in cluster.daemons.items()}
                raise AssertionError(f"after outage {outage + 1}: {states}") from None
            assert events_by_subject(pg_url)[subject] == len(users)
        server.close()
