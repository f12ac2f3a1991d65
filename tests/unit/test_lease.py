"""Mailbox leases against a real PostgreSQL: fair shares, takeover after expiry, fencing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

import psycopg
import pytest
import structlog
from prometheus_client import CollectorRegistry

from emailsync.cluster.lease import FencedStore, LeaseKeeper, LeaseTable, OwedStartSync
from emailsync.cluster.membership import Cluster
from emailsync.config import ClusterSettings
from emailsync.errors import LeaseLostError
from emailsync.model import Direction, Fence, TimelineEvent
from emailsync.state.postgres import PostgresStore
from emailsync.telemetry.metrics import ClusterMetrics

MAILBOXES = [f"agent{i:02d}@example.com" for i in range(10)]


class Daemon:
    """The keeper's view of a daemon: which mailboxes exist, and which workers run."""

    def __init__(self, mailboxes: Sequence[str]) -> None:
        self.mailboxes = list(mailboxes)
        self.running: dict[str, Fence] = {}
        self.stopped: list[str] = []

    def wanted_mailboxes(self) -> list[str]:
        return self.mailboxes

    def acquire_mailbox(self, address: str, fence: Fence, owed: OwedStartSync | None) -> None:
        assert address not in self.running
        self.running[address] = fence

    def release_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        for address in addresses:
            self.running.pop(address)
            self.stopped.append(address)
        return lambda timeout: True


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(pg_url)
    opened.add_group("Smith", ["client@example.org"])
    yield opened
    opened.close()


def keeper(
    store: PostgresStore, name: str, lease_seconds: float = 30.0, *, announce_first: bool = False
) -> tuple[LeaseKeeper, Daemon, CollectorRegistry]:
    registry = CollectorRegistry()
    daemon = Daemon(MAILBOXES)
    table = LeaseTable(store, name, lease_seconds)
    return (
        LeaseKeeper(
            table,
            daemon,
            ClusterMetrics(registry),
            lease_seconds=lease_seconds,
            announce_first=announce_first,
        ),
        daemon,
        registry,
    )


def event(mailbox: str, key: str = "k1") -> TimelineEvent:
    return TimelineEvent(
        group="Smith",
        direction=Direction.OUTBOUND,
        mailbox=mailbox,
        message_key=key,
        message_id=f"<{key}@example.com>",
        subject="Hello",
        from_=mailbox,
        to="client@example.org",
        cc="",
        date=None,
        body_text="Hi",
        attachments=(),
        size=100,
        filed_at=datetime(2024, 5, 1, tzinfo=UTC),
    )


def test_two_keepers_split_the_mailboxes_fairly_without_a_double_owner(
    store: PostgresStore,
) -> None:
    """The first takes all 10; once the second is live, 5 move over, never two owners."""
    first, first_daemon, first_metrics = keeper(store, "a")
    second, second_daemon, _ = keeper(store, "b")
    first.tick()
    assert len(first_daemon.running) == 10
    second.tick()  # registers b; every lease is held, nothing to claim yet
    assert second_daemon.running == {}
    first.tick()  # share is now 5: hands back 5
    assert first.returned(10)  # released once their workers ended
    assert not set(first_daemon.running) & set(second_daemon.running)
    second.tick()
    assert len(first_daemon.running) == 5
    assert len(second_daemon.running) == 5
    assert set(first_daemon.running) | set(second_daemon.running) == set(MAILBOXES)
    owners = first.table.owners(MAILBOXES)
    assert {m for m, o in owners.items() if o == "a"} == set(first_daemon.running)
    assert first_metrics.get_sample_value("emailsync_owned_mailboxes") == 5
    assert first_metrics.get_sample_value("emailsync_lease_losses_total") == 0


def test_a_keeper_that_stops_renewing_is_taken_over_after_expiry(store: PostgresStore) -> None:
    """The other keeper waits for the lease to expire, then owns every mailbox anew."""
    first, first_daemon, _ = keeper(store, "a", lease_seconds=1.5)
    second, second_daemon, _ = keeper(store, "b", lease_seconds=1.5)
    first.tick()
    second.tick()
    assert second_daemon.running == {}
    old = dict(first_daemon.running)
    time.sleep(1.6)  # "a" is paused: no heartbeat, its leases and instance row expire
    second.tick()
    assert set(second_daemon.running) == set(MAILBOXES)
    for mailbox, fence in second_daemon.running.items():
        assert fence.generation > old[mailbox].generation
    assert not first.holds(old[MAILBOXES[0]])


