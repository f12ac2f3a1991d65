"""Frozen value types shared by every layer: messages, directions, outcomes, events."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Direction(enum.Enum):
    """Which way a message went, seen from the mailbox owner."""

    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Outcome(enum.Enum):
    """What a sync pass decided for one queued message; the value is the metric/log label."""

    SENT = "sent"  # outbound, linked: events recorded, moved to Sent
    RECEIVED = "received"  # inbound, linked: events recorded, moved to Received
    NO_GROUP = "no_group"  # no group linked to any counterpart: moved to Failed
    UNPARSEABLE = "unparseable"  # the message cannot be used: moved to Failed
    REJECTED = "rejected"  # the store (a CRM) refused one of its events: moved to Failed


class FolderRole(enum.Enum):
    """The folders of the tree, by what they are for (names come from the config)."""

    QUEUE = "queue"
    SENT = "sent"
    RECEIVED = "received"
    FAILED = "failed"


OUTCOME_FOLDER: dict[Outcome, FolderRole] = {
    Outcome.SENT: FolderRole.SENT,
    Outcome.RECEIVED: FolderRole.RECEIVED,
    Outcome.NO_GROUP: FolderRole.FAILED,
    Outcome.UNPARSEABLE: FolderRole.FAILED,
    Outcome.REJECTED: FolderRole.FAILED,
}

# Keywords (RFC 3501 §2.3.2) set on messages filed to Failed, so a person or a script can
# tell why without asking the daemon.
OUTCOME_KEYWORD: dict[Outcome, str] = {
    Outcome.NO_GROUP: "$EmailSyncNoGroup",
    Outcome.UNPARSEABLE: "$EmailSyncUnparseable",
    Outcome.REJECTED: "$EmailSyncRejected",
}

# Keyword on a Queue message the server would not move or fetch (or the store would not take)
# on ``stuck_after_attempts`` passes in a row: it stays in Queue and passes skip it until the
# keyword is removed (``retry-failed``, Start Sync with include_stuck, or by hand). Being on
# the message, the quarantine survives a restart of the daemon.
STUCK_KEYWORD = "$EmailSyncStuck"


@dataclass(frozen=True)
class TextSection:
    """A text part of a message's MIME structure, to be fetched by its IMAP section number."""

    section: str  # RFC 3501 §6.4.5 part specifier: "1", "1.2", …
    content_type: str  # "text/plain" or "text/html"
    charset: str
    encoding: str  # Content-Transfer-Encoding (RFC 2045 §6), lower case
    size: int  # encoded octets on the server


@dataclass(frozen=True)
class BodyPlan:
    """What a message's BODYSTRUCTURE (RFC 3501 §7.4.2) says an event needs of its body.

    The text parts in document order, and the attachments (names and sizes known without
    downloading them): a 50 MB PDF is listed, never fetched.
    """

    texts: tuple[TextSection, ...]
    attachments: tuple[Attachment, ...]


@dataclass(frozen=True)
class FetchedMessage:
    """What one IMAP FETCH returned for a message: header block or whole bytes, and metadata.

    A body fetched by its structure has ``plan`` set, ``data`` empty and its text parts
    (each cut at the fetch cap) in ``sections``, by section number; ``sections_cut`` names
    those the cap did cut short. ``prefix`` is True when ``data`` is only the start of the
    message (fetched up to a byte cap because its structure could not be read).
    """

    uid: int
    data: bytes
    internaldate: datetime | None
    size: int
    flags: tuple[str, ...] = ()
    savedate: datetime | None = None  # when it landed in this folder (RFC 8514), if known
    plan: BodyPlan | None = None
    sections: dict[str, bytes] = field(default_factory=dict)
    sections_cut: frozenset[str] = frozenset()
    prefix: bool = False


