"""Realistic queued mail for the benchmarks: linked, unlinked and unusable, with known outcomes.

The mix (by count, exact for any N): ~62 % linked to a group (half outbound, half inbound;
a text body, sometimes an HTML alternative, sometimes a small PDF), ~35 % with no group
(newsletters in, mail to strangers out) and ~3 % unusable (no header fields, or no address).
Every message says where the daemon must file it, so a run can check its own result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from emailsync.model import OUTCOME_FOLDER, OUTCOME_KEYWORD, FolderRole, Outcome

GROUP_COUNT = 200
LINKED_SHARE = 0.62
UNUSABLE_SHARE = 0.03
HTML_SHARE = 0.4  # of messages with a body
ATTACHMENT_SHARE = 0.2
ATTACHMENT_BYTES = (8 * 1024, 48 * 1024)
PARAGRAPHS = (2, 8)

_WORDS = (
    *("viewing", "tenancy", "deposit", "landlord", "inventory", "offer", "survey", "keys"),
    *("completion", "exchange", "contract", "rent", "schedule", "meter", "reading", "flat"),
    *("agreement", "reference", "mortgage", "valuation", "garden", "parking", "please"),
    *("confirm", "thanks", "regards", "tomorrow", "morning", "available", "property", "house"),
)


@dataclass(frozen=True)
class Directory:
    """The groups of a run: each group name with its client addresses (one group per address)."""

    groups: dict[str, tuple[str, ...]]

    @classmethod
    def build(cls, rng: random.Random, count: int = GROUP_COUNT) -> Directory:
        """``count`` groups of one to three client addresses each."""
        groups = {
            f"Property {n:04d}": tuple(
                f"client{n:04d}.{k}@clients.example.org" for k in range(rng.randint(1, 3))
            )
            for n in range(count)
        }
        return cls(groups)

    def rows(self) -> list[tuple[str, str]]:
        """``(group, address)`` rows for ``Store.import_groups``."""
        return [(name, addr) for name, addrs in self.groups.items() for addr in addrs]

    def group_of(self) -> dict[str, str]:
        """Address → group name."""
        return {addr: name for name, addrs in self.groups.items() for addr in addrs}


@dataclass(frozen=True)
class BenchMessage:
    """One message to APPEND, with the outcome and the number of events it must produce."""

    raw: bytes
    outcome: Outcome
    events: int = 0

    @property
    def linked(self) -> bool:
        """True when the daemon must fetch its body (it goes to Sent or Received)."""
        return self.outcome in (Outcome.SENT, Outcome.RECEIVED)

    @property
    def destination(self) -> FolderRole:
        """The folder the message must end up in."""
        return OUTCOME_FOLDER[self.outcome]

    @property
    def keyword(self) -> str | None:
        """The keyword a message filed to Failed gets."""
        return OUTCOME_KEYWORD.get(self.outcome)


def make_corpus(
    count: int, owner: str, directory: Directory, rng: random.Random
) -> list[BenchMessage]:
    """``count`` messages in the documented mix, shuffled."""
    unusable = max(1, round(count * UNUSABLE_SHARE))
    linked = round(count * LINKED_SHARE)
    kinds = ["linked"] * linked + ["unusable"] * unusable
    kinds += ["unlinked"] * (count - len(kinds))
    rng.shuffle(kinds)
    writer = _Writer(owner, directory, rng)
    makers = {"linked": writer.linked, "unlinked": writer.unlinked, "unusable": writer.unusable}
    return [makers[kind]() for kind in kinds]


class _Writer:
    """Builds the messages of one corpus."""

    def __init__(self, owner: str, directory: Directory, rng: random.Random) -> None:
        self.owner = owner
        self.rng = rng
        self.directory = directory
        self.addresses = sorted(directory.group_of())
        self.group_of = directory.group_of()
        self.clock = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)

    def linked(self) -> BenchMessage:
        clients = self.rng.sample(self.addresses, self.rng.choice((1, 1, 1, 2)))
        events = len({self.group_of[a] for a in clients})
        if self.rng.random() < 0.5:
            return BenchMessage(self._mail(self.owner, clients), Outcome.SENT, events)
        # Inbound: the counterparts are From and Reply-To, so only the sender links.
        return BenchMessage(self._mail(clients[0], [self.owner]), Outcome.RECEIVED, 1)

    def unlinked(self) -> BenchMessage:
        stranger = f"news{self.rng.randint(1, 999)}@lists.example.net"
        if self.rng.random() < 0.7:
            return BenchMessage(self._mail(stranger, [self.owner]), Outcome.NO_GROUP)
        return BenchMessage(self._mail(self.owner, [stranger]), Outcome.NO_GROUP)

    def unusable(self) -> BenchMessage:
        if self.rng.random() < 0.5:
            raw = b"this is not a message\r\nno header fields at all\r\n"
        else:
            raw = b"Subject: notes to self\r\nMIME-Version: 1.0\r\n\r\n" + self._text().encode()
        return BenchMessage(raw, Outcome.UNPARSEABLE)

    def _mail(self, sender: str, recipients: list[str]) -> bytes:
        msg = EmailMessage()
        self.clock += timedelta(minutes=self.rng.randint(1, 90))
        host = "mx.example.com"
        for hop in range(self.rng.randint(2, 4)):
            msg["Received"] = (
                f"from relay{hop}.example.net (relay{hop}.example.net [192.0.2.{hop + 10}]) "
                f"by {host} with ESMTPS id {self.rng.getrandbits(48):012x}; "
                f"{format_datetime(self.clock)}"
            )
        msg["DKIM-Signature"] = "v=1; a=rsa-sha256; d=example.com; s=sel; " + "b=" + "Ab3" * 60
        msg["From"] = sender
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = " ".join(self.rng.choices(_WORDS, k=self.rng.randint(3, 8))).title()
        msg["Date"] = format_datetime(self.clock)
        msg["Message-ID"] = make_msgid(domain="bench.example.com")
        text = self._text()
        msg.set_content(text)
        if self.rng.random() < HTML_SHARE:
            paragraphs = "".join(f"<p>{p}</p>" for p in text.split("\n\n"))
            msg.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
        if self.rng.random() < ATTACHMENT_SHARE:
            size = self.rng.randint(*ATTACHMENT_BYTES)
            msg.add_attachment(
                self.rng.randbytes(size),
                maintype="application",
                subtype="pdf",
                filename=f"schedule-{self.rng.randint(1, 9999)}.pdf",
            )
        return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def _text(self) -> str:
        paragraphs = [
            " ".join(self.rng.choices(_WORDS, k=self.rng.randint(20, 70))).capitalize() + "."
            for _ in range(self.rng.randint(*PARAGRAPHS))
        ]
        return "\n\n".join(paragraphs) + "\n"
