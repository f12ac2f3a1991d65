"""Agent tokens one at a time: each issued with a random id, recorded in the state database,
checked against its row there, and revoked on its own.

Who decides what. The vault (``emailsync.state.vault``) signs a token, ``es2.<id>.<address>.
<generation>.<expiry>.<mac>``, and checks its signature and expiry; the ``agent_tokens`` table
of the state database (``store.base.TokenLedger``: SQLite, or PostgreSQL shared by a cluster)
says whether the id was issued and is not revoked. A token whose id has no row is refused: a
database restored from a backup older than the token does not know it, and nothing vouches
for it then. Every token gets an expiry unless ``[daemon] agent_token_days = 0`` says
otherwise (set on purpose: the default is 90 days).

es1 tokens, issued before ids, still work after the upgrade: the agents' bookmarks and the
CRM's sidebar links keep working, where refusing them all at once would lock every agent out
on the day of the upgrade (IT can still do that: ``emailsync keys rotate``). They carry no
id, so all es1 tokens of a mailbox share one row (``legacy_token_id``), recorded on their
first use after the upgrade: IT sees them in the list and revokes them with that row, or
with the mailbox's address, which revokes the mailbox's es1 tokens even before any was used.

Last use is written at most once every ``LAST_USED_WRITE_SECONDS`` per token and process: a
page session checks its token on every request, and a write for each would turn every click
into a write transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from emailsync.config import Settings
from emailsync.errors import StoreError
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.state import DEFAULT_DB_NAME, open_state
from emailsync.state.base import IssuedToken, TokenLedger
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import TOKEN_ID, AgentToken, Vault

log = structlog.get_logger(__name__)

LAST_USED_WRITE_SECONDS = 60.0
TOKEN_ID_BYTES = 8  # 16 hex digits: unique among one database's tokens; not a secret
LEGACY_ISSUER = "es1"  # issued_by of the row standing for a mailbox's es1 tokens


def legacy_token_id(address: str) -> str:
    """The id of the row that stands for every es1 token of a mailbox."""
    return "es1-" + hashlib.sha256(address.encode()).hexdigest()[:16]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AgentTokens:
    """Issues, checks, lists and revokes agent tokens; safe from every request thread."""

    def __init__(
        self,
        vault: Vault,
        ledger: TokenLedger,
        *,
        default_days: int,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.vault = vault
        self.ledger = ledger
        self.default_days = default_days  # 0: no expiry
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._used_written: dict[str, float] = {}  # token id → monotonic time of the last write

    def issue(self, address: str, days: int | None, issued_by: str) -> tuple[str, IssuedToken]:
        """A new token for ``address`` valid ``days`` (None: the default) and its row.

        The row is written first, so no token ever exists without one.
        """
        issued_at = self._clock().replace(microsecond=0)  # the token holds whole seconds
        days = self.default_days if days is None else days
        expires = issued_at + timedelta(days=days) if days else None
        row = IssuedToken(secrets.token_hex(TOKEN_ID_BYTES), address, issued_at, issued_by, expires)
        self.ledger.record_token(row)
        return self.vault.issue_token(address, expires, token_id=row.id), row

    def check(self, token: str) -> AgentToken | None:
        """What ``token`` grants, or None: bad signature, expired, unknown id or revoked.

        ``StoreError`` when the state database cannot say (that is the server's fault, not a
        bad token); ``ConfigError`` when the registry key cannot be read.
        """
        now = self._clock()
        granted = self.vault.check_token(token, now=now)
        if granted is None:
            return None
        token_id = granted.token_id or legacy_token_id(granted.address)
        row = self.ledger.issued_token(token_id)
        if row is None and granted.token_id is None:
            # The first use of this mailbox's es1 tokens since the upgrade: list them.
            first = IssuedToken(token_id, granted.address, None, LEGACY_ISSUER, None, now)
            self.ledger.record_token(first)
            self._mark_written(token_id)
            return granted
        if row is None or row.address != granted.address or row.revoked_at is not None:
            return None
        if self._mark_written(token_id):
            try:
                self.ledger.token_used(token_id, now)
            except StoreError as exc:  # the token is good; only its last use goes unrecorded
                log.warning("agent_token_use_not_recorded", token_id=token_id, error=str(exc))
        return granted

    def _mark_written(self, token_id: str) -> bool:
        """True when the token's last use is due to be written (and from now on counts as)."""
        with self._lock:
            now = self._monotonic()
            last = self._used_written.get(token_id)
            if last is not None and now - last < LAST_USED_WRITE_SECONDS:
                return False
            self._used_written[token_id] = now
            return True

    def issued(self) -> list[IssuedToken]:
        """Every token issued, newest first (revoked and expired ones too)."""
        return self.ledger.issued_tokens()

    def revoke(self, which: str) -> list[IssuedToken]:
        """Revoke the token with id ``which``, or every token of the mailbox ``which`` names.

        Returns the tokens concerned ([] for an unknown id); a mailbox's es1 tokens are
        revoked with its address whether or not one was used yet. ``ValueError`` when
        ``which`` is neither an id nor an address.
        """
        now = self._clock()
        if "@" in which:
            address = normalise_address(which.strip())
            if address is None or mailbox_address_problem(address) is not None:
                raise ValueError(f"{which!r} is neither a token id nor a mailbox address")
            legacy = legacy_token_id(address)
            self.ledger.record_token(
                IssuedToken(legacy, address, None, LEGACY_ISSUER, None, revoked_at=now)
            )
            revoked = self.ledger.revoke_tokens(now, address=address)
        elif TOKEN_ID.fullmatch(which):
            revoked = self.ledger.revoke_tokens(now, token_id=which)
        else:
            raise ValueError(f"{which!r} is neither a token id nor a mailbox address")
        for token in revoked:
            log.info("agent_token_revoked", token_id=token.id, mailbox=token.address)
        return revoked

    def rotated(self) -> int:
        """Mark every token revoked after ``keys rotate`` (their signatures fail already)."""
        return self.ledger.revoke_all_tokens(self._clock())