def test_a_stale_owner_records_nothing(store: PostgresStore) -> None:
    """After takeover the old fence is refused in the recording transaction; nothing is kept."""
    first, first_daemon, _ = keeper(store, "a", lease_seconds=1.5)
    second, second_daemon, _ = keeper(store, "b", lease_seconds=1.5)
    first.tick()
    mailbox = MAILBOXES[0]
    stale = first_daemon.running[mailbox]
    fenced = FencedStore(store, store, stale, first)
    assert fenced.record_events([event(mailbox, "before")]) == 1  # the owner may write
    time.sleep(1.6)
    second.tick()
    assert mailbox in second_daemon.running
    with pytest.raises(LeaseLostError):
        fenced.record_events([event(mailbox, "after")])
    with pytest.raises(LeaseLostError):
        fenced.groups_for_addresses(["client@example.org"])
    # The database refuses it too, even if the local deadline were wrong.
    with pytest.raises(LeaseLostError):
        store.record_events([event(mailbox, "after")], fence=stale)
    assert [e.message_key for e in store.list_events()] == ["before"]
    current = FencedStore(store, store, second_daemon.running[mailbox], second)
    assert current.record_events([event(mailbox, "after")]) == 1


def test_a_taken_lease_stops_the_worker_and_counts_a_loss(store: PostgresStore) -> None:
    """A lease someone else bumped is not renewed: the worker stops, losses_total counts it."""
    first, first_daemon, metrics = keeper(store, "a")
    first.tick()
    mailbox = MAILBOXES[3]
    with store.transaction("steal") as conn:
        conn.execute(
            "UPDATE mailbox_leases SET owner = 'x', generation = generation + 1 WHERE mailbox = %s",
            (mailbox,),
        )
    first.tick()
    assert first_daemon.stopped == [mailbox]
    assert metrics.get_sample_value("emailsync_lease_losses_total") == 1
    assert metrics.get_sample_value("emailsync_owned_mailboxes") == 9


def test_a_graceful_stop_releases_at_once(store: PostgresStore) -> None:
    """stop() stops the workers and hands the leases back: the other takes them without waiting."""
    first, first_daemon, _ = keeper(store, "a")
    second, second_daemon, _ = keeper(store, "b")
    first.tick()
    first.stop()
    assert first_daemon.running == {}
    assert sorted(first_daemon.stopped) == MAILBOXES
    second.tick()
    assert set(second_daemon.running) == set(MAILBOXES)


def test_a_fence_with_an_old_generation_is_refused_by_the_store(store: PostgresStore) -> None:
    """Same owner, older generation (re-claimed after a pause): refused, nothing recorded."""
    first, first_daemon, _ = keeper(store, "a")
    first.tick()
    fence = first_daemon.running[MAILBOXES[0]]
    with pytest.raises(LeaseLostError):
        store.record_events(
            [event(MAILBOXES[0])], fence=replace(fence, generation=fence.generation - 1)
        )
    assert store.list_events() == []
    assert store.record_events([event(MAILBOXES[0])], fence=fence) == 1


def test_a_late_joiner_brings_shares_within_one_of_each_other(store: PostgresStore) -> None:
    """10 mailboxes, a third keeper joins two that hold 5 each: the end is 4/3/3, not 5/4/1."""
    keepers = [keeper(store, name) for name in ("a", "b", "c")]
    for each, _, _ in keepers[:2]:
        each.tick()
    for each, _, _ in keepers[:2]:
        each.tick()
        assert each.returned(10)
    for _ in range(6):
        for each, _, _ in keepers:
            each.tick()
            assert each.returned(10)
    counts = sorted(len(daemon.running) for _, daemon, _ in keepers)
    assert counts == [3, 3, 4]
    running = [set(daemon.running) for _, daemon, _ in keepers]
    assert set.union(*running) == set(MAILBOXES)
    assert sum(len(r) for r in running) == len(MAILBOXES)


