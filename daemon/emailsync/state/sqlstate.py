"""What SqliteStore and PostgresStore share: the Store, Registry and TokenLedger methods.

Each is one call into the statements written once for both databases (``timeline_sql``,
``registry_sql``, ``tokens_sql``); a store brings its connections, its migrations and the
few methods that differ (recording events: PostgreSQL checks a lease's fence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from datetime import datetime

from emailsync.model import Group, TimelineEvent
from emailsync.state.base import IssuedToken, RegisteredBranch, RegisteredMailbox
from emailsync.state.registry_sql import SqlRegistry
from emailsync.state.timeline_sql import SqlTimeline
from emailsync.state.tokens_sql import SqlTokens


class SqlStateMethods:
    """The shared methods; a subclass sets ``_timeline``, ``_registry`` and ``_tokens``."""

    _timeline: SqlTimeline
    _registry: SqlRegistry
    _tokens: SqlTokens

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """Groups linked to any of the (normalised) addresses, each once, ordered by name.

        Each ``Group.addresses`` holds all addresses of the group, not only the matched ones.
        Addresses are compared case-insensitively.
        """
        return self._timeline.groups_for_addresses(addresses)

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """Create the group, or extend it, with the addresses; return it with all addresses.

        Addresses are normalised; raises ``ValueError`` naming the first invalid name or
        address, before anything is written.
        """
        return self._timeline.add_group(name, addresses)

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """Link ``(group, address)`` rows, creating groups as needed; return new links.

        Raises ``ValueError`` naming the first invalid row (counting from 1); nothing is
        written then. Rows already linked, or repeated, are not counted.
        """
        return self._timeline.import_groups(rows)

    def list_groups(self) -> list[Group]:
        """Every group with all its addresses, ordered by name."""
        return self._timeline.list_groups()

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` filled in (sorted).

        ``group`` keeps one group's events, ``mailbox`` the events that mailbox filed (first
        or later); ``limit`` caps how many are returned.
        """
        return self._timeline.list_events(group=group, mailbox=mailbox, limit=limit)

    def put_branch(self, branch: RegisteredBranch) -> bool:
        """Create or replace a branch; True when it is new."""
        return self._registry.put_branch(branch)

    def registered_branches(self) -> list[RegisteredBranch]:
        """Every registered branch, by name."""
        return self._registry.registered_branches()

    def put_mailbox(self, mailbox: RegisteredMailbox, secret: bytes | None) -> None:
        """Create or replace a mailbox with its encrypted secret; it is not stopped after."""
        self._registry.put_mailbox(mailbox, secret)

    def registered_mailboxes(self) -> list[RegisteredMailbox]:
        """Every registered mailbox, by address (no secrets)."""
        return self._registry.registered_mailboxes()

    def registered_mailbox(self, address: str) -> RegisteredMailbox | None:
        """One registered mailbox (no secret), or None."""
        return self._registry.registered_mailbox(address)

    def mailbox_secret(self, address: str) -> bytes | None:
        """The encrypted secret of a registered mailbox, or None."""
        return self._registry.mailbox_secret(address)

    def remove_mailbox(self, address: str) -> bool:
        """Forget a registered mailbox and its secret; False when not registered.

        What "gone" means in each database's files (SQLite: secure_delete and a WAL
        checkpoint; PostgreSQL: VACUUM) is ``emailsync.state.registry_sql``'s to say.
        """
        return self._registry.remove_mailbox(address)

    def reencrypt_secrets(self, convert: Callable[[bytes, str], bytes]) -> int:
        """Rewrite every secret with ``convert(blob, address)`` in one transaction."""
        return self._registry.reencrypt_secrets(convert)

    def record_stop(self, address: str) -> None:
        """Stop Email Sync for a mailbox of the config file, until ``clear_stop``."""
        self._registry.record_stop(address)

    def clear_stop(self, address: str) -> bool:
        """The mailbox may run again; False when it was not stopped."""
        return self._registry.clear_stop(address)

    def stopped_mailboxes(self) -> set[str]:
        """Every mailbox Stop Email Sync holds stopped."""
        return self._registry.stopped_mailboxes()

    def is_stopped(self, address: str) -> bool:
        """Whether Stop Email Sync holds this mailbox stopped."""
        return self._registry.is_stopped(address)

    def mailbox_lock(self, address: str) -> AbstractContextManager[None]:
        """Hold the mailbox's lock for the block: a ``mailbox_locks`` row across a cluster,
        a lock in this process for SQLite (``SqlRegistry.mailbox_lock``)."""
        return self._registry.mailbox_lock(address)

    def record_token(self, token: IssuedToken) -> None:
        """Record a token; an id recorded before keeps its first row."""
        self._tokens.record_token(token)

    def issued_token(self, token_id: str) -> IssuedToken | None:
        """The token with this id, or None."""
        return self._tokens.issued_token(token_id)

    def issued_tokens(self) -> list[IssuedToken]:
        """Every token recorded, newest first (the es1 rows last)."""
        return self._tokens.issued_tokens()

    def revoke_tokens(
        self, at: datetime, *, token_id: str | None = None, address: str | None = None
    ) -> list[IssuedToken]:
        """Revoke the token with this id, or every token of this address; the tokens named."""
        return self._tokens.revoke_tokens(at, token_id=token_id, address=address)

    def revoke_all_tokens(self, at: datetime) -> int:
        """Revoke every token not revoked yet; how many."""
        return self._tokens.revoke_all_tokens(at)

    def token_used(self, token_id: str, at: datetime) -> None:
        """Record the token's last use."""
        self._tokens.token_used(token_id, at)
