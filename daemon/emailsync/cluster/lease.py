"""Mailbox leases: several instances share the mailboxes through PostgreSQL, with fencing.

Every instance registers a heartbeat row in ``cluster_instances`` and holds leases in
``mailbox_leases`` (schema_pg/002_cluster.sql). On each heartbeat (a third of
``lease_seconds``) the ``LeaseKeeper``:

1. renews its own row and its leases (``expires_at = now() + lease``, the database's clock);
   a lease it did not get back was lost: that mailbox's worker stops at once;
2. computes its fair share, ceil(mailboxes / live instances);
3. above it, stops a few workers and releases their leases once those ended (re-balancing
   slowly, so a joining instance never makes the cluster drop everything at once; above the
   floor while another live instance is below it, one a heartbeat, so shares end within one
   of each other); below it, claims
   free or expired leases with ``SELECT … FOR UPDATE SKIP LOCKED`` (instances claiming at
   the same moment take different rows, none waits) and starts their workers.

The keeper's thread never waits for a worker (issue 19): stops are asked at once and waited
for on threads of their own, while the handed-back leases go on being renewed.

A claim bumps the lease's ``generation``: the fencing token. Every write a worker makes
carries it (``FencedStore``) and the store checks it in the same transaction that records
the events, so an owner that was paused or cut off past its lease, and wakes up still
believing it owns the mailbox, records nothing; the ``LeaseLostError`` that refuses it makes
the worker stop before it moves anything (filing records before it moves), and the filer
asks once more right before each MOVE goes out (``FencedStore.check_lease``), for an owner
paused between the two. The keeper also keeps a local deadline per lease (monotonic clock,
from the start of the renewal that extended it); a watcher thread stops a worker whose
deadline passed even when the store is unreachable or a heartbeat hangs on it. A renewal
that gets through only after the deadline passed does not extend it: the worker may have met
the fence meanwhile and parked, so the lease counts as lost and is claimed anew (a row still
naming this instance is claimable by it at once) with a fresh worker.
Graceful stop: workers first (their leases renewed meanwhile), then the leases are released
so others take them at once.
"""

from __future__ import annotations

import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, Protocol

