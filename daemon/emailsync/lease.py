"""Mailbox leases: several instances share the mailboxes through PostgreSQL, with fencing.

Every instance registers a heartbeat row in ``cluster_instances`` and holds leases in
``mailbox_leases`` (schema_pg/002_cluster.sql). On each heartbeat (a third of
``lease_seconds``) the ``LeaseKeeper``:

1. renews its own row and its leases (``expires_at = now() + lease``, the database's clock);
   a lease it did not get back was lost: that mailbox's worker stops at once;
2. computes its fair share, ceil(mailboxes / live instances);
3. above it, stops a few workers and releases their leases (re-balancing slowly, so a
   joining instance never makes the cluster drop everything at once; above the floor while
   another live instance is below it, one a heartbeat, so shares end within one of each
   other); below it, claims
   free or expired leases with ``SELECT … FOR UPDATE SKIP LOCKED`` (instances claiming at
   the same moment take different rows, none waits) and starts their workers.

A claim bumps the lease's ``generation``: the fencing token. Every write a worker makes
carries it (``FencedStore``) and the store checks it in the same transaction that records
the events, so an owner that was paused or cut off past its lease, and wakes up still
believing it owns the mailbox, records nothing; the ``LeaseLostError`` that refuses it makes
the worker stop before it moves anything (filing records before it moves). The keeper also
keeps a local deadline per lease (monotonic clock, from the start of the renewal that
extended it) and stops a worker whose deadline passed even when the store is unreachable.
Graceful stop: workers first, then the leases are released so others take them at once.
"""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry

from emailsync.errors import LeaseLostError, StoreError
from emailsync.metrics import ClusterMetrics
from emailsync.model import Fence, Group, TimelineEvent
from emailsync.store.base import Recorded
from emailsync.store.postgres import PostgresStore

log = structlog.get_logger(__name__)

# Leases are renewed this many times per lease period; one missed heartbeat is survivable.
HEARTBEATS_PER_LEASE = 3
# An instance above its fair share hands back at most this many mailboxes per heartbeat.
REBALANCE_STEP = 5
# The local deadline stops a worker this fraction of the lease before the database's expiry,
# so clock-rate differences between hosts never let two owners overlap.
LOCAL_DEADLINE_MARGIN = 0.1
# How long stop() waits for a heartbeat in progress.
STOP_JOIN_SECONDS = 2.0
# The keeper re-checks local deadlines at least this often between heartbeats.
DEADLINE_CHECK_SECONDS = 0.25

_REGISTER = """
    INSERT INTO mailbox_leases (mailbox) SELECT unnest(%s::text[])
    ON CONFLICT (mailbox) DO NOTHING
"""
_HEARTBEAT = """
    INSERT INTO cluster_instances (instance_id, heartbeat_at, expires_at)
    VALUES (%(me)s, now(), now() + %(lease)s)
    ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now(), expires_at = now() + %(lease)s
"""
# Live instances, and the fewest leases any of them holds (0 for a newcomer).
_LIVE_INSTANCES = """
    SELECT count(*), coalesce(min(held), 0) FROM (
        SELECT i.instance_id, count(l.mailbox) AS held
        FROM cluster_instances AS i
        LEFT JOIN mailbox_leases AS l ON l.owner = i.instance_id AND l.expires_at > now()
        WHERE i.expires_at > now()
        GROUP BY i.instance_id
    ) AS live
"""
_RENEW = """
    UPDATE mailbox_leases SET expires_at = now() + %(lease)s
    WHERE owner = %(me)s AND mailbox = ANY(%(mailboxes)s) AND expires_at > now()
    RETURNING mailbox, generation
"""
# Each instance walks the free rows in its own pseudo-random order, so instances claiming
# together rarely meet on a row; SKIP LOCKED lets them pass each other when they do.
_CLAIMABLE = """
    SELECT mailbox FROM mailbox_leases
    WHERE mailbox = ANY(%(wanted)s) AND (owner IS NULL OR expires_at <= now())
    ORDER BY md5(mailbox || %(me)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
"""
_CLAIM = """
    UPDATE mailbox_leases
    SET owner = %(me)s, generation = generation + 1, expires_at = now() + %(lease)s,
        acquired_at = now()
    WHERE mailbox = ANY(%(mailboxes)s)
    RETURNING mailbox, generation
"""
_RELEASE = """
    UPDATE mailbox_leases SET owner = NULL, expires_at = '-infinity'
    WHERE mailbox = %s AND owner = %s AND generation = %s
"""
_LEAVE = "DELETE FROM cluster_instances WHERE instance_id = %s"
_OWNERS = """
    SELECT mailbox, CASE WHEN expires_at > now() THEN owner END
    FROM mailbox_leases WHERE mailbox = ANY(%s)
"""


