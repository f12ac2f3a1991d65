"""Where MSAL's token cache of a delegated Office 365 mailbox lives: a file, or the state database.

The cache holds the refresh token, which the provider may rotate on every use and refuse
once rotated. So every refresh is a read-modify-write of the cache under a lock that every
other writer of the same mailbox takes too (the daemon's worker, the sign-in that stored it,
``emailsync auth login``): ``TokenCacheStore.locked`` reads the cache with the lock held and
writes it back before letting go, so nobody redeems a refresh token another has already
rotated away, nor writes an older cache over a newer one.

Two stores. ``FileTokenCaches``: ``state_dir/tokens/<address>.json`` (0600 in a 0700
directory) under an ``flock`` on ``<address>.json.lock``: one host, the SQLite state's
default, and what existing deployments have. ``emailsync.state.tokencache_sql.SqlTokenCaches``:
a ``token_caches`` row of the shared (PostgreSQL) state database, vault-encrypted, under
``SELECT … FOR UPDATE``: in a cluster the instance that finished a sign-in is seldom the one
that runs the mailbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import structlog

from emailsync.privilege import PRIVATE_DIR_MODE as TOKEN_DIR_MODE
from emailsync.privilege import PRIVATE_FILE_MODE as TOKEN_FILE_MODE
from emailsync.privilege import write_private_file

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StoredCache:
    """A cache as read: MSAL's serialised JSON, and a stamp that changes with every write."""

    text: str
    stamp: object


class CacheSlot(Protocol):
    """One mailbox's cache while its lock is held (``TokenCacheStore.locked``)."""

    def read(self) -> StoredCache | None:
        """The cache now, or None when there is none."""
        ...

    def write(self, text: str) -> object:
        """Replace the cache with ``text``; the new stamp."""
        ...


class TokenCacheStore(Protocol):
    """The token caches of delegated Office 365 mailboxes, one per address."""

    def locked(self, address: str) -> AbstractContextManager[CacheSlot]:
        """Hold ``address``'s cache lock (every instance, every process) for a read-modify-write."""
        ...

    def read(self, address: str) -> StoredCache | None:
        """The cache without the lock (for a status or an expiry), or None."""
        ...

    def forget(self, address: str) -> None:
        """Delete the mailbox's cache (Stop Email Sync); nothing to delete is fine."""
        ...

    def where(self, address: str) -> str:
        """Where the cache is kept, for messages and ``auth status`` (never its content)."""
        ...

    def path(self, address: str) -> Path | None:
        """The cache file, or None when it is not a file."""
        ...

    def close(self) -> None:
        """Let go of what the store holds open (a daemon's shutdown)."""
        ...


class FileTokenCaches:
    """Token caches as files under ``state_dir/tokens`` with an ``flock`` beside each."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def path(self, address: str) -> Path:
        """``state_dir/tokens/<address>.json``."""
        return token_cache_path(self.state_dir, address)

    def where(self, address: str) -> str:
        """The file's path."""
        return str(self.path(address))

    @contextlib.contextmanager
    def locked(self, address: str) -> Iterator[CacheSlot]:
        """Hold an exclusive ``flock`` on ``<cache>.lock`` (other processes, other instances).

        A separate lock file, because the cache itself is replaced by rename on every write
        (a lock on the old inode would not exclude a writer of the new one). The lock file is
        never deleted, for the same reason.
        """
        path = self.path(address)
        lock_path = token_cache_lock_path(path)
        lock_path.parent.mkdir(mode=TOKEN_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, TOKEN_FILE_MODE)
        try:
            # Blocks while another process refreshes: bounded by the HTTP session's timeouts.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield _FileSlot(path)
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def read(self, address: str) -> StoredCache | None:
        """The file as it is (OSError, ValueError when unreadable)."""
        return _read_file(self.path(address))

    def forget(self, address: str) -> None:
        """Delete the file under its lock (the lock file stays: see ``locked``)."""
        with self.locked(address), contextlib.suppress(FileNotFoundError):
            self.path(address).unlink()

    def close(self) -> None:
        """Nothing is held open between uses."""


class _FileSlot:
    def __init__(self, path: Path) -> None:
        self._path = path

    def read(self) -> StoredCache | None:
        return _read_file(self._path)

    def write(self, text: str) -> object:
        write_private_file(self._path, text)
        return _stamp(self._path.stat())


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _read_file(path: Path) -> StoredCache | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if info.st_mode & 0o077:
        path.chmod(TOKEN_FILE_MODE)
        log.warning("token_cache_mode_fixed", path=str(path))
    return StoredCache(path.read_text(encoding="utf-8"), _stamp(info))


def token_cache_path(state_dir: Path, address: str) -> Path:
    """Where a mailbox's MSAL token cache lives: ``state_dir/tokens/<address>.json``."""
    # A local part may legally hold "/" and other oddities: percent-encode all but the usual.
    return state_dir / "tokens" / f"{quote(address, safe='@.+-_')}.json"


def token_cache_lock_path(cache_path: Path) -> Path:
    """The lock file beside a token cache: ``<address>.json.lock``."""
    return cache_path.with_name(cache_path.name + ".lock")