def test_keepers_started_together_announce_first_and_share_without_handing_back(
    store: PostgresStore,
) -> None:
    """The first heartbeat only registers; the next claims the fair share straight away."""
    pair = [keeper(store, name, announce_first=True) for name in ("a", "b")]
    for each, daemon, _ in pair:
        each.tick()
        assert daemon.running == {}
        assert each.ticks == 0
    for each, _, _ in pair:
        each.tick()
    assert [len(daemon.running) for _, daemon, _ in pair] == [5, 5]
    assert all(daemon.stopped == [] for _, daemon, _ in pair)
    assert all(each.ticks == 1 for each, _, _ in pair)


class SlowDaemon(Daemon):
    """Starting a worker takes 0.2 s, as on a busy host with hundreds of them."""

    def acquire_mailbox(self, address: str, fence: Fence, owed: OwedStartSync | None) -> None:
        time.sleep(0.2)
        super().acquire_mailbox(address, fence, owed)


def test_leases_are_renewed_while_many_workers_start(store: PostgresStore) -> None:
    """10 slow starts (2 s) outlast a 1.5 s lease: the keeper renews meanwhile, keeps all."""
    registry = CollectorRegistry()
    daemon = SlowDaemon(MAILBOXES)
    slow = LeaseKeeper(
        LeaseTable(store, "slow", 1.5),
        daemon,
        ClusterMetrics(registry),
        lease_seconds=1.5,
        announce_first=False,
    )
    slow.tick()
    assert len(daemon.running) == 10
    assert all(slow.holds(fence) for fence in daemon.running.values())
    assert set(slow.table.renew(MAILBOXES)) == set(MAILBOXES)  # the database agrees


class SyncRecorder:
    """A daemon for ``Cluster`` with no mailboxes that records the Start Syncs it is handed."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(mailboxes=[])
        self.syncs: list[tuple[str | None, bool]] = []
        self.received = threading.Event()

    def run_mailbox(self, address: str, store: object) -> bool:
        return False

    def drop_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        return lambda timeout: True

    def links_notified(self) -> None:
        """No Failed mail here to re-file."""

    def wanted_mailboxes(self) -> list[str]:
        return [m.address for m in self.settings.mailboxes if m.enabled]

    def registry_notified(self, address: str | None) -> None:
        """No registry here."""

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        self.syncs.append((address, include_stuck))
        self.received.set()
        return True


@contextmanager
def listening(store: PostgresStore, daemons: Sequence[SyncRecorder]) -> Iterator[list[Cluster]]:
    """A started Cluster for each daemon, "sender" then "receiver", each listening; stopped
    after."""
    clusters = [
        Cluster(store, d, ClusterSettings(instance_id=name), CollectorRegistry())  # type: ignore[arg-type]
        for d, name in zip(daemons, ("sender", "receiver"), strict=True)
    ]
    for cluster in clusters:
        cluster.start()
    try:
        assert all(c.listening.wait(10) for c in clusters)
        yield clusters
    finally:
        for cluster in clusters:
            cluster.stop()


def test_start_sync_with_include_stuck_travels_through_notify(store: PostgresStore) -> None:
    """A Start Sync for all with include_stuck published by one instance reaches the other
    with include_stuck (LISTEN/NOTIFY), and not the sender itself."""
    daemons = [SyncRecorder(), SyncRecorder()]
    with listening(store, daemons) as clusters:
        clusters[0].publish_sync(None, include_stuck=True)
        assert daemons[1].received.wait(10)
        assert daemons[1].syncs == [(None, True)]
        assert daemons[0].syncs == []


def terminate_listener(store: PostgresStore, instance: str) -> None:
    """Cut ``instance``'s LISTEN connection, as a network drop or a DBA would."""
    with store.transaction("test: cut the listener") as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"emailsync-listen {instance}",),
        ).fetchall()
    assert rows == [(True,)]


