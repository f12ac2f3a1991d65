"""The one place where psycopg and psycopg_pool errors become emailsync's store errors.

One table of decisions: an error after which a later retry can succeed (the server is down,
restarting, shutting us out, overloaded, or our transaction lost a race) is
``StoreUnavailableError`` — the message stays in Queue. Anything else (a constraint, a bug,
a schema we do not know) is ``StoreError``. Messages name what we were doing, never the
connection string, which may carry a password.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import psycopg_pool

from emailsync.errors import StoreError, StoreUnavailableError

# SQLSTATE classes (https://www.postgresql.org/docs/15/errcodes-appendix.html) after which a
# retry can succeed: 08 connection exception, 53 insufficient resources, 57 operator
# intervention (admin_shutdown 57P01, crash_shutdown 57P02, cannot_connect_now 57P03),
# 58 system error (I/O).
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
# Single codes: serialization_failure and deadlock_detected (retry the transaction),
# lock_not_available (lock_timeout), query_canceled (statement_timeout).
_UNAVAILABLE_CODES = frozenset({"40001", "40P01", "55P03", "57014"})


def is_unavailable(exc: BaseException) -> bool:
    """True when a retry later may succeed (see the module docstring)."""
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg_pool.PoolClosed):
        return isinstance(exc, psycopg_pool.PoolTimeout)
    if isinstance(exc, psycopg.Error):
        code = exc.sqlstate
        if code is None:
            # No SQLSTATE: the client side failed — connection refused, reset or closed.
            return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        return code[:2] in _UNAVAILABLE_CLASSES or code in _UNAVAILABLE_CODES
    return False


def translate(exc: Exception, doing: str) -> StoreError:
    """The store error for a psycopg/psycopg_pool exception (raise it ``from exc``)."""
    # The server's primary message only: its detail could quote row values (client mail).
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    sqlstate = getattr(exc, "sqlstate", None)
    if primary:
        reason = primary
    elif sqlstate is None and str(exc).strip():
        # Client-side failures (refused, reset, pool timeout): libpq's text names host and
        # port, never the password.
        reason = str(exc).strip().splitlines()[-1]
    else:
        reason = type(exc).__name__
    message = f"store (postgresql): {doing}: {reason}" + (f" [{sqlstate}]" if sqlstate else "")
    if is_unavailable(exc):
        return StoreUnavailableError(message)
    return StoreError(message)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run a block, turning psycopg errors into ``StoreUnavailableError`` / ``StoreError``."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed) as exc:
        raise translate(exc, doing) from exc
