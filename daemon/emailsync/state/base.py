"""The ``Store`` protocol: what filing, the CLI and the web layer need from a timeline store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from emailsync.model import Group, TimelineEvent


@dataclass(frozen=True)
class Recorded:
    """What a store said about a batch of events.

    ``new`` counts events that did not exist before. ``rejected`` maps the ``(group,
    message_key)`` of each event the store refused for good to its reason; every other event of
    the batch is recorded. The built-in store never rejects.
    """

    new: int = 0
    rejected: Mapping[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class IssuedToken:
    """One agent token as the state database records it: never the token itself.

    ``issued_at`` is None for the row standing for a mailbox's es1 tokens (issued before
    tokens had ids, see ``emailsync.state.agenttoken``); ``expires_at`` None: no expiry.
    """

    id: str
    address: str
    issued_at: datetime | None
    issued_by: str  # cli:USER, api, page, or es1
    expires_at: datetime | None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def state(self, now: datetime) -> str:
        """``revoked``, ``expired`` or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@runtime_checkable
class TokenLedger(Protocol):
    """The agent tokens issued, in the state database (SQLite, or PostgreSQL for a cluster).

    Every method is one statement or one transaction, safe from any thread.
    """

    def record_token(self, token: IssuedToken) -> None:
        """Record a token; an id recorded before keeps its first row."""
        ...

    def issued_token(self, token_id: str) -> IssuedToken | None:
        """The token with this id, or None."""
        ...

    def issued_tokens(self) -> list[IssuedToken]:
        """Every token recorded, newest first (the es1 rows last)."""
        ...

    def revoke_tokens(
        self, at: datetime, *, token_id: str | None = None, address: str | None = None
    ) -> list[IssuedToken]:
        """Revoke the token with this id, or every token of this (normalised) address.

        Returns the tokens named, as they are now; one revoked before keeps its first
        ``revoked_at``. ``ValueError`` unless exactly one of ``token_id``, ``address``.
        """
        ...

    def revoke_all_tokens(self, at: datetime) -> int:
        """Revoke every token not revoked yet (``keys rotate``); how many."""
        ...

    def token_used(self, token_id: str, at: datetime) -> None:
        """Record the token's last use."""
        ...


class Store(Protocol):
    """A group directory plus the timeline events filed against its groups.

    Implementations are shared by every mailbox worker thread, so every method must be safe
    to call concurrently. Failures are raised as ``StoreUnavailableError`` when retrying later
    may help (the message stays in Queue) and as ``StoreError`` otherwise; a failed call
    leaves nothing half-written.
    """

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """Groups linked to any of the (normalised) addresses, each once, ordered by name.

        Each ``Group.addresses`` holds all addresses of the group, not only the matched ones.
        Names and addresses are in code-point order (the built-in tables: the same in SQLite
        and PostgreSQL, whatever the database's collation).
        """
        ...

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """Record events in one transaction; return how many were new.

        Idempotent on ``(group, message_key)``: recording an existing pair adds the event's
        mailbox to the mailboxes that filed it and creates no new event.
        """
        ...

    def record_events_checked(self, events: Sequence[TimelineEvent]) -> Recorded:
        """Like ``record_events``, but a store may refuse single events (a CRM's 4xx per event).

        The events it does not refuse are recorded (or were already there) when this returns.
        """
        ...

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """Create the group, or extend it, with the addresses; return it with all addresses.

        Raises ``ValueError`` naming the first name or address that is not valid.
        """
        ...

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """Link ``(group, address)`` rows, creating groups as needed; return new links.

        Raises ``ValueError`` naming the first row that is not valid; nothing is written then.
        """
        ...

    def list_groups(self) -> list[Group]:
        """Every group with all its addresses, ordered by name (code-point order)."""
        ...

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` filled in.

        Events filed at the same moment: the one recorded later first (the built-in tables
        record a batch in ``(group, message_key)`` order).
        """
        ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Register the store's own metrics, if it has any, on the daemon's registry."""
        ...

    def close(self) -> None:
        """Release the store's connections; the store cannot be used afterwards."""
        ...


@dataclass(frozen=True)
class RegisteredBranch:
    """A branch's IMAP server, registered at run time (``PUT /v1/branches/{name}``)."""

    name: str
    host: str
    port: int
    security: str
    ca_file: str | None = None


@dataclass(frozen=True)
class RegisteredMailbox:
    """A mailbox registered at run time; its secret is never part of this record."""

    address: str
    branch: str
    auth: str
    username: str
    has_secret: bool
    stopped: bool
    trigger: str = "auto"  # auto: file on arrival; manual: only on Start Sync
    # When it was last set up (ISO text): a new set-up is a new value, also with the same
    # settings. Not part of equality.
    updated_at: str = field(default="", compare=False)


@runtime_checkable
class Registry(Protocol):
    """Branches and mailboxes registered at run time, beside the read-only TOML ones.

    Secrets are opaque blobs here (encrypted by ``emailsync.state.vault``); erasing one must leave
    no copy of it in the store's tables (SQLite: nor in its files; PostgreSQL: VACUUM reuses
    the dead row's space). Stop Email Sync of the config file's mailboxes lives here too.
    """

    def put_branch(self, branch: RegisteredBranch) -> bool:
        """Create or replace a branch; True when it is new."""
        ...

    def registered_branches(self) -> list[RegisteredBranch]:
        """Every registered branch, by name."""
        ...

    def put_mailbox(self, mailbox: RegisteredMailbox, secret: bytes | None) -> None:
        """Create or replace a mailbox with its encrypted secret (None: none, e.g. OAuth)."""
        ...

    def registered_mailboxes(self) -> list[RegisteredMailbox]:
        """Every registered mailbox, by address (no secrets)."""
        ...

    def mailbox_secret(self, address: str) -> bytes | None:
        """The encrypted secret of a registered mailbox, or None."""
        ...

    def remove_mailbox(self, address: str) -> bool:
        """Stop Email Sync: forget the mailbox and its secret for good; False when unknown."""
        ...

    def reencrypt_secrets(self, convert: Callable[[bytes, str], bytes]) -> int:
        """Rewrite every secret with ``convert(blob, address)`` in one transaction."""
        ...

    def registered_mailbox(self, address: str) -> RegisteredMailbox | None:
        """One registered mailbox (no secret), or None."""
        ...

    def record_stop(self, address: str) -> None:
        """Stop Email Sync for a mailbox of the config file: stopped on every instance and
        across restarts until ``clear_stop``; a stop recorded before keeps its first time."""
        ...

    def clear_stop(self, address: str) -> bool:
        """The mailbox may run again (First Time Setup); False when it was not stopped."""
        ...

    def stopped_mailboxes(self) -> set[str]:
        """Every mailbox Stop Email Sync holds stopped."""
        ...

    def is_stopped(self, address: str) -> bool:
        """Whether Stop Email Sync holds this mailbox stopped."""
        ...

    def mailbox_lock(self, address: str) -> AbstractContextManager[None]:
        """Hold the mailbox's lock for the block: set-up, forget and a sign-in's finish of
        one mailbox never interleave (across a cluster's instances where the state is shared)."""
        ...


@runtime_checkable
class LeaseBound(Protocol):
    """A store that writes for one mailbox only while this instance holds its lease.

    A cluster's worker gets one (``emailsync.cluster.lease.FencedStore``); the filer asks it right
    before any message moves, since the lease can be lost after the events were recorded.
    """

    def check_lease(self) -> None:
        """Raise ``LeaseLostError`` unless this instance still holds the mailbox's lease."""
        ...
