"""The ``Store`` protocol: what filing, the CLI and the web layer need from a timeline store."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
        """Every group with all its addresses, ordered by name."""
        ...

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Recorded events, newest filed first, with ``mailboxes`` filled in."""
        ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Register the store's own metrics, if it has any, on the daemon's registry."""
        ...

    def close(self) -> None:
        """Release the store's connections; the store cannot be used afterwards."""
        ...
