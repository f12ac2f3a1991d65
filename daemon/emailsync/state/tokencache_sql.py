"""Office 365 token caches in the state database (``token_caches``), written once for both.

In a cluster the instance that finished a browser sign-in is seldom the one whose lease runs
the mailbox, and a lease moves: the cache (with the refresh token) is a row of the shared
state, AES-GCM encrypted by the vault with ``token_caches:<address>`` as associated data (a
blob cannot be moved to another mailbox's row). A refresh reads the row ``FOR UPDATE`` and
writes it back in the same transaction, so writers on every instance take turns, as the
``flock`` of ``FileTokenCaches`` makes them on one host. A mailbox with no row yet has nothing
to lock: its first writers are sign-ins, which hold no refresh token to lose.

A refresh holds the row's lock across the provider's HTTP answer (seconds when it is slow), so
in PostgreSQL the locking transactions run on a few connections of their own
(``TOKEN_CACHE_CONNECTIONS``, opened at first use), never on the state's pool, which the lease
renewals and the filing share: refreshes of many mailboxes at once (after an outage) queue
among themselves and never make a lease renewal wait.

``token_caches_for`` picks the store: this one for a PostgreSQL state, files in ``state_dir``
for SQLite (one host; existing deployments keep their files). On SQLite the statements work
too (the transaction is ``BEGIN IMMEDIATE``, which locks the whole file meanwhile): the
contract tests run them on both.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from emailsync.errors import StoreError
from emailsync.imap.tokencache import FileTokenCaches, StoredCache, TokenCacheStore
from emailsync.state.sqlcore import SealedRows, SqlEngine, dialect_of, row_label
from emailsync.state.vault import Vault

SELECT = "SELECT cache FROM token_caches WHERE address = ?"
UPSERT = (
    "INSERT INTO token_caches (address, cache, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (address) DO UPDATE SET cache = excluded.cache, updated_at = excluded.updated_at"
)
DELETE = "DELETE FROM token_caches WHERE address = ?"
# The PostgreSQL connections of the refreshes' row locks (apart from the state's pool).
TOKEN_CACHE_CONNECTIONS = 4


class SqlTokenCaches(SealedRows):
    """``TokenCacheStore`` on a SQL engine: one vault-encrypted row per mailbox."""

    def __init__(
        self, engine: SqlEngine, vault: Vault, *, locking: SqlEngine | None = None
    ) -> None:
        """``locking``: where the read-modify-write transactions run (default ``engine``)."""
        super().__init__(engine, vault, "token_caches")
        self.locking = locking or engine
        # SQLite has no row locks: its write transaction holds the database's lock already.
        self._locked_select = SELECT + (" FOR UPDATE" if self.dialect.postgres else "")

    def path(self, address: str) -> Path | None:
        """Not a file."""
        return None

    def where(self, address: str) -> str:
        """Where the cache is, for messages (never its content)."""
        return f"in the state database ({self.dialect.name})"

    @contextlib.contextmanager
    def locked(self, address: str) -> Iterator[_SqlSlot]:
        """A transaction holding the row's lock (when there is a row) until the block ends.

        The vault's key check comes first (``KeyUnavailableError``): an instance whose key no
        longer matches the state database's (another rotated it) could not write the cache
        back, so it must not redeem a refresh token the provider then rotates away.
        """
        if self.vault.guard is not None:
            self.vault.guard()
        with self.locking.transaction("lock the token cache") as conn:
            row = conn.execute(self.dialect.sql(self._locked_select), (address,)).fetchone()
            yield _SqlSlot(self, conn, address, None if row is None else bytes(row[0]))

    def read(self, address: str) -> StoredCache | None:
        """The cache as committed now, without the lock."""
        with self.engine.reading("read the token cache") as conn:
            row = conn.execute(self.dialect.sql(SELECT), (address,)).fetchone()
        return None if row is None else self._open(address, bytes(row[0]))

    def forget(self, address: str) -> None:
        """Delete the mailbox's row; it waits for a refresh holding the lock to finish."""
        with self.engine.transaction("forget the token cache") as conn:
            conn.execute(self.dialect.sql(DELETE), (address,))

    def close(self) -> None:
        """Close the locking connections when they are the caches' own."""
        if self.locking is not self.engine:
            close = getattr(self.locking, "close", None)
            if callable(close):
                close()

    def _open(self, address: str, blob: bytes) -> StoredCache:
        # The stamp is the ciphertext itself: a fresh nonce on every write.
        text = self.unseal(address, blob)
        return StoredCache(text, blob)

    def _write(self, conn: Any, address: str, text: str) -> bytes:
        blob = self.seal(address, text)
        conn.execute(self.dialect.sql(UPSERT), (address, blob, time.time()))
        return blob