import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import WORKER_STOP_SECONDS
from emailsync.errors import LeaseLostError, StoreError
from emailsync.model import Fence, Group, TimelineEvent
from emailsync.state.base import Recorded, Store
from emailsync.state.postgres import PostgresStore
from emailsync.telemetry.metrics import ClusterMetrics

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
# together rarely meet on a row; SKIP LOCKED lets them pass each other when they do. A row
# still naming this instance is claimable by it at once: the keeper only claims mailboxes it
# does not run (a lease it lost on its own clock, or held by its previous process), and the
# new generation fences off whatever the old lease's worker still tries.
_CLAIMABLE = """
    SELECT mailbox FROM mailbox_leases
    WHERE mailbox = ANY(%(wanted)s) AND (owner IS NULL OR expires_at <= now() OR owner = %(me)s)
    ORDER BY md5(mailbox || %(me)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
"""
# The Start Sync a lease row owes (schema_pg/005) comes back with the claim; the claimer
# clears it once the new worker has it (_SETTLE), so a claim that starts no worker keeps it.
_CLAIM = """
    UPDATE mailbox_leases
    SET owner = %(me)s, generation = generation + 1, expires_at = now() + %(lease)s,
        acquired_at = now()
    WHERE mailbox = ANY(%(mailboxes)s)
    RETURNING mailbox, generation, owed_request, owed_include_stuck
"""
_SETTLE = """
    UPDATE mailbox_leases SET owed_request = NULL, owed_include_stuck = false
    WHERE mailbox = ANY(%(mailboxes)s) AND owner = %(me)s AND owed_request <= %(request)s
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


@dataclass(frozen=True)
class OwedStartSync:
    """A Start Sync published for a mailbox and not yet handed to a worker of it.

    It waits on the mailbox's lease row (``owed_request``: the latest such request's id), so
    the instance that claims the lease next runs it, with ``include_stuck`` if any of them
    asked for it.
    """

    request: int
    include_stuck: bool


class Claimed(NamedTuple):
    """A lease just claimed, and the Start Sync its row owes (None: nothing)."""

    fence: Fence
    owed: OwedStartSync | None


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

    def claim(self, candidates: Iterable[str], limit: int) -> list[Claimed]:
        """Take up to ``limit`` free or expired leases among ``candidates``; new fences, each
        with the Start Sync its row owes."""
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
        return [
            Claimed(
                Fence(mailbox, self.instance_id, int(generation)),
                None if request is None else OwedStartSync(int(request), bool(include_stuck)),
            )
            for mailbox, generation, request, include_stuck in rows
        ]

    def settle(self, mailboxes: Iterable[str], request: int) -> None:
        """Clear what these leases (still ours) owe up to Start Sync ``request``: delivered."""
        wanted = sorted(mailboxes)
        if not wanted:
            return
        with self.store.transaction("settle start sync") as conn:
            conn.execute(_SETTLE, {"mailboxes": wanted, "me": self.instance_id, "request": request})

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

    def acquire_mailbox(self, address: str, fence: Fence, owed: OwedStartSync | None) -> None:
        """Start the mailbox's worker, writing through a store fenced with ``fence``, and hand
        it the Start Sync the lease owes, if any."""
        ...

    def release_mailboxes(self, addresses: Sequence[str]) -> WaitForStop:
        """Ask these mailboxes' workers to stop, and return at once.

        The answer waits up to its argument (seconds) for them to end: True when they did.
        """
        ...


# Waits up to this many seconds for workers asked to stop; True when they all ended.
WaitForStop = Callable[[float], bool]


class LeaseKeeper:
    """Decides which mailboxes this instance runs; one thread, heartbeat every lease / 3.

    It never waits for a worker: stopping one (its lease handed back or lost) is asked at
    once and waited for on a thread of its own, and a handed-back lease is renewed until its
    worker has ended and only then released, so no lease of this instance expires while a
    slow worker logs out (issue 19). A second thread stops workers whose local deadline has
    passed, even while a heartbeat is stuck on a slow or unreachable store.
    """

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
        # Starting and stopping workers, in the order the leases came and went (a worker of a
        # lease lost by one thread is asked to stop before another starts its successor).
        self._hooks_lock = threading.RLock()
        self._owned: dict[str, Fence] = {}
        self._deadlines: dict[str, float] = {}
        # Handed back, their workers still stopping: renewed, released once those ended.
        self._returning: dict[str, Fence] = {}
        self._returners: list[threading.Thread] = []
        self._registered: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._draining = threading.Event()  # stop() under way: renew only, claim nothing
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
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
            # The clock is read under the lock: a renewal that extends the deadline after this
            # answered False then knows it came too late (see _renew).
            current = self._owned.get(fence.mailbox)
            deadline = self._deadlines.get(fence.mailbox, 0.0)
            return current == fence and time.monotonic() < deadline

    def resume(self, address: str) -> bool:
        """(Re)start a mailbox's worker under the lease held now; False when none is held."""
        with self._hooks_lock:
            fence = self.owned().get(address)
            if fence is None or not self.holds(fence):
                return False
            self.hooks.acquire_mailbox(address, fence, None)
            return True

    def returned(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for handed-back leases to be released; True: none is left."""
        deadline = time.monotonic() + timeout
        for returner in list(self._returners):
            returner.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return not self._returning

    def start(self) -> None:
        """Run the heartbeat loop and the deadline watcher in daemon threads."""
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="lease-deadline", daemon=True)
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        """Stop every owned worker while still renewing its lease, then release and leave.

        Bounded by ``WORKER_STOP_SECONDS`` for the workers (SIGTERM must end the daemon
        within 10 s); the heartbeat goes on meanwhile, so no lease expires under a worker
        that is still logging out.
        """
        self._draining.set()
        with self._hooks_lock:
            with self._lock:
                fences = list(self._owned.values())
                self._returning.update(self._owned)
                self._owned.clear()
                self._deadlines.clear()
            wait = self.hooks.release_mailboxes([fence.mailbox for fence in fences])
        self.metrics.owned_mailboxes.set(0)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        if not wait(WORKER_STOP_SECONDS):
            self.log.warning("workers_slow_to_stop", mailboxes=len(fences))
        self.returned(max(0.0, deadline - time.monotonic()))  # earlier hand-backs
        self._stop.set()
        for thread in (self._thread, self._watcher):
            if thread is not None:
                # Bounded: a tick stuck on an unreachable store claims nothing (draining).
                thread.join(STOP_JOIN_SECONDS)
        with self._lock:
            fences = list(self._returning.values())
            self._returning.clear()
        try:
            self.table.release(fences)
            self.table.leave()
        except StoreError as exc:
            # They expire by themselves within lease_seconds.
            self.log.warning("lease_release_failed", error=str(exc), leases=len(fences))
        else:
            self.log.info("leases_released", leases=len(fences))

    def alive(self) -> bool:
        """The heartbeat and watcher threads run (they never end before stop())."""
        return all(t is not None and t.is_alive() for t in (self._thread, self._watcher))

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
            self._stop.wait(max(0.0, next_beat - time.monotonic()))

    def _watch(self) -> None:
        """Stop workers past their local deadline, on time even while a tick is stuck."""
        while not self._stop.wait(DEADLINE_CHECK_SECONDS):
            try:
                self._expire_local()
            except Exception:  # the top of the watcher loop: log and look again
                self.log.exception("lease_watch_failed")

    def tick(self) -> None:
        """One heartbeat: renew, count instances, then hand back or claim toward the share."""
        wanted = sorted(set(self.hooks.wanted_mailboxes()))
        try:
            if frozenset(wanted) != self._registered:
                self.table.register(wanted)
                self._registered = frozenset(wanted)
            live, fewest = self.table.heartbeat()
            self._renew()
            if self._draining.is_set():
                return  # stop() hands everything back; only the renewals matter now
            if self._announce_pending:
                self._announce_pending = False
                self.log.info("cluster_announced", live_instances=live)
                return
            share = math.ceil(len(wanted) / live) if wanted else 0
            floor = len(wanted) // live
            owned = self.owned()
            with self._lock:
                returning = set(self._returning)
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
                candidates = [m for m in wanted if m not in owned and m not in returning]
                self._claim(candidates, share - len(owned))
        except StoreError as exc:
            self.log.warning("lease_heartbeat_failed", error=str(exc))
            return
        self.ticks += 1

    def _renew(self) -> None:
        with self._lock:
            owned = dict(self._owned)
            returning = list(self._returning)
        if not owned and not returning:
            return
        started = time.monotonic()
        self._last_renewal = started
        held = self.table.renew([*owned, *returning])
        deadline = started + self.lease_seconds * (1 - LOCAL_DEADLINE_MARGIN)
        lost: list[Fence] = []
        lapsed: list[Fence] = []
        with self._lock:
            now = time.monotonic()
            for mailbox, fence in owned.items():
                if self._owned.get(mailbox) != fence:
                    continue  # lost or handed back while the renewal ran
                if held.get(mailbox) != fence.generation:
                    lost.append(fence)
                elif self._deadlines.get(mailbox, 0.0) <= now:
                    # Renewed, but after the local deadline: the worker may have met the
                    # fence and parked (a worker never resumes by itself). A lapsed lease is
                    # never extended: it is lost here and claimed anew (it is still ours).
                    lapsed.append(fence)
                else:
                    self._deadlines[mailbox] = deadline
        self._lose(lost, reason="not_renewed")
        self._lose(lapsed, reason="renewed_too_late")

    def _claim(self, candidates: list[str], limit: int) -> None:
        if self._draining.is_set():
            return
        started = time.monotonic()
        claimed = self.table.claim(candidates, limit)
        fences = [each.fence for each in claimed]
        owed = {each.fence.mailbox: each.owed for each in claimed if each.owed is not None}
        deadline = started + self.lease_seconds * (1 - LOCAL_DEADLINE_MARGIN)
        with self._hooks_lock:
            if self._draining.is_set():
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
            with self._hooks_lock:
                if self._draining.is_set() or not self.holds(fence):
                    continue  # lost while the others started: its worker must not start
                self.log.info("lease_acquired", mailbox=fence.mailbox, generation=fence.generation)
                self.hooks.acquire_mailbox(fence.mailbox, fence, owed.get(fence.mailbox))
            delivered = owed.get(fence.mailbox)
            if delivered is not None:
                self._settle(fence.mailbox, delivered)
            # Starting hundreds of workers takes a while on a busy host: keep renewing, or
            # the leases would pass their deadline before the loop ends.
            if time.monotonic() - self._last_renewal >= self.heartbeat_seconds:
                self._renew()

    def _settle(self, mailbox: str, owed: OwedStartSync) -> None:
        """The new worker has the owed Start Sync: clear it from the lease row."""
        try:
            self.table.settle([mailbox], owed.request)
        except StoreError as exc:
            # Left owed: the next owner runs one Start Sync pass more, nothing worse.
            self.log.warning("start_sync_not_settled", mailbox=mailbox, error=str(exc))

    def _hand_back(self, fences: list[Fence], *, reason: str) -> None:
        """Stop the workers first, then release: never two IDLE connections for a mailbox.

        The stop is waited for on a thread of its own; the lease is renewed meanwhile.
        """
        with self._hooks_lock:
            with self._lock:
                for fence in fences:
                    self._owned.pop(fence.mailbox, None)
                    self._deadlines.pop(fence.mailbox, None)
                    self._returning[fence.mailbox] = fence
                owned = len(self._owned)
            wait = self.hooks.release_mailboxes([fence.mailbox for fence in fences])
        self.metrics.owned_mailboxes.set(owned)
        returner = threading.Thread(
            target=self._release_when_stopped,
            args=(fences, wait, reason),
            name="lease-return",
            daemon=True,
        )
        self._returners = [t for t in self._returners if t.is_alive()] + [returner]
        returner.start()

    def _release_when_stopped(self, fences: list[Fence], wait: WaitForStop, reason: str) -> None:
        """Wait (bounded) for the workers of handed-back leases to end, then release those."""
        try:
            if not wait(WORKER_STOP_SECONDS):
                # Released all the same, as a removed mailbox's worker would be: it is bound
                # by its socket timeouts and only ever logs out now.
                self.log.warning(
                    "workers_slow_to_stop",
                    mailboxes=[f.mailbox for f in fences],
                    waited=WORKER_STOP_SECONDS,
                )
            with self._lock:
                fences = [f for f in fences if self._returning.get(f.mailbox) == f]
            self.table.release(fences)
            for fence in fences:
                self.log.info("lease_released", mailbox=fence.mailbox, reason=reason)
        except StoreError as exc:
            # They expire by themselves within lease_seconds.
            self.log.warning("lease_release_failed", error=str(exc), leases=len(fences))
        except Exception:  # the top of this thread: a failure must not leave leases stuck
            self.log.exception("lease_return_failed")
        finally:
            with self._lock:
                for fence in fences:
                    if self._returning.get(fence.mailbox) == fence:
                        del self._returning[fence.mailbox]

    def _lose(self, fences: Sequence[Fence], *, reason: str) -> None:
        """Forget leases this instance no longer holds and have their workers stop (at once)."""
        lost: list[Fence] = []
        with self._hooks_lock:
            with self._lock:
                for fence in fences:
                    if self._owned.get(fence.mailbox) == fence:
                        del self._owned[fence.mailbox]
                        self._deadlines.pop(fence.mailbox, None)
                        lost.append(fence)
                owned = len(self._owned)
            if not lost:
                return
            # Not waited for: the lease is gone already, and the supervisor starts no
            # successor of a worker before it has ended.
            self.hooks.release_mailboxes([fence.mailbox for fence in lost])
        self.metrics.owned_mailboxes.set(owned)
        self.metrics.lease_losses.inc(len(lost))
        for fence in lost:
            self.log.warning(
                "lease_lost", mailbox=fence.mailbox, generation=fence.generation, reason=reason
            )

    def _expire_local(self) -> None:
        """Stop workers whose lease may have expired by now, store reachable or not."""
        now = time.monotonic()
        with self._lock:
            expired = [self._owned[m] for m, d in self._deadlines.items() if d <= now]
        self._lose(expired, reason="deadline_passed")


class FencedStore:
    """The timeline as one leased mailbox's worker sees it: nothing happens without the lease.

    ``timeline`` is the state database's own tables (``state`` itself) or a CRM. Reads before
    filing check the lease too (locally, then in the database), so a worker that woke up
    without its lease fails its pass with ``LeaseLostError`` before it decides to move
    anything, including messages that would go to Failed without an event. Built-in events
    are recorded with the fence checked in their transaction; a CRM's are delivered only after
    the database said the generation is still this instance's. ``check_lease`` (right before
    the MOVEs) asks the database again: a paused instance woken after its lease moved
    delivers nothing and moves nothing (issue 20).
    """

    def __init__(
        self, timeline: Store, state: PostgresStore, fence: Fence, keeper: LeaseKeeper
    ) -> None:
        self.timeline = timeline
        self.store = state
        self.fence = fence
        self.keeper = keeper

    def _check_local(self) -> None:
        if not self.keeper.holds(self.fence):
            raise LeaseLostError(
                f"lease on {self.fence.mailbox} (generation {self.fence.generation}) expired"
                " or was lost"
            )

    def check_lease(self) -> None:
        """Raise ``LeaseLostError`` once the lease is gone (``LeaseBound``; before a move).

        On this instance's own clock first, then in the database: one round trip a batch.
        """
        self._check_local()
        self.store.check_fence(self.fence)

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """As ``Store``; refused with ``LeaseLostError`` once the lease is gone."""
        self.check_lease()
        return self.timeline.groups_for_addresses(addresses)

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """As ``Store``, with the fence checked in the recording transaction or before."""
        if self._fenced_in_transaction():
            return self.store.record_events(events, fence=self.fence)
        return self.timeline.record_events(events)

    def record_events_checked(self, events: Sequence[TimelineEvent]) -> Recorded:
        """As ``Store``, with the fence checked in the recording transaction or before."""
        if self._fenced_in_transaction():
            return self.store.record_events_checked(events, fence=self.fence)
        return self.timeline.record_events_checked(events)

    def _fenced_in_transaction(self) -> bool:
        """True when the events go to the state database, whose recording transaction checks
        the fence (the lease checked locally first); otherwise (a CRM) the lease is checked
        now, in the database too, before they are delivered."""
        if self.timeline is self.store:
            self._check_local()
            return True
        self.check_lease()
        return False

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """As ``Store``."""
        return self.timeline.add_group(name, addresses)

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """As ``Store``."""
        return self.timeline.import_groups(rows)

    def list_groups(self) -> list[Group]:
        """As ``Store``."""
        return self.timeline.list_groups()

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """As ``Store``."""
        return self.timeline.list_events(group=group, mailbox=mailbox, limit=limit)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Nothing: the shared store's metrics are registered once, by the supervisor."""

    def close(self) -> None:
        """Nothing: the shared store is closed by its owner."""