def token_json(token: IssuedToken, now: datetime) -> dict[str, Any]:
    """A token's row as the API and ``token list --json`` show it (never the token)."""

    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "id": token.id,
        "address": token.address,
        "issued_at": iso(token.issued_at),
        "issued_by": token.issued_by,
        "expires_at": iso(token.expires_at),
        "last_used_at": iso(token.last_used_at),
        "revoked_at": iso(token.revoked_at),
        "state": token.state(now),
    }


@contextlib.contextmanager
def open_agent_tokens(settings: Settings) -> Iterator[AgentTokens]:
    """The agent tokens of the configured state database, for a ``with`` block (the CLI).

    With a ``[crm]`` too: the tokens are emailsync's state, never the CRM's (which is not
    contacted), so they live in the state database whichever timeline is configured.
    """
    with contextlib.ExitStack() as stack:
        opened = open_state(settings.state_url, settings.daemon.state_dir)
        stack.callback(opened.close)
        ledger, close = ledger_for(opened, settings.daemon.state_dir)
        stack.callback(close)
        yield AgentTokens(
            Vault(settings.daemon.state_dir),
            ledger,
            default_days=settings.daemon.agent_token_days,
        )


def ledger_for(store: object, state_dir: Path) -> tuple[TokenLedger, Callable[[], None]]:
    """The tokens table of the state database, and what closes what was opened for it.

    The store's own when it keeps one (SQLite, PostgreSQL). With a ``[crm]`` the store is the
    CRM, which keeps no state: the tokens then live in the built-in SQLite file of
    ``state_dir``, where the state database would be.
    """
    if isinstance(store, TokenLedger):
        return store, lambda: None
    opened = SqliteStore(state_dir / DEFAULT_DB_NAME)
    return opened, opened.close
