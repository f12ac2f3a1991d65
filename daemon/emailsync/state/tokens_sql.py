"""The agent-token ledger's SQL (``TokenLedger``), written once for SQLite and PostgreSQL.

``SqlTokens`` runs these on a ``SqlEngine``; times go through the engine's ``Dialect`` (ISO
text in SQLite, ``timestamptz`` in PostgreSQL; a naive datetime is UTC in both). In
PostgreSQL the table is shared by the cluster: a token revoked on one host stops working on
every instance at once, and tokens issued anywhere are listed together.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from emailsync.state.base import IssuedToken
from emailsync.state.rows import newest_first
from emailsync.state.sqlcore import SqlEngine, dialect_of

INSERT = (
    "INSERT INTO agent_tokens"
    " (id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
EVERY = (
    "SELECT id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at"
    " FROM agent_tokens"
)
BY_ID = EVERY + " WHERE id = ?"
BY_ADDRESS = EVERY + " WHERE address = ?"
REVOKE_ID = "UPDATE agent_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
REVOKE_ADDRESS = "UPDATE agent_tokens SET revoked_at = ? WHERE address = ? AND revoked_at IS NULL"
REVOKE_ALL = "UPDATE agent_tokens SET revoked_at = ? WHERE revoked_at IS NULL"
USED = "UPDATE agent_tokens SET last_used_at = ? WHERE id = ?"


class SqlTokens:
    """The ``TokenLedger`` methods on a SQL engine; each one statement or one transaction."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine
        self.dialect = dialect_of(engine)

    def record_token(self, token: IssuedToken) -> None:
        """Record a token; an id recorded before keeps its first row."""
        time = self.dialect.time
        with self.engine.transaction("record agent token") as conn:
            conn.execute(
                self.dialect.sql(INSERT),
                (
                    token.id,
                    token.address,
                    time(token.issued_at),
                    token.issued_by,
                    time(token.expires_at),
                    time(token.last_used_at),
                    time(token.revoked_at),
                ),
            )

    def issued_token(self, token_id: str) -> IssuedToken | None:
        """The token with this id, or None."""
        with self.engine.reading("read agent token") as conn:
            row = conn.execute(self.dialect.sql(BY_ID), (token_id,)).fetchone()
        return None if row is None else self._token(row)

    def issued_tokens(self) -> list[IssuedToken]:
        """Every token recorded, newest first (the es1 rows last, by address)."""
        with self.engine.reading("list agent tokens") as conn:
            rows = conn.execute(self.dialect.sql(EVERY)).fetchall()
        return newest_first(self._token(row) for row in rows)

    def revoke_tokens(
        self, at: datetime, *, token_id: str | None = None, address: str | None = None
    ) -> list[IssuedToken]:
        """Revoke the token with this id, or every token of this address; the tokens named,
        as they are now (one revoked before keeps its first ``revoked_at``)."""
        if (token_id is None) == (address is None):
            raise ValueError("revoke one token id or one address")
        by_id = token_id is not None
        revoke, select = (REVOKE_ID, BY_ID) if by_id else (REVOKE_ADDRESS, BY_ADDRESS)
        value = token_id if by_id else address
        with self.engine.transaction("revoke agent tokens") as conn:
            conn.execute(self.dialect.sql(revoke), (self.dialect.time(at), value))
            rows = conn.execute(self.dialect.sql(select), (value,)).fetchall()
        return newest_first(self._token(row) for row in rows)

    def revoke_all_tokens(self, at: datetime) -> int:
        """Revoke every token not revoked yet; how many."""
        with self.engine.transaction("revoke agent tokens") as conn:
            cursor = conn.execute(self.dialect.sql(REVOKE_ALL), (self.dialect.time(at),))
            return max(int(cursor.rowcount), 0)

    def token_used(self, token_id: str, at: datetime) -> None:
        """Record the token's last use."""
        with self.engine.transaction("record agent token use") as conn:
            conn.execute(self.dialect.sql(USED), (self.dialect.time(at), token_id))

    def _token(self, row: Sequence[Any]) -> IssuedToken:
        token_id, address, issued_at, issued_by, *times = row
        issued, expires, used, revoked = (
            None if t is None else self.dialect.read_time(t) for t in (issued_at, *times)
        )
        return IssuedToken(token_id, address, issued, issued_by, expires, used, revoked)
