"""One daemon's membership of a cluster: its lease keeper, and Start Sync across instances.

With a ``postgresql://`` store every instance runs the workers of the mailboxes it holds a
lease on (``emailsync.cluster.lease``), not of every configured mailbox. A Start Sync that
reaches an instance without the mailbox's worker is written to ``start_sync_requests``
(schema_pg/003_start_sync_requests.sql) and announced with PostgreSQL ``NOTIFY`` on
``emailsync_sync`` in the same transaction; every instance ``LISTEN``s there and the owner
runs the pass. The row is the truth, the notification only a wake-up: one sent while an
instance's listening connection is down reaches nobody, so on every (re)connect the listener
first ``LISTEN``s, then reads the requests above the last id it has seen and acts on those
for the mailboxes it owns. No broker beside the database.

Mailboxes registered at run time share the leases with the config file's (``wanted_mailboxes``:
the daemon reads the registry and the stops afresh at every heartbeat). A registry change
(set-up, forget, Stop Email Sync, a branch) is a row and a ``NOTIFY`` on
``emailsync_registry`` in one transaction (``emailsync.state.registry_sql``); every
instance's listener hands the address to the daemon, which re-reads that mailbox's rows and
acts: the lease's owner (re)starts its worker, or ends it within a notification's delay. On
every (re)connect the daemon re-reads everything.

A request also marks the lease rows of its mailboxes as owed a Start Sync (with its
``include_stuck``; schema_pg/005), and the owner that hands it to its worker clears the
mark: one published while the mailbox passes between owners (handed back, its owner dead or
paused past its lease) is run by whoever claims the lease next (``emailsync.cluster.lease``).
The listener survives any error: it logs, waits, and listens again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Protocol

import psycopg
import structlog
from prometheus_client import CollectorRegistry

from emailsync.cluster.lease import (
    FencedStore,
    LeaseKeeper,
    LeaseTable,
    OwedStartSync,
    WaitForStop,
    default_instance_id,
)
from emailsync.config import ClusterSettings, Settings
from emailsync.errors import StoreError
from emailsync.model import Fence
from emailsync.state.base import Store
from emailsync.state.failedindex import LINKS_CHANNEL
from emailsync.state.postgres import PostgresStore
from emailsync.state.registry_sql import REGISTRY_CHANNEL
from emailsync.telemetry.metrics import ClusterMetrics

log = structlog.get_logger(__name__)

SYNC_CHANNEL = "emailsync_sync"
# How long the listener waits for notifications before checking whether it should stop.
LISTEN_POLL_SECONDS = 1.0
# Back-off between reconnects of the listening connection (the store is down).
LISTEN_RETRY_SECONDS = 2.0
# Publishers hold this advisory lock while they insert a request, so request ids commit in
# increasing order and a listener's "above the last id seen" misses none ("emailsys" in ASCII).
PUBLISH_LOCK_KEY = 0x656D61696C737973
# Requests older than this are deleted by the next publisher. A listener cut off for longer
# (its instance would have lost its leases long before) misses them.
REQUEST_RETENTION = timedelta(days=1)

_PRUNE_REQUESTS = "DELETE FROM start_sync_requests WHERE requested_at < now() - %s"
_INSERT_REQUEST = """
    INSERT INTO start_sync_requests (mailbox, include_stuck, sender) VALUES (%s, %s, %s)
    RETURNING id
"""
# Every lease row the request is for owes it, except those the sender handed it to itself.
_OWE = """
    UPDATE mailbox_leases
    SET owed_request = %(request)s, owed_include_stuck = owed_include_stuck OR %(stuck)s
    WHERE (%(mailbox)s::text IS NULL OR mailbox = %(mailbox)s)
      AND NOT (mailbox = ANY(%(delivered)s) AND owner = %(me)s AND expires_at > now())
"""
_LAST_REQUEST = "SELECT coalesce(max(id), 0) FROM start_sync_requests"
_REQUESTS_AFTER = """
    SELECT id, mailbox, include_stuck, sender FROM start_sync_requests WHERE id > %s ORDER BY id
