"""Logged-in page sessions in the state database (``page_sessions``), written once for both.

A session is a server-side row, so a login made on one instance is honoured by every other
and by the next start, and a logout (or a revoked token) ends it everywhere at once: nothing
about it is cached in a process. The row's id is the SHA-256 of the cookie's session id, so
whoever reads the table cannot present a cookie; the token the visitor logged in with (the
control token or an agent's link) is AES-GCM encrypted by the vault with the row's id as
associated data. One-shot messages (``flash``) are written back as JSON.

Expired rows are deleted when met and before each new login; beyond ``max_sessions`` the
oldest go first (a flood of logins cannot grow the table). Times are Unix seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from emailsync.errors import ConfigError
from emailsync.state.sqlcore import Capped, SealedRows, SqlEngine
from emailsync.state.vault import Vault

SELECT = (
    "SELECT principal, token, csrf, messages, created_at, expires_at"
    " FROM page_sessions WHERE id = ?"
)
INSERT = (
    "INSERT INTO page_sessions (id, principal, token, csrf, messages, created_at, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
DELETE = "DELETE FROM page_sessions WHERE id = ?"
CAPPED = Capped(
    delete_expired="DELETE FROM page_sessions WHERE expires_at <= ?",
    count="SELECT count(*) FROM page_sessions",
    delete_oldest=(
        "DELETE FROM page_sessions WHERE id IN"
        " (SELECT id FROM page_sessions ORDER BY created_at, id LIMIT ?)"
    ),
)
MESSAGES = "UPDATE page_sessions SET messages = ? WHERE id = ?"


@dataclass
class SessionRow:
    """One logged-in session as stored: ``principal`` None is the admin."""

    sid: str  # the cookie's id; only its hash is stored
    principal: str | None
    token: str = field(repr=False)
    csrf: str = field(repr=False)
    messages: dict[str, str]
    created_at: float  # Unix seconds
    expires_at: float


def row_id(sid: str) -> str:
    """The row id of a cookie's session id: its SHA-256, in hex."""
    return hashlib.sha256(sid.encode()).hexdigest()


class SqlSessions(SealedRows):
    """Page sessions on a SQL engine; every call is one transaction."""

    def __init__(self, engine: SqlEngine, vault: Vault, *, max_sessions: int) -> None:
        super().__init__(engine, vault, "page_sessions")
        self.max_sessions = max_sessions

    def load(self, sid: str, now: float | None = None) -> SessionRow | None:
        """The live session of this cookie id; an expired or unreadable one is deleted."""
        now = time.time() if now is None else now
        rid = row_id(sid)
        sql = self.dialect.sql
        with self.engine.reading("read a page session") as conn:
            row = conn.execute(sql(SELECT), (rid,)).fetchone()
        if row is None:
            return None
        principal, blob, csrf, messages, created_at, expires_at = row
        token: str | None = None
        if float(expires_at) > now:
            try:
                token = self.unseal(rid, bytes(blob))
            except ConfigError:
                token = None  # sealed under a key this instance no longer holds: log in again
        if token is None:
            self.delete(sid)
            return None
        return SessionRow(
            sid,
            principal or None,
            token,
            str(csrf),
            dict(json.loads(messages)),
            float(created_at),
            float(expires_at),
        )

    def insert(self, session: SessionRow, now: float | None = None) -> None:
        """Store a new session; expired ones go, and the oldest beyond ``max_sessions``."""
        now = time.time() if now is None else now
        rid = row_id(session.sid)
        blob = self.seal(rid, session.token)
        sql = self.dialect.sql
        with self.engine.transaction("store a page session") as conn:
            CAPPED.make_room(conn, self.dialect, now, self.max_sessions)
            conn.execute(
                sql(INSERT),
                (
                    rid,
                    session.principal or "",
                    blob,
                    session.csrf,
                    json.dumps(session.messages),
                    session.created_at,
                    session.expires_at,
                ),
            )

    def delete(self, sid: str) -> None:
        """End a session (on every instance: none keeps a copy)."""
        with self.engine.transaction("end a page session") as conn:
            conn.execute(self.dialect.sql(DELETE), (row_id(sid),))

    def save_messages(self, sid: str, messages: dict[str, str]) -> None:
        """Write a session's one-shot messages back (a page on any instance shows them)."""
        with self.engine.transaction("write page messages") as conn:
            conn.execute(self.dialect.sql(MESSAGES), (json.dumps(messages), row_id(sid)))