def default_instance_id() -> str:
    """The hostname plus a random suffix: unique even for several instances on one host."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class LeaseTable:
    """The cluster tables, as one instance reads and writes them (one transaction per call)."""

    def __init__(self, store: PostgresStore, instance_id: str, lease_seconds: float) -> None:
        self.store = store
        self.instance_id = instance_id
        self.lease = timedelta(seconds=lease_seconds)

    def register(self, mailboxes: Sequence[str]) -> None:
        """Make sure every mailbox has a lease row (free when new)."""
        with self.store.transaction("register mailboxes") as conn:
            conn.execute(_REGISTER, (list(mailboxes),))

    def heartbeat(self) -> tuple[int, int]:
        """Renew this instance's row; return how many instances are live (this one included)
        and the fewest leases any live instance holds."""
        with self.store.transaction("heartbeat") as conn:
            conn.execute(_HEARTBEAT, {"me": self.instance_id, "lease": self.lease})
            row = conn.execute(_LIVE_INSTANCES).fetchone()
        if row is None:
            return 1, 0
        return max(1, int(row[0])), int(row[1])

    def renew(self, mailboxes: Iterable[str]) -> dict[str, int]:
        """Extend the leases still held; return them as mailbox → generation."""
        wanted = sorted(mailboxes)
        if not wanted:
            return {}
        with self.store.transaction("renew leases") as conn:
            rows = conn.execute(
                _RENEW, {"me": self.instance_id, "lease": self.lease, "mailboxes": wanted}
            ).fetchall()
        return {mailbox: int(generation) for mailbox, generation in rows}

    def claim(self, candidates: Iterable[str], limit: int) -> list[Fence]:
        """Take up to ``limit`` free or expired leases among ``candidates``; new fences."""
        wanted = sorted(candidates)
        if limit <= 0 or not wanted:
            return []
        with self.store.transaction("claim leases") as conn:
            free = [
                mailbox
                for (mailbox,) in conn.execute(
                    _CLAIMABLE, {"wanted": wanted, "me": self.instance_id, "limit": limit}
                ).fetchall()
            ]
            if not free:
                return []
            rows = conn.execute(
                _CLAIM, {"me": self.instance_id, "lease": self.lease, "mailboxes": free}
            ).fetchall()
        return [Fence(mailbox, self.instance_id, int(generation)) for mailbox, generation in rows]

    def release(self, fences: Iterable[Fence]) -> None:
        """Hand leases back (only those still ours with that generation)."""
        rows = [(f.mailbox, f.owner, f.generation) for f in fences]
        if not rows:
            return
        with self.store.transaction("release leases") as conn, conn.cursor() as cur:
            cur.executemany(_RELEASE, rows)

    def leave(self) -> None:
        """Remove this instance's row, so the others count one instance fewer at once."""
        with self.store.transaction("leave cluster") as conn:
            conn.execute(_LEAVE, (self.instance_id,))

    def owners(self, mailboxes: Iterable[str]) -> dict[str, str | None]:
        """The instance holding each mailbox's unexpired lease (None: nobody)."""
        with self.store.transaction("read lease owners") as conn:
            rows = conn.execute(_OWNERS, (sorted(mailboxes),)).fetchall()
        return dict(rows)


class LeaseHooks(Protocol):
    """What the keeper asks of the daemon: which mailboxes exist, start and stop workers."""

    def wanted_mailboxes(self) -> list[str]:
        """Addresses this cluster serves (enabled, not stopped), the same on every instance."""
        ...

    def acquire_mailbox(self, address: str, fence: Fence) -> None:
        """Start the mailbox's worker, writing through a store fenced with ``fence``."""
        ...

    def release_mailboxes(self, addresses: Sequence[str]) -> None:
        """Stop these mailboxes' workers (together) and wait for them to end."""
        ...


