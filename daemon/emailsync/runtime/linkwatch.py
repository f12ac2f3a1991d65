"""After a link change, wake the owners of the Failed mail it made due; and the periodic check.

``LinkWatch`` is one thread per daemon. A link change marks the index rows of its addresses
due in the state database (``emailsync.state.failedindex``); the watcher reads the changes
logged since the last it saw and asks each mailbox with due mail whose worker runs here for
a re-file (a ``refile`` trigger: the worker does it between IDLEs, on its own connection).
A change for an address with no Failed mail makes nothing due and wakes nobody, so it costs
no IMAP command. The watcher is woken at once by a change made in this process (a CRM's
call) or, in a cluster, by ``NOTIFY emailsync_links``; otherwise it looks every
``poll_seconds`` (another process: ``emailsync groups add``). A wake-up it misses is not
lost: the marks stay until a worker acts on them, and every worker looks at its marks when
it logs in.

``FailedCheck`` is for CRMs that cannot call back: every ``refile_check_seconds`` it walks the
addresses of the Failed mail of the mailboxes running here, at most
``refile_check_per_minute`` a minute, looks their groups up through the store (batched and
cached like any lookup), and logs a ``periodic`` link change for those now linked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from http import HTTPStatus

import structlog

from emailsync.config import Settings
from emailsync.errors import StoreError
from emailsync.state.base import Store
from emailsync.state.failedindex import LINK_CHANGE, PERIODIC, FailedIndex
from emailsync.timeline.crm.callback import Answer, ChangeReceiver

log = structlog.get_logger(__name__)

# How often the watcher looks for changes made by another process (the CLI) on one host…
LOCAL_POLL_SECONDS = 0.5
# …and in a cluster, where NOTIFY wakes it and this only covers a notification lost.
SHARED_POLL_SECONDS = 30.0
# Addresses a log line names at most (the rest are counted).
LOGGED_ADDRESSES = 5


class LinkWatch:
    """Reads new link changes and asks the workers of the mailboxes they made due to re-file."""

    def __init__(
        self,
        index: FailedIndex,
        wake: Callable[[str], bool],
        *,
        poll_seconds: float = LOCAL_POLL_SECONDS,
    ) -> None:
        self.index = index
        self.wake = wake  # asks a local worker for a re-file; False: none runs here
        self.poll_seconds = poll_seconds
        self._event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: int | None = None  # the newest change seen (None: not read yet)
        self._posted: dict[str, int] = {}  # mailbox → the newest change it was woken for

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="link-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (it ends within a moment)."""
        self._stop.set()
        self._event.set()
        if self._thread is not None:
            self._thread.join(2)

    def poke(self) -> None:
        """Look now (a change was made here, or another instance notified one)."""
        self._event.set()

    def alive(self) -> bool:
        """The thread runs (or was never started)."""
        return self._thread is None or self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._event.wait(self.poll_seconds)
            self._event.clear()
            if self._stop.is_set():
                return
            try:
                self.check()
            except StoreError as exc:
                log.warning("link_watch_failed", error=str(exc))
            except Exception as exc:  # the top of a thread's loop: log and go on
                log.exception("link_watch_failed", error=repr(exc))

    def check(self) -> list[str]:
        """Act on the changes since the last look; the mailboxes asked to re-file."""
        if self._last is None:
            # Changes before this daemon started are its workers' business at login.
            self._last = self.index.watermark()
            return []
        changes = self.index.changes_after(self._last)
        if not changes:
            return []
        self._last = changes[-1].id
        woken: list[str] = []
        for mailbox, change in sorted(self.index.due_mailboxes().items()):
            if change > self._posted.get(mailbox, 0) and self.wake(mailbox):
                self._posted[mailbox] = change
                woken.append(mailbox)
        addresses = sorted({c.address for c in changes})
        log.info(
            "links_changed",
            changes=len(changes),
            addresses=addresses[:LOGGED_ADDRESSES],
            more_addresses=max(0, len(addresses) - LOGGED_ADDRESSES),
            trigger=sorted({c.trigger for c in changes}),
            mailboxes=woken,
        )
        return woken