@dataclass(frozen=True)
class Attachment:
    """One attachment: its decoded file name, MIME type and decoded size in bytes."""

    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class QueuedMessage:
    """One message in Queue, parsed as far as it could be.

    Addresses are normalised (see ``emailsync.mail.address``). ``problem`` is set, and the other
    fields may be empty, when the message is unusable; such a message goes to Failed.
    ``body_truncated`` is True when ``body_text`` is not the whole text: cut at the cap of
    ``emailsync.mail.message.MAX_BODY_CHARS``, or by a fetch that brought only part of it.
    """

    uid: int
    key: str  # SHA-256 hex of the normalised identity fields (DESIGN.md §1)
    message_id: str | None
    subject: str
    from_addrs: tuple[str, ...]
    sender_addrs: tuple[str, ...]
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    date: datetime | None  # the Date header, else INTERNALDATE
    size: int
    body_text: str = ""
    body_truncated: bool = False
    attachments: tuple[Attachment, ...] = ()
    problem: str | None = None
    # The To/Cc/From lines as written (decoded), for the event; addresses above are for logic.
    display_from: str = ""
    display_to: str = ""
    display_cc: str = ""

    @property
    def usable(self) -> bool:
        """True when the message can be classified and filed with events."""
        return self.problem is None


@dataclass(frozen=True)
class Classification:
    """Direction and counterpart addresses of a message, seen from the mailbox owner."""

    direction: Direction
    counterparts: tuple[str, ...]


@dataclass(frozen=True)
class Group:
    """A group card of the CRM, with the addresses linked to it."""

    name: str
    addresses: tuple[str, ...] = ()
    # The CRM's own identifier, when the group comes from a CRM; events then name the group
    # by it. The built-in store identifies groups by name and leaves this empty.
    id: str = ""

    @property
    def ref(self) -> str:
        """How events name this group: the CRM's id, else the name."""
        return self.id or self.name


@dataclass(frozen=True)
class Via:
    """One mailbox that filed an event, and the direction seen from that mailbox's owner.

    The same message is outbound in its sender's mailbox and inbound in its recipient's.
    ``direction`` is None for a mailbox that filed the event before emailsync kept the
    direction per mailbox (the store's schema 4), until it files the message again.
    """

    mailbox: str
    direction: Direction | None


@dataclass(frozen=True)
class TimelineEvent:
    """One timeline entry: a message filed against one group.

    ``(group, message_key)`` is the idempotency key: recording the same pair twice is a no-op
    apart from adding ``mailbox``, with ``direction`` as seen from it, to the mailboxes that
    filed it (``via``). Read back from a store, ``mailbox`` and ``direction`` are the first
    filer's; ``via`` has every mailbox with its own direction.
    """

    group: str
    direction: Direction
    mailbox: str
    message_key: str
    message_id: str | None
    subject: str
    from_: str
    to: str
    cc: str
    date: datetime | None
    body_text: str
    attachments: tuple[Attachment, ...]
    size: int
    filed_at: datetime
    mailboxes: tuple[str, ...] = field(default=())  # filled in when read back from a store
    body_truncated: bool = False  # body_text is not the whole text (see QueuedMessage)
    via: tuple[Via, ...] = ()  # filled in when read back from a store, by mailbox

    @classmethod
    def of(
        cls,
        message: QueuedMessage,
        group: str,
        direction: Direction,
        mailbox: str,
        filed_at: datetime,
    ) -> TimelineEvent:
        """The event a filed message records on one of its groups."""
        return cls(
            group=group,
            direction=direction,
            mailbox=mailbox,
            message_key=message.key,
            message_id=message.message_id,
            subject=message.subject,
            from_=message.display_from,
            to=message.display_to,
            cc=message.display_cc,
            date=message.date,
            body_text=message.body_text,
            attachments=message.attachments,
            size=message.size,
            filed_at=filed_at,
            body_truncated=message.body_truncated,
        )


@dataclass(frozen=True)
class Fence:
    """A mailbox lease held by one instance: the fencing token its writes must carry.

    ``generation`` grows each time the mailbox changes hands, so a write carrying an older
    generation comes from an owner that lost the lease (paused, partitioned) and is refused.
    """

    mailbox: str
    owner: str
    generation: int