class LeaseKeeper:
    """Decides which mailboxes this instance runs; one thread, heartbeat every lease / 3."""

    def __init__(
        self,
        table: LeaseTable,
        hooks: LeaseHooks,
        metrics: ClusterMetrics,
        *,
        lease_seconds: float,
        announce_first: bool = True,
    ) -> None:
        self.table = table
        self.hooks = hooks
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = lease_seconds / HEARTBEATS_PER_LEASE
        self.log = log.bind(instance=table.instance_id)
        self._lock = threading.Lock()
        self._owned: dict[str, Fence] = {}
        self._deadlines: dict[str, float] = {}
        self._registered: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The first heartbeat only announces this instance: instances started together then
        # see each other before claiming, instead of the first one taking every mailbox and
        # handing most of them back a few at a time.
        self._announce_pending = announce_first
        self._last_renewal = 0.0
        self.ticks = 0  # completed claiming heartbeats: ready, and the tests' positive signal

    @property
    def instance_id(self) -> str:
        """This instance's name in the cluster tables."""
        return self.table.instance_id

    def owned(self) -> dict[str, Fence]:
        """The leases this instance holds now."""
        with self._lock:
            return dict(self._owned)

    def holds(self, fence: Fence) -> bool:
        """True while ``fence`` is this instance's current lease and its local deadline holds."""
        with self._lock:
            current = self._owned.get(fence.mailbox)
            deadline = self._deadlines.get(fence.mailbox, 0.0)
        return current == fence and time.monotonic() < deadline

    def start(self) -> None:
        """Run the heartbeat loop in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop heartbeats, stop every owned worker, then release the leases and leave."""
        self._stop.set()
        if self._thread is not None:
            # Bounded: SIGTERM must end the daemon within 10 s; a tick stuck on an unreachable
            # store claims nothing once stop is set (see _claim).
            self._thread.join(STOP_JOIN_SECONDS)
        with self._lock:
            fences = list(self._owned.values())
        self.hooks.release_mailboxes([fence.mailbox for fence in fences])
        with self._lock:
            self._owned.clear()
            self._deadlines.clear()
        self.metrics.owned_mailboxes.set(0)
        try:
            self.table.release(fences)
            self.table.leave()
        except StoreError as exc:
            # They expire by themselves within lease_seconds.
            self.log.warning("lease_release_failed", error=str(exc), leases=len(fences))
        else:
            self.log.info("leases_released", leases=len(fences))

    def alive(self) -> bool:
        """The heartbeat thread runs (it never ends before stop())."""
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_seconds
                try:
                    self.tick()
                except Exception:  # the top of the keeper loop: log and beat again
                    self.log.exception("lease_tick_failed")
            self._expire_local()
            self._stop.wait(min(DEADLINE_CHECK_SECONDS, max(0.0, next_beat - time.monotonic())))

    def tick(self) -> None:
        """One heartbeat: renew, count instances, then hand back or claim toward the share."""
        wanted = sorted(set(self.hooks.wanted_mailboxes()))
        try:
            if frozenset(wanted) != self._registered:
                self.table.register(wanted)
                self._registered = frozenset(wanted)
            live, fewest = self.table.heartbeat()
            self._renew()
            if self._announce_pending:
                self._announce_pending = False
                self.log.info("cluster_announced", live_instances=live)
                return
            share = math.ceil(len(wanted) / live) if wanted else 0
            floor = len(wanted) // live
            owned = self.owned()
            unwanted = [f for m, f in owned.items() if m not in set(wanted)]
            by_name = sorted(owned.values(), key=lambda f: f.mailbox)
            if unwanted:
                self._hand_back(unwanted, reason="not_configured")
            elif len(owned) > share:
                self._hand_back(by_name[share:][:REBALANCE_STEP], reason="rebalance")
            elif len(owned) > floor and fewest < floor:
                # Everyone is within the ceiling, but one instance is below the floor (it
                # joined late and found little free): one each, until all are within one.
                self._hand_back(by_name[floor:][:1], reason="rebalance")
            elif len(owned) < share:
                self._claim([m for m in wanted if m not in owned], share - len(owned))
        except StoreError as exc:
            self.log.warning("lease_heartbeat_failed", error=str(exc))
            return
        self.ticks += 1

    def _renew(self) -> None:
        with self._lock:
            owned = dict(self._owned)
        if not owned:
            return
        started = time.monotonic()
        self._last_renewal = started
        held = self.table.renew(owned)
        deadline = started + self.lease_seconds * (1 - LOCAL_DEADLINE_MARGIN)
        lost: list[Fence] = []
        for mailbox, fence in owned.items():
            if held.get(mailbox) == fence.generation:
                with self._lock:
                    if self._owned.get(mailbox) == fence:
                        self._deadlines[mailbox] = deadline
            else:
                lost.append(fence)
        self._lose(lost, reason="not_renewed")

    def _claim(self, candidates: list[str], limit: int) -> None:
        if self._stop.is_set():
            return
        started = time.monotonic()
        fences = self.table.claim(candidates, limit)
        deadline = started + self.lease_seconds * (1 - LOCAL_DEADLINE_MARGIN)
        if self._stop.is_set():
            # Stopping while the claim ran: hand them straight back, start nothing.
            self.table.release(fences)
            return
        # Owned (and so renewed) from now on, all of them, before any worker starts.
        with self._lock:
            for fence in fences:
                self._owned[fence.mailbox] = fence
                self._deadlines[fence.mailbox] = deadline
        self.metrics.owned_mailboxes.set(len(self.owned()))
        for fence in fences:
            if not self.holds(fence):
                continue  # lost while the others started: its worker must not start
            self.log.info("lease_acquired", mailbox=fence.mailbox, generation=fence.generation)
            self.hooks.acquire_mailbox(fence.mailbox, fence)
            # Starting hundreds of workers takes a while on a busy host: keep renewing, or
            # the leases would pass their deadline before the loop ends.
            if time.monotonic() - self._last_renewal >= self.heartbeat_seconds:
                self._renew()

    def _hand_back(self, fences: list[Fence], *, reason: str) -> None:
        """Stop the workers first, then release: never two IDLE connections for a mailbox."""
        self.hooks.release_mailboxes([fence.mailbox for fence in fences])
        for fence in fences:
            with self._lock:
                self._owned.pop(fence.mailbox, None)
                self._deadlines.pop(fence.mailbox, None)
            self.log.info("lease_released", mailbox=fence.mailbox, reason=reason)
        self.metrics.owned_mailboxes.set(len(self.owned()))
        self.table.release(fences)

    def _lose(self, fences: Sequence[Fence], *, reason: str) -> None:
        """Forget leases this instance no longer holds and stop their workers."""
        lost: list[Fence] = []
        with self._lock:
            for fence in fences:
                if self._owned.get(fence.mailbox) == fence:
                    del self._owned[fence.mailbox]
                    self._deadlines.pop(fence.mailbox, None)
                    lost.append(fence)
            owned = len(self._owned)
        if not lost:
            return
        self.metrics.owned_mailboxes.set(owned)
        self.metrics.lease_losses.inc(len(lost))
        for fence in lost:
            self.log.warning(
                "lease_lost", mailbox=fence.mailbox, generation=fence.generation, reason=reason
            )
        self.hooks.release_mailboxes([fence.mailbox for fence in lost])

    def _expire_local(self) -> None:
        """Stop workers whose lease may have expired by now, store reachable or not."""
        now = time.monotonic()
        with self._lock:
            expired = [self._owned[m] for m, d in self._deadlines.items() if d <= now]
        self._lose(expired, reason="deadline_passed")


