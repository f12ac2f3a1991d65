"""Office 365 browser sign-ins under way (``signin_flows``), written once for SQLite and PostgreSQL.

A sign-in starts on one instance and the provider redirects the browser back to whichever
instance the load balancer picks: the pending flow (MSAL's, with the PKCE verifier and the
nonce; the mailbox's branch and trigger) is a row keyed by the OAuth ``state``, sealed by the
vault with ``signin_flows:<state>`` as associated data. Taking it is one ``DELETE …
RETURNING``: of two callbacks with the same state (a replay, a double click) exactly one gets
the flow, on any instance. A flow lives ``FLOW_SECONDS``; expired rows are deleted at every
start, and beyond ``max_flows`` the ones closest to expiry go first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from emailsync.errors import ConfigError
from emailsync.state.sqlcore import Capped, SealedRows, SqlEngine
from emailsync.state.vault import Vault

INSERT = "INSERT INTO signin_flows (state, address, flow, expires_at) VALUES (?, ?, ?, ?)"
CAPPED = Capped(
    delete_expired="DELETE FROM signin_flows WHERE expires_at <= ?",
    count="SELECT count(*) FROM signin_flows",
    delete_oldest=(
        "DELETE FROM signin_flows WHERE state IN"
        " (SELECT state FROM signin_flows ORDER BY expires_at, state LIMIT ?)"
    ),
)
TAKE = "DELETE FROM signin_flows WHERE state = ? RETURNING address, flow, expires_at"


class SqlSignInFlows(SealedRows):
    """Pending sign-ins on a SQL engine: ``put`` one, ``take`` it once."""

    def __init__(self, engine: SqlEngine, vault: Vault, *, max_flows: int) -> None:
        super().__init__(engine, vault, "signin_flows")
        self.max_flows = max_flows

    def put(
        self, state: str, address: str, payload: Mapping[str, Any], expires_at: float, now: float
    ) -> None:
        """Keep a flow until ``expires_at`` (Unix seconds); expired ones go."""
        blob = self.seal(state, json.dumps(payload))
        sql = self.dialect.sql
        with self.engine.transaction("keep a sign-in") as conn:
            CAPPED.make_room(conn, self.dialect, now, self.max_flows)
            conn.execute(sql(INSERT), (state, address, blob, expires_at))

    def take(self, state: str, now: float) -> tuple[str, dict[str, Any]] | None:
        """The flow of ``state`` (its address and payload), deleted in the same statement;
        None when there is none, it expired, or it cannot be opened (another key)."""
        if not state:
            return None
        with self.engine.transaction("take a sign-in") as conn:
            row = conn.execute(self.dialect.sql(TAKE), (state,)).fetchone()
        if row is None:
            return None
        address, blob, expires_at = row
        if float(expires_at) <= now:
            return None
        try:
            payload = json.loads(self.unseal(state, bytes(blob)))
        except ConfigError:
            return None
        return str(address), dict(payload)