"""


class ClusterDaemon(Protocol):
    """What the cluster needs from the supervisor: its settings, and workers on demand."""

    @property
    def settings(self) -> Settings:
        """The current configuration (every instance has the same mailboxes)."""
        ...

    def run_mailbox(self, address: str, store: Store) -> bool:
        """Start the mailbox's worker, writing through ``store``."""
        ...

    def drop_mailboxes(self, addresses: Sequence[str]) -> WaitForStop:
        """Ask these mailboxes' workers to stop; the answer waits (bounded) for them."""
        ...

    def start_sync_local(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for a mailbox whose worker runs here (or all local ones)."""
        ...

    def links_notified(self) -> None:
        """Another instance logged a group-link change: look for Failed mail it made due."""
        ...

    def wanted_mailboxes(self) -> list[str]:
        """Every mailbox the cluster shares: the config file's enabled ones not stopped and
        the registered ones that can log in (read afresh)."""
        ...

    def registry_notified(self, address: str | None) -> None:
        """A registry row of ``address`` changed (None: anything may have, re-read all)."""
        ...


class Cluster:
    """Leases and cross-instance Start Sync for one daemon sharing a PostgreSQL store."""

    def __init__(
        self,
        store: PostgresStore,
        daemon: ClusterDaemon,
        settings: ClusterSettings,
        registry: CollectorRegistry,
        *,
        timeline: Store | None = None,
    ) -> None:
        self.store = store
        # Where the workers' groups come from and events go: the state's own tables or a CRM.
        self.timeline: Store = timeline if timeline is not None else store
        self.daemon = daemon
        self.instance_id = settings.instance_id or default_instance_id()
        self.table = LeaseTable(store, self.instance_id, settings.lease_seconds)
        self.keeper = LeaseKeeper(
            self.table, self, ClusterMetrics(registry), lease_seconds=settings.lease_seconds
        )
        self.log = log.bind(instance=self.instance_id)
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self.listening = threading.Event()
        # The highest Start Sync request id this instance has acted on or skipped (None until
        # the listener first connects: requests older than this instance are not its own).
        self._last_request: int | None = None
        # The mailboxes the last heartbeat shared (for owners(), without reading them again).
        self._wanted: list[str] = [m.address for m in daemon.settings.mailboxes if m.enabled]
        # How the listening connection shows in pg_stat_activity.
        self.listen_application_name = f"emailsync-listen {self.instance_id}"

    # -- LeaseHooks ----------------------------------------------------------------------------

    def wanted_mailboxes(self) -> list[str]:
        """Every mailbox the cluster shares (config and registry; stopped ones are not)."""
        wanted = self.daemon.wanted_mailboxes()
        self._wanted = list(wanted)
        return wanted

    def acquire_mailbox(self, address: str, fence: Fence, owed: OwedStartSync | None) -> None:
        """Start the worker with a store that carries the lease's fencing token; hand it the
        Start Sync its lease owes (published while the mailbox had no serving owner)."""
        self.daemon.run_mailbox(address, FencedStore(self.timeline, self.store, fence, self.keeper))
        if owed is not None:
            self.log.info(
                "start_sync_owed",
                mailbox=address,
                include_stuck=owed.include_stuck,
                request=owed.request,
            )
            self.daemon.start_sync_local(address, include_stuck=owed.include_stuck)

    def resume(self, address: str) -> bool:
        """(Re)start a mailbox's worker if this instance holds its lease; True if it does.

        For workers the supervisor stopped itself (reload, Stop Email Sync then setup): a
        worker in a cluster must never run without its lease's fence.
        """
        return self.keeper.resume(address)

    def release_mailboxes(self, addresses: Sequence[str]) -> WaitForStop:
        """Stop the workers (the keeper releases or has lost their leases)."""
        return self.daemon.drop_mailboxes(addresses)

    # -- lifetime ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the lease keeper and the Start Sync listener."""
        self.log.info("cluster_joining", lease_seconds=self.keeper.lease_seconds)
        self._listener = threading.Thread(target=self._listen, name="cluster-listen", daemon=True)
        self._listener.start()
        self.keeper.start()

    def stop(self) -> None:
        """Stop the owned workers, release their leases, leave the cluster."""
        self._stop.set()
        self.keeper.stop()
        if self._listener is not None:
            self._listener.join(LISTEN_POLL_SECONDS * 2)

    def healthy(self) -> bool:
        """The keeper's threads and the Start Sync listener run."""
        listening = self._listener is None or self._listener.is_alive()
        return self.keeper.alive() and listening

    def running(self) -> set[str]:
        """The mailboxes whose lease this instance holds (its workers may serve them)."""
        return set(self.keeper.owned())

    def ready(self) -> bool:
        """The keeper completed a heartbeat (it knows which mailboxes are its own)."""
        return self.keeper.ticks > 0

    def owners(self) -> dict[str, str | None]:
        """The instance holding each configured mailbox (None: nobody right now)."""
        return self.table.owners(self._wanted)

    # -- Start Sync across instances -----------------------------------------------------------

    def publish_sync(self, address: str | None, *, include_stuck: bool = False) -> None:
        """Ask the owner (any instance; all for None) to run a Start Sync pass.

        ``include_stuck``: the pass first releases the messages quarantined in Queue. The
        request is a row (read by listeners that were reconnecting) and a notification, in
        one transaction; requests older than ``REQUEST_RETENTION`` are pruned there too. The
        lease rows it is for owe it until a worker has it, but for this instance's own when
        it is for all: the caller ran it on its own workers already (``Supervisor.start_sync``).
        """
        delivered = self.running() if address is None else set()
        with self.store.transaction("publish start sync") as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (PUBLISH_LOCK_KEY,))
            conn.execute(_PRUNE_REQUESTS, (REQUEST_RETENTION,))
            row = conn.execute(_INSERT_REQUEST, (address, include_stuck, self.instance_id))
            (request,) = row.fetchone() or (None,)
            conn.execute(
                _OWE,
                {
                    "request": request,
                    "stuck": include_stuck,
                    "mailbox": address,
                    "delivered": sorted(delivered),
                    "me": self.instance_id,
                },
            )
            payload = json.dumps(
                {
                    "id": request,
                    "from": self.instance_id,
                    "mailbox": address,
                    "include_stuck": include_stuck,
                }
            )
            conn.execute("SELECT pg_notify(%s, %s)", (SYNC_CHANNEL, payload))
        self.log.info(
            "start_sync_published", mailbox=address, include_stuck=include_stuck, request=request
        )

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with self.store.listen_connection(self.listen_application_name) as conn:
                    # LISTEN first, then read: a request committed in between is both read and
                    # notified (the notification is then skipped by its id), none is neither.
                    conn.execute(f"LISTEN {SYNC_CHANNEL}")  # a constant identifier
                    # Link changes (issue 22): their due marks are the truth; this only wakes.
                    conn.execute(f"LISTEN {LINKS_CHANNEL}")
                    # Registry changes (set-up, forget, stops): the rows are the truth.
                    conn.execute(f"LISTEN {REGISTRY_CHANNEL}")
                    self.daemon.links_notified()  # what a lost connection may have missed
                    self._on_registry(None)  # re-read everything
                    missed = self._catch_up(conn)
                    self.listening.set()
                    self.log.info("start_sync_listening", missed=missed)
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            if notify.channel == LINKS_CHANNEL:
                                self.daemon.links_notified()
                            elif notify.channel == REGISTRY_CHANNEL:
                                self._on_registry(notify.payload)
                            else:
                                self._on_notify(notify.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                self.log.warning("start_sync_listener_lost", error=type(exc).__name__)
                self._stop.wait(LISTEN_RETRY_SECONDS)
            except Exception as exc:  # the top of the listener loop: log, wait, listen again
                # A request that failed is not read again (its id was passed), but its lease
                # rows still owe it: the next owner runs it.
                self.listening.clear()
                self.log.exception("start_sync_listener_failed", error=repr(exc))
                self._stop.wait(LISTEN_RETRY_SECONDS)

    def _on_registry(self, address: str | None) -> None:
        """A registry row changed: the daemon re-reads it; a failure waits for the next
        heartbeat's read (the listener goes on)."""
        try:
            self.daemon.registry_notified(address)
        except StoreError as exc:
            self.log.warning("registry_change_unread", mailbox=address, error=str(exc))

    def _catch_up(self, conn: psycopg.Connection[Any]) -> int:
        """Act on the requests published since the last one seen; return how many there were.

        On the first connect there is nothing to catch up: the mailboxes are not owned yet,
        and each worker's first pass comes with its lease.
        """
        if self._last_request is None:
            row = conn.execute(_LAST_REQUEST).fetchone()
            self._last_request = int(row[0]) if row is not None else 0
            return 0
        rows = conn.execute(_REQUESTS_AFTER, (self._last_request,)).fetchall()
        for request, address, include_stuck, sender in rows:
            self._last_request = max(self._last_request, int(request))
            self._act(
                address, include_stuck=include_stuck, sender=sender, missed=True, request=request
            )
        return len(rows)

    def _on_notify(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            self.log.warning("start_sync_notification_invalid")
            return
        if not isinstance(message, dict):
            return
        request = message.get("id")
        if isinstance(request, int) and self._last_request is not None:
            if request <= self._last_request:
                return  # read from the table when the listener (re)connected
            self._last_request = request
        address = message.get("mailbox")
        if address is not None and not isinstance(address, str):
            return
        sender = message.get("from")
        self._act(
            address,
            include_stuck=message.get("include_stuck") is True,
            sender=sender if isinstance(sender, str) else None,
            missed=False,
            request=request if isinstance(request, int) else None,
        )

    def _act(
        self,
        address: str | None,
        *,
        include_stuck: bool,
        sender: str | None,
        missed: bool,
        request: int | None,
    ) -> None:
        """Run a request's pass here if it is another instance's, for a mailbox we own (or all).

        Once the workers have it, the leases no longer owe it (``settle``); a mailbox this
        instance does not run keeps its mark for the owner, or the next one.
        """
        if sender == self.instance_id:
            return  # the sender ran it locally where it could
        owned = self.running()
        if address is not None and address not in owned:
            return
        mine = sorted(owned) if address is None else [address]
        self.log.info(
            "start_sync_received",
            mailbox=address,
            sender=sender,
            include_stuck=include_stuck,
            missed=missed,
        )
        if self.daemon.start_sync_local(address, include_stuck=include_stuck) and request and mine:
            try:
                self.table.settle(mine, request)
            except StoreError as exc:
                # Left owed: the next owner runs one Start Sync pass more, nothing worse.
                self.log.warning("start_sync_not_settled", mailbox=address, error=str(exc))