class FencedStore:
    """The store as one leased mailbox's worker sees it: every write carries the fence.

    Reads before filing check the lease too (locally, then in the database), so a worker
    that woke up without its lease fails its pass with ``LeaseLostError`` before it decides
    to move anything, including messages that would go to Failed without an event.
    """

    def __init__(self, store: PostgresStore, fence: Fence, keeper: LeaseKeeper) -> None:
        self.store = store
        self.fence = fence
        self.keeper = keeper

    def _check_local(self) -> None:
        if not self.keeper.holds(self.fence):
            raise LeaseLostError(
                f"lease on {self.fence.mailbox} (generation {self.fence.generation}) expired"
                " or was lost"
            )

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """As ``Store``; refused with ``LeaseLostError`` once the lease is gone."""
        self._check_local()
        self.store.check_fence(self.fence)
        return self.store.groups_for_addresses(addresses)

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """As ``Store``, with the fence checked in the recording transaction."""
        self._check_local()
        return self.store.record_events(events, fence=self.fence)

    def record_events_checked(self, events: Sequence[TimelineEvent]) -> Recorded:
        """As ``Store``, with the fence checked in the recording transaction."""
        self._check_local()
        return self.store.record_events_checked(events, fence=self.fence)

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """As ``Store``."""
        return self.store.add_group(name, addresses)

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """As ``Store``."""
        return self.store.import_groups(rows)

    def list_groups(self) -> list[Group]:
        """As ``Store``."""
        return self.store.list_groups()

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """As ``Store``."""
        return self.store.list_events(group=group, mailbox=mailbox, limit=limit)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Nothing: the shared store's metrics are registered once, by the supervisor."""

    def close(self) -> None:
        """Nothing: the shared store is closed by its owner."""
