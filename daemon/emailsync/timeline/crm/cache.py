"""A TTL cache of group lookups by address, negative answers included."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from emailsync.model import Group

# Beyond this many addresses the oldest entries go first (a busy office sees a few thousand).
MAX_ENTRIES = 50_000


class LookupCache:
    """Address → the groups linked to it, each entry kept for a TTL.

    An empty tuple is a cached negative answer ("no group"), which is only ever stored after
    the CRM said so: a failed lookup stores nothing. Safe to share between threads.
    """

    def __init__(
        self,
        ttl_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, tuple[Group, ...]]] = {}
        self._lock = threading.Lock()

    def get_many(self, addresses: Iterable[str]) -> tuple[dict[str, tuple[Group, ...]], list[str]]:
        """The cached answers that are still fresh, and the addresses that need a lookup."""
        now = self.clock()
        found: dict[str, tuple[Group, ...]] = {}
        missing: list[str] = []
        with self._lock:
            for address in addresses:
                entry = self._entries.get(address)
                if entry is not None and entry[0] > now:
                    found[address] = entry[1]
                else:
                    if entry is not None:
                        del self._entries[address]
                    missing.append(address)
        return found, missing

    def put_many(
        self, answers: dict[str, tuple[Group, ...]], *, ttl_seconds: float | None = None
    ) -> None:
        """Store answers for ``ttl_seconds`` (the server's ``max-age``), else the configured TTL."""
        ttl = self.ttl_seconds if ttl_seconds is None else min(ttl_seconds, self.ttl_seconds)
        if ttl <= 0:
            return
        expires = self.clock() + ttl
        with self._lock:
            for address, groups in answers.items():
                self._entries.pop(address, None)  # re-insert: dict order is the age order
                self._entries[address] = (expires, groups)
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def forget(self, addresses: Iterable[str]) -> None:
        """Forget these addresses' answers (the CRM said their links changed)."""
        with self._lock:
            for address in addresses:
                self._entries.pop(address, None)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
