"""The state database: emailsync's own data, in SQLite (one host) or PostgreSQL (a cluster).

It holds the registry, encrypted secrets (``vault``, checked by ``keycheck``), agent tokens
(``agenttoken``), stops, sessions, sign-ins, token caches, leases and the Failed-for-no-group
index, and the built-in timeline tables (``timeline_sql``), so a state database is itself a
``Store``. The protocols are in ``base``; each table's SQL is written once (``*_sql``) for
both databases (``sqlcore`` holds the dialects); ``sqlite`` and ``postgres`` keep connections
and migrations (``schema/``, ``schema_pg/``). ``open_state`` picks one by URL.

May import: ``emailsync.imap`` (token caches), ``emailsync.config`` and below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote, urlsplit

from emailsync.errors import ConfigError
from emailsync.state.base import Store
from emailsync.state.csvimport import read_group_csv
from emailsync.state.sqlite import SqliteStore

if TYPE_CHECKING:
    from emailsync.state.postgres import PostgresStore

__all__ = [
    "DEFAULT_DB_NAME",
    "StateStore",
    "Store",
    "check_store_url",
    "open_state",
    "read_group_csv",
]

# A state database: either keeps the built-in timeline tables too, so either is also a Store.
StateStore: TypeAlias = "SqliteStore | PostgresStore"

# The built-in store's file inside the state directory when the URL names no path.
DEFAULT_DB_NAME = "emailsync.db"
# URL schemes libpq accepts for a connection URI.
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def open_state(url: str, state_dir: Path) -> StateStore:
    """Open the state database the ``[daemon] state`` URL names, migrating it if needed.

    ``sqlite:///abs/path.db`` opens that file; ``sqlite:`` or an empty URL opens
    ``<state_dir>/emailsync.db``; ``postgresql://…`` (or ``postgres://…``) opens a
    ``PostgresStore``, which several instances can share. Raises ``ConfigError`` for a URL it
    cannot use, and ``StoreUnavailableError`` / ``StoreError`` when the database cannot be
    opened.
    """
    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        # Imported here: psycopg is only loaded by instances that use it.
        from emailsync.state.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url.strip())
    return SqliteStore(sqlite_path(url, state_dir))


def check_store_url(url: str, state_dir: Path) -> None:
    """Raise ``ConfigError`` exactly when ``open_store`` would refuse ``url``.

    ``check-config`` calls this so that it never accepts a URL that ``run`` then refuses:
    both go through the same parser.
    """
    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        return
    sqlite_path(url, state_dir)


def sqlite_path(url: str, state_dir: Path) -> Path:
    """The database file a store URL names; ``ConfigError`` for any other URL."""
    url = url.strip()
    if not url:
        return state_dir / DEFAULT_DB_NAME
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme:
        raise ConfigError([f"store: {url!r} is not a URL; use sqlite:///ABSOLUTE/PATH.db"])
    if scheme != "sqlite":
        # Only the scheme is echoed: a postgresql:// URL may carry a password.
        raise ConfigError(
            [
                f"store: unsupported store URL scheme {scheme!r}; use sqlite:///ABSOLUTE/PATH.db"
                " or postgresql://USER@HOST/DATABASE"
            ]
        )
    if parts.netloc:
        raise ConfigError(
            [f"store: {url!r} names a host; use three slashes: sqlite:///ABSOLUTE/PATH.db"]
        )
    if parts.query or parts.fragment:
        raise ConfigError([f"store: {url!r} has a query or fragment; sqlite URLs take none"])
    path = unquote(parts.path)
    if not path:
        return state_dir / DEFAULT_DB_NAME
    if not path.startswith("/"):
        raise ConfigError([f"store: {url!r} needs an absolute path: sqlite:///ABSOLUTE/PATH.db"])
    # sqlite:////abs (SQLAlchemy's spelling of an absolute path) names the same file; POSIX
    # keeps a leading "//" in a path, which then shows up in every message.
    return Path("/" + path.lstrip("/"))
