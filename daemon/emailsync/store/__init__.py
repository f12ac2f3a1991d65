"""The state database and the timeline: ``open_state`` and ``open_store`` pick them by URL.

Two independent choices (issue 20). The *state* database holds emailsync's own data (the
registry, secrets, tokens, stops, sessions, leases, …): the SQLite file in state_dir or a
shared PostgreSQL. The *timeline* (where groups come from and events go) is that database's
built-in tables, or a CRM (``[crm]``, ``emailsync.crm.store.HttpStore``) that keeps its own
state in the state database it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote, urlsplit

from emailsync.config import CrmSettings
from emailsync.errors import ConfigError
from emailsync.store.base import Store
from emailsync.store.csvimport import read_group_csv
from emailsync.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from emailsync.store.postgres import PostgresStore

__all__ = [
    "DEFAULT_DB_NAME",
    "StateStore",
    "Store",
    "check_store_url",
    "open_state",
    "open_store",
    "open_timeline",
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
        from emailsync.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url.strip())
    return SqliteStore(_sqlite_path(url, state_dir))


def open_timeline(state: StateStore, crm: CrmSettings | None) -> Store:
    """The timeline over an open state database: its own tables, or the CRM of ``[crm]``.

    The CRM's store keeps its state (the Failed-for-no-group index) in ``state``; closing it
    leaves ``state`` open for its owner. ``ConfigError`` for an unreadable CRM secret.
    """
    if crm is None:
        return state
    from emailsync.crm.store import HttpStore  # noqa: PLC0415 -- crm.store imports store.base

    return HttpStore(crm, state=state)


def open_store(url: str, state_dir: Path, crm: CrmSettings | None = None) -> Store:
    """The timeline for one-off use (the CLI's commands, tests): closing it closes everything.

    Without a ``[crm]`` that is the state database of ``url`` itself (``open_state``). With
    one, the CRM, keeping its state in the database of ``url`` (a SQLite file is opened when
    first needed).
    """
    if crm is None:
        return open_state(url, state_dir)
    from emailsync.crm.store import HttpStore  # noqa: PLC0415 -- crm.store imports store.base

    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        return HttpStore(crm, state=open_state(url, state_dir), owns_state=True)
    return HttpStore(crm, state_path=_sqlite_path(url, state_dir))


def check_store_url(url: str, state_dir: Path) -> None:
    """Raise ``ConfigError`` exactly when ``open_store`` would refuse ``url``.

    ``check-config`` calls this so that it never accepts a URL that ``run`` then refuses:
    both go through the same parser.
    """
    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        return
    _sqlite_path(url, state_dir)


def _sqlite_path(url: str, state_dir: Path) -> Path:
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