def test_a_start_sync_published_while_a_listener_is_cut_off_is_read_when_it_is_back(
    store: PostgresStore,
) -> None:
    """Requests published while the receiver's LISTEN connection is down are acted on once
    it is back (read from start_sync_requests), in order; one notified after that arrives
    once, not again from the table; the receiver never sees requests older than itself."""
    early = Cluster(
        store,
        SyncRecorder(),
        ClusterSettings(instance_id="early"),
        CollectorRegistry(),  # type: ignore[arg-type]
    )
    early.publish_sync(None)  # before the receiver existed: not its business
    daemons = [SyncRecorder(), SyncRecorder()]
    with listening(store, daemons) as clusters:
        terminate_listener(store, "receiver")
        wait = time.monotonic() + 5
        while clusters[1].listening.is_set() and time.monotonic() < wait:
            time.sleep(0.01)
        assert not clusters[1].listening.is_set()  # the receiver saw its connection go
        clusters[0].publish_sync(None, include_stuck=True)
        clusters[0].publish_sync(None)
        assert daemons[1].syncs == []
        assert clusters[1].listening.wait(10)  # reconnected (LISTEN_RETRY_SECONDS later)
        assert daemons[1].syncs == [(None, True), (None, False)]

        daemons[1].received.clear()
        clusters[0].publish_sync(None, include_stuck=True)
        assert daemons[1].received.wait(10)
        # One more: once it is in, a duplicate of the one before would have come before it.
        daemons[1].received.clear()
        clusters[0].publish_sync(None)
        assert daemons[1].received.wait(10)
        assert daemons[1].syncs == [(None, True), (None, False), (None, True), (None, False)]
        assert daemons[0].syncs == []  # the sender acts locally, never on its own requests


def test_publishing_prunes_requests_older_than_the_retention(store: PostgresStore) -> None:
    """start_sync_requests does not grow forever: a publish deletes rows past a day."""
    cluster = Cluster(
        store,
        SyncRecorder(),
        ClusterSettings(instance_id="p"),
        CollectorRegistry(),  # type: ignore[arg-type]
    )
    with store.transaction("test: an old request") as conn:
        conn.execute(
            "INSERT INTO start_sync_requests (mailbox, include_stuck, sender, requested_at)"
            " VALUES (NULL, false, 'gone', now() - interval '25 hours')"
        )
    cluster.publish_sync("agent00@example.com")
    with store.transaction("test: read requests") as conn:
        rows = conn.execute("SELECT mailbox, sender FROM start_sync_requests").fetchall()
    assert rows == [("agent00@example.com", "p")]


def test_a_renewal_that_lands_after_the_local_deadline_does_not_keep_a_parked_worker(
    store: PostgresStore, pg_url: str
) -> None:
    """Issue 19 #1: a renewal held up by the store (here a row lock) past the local deadline
    goes through in the end. A worker that met the fence meanwhile has parked and never
    resumes by itself, so the keeper must not simply extend the lease under it: it stops
    that worker and claims the mailbox anew, and a new worker runs with a new fence."""
    first, daemon, metrics = keeper(store, "a", lease_seconds=3.0)
    first.tick()
    mailbox = MAILBOXES[0]
    old = daemon.running[mailbox]
    fenced = FencedStore(store, store, old, first)
    time.sleep(1.0)  # the next renewal starts later than the last: its deadline is later too
    with psycopg.connect(pg_url) as blocker:
        blocker.execute("SELECT 1 FROM mailbox_leases WHERE owner = 'a' FOR UPDATE")
        ticking = threading.Thread(target=first.tick)
        ticking.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        deadline = time.monotonic() + 10
        while blocker.execute(waiting).fetchone() != (1,):
            assert time.monotonic() < deadline, "the renewal never waited on the lock"
            time.sleep(0.02)
        while first.holds(old):  # the local deadline passes while the renewal waits
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(LeaseLostError):  # the worker meets the fence: it parks
            fenced.groups_for_addresses(["client@example.org"])
        blocker.rollback()
    ticking.join(10)
    assert not ticking.is_alive()
    assert not first.holds(old)
    assert mailbox in daemon.stopped
    new = daemon.running[mailbox]
    assert new.generation > old.generation
    assert first.holds(new)
    assert FencedStore(store, store, new, first).groups_for_addresses(["client@example.org"])
    # Every lease lapsed the same way (all waited on the lock): all restarted, none kept.
    assert metrics.get_sample_value("emailsync_lease_losses_total") == len(MAILBOXES)
    assert all(first.holds(fence) for fence in daemon.running.values())


