"""What the SQL stores share: checking names and addresses, folding rows, the events query."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emailsync.address import normalise_address
from emailsync.model import Direction, Group, TimelineEvent, Via
from emailsync.store.base import IssuedToken


@dataclass(frozen=True)
class EventsQuery:
    """The fragments of one engine's "list events" statement (its own placeholders).

    ``build`` joins only these constant fragments; every value is a bound parameter.
    """

    select: str
    where_group: str
    where_mailbox: str
    order_and_limit: str  # ends in the LIMIT placeholder
    no_limit: object  # the LIMIT value meaning "no limit" (SQLite: -1, PostgreSQL: NULL)

    def build(
        self, *, group: str | None, mailbox: str | None, limit: int | None
    ) -> tuple[str, list[object]]:
        """The statement and its parameters: newest filed first, optionally one group's or
        one mailbox's events, at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        conditions: list[str] = []
        params: list[object] = []
        if group is not None:
            conditions.append(self.where_group)
            params.append(group)
        if mailbox is not None:
            conditions.append(self.where_mailbox)
            params.append(mailbox_key(mailbox))
        params.append(self.no_limit if limit is None else limit)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return self.select + where + self.order_and_limit, params


def groups_from_rows(rows: Iterable[tuple[str, str | None]]) -> list[Group]:
    """Fold ``(name, address)`` rows, ordered by name, into groups (address None: empty)."""
    addresses: dict[str, list[str]] = {}
    for name, address in rows:
        members = addresses.setdefault(name, [])
        if address is not None:
            members.append(address)
    return [Group(name=name, addresses=tuple(members)) for name, members in addresses.items()]


def checked_group_name(name: str) -> str:
    """A group name without surrounding blanks; ValueError when nothing is left."""
    stripped = name.strip()
    if not stripped:
        raise ValueError(f"empty group name: {name!r}")
    return stripped


def checked_address(address: str) -> str:
    """The normalised address; ValueError when it is not an email address."""
    normalised = normalise_address(address)
    if normalised is None:
        raise ValueError(f"not an email address: {address!r}")
    return normalised


def mailbox_key(mailbox: str) -> str:
    """A mailbox in the form it is stored and matched: its normalised address if it has one."""
    return normalise_address(mailbox) or mailbox.strip()


def event_links(event: TimelineEvent) -> dict[str, str | None]:
    """Each mailbox that filed ``event``, as stored, and the direction seen from it if known.

    The filer (``mailbox``) sees the event's ``direction``; the mailboxes an event read back
    carries (``via``, ``mailboxes``) keep theirs, None when the store did not know it.
    """
    links: dict[str, str | None] = {}
    for via in event.via:
        links[mailbox_key(via.mailbox)] = via.direction.value if via.direction else None
    for mailbox in event.mailboxes:
        links.setdefault(mailbox_key(mailbox), None)
    links[mailbox_key(event.mailbox)] = event.direction.value
    return links


def via_from_rows(rows: Iterable[Sequence[str | None]]) -> tuple[Via, ...]:
    """``(mailbox, direction or None)`` rows of an event's mailboxes, as Via, by mailbox."""
    found = [
        Via(str(mailbox), Direction(direction) if direction else None)
        for mailbox, direction in rows
    ]
    return tuple(sorted(found, key=lambda via: via.mailbox))


@dataclass(frozen=True)
class TokenSql:
    """The agent_tokens statements (``TokenLedger``), written once for both engines.

    Rows come in ``IssuedToken``'s field order; ``for_engine`` puts in an engine's
    placeholder (SQLite ``?``, psycopg ``%s``).
    """

    insert: str = (
        "INSERT INTO agent_tokens"
        " (id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
    )
    every: str = (
        "SELECT id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at"
        " FROM agent_tokens"
    )
    by_id: str = (
        "SELECT id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at"
        " FROM agent_tokens WHERE id = ?"
    )
    by_address: str = (
        "SELECT id, address, issued_at, issued_by, expires_at, last_used_at, revoked_at"
        " FROM agent_tokens WHERE address = ?"
    )
    revoke_id: str = "UPDATE agent_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
    revoke_address: str = (
        "UPDATE agent_tokens SET revoked_at = ? WHERE address = ? AND revoked_at IS NULL"
    )
    revoke_all: str = "UPDATE agent_tokens SET revoked_at = ? WHERE revoked_at IS NULL"
    used: str = "UPDATE agent_tokens SET last_used_at = ? WHERE id = ?"

    @classmethod
    def for_engine(cls, placeholder: str) -> TokenSql:
        """The statements with ``placeholder`` for each ``?``."""
        return cls(**{name: text.replace("?", placeholder) for name, text in vars(cls()).items()})

    @staticmethod
    def revocation(token_id: str | None, address: str | None) -> tuple[bool, str]:
        """(by id?, the id or address) of a revocation; ``ValueError`` unless exactly one."""
        if (token_id is None) == (address is None):
            raise ValueError("revoke one token id or one address")
        return (True, token_id) if token_id is not None else (False, address or "")


def newest_first(tokens: Iterable[IssuedToken]) -> list[IssuedToken]:
    """Tokens newest issued first; the rows of es1 tokens (no issue time) last, by address."""
    return sorted(
        tokens,
        key=lambda t: (
            t.issued_at is None,
            -t.issued_at.timestamp() if t.issued_at is not None else 0.0,
            t.address,
        ),
    )
