"""The ``Store`` protocol: what filing, the CLI and the web layer need from a timeline store."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from emailsync.model import Group, TimelineEvent


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
        """
        ...

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """Record events in one transaction; return how many were new.

        Idempotent on ``(group, message_key)``: recording an existing pair adds the event's
        mailbox to the mailboxes that filed it and creates no new event.
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
        """Every group with all its addresses, ordered by name."""
        ...

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` filled in."""
        ...

    def close(self) -> None:
        """Release the store's connections; the store cannot be used afterwards."""
        ...
