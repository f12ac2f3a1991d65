"""What the SQL stores share: checking names and addresses, folding rows into values."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from emailsync.mail.address import normalise_address
from emailsync.model import Direction, Group, TimelineEvent, Via
from emailsync.state.base import IssuedToken


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
