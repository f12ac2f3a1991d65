"""Timeline stores: the ``Store`` protocol, and ``open_store`` to pick one by URL."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from emailsync.config import CrmSettings
from emailsync.errors import ConfigError
from emailsync.store.base import Store
from emailsync.store.csvimport import read_group_csv
from emailsync.store.sqlite import SqliteStore

__all__ = ["DEFAULT_DB_NAME", "Store", "check_store_url", "open_store", "read_group_csv"]

# The built-in store's file inside the state directory when the URL names no path.
DEFAULT_DB_NAME = "emailsync.db"
# URL schemes libpq accepts for a connection URI.
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def open_store(url: str, state_dir: Path, crm: CrmSettings | None = None) -> Store:
    """Open the store that the ``[daemon] store`` URL names, migrating its schema if needed.

    With a ``[crm]`` table, the CRM is the store (``url`` is then ignored). Otherwise
    ``sqlite:///abs/path.db`` opens that file; ``sqlite:`` or an empty URL opens
    ``<state_dir>/emailsync.db``; ``postgresql://…`` (or ``postgres://…``) opens a
    ``PostgresStore``, which several instances can share. Raises ``ConfigError`` for a URL
    it cannot use or an unreadable CRM secret, and ``StoreUnavailableError`` /
    ``StoreError`` when the store itself cannot be opened.
    """
    if crm is not None:
        from emailsync.crm.store import HttpStore  # noqa: PLC0415 -- crm.store imports store.base

        # Groups and events live in the CRM; emailsync's own state in the SQLite file.
        return HttpStore(crm, state_path=_sqlite_path(url, state_dir))
    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        # Imported here: psycopg is only loaded by instances that use it.
        from emailsync.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url.strip())
    return SqliteStore(_sqlite_path(url, state_dir))


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