class _SqlSlot:
    """The row while ``SqlTokenCaches.locked`` holds it."""

    def __init__(self, caches: SqlTokenCaches, conn: Any, address: str, blob: bytes | None) -> None:
        self._caches = caches
        self._conn = conn
        self._address = address
        self._blob = blob

    def read(self) -> StoredCache | None:
        return None if self._blob is None else self._caches._open(self._address, self._blob)

    def write(self, text: str) -> object:
        self._blob = self._caches._write(self._conn, self._address, text)
        return self._blob


def reseal_shared_state(engine: SqlEngine, convert: Callable[[bytes, str], bytes]) -> int:
    """``emailsync keys rotate``: re-encrypt what the shared-state tables seal, in one
    transaction; how many rows. Token caches (refresh tokens: losing one costs a sign-in),
    page sessions and pending sign-ins, each under its own row's label. ``convert`` leaves a
    blob already under the new generation as it is, so an interrupted rotation resumes."""
    sql = dialect_of(engine).sql
    lock = " FOR UPDATE" if dialect_of(engine).postgres else ""
    tables = (
        ("token_caches", "address", "cache"),
        ("page_sessions", "id", "token"),
        ("signin_flows", "state", "flow"),
    )
    done = 0
    with engine.transaction("re-encrypt the shared state") as conn:
        for table, key, column in tables:
            select = f"SELECT {key}, {column} FROM {table}{lock}"  # noqa: S608 -- names above
            update = f"UPDATE {table} SET {column} = ? WHERE {key} = ?"  # noqa: S608 -- names above
            for row_key, blob in conn.execute(sql(select)).fetchall():
                conn.execute(
                    sql(update), (convert(bytes(blob), row_label(table, row_key)), row_key)
                )
                done += 1
    return done


def token_caches_for(state: object, vault: Vault, state_dir: Path) -> TokenCacheStore:
    """Where a daemon keeps delegated token caches: the state database when it is shared
    (PostgreSQL), else files in ``state_dir`` (SQLite, one host; a CRM's local state)."""
    if isinstance(state, SqlEngine) and dialect_of(state).postgres:
        pool = getattr(state, "pool", None)
        url = getattr(pool, "conninfo", None)
        own = _OwnConnections(url, TOKEN_CACHE_CONNECTIONS) if isinstance(url, str) else None
        return SqlTokenCaches(state, vault, locking=own)
    return FileTokenCaches(state_dir)


class _OwnConnections:
    """A small PostgreSQL pool of the token caches' own, opened at first use (see the module)."""

    param_marker = "%s"

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._size = size
        self._store: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def transaction(self, doing: str) -> contextlib.AbstractContextManager[Any]:
        """A transaction on one of the own connections."""
        return self._opened().transaction(doing)  # type: ignore[no-any-return]

    def reading(self, doing: str) -> contextlib.AbstractContextManager[Any]:
        """A read on one of the own connections."""
        return self._opened().reading(doing)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the pool if it was opened; later uses raise ``StoreError``."""
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None:
            store.close()

    def _opened(self) -> Any:
        with self._lock:
            if self._closed:
                raise StoreError("token caches: already closed")
            if self._store is None:
                # Imported here: psycopg is loaded only for a PostgreSQL state.
                from emailsync.state.postgres import PostgresStore  # noqa: PLC0415

                self._store = PostgresStore(self._url, max_connections=self._size)
            return self._store