class FailsOnce(SyncRecorder):
    """A daemon whose first Start Sync raises, as a bug in it would."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        if not self.failed.is_set():
            self.failed.set()
            raise RuntimeError("a bug in the daemon")
        return super().start_sync_local(address, include_stuck=include_stuck)


def test_the_start_sync_listener_survives_an_error_that_is_not_psycopg_s(
    store: PostgresStore,
) -> None:
    """Issue 19 #17: an exception other than psycopg's (here the daemon's Start Sync raises)
    does not end the listener thread for good: it is logged, the listener listens again, and
    the next request is acted on; the instance stays healthy."""
    failing = FailsOnce()
    daemons: list[SyncRecorder] = [SyncRecorder(), failing]
    with listening(store, daemons) as clusters:
        with structlog.testing.capture_logs() as logs:
            clusters[0].publish_sync(None, include_stuck=True)
            assert failing.failed.wait(10)
            clusters[0].publish_sync(None)
            assert daemons[1].received.wait(15)
        assert daemons[1].syncs == [(None, False)]
        assert any(e["event"] == "start_sync_listener_failed" for e in logs)
        assert clusters[1].healthy()


class Owner(SyncRecorder):
    """A daemon for ``Cluster`` with mailboxes: the workers it runs, the Start Syncs they get."""

    def __init__(self, mailboxes: Sequence[str]) -> None:
        super().__init__()
        self.settings = SimpleNamespace(
            mailboxes=[SimpleNamespace(address=m, enabled=True) for m in mailboxes]
        )
        self.running: set[str] = set()

    def run_mailbox(self, address: str, store: object) -> bool:
        self.running.add(address)
        return True

    def drop_mailboxes(self, addresses: Sequence[str]) -> Callable[[float], bool]:
        self.running -= set(addresses)
        return lambda timeout: True

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        if address is not None and address not in self.running:
            return False
        return super().start_sync_local(address, include_stuck=include_stuck)


def member(store: PostgresStore, name: str, daemon: Owner) -> Cluster:
    settings = ClusterSettings(instance_id=name, lease_seconds=1.5)
    return Cluster(store, daemon, settings, CollectorRegistry())  # type: ignore[arg-type]


def owed(store: PostgresStore, mailbox: str) -> tuple[object, bool]:
    with store.transaction("test: read what a lease owes") as conn:
        row = conn.execute(
            "SELECT owed_request, owed_include_stuck FROM mailbox_leases WHERE mailbox = %s",
            (mailbox,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def claim_when_free(cluster: Cluster, daemon: Owner, mailbox: str) -> None:
    """Heartbeats of ``cluster`` until it runs ``mailbox`` (once the old lease expired)."""
    deadline = time.monotonic() + 15
    while mailbox not in daemon.running:
        assert time.monotonic() < deadline, "the lease never came free"
        cluster.keeper.tick()
        time.sleep(0.1)


def test_a_start_sync_published_while_a_mailbox_passes_between_owners_reaches_the_next_one(
    store: PostgresStore,
) -> None:
    """Issue 19 #17: a mailbox's owner is gone (dead, its lease not expired yet) when a Start
    Sync with include_stuck for it reaches another instance: nobody can run it then. The
    instance that claims the lease next runs it, include_stuck and all, and the lease no
    longer owes it."""
    mailbox = MAILBOXES[0]
    gone, heir = Owner([mailbox]), Owner([mailbox])
    dead, next_owner = member(store, "dead", gone), member(store, "heir", heir)
    sender = member(store, "sender", Owner([mailbox]))
    dead.keeper.tick()  # announces
    dead.keeper.tick()  # claims
    assert gone.running == {mailbox}
    sender.publish_sync(mailbox, include_stuck=True)  # "dead" no longer listens
    claim_when_free(next_owner, heir, mailbox)
    assert heir.syncs == [(mailbox, True)]
    assert gone.syncs == []
    assert owed(store, mailbox) == (None, False)


def test_a_start_sync_its_owner_ran_is_not_run_again_by_the_next_owner(
    store: PostgresStore,
) -> None:
    """The owner hands the request to its worker and the lease stops owing it: when the
    mailbox later moves (a graceful stop), the next owner starts it without a Start Sync."""
    mailbox = MAILBOXES[0]
    first, heir = Owner([mailbox]), Owner([mailbox])
    owner, next_owner = member(store, "owner", first), member(store, "heir", heir)
    sender = member(store, "sender", Owner([mailbox]))
    owner.start()
    try:
        assert owner.listening.wait(10)
        deadline = time.monotonic() + 15
        while mailbox not in first.running:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sender.publish_sync(mailbox, include_stuck=True)
        assert first.received.wait(10)
        while owed(store, mailbox) != (None, False):  # settled once the worker had it
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
    finally:
        owner.stop()
    assert first.syncs == [(mailbox, True)]
    claim_when_free(next_owner, heir, mailbox)
    assert heir.syncs == []