class FailedCheck:
    """The periodic re-check of Failed-for-no-group mail, one slice a tick (scheduler job)."""

    def __init__(
        self,
        index: FailedIndex,
        store: Store,
        mailboxes: Callable[[], Collection[str]],
        *,
        every_seconds: float,
        per_minute: int,
        tick_seconds: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = index
        self.store = store
        self.mailboxes = mailboxes  # those running here: each instance checks its own
        self.every_seconds = every_seconds
        self.tick_seconds = tick_seconds
        # Each tick looks up its share of the minute's budget, one address at least.
        self.per_tick = max(1, round(per_minute * tick_seconds / 60))
        self.on_change = on_change
        self.clock = clock
        self._cursor: str | None = None  # None: no walk in progress
        self._next_walk = clock() + min(every_seconds, 600.0)
        self._walk_started = 0.0
        self._linked = 0

    def tick(self) -> int:
        """Check the next slice of addresses when a walk is due; how many are linked now."""
        if self.every_seconds <= 0:
            return 0
        now = self.clock()
        if self._cursor is None:
            if now < self._next_walk:
                return 0
            self._cursor, self._walk_started, self._linked = "", now, 0
            log.info("refile_check_started")
        try:
            addresses = self.index.addresses(self._cursor, self.per_tick, self.mailboxes())
            linked = self._linked_of(addresses)
            if linked:
                self.index.links_changed(linked, PERIODIC)
        except StoreError as exc:
            log.warning("refile_check_failed", error=str(exc))  # the same slice next tick
            return 0
        self._linked += len(linked)
        if linked:
            self.on_change()
        if len(addresses) < self.per_tick:
            log.info(
                "refile_check_done",
                linked=self._linked,
                seconds=round(now - self._walk_started, 1),
            )
            self._cursor = None
            self._next_walk = self._walk_started + self.every_seconds
        else:
            self._cursor = addresses[-1]
        return len(linked)

    def _linked_of(self, addresses: list[str]) -> list[str]:
        """Those of ``addresses`` linked to a group now."""
        if not addresses:
            return []
        asked = set(addresses)
        groups = self.store.groups_for_addresses(addresses)
        return sorted({a for g in groups for a in g.addresses if a in asked})


class LinkChanges:
    """A daemon's part in bringing Failed mail back: the watcher, the periodic check, and
    the CRM's ``POST /v1/groups:changed`` (the supervisor composes it; one per daemon)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        index: FailedIndex,
        wake: Callable[[str], bool],
        running: Callable[[], Collection[str]],
        *,
        shared: bool = False,
    ) -> None:
        self.store = store
        self.index = index
        daemon = settings.daemon
        self.watch = LinkWatch(
            index, wake, poll_seconds=SHARED_POLL_SECONDS if shared else LOCAL_POLL_SECONDS
        )
        self.check = FailedCheck(
            index,
            store,
            running,
            every_seconds=daemon.refile_check_seconds,
            per_minute=daemon.refile_check_per_minute,
            tick_seconds=check_tick_seconds(daemon.refile_check_seconds),
            on_change=self.watch.poke,
        )
        crm = settings.crm
        self.receiver = (
            ChangeReceiver(
                crm.secret.read().reveal().encode("utf-8"),
                self.changed,
                window_seconds=crm.changed_window_seconds,
            )
            if crm is not None
            else None
        )

    def start(self) -> None:
        """Start the watcher."""
        self.watch.start()

    def stop(self) -> None:
        """Stop the watcher."""
        self.watch.stop()

    def changed(self, addresses: Sequence[str]) -> None:
        """These addresses' links changed (a CRM said so): mark their mail due, wake owners.

        Marked first, the lookup cache forgotten after: a lookup that raced the call cannot
        leave an old answer cached for the re-file to read.
        """
        self.index.links_changed(addresses, LINK_CHANGE)
        forget = getattr(self.store, "links_changed", None)  # HttpStore's lookup cache
        if callable(forget):
            forget(addresses)
        self.watch.poke()

    def call(self, header: str | None, path: str, body: bytes) -> Answer:
        """Answer a ``POST /v1/groups:changed``; 404 without a ``[crm]``."""
        if self.receiver is None:
            return HTTPStatus.NOT_FOUND, {"error": "no [crm] is configured"}, {}
        return self.receiver.receive(header, path, body)


def check_tick_seconds(every_seconds: float) -> float:
    """How often the periodic check's job runs: each minute, or more often for short periods."""
    return min(60.0, max(1.0, every_seconds / 10))
