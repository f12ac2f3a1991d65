"""Tests of emailsync.mail.classify: direction and counterparts seen from the mailbox owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailsync.mail.classify import classify
from emailsync.mail.message import parse_message
from emailsync.model import Classification, Direction, QueuedMessage

DATA = Path(__file__).resolve().parent.parent / "data"
OWNER = frozenset({"agent@example.com", "lettings@example.com"})


ADDRESS_FIELDS = ("from_addrs", "sender_addrs", "reply_to", "to", "cc", "bcc")


def make(**addresses: tuple[str, ...]) -> QueuedMessage:
    """A parsed message with only the address fields that matter to classification: those of
    ADDRESS_FIELDS given, the others empty."""
    fields = dict.fromkeys(ADDRESS_FIELDS, ()) | addresses
    return QueuedMessage(
        uid=1, key="0" * 64, message_id="m@example.org", subject="s", date=None, size=1, **fields
    )


def test_message_from_the_owner_is_outbound_to_its_recipients() -> None:
    """Mail the agent sent is outbound; the people it went to are the counterparts."""
    msg = make(from_addrs=("agent@example.com",), to=("sue@example.org",), cc=("sol@example.net",))
    assert classify(msg, OWNER) == Classification(
        Direction.OUTBOUND, ("sue@example.org", "sol@example.net")
    )


def test_outbound_bcc_recipients_are_counterparts() -> None:
    """The sender's copy carries Bcc, and those people are counterparts too."""
    msg = make(from_addrs=("agent@example.com",), bcc=("hidden@example.org",))
    assert classify(msg, OWNER).counterparts == ("hidden@example.org",)


def test_message_from_an_alias_is_outbound() -> None:
    """An alias of the mailbox counts as the owner."""
    msg = make(from_addrs=("lettings@example.com",), to=("ann@example.org",))
    assert classify(msg, OWNER).direction is Direction.OUTBOUND


def test_message_from_someone_else_is_inbound_from_its_author() -> None:
    """Mail the agent received is inbound; its author is the counterpart."""
    msg = make(from_addrs=("ann@example.org",), to=("agent@example.com", "bob@example.net"))
    assert classify(msg, OWNER) == Classification(Direction.INBOUND, ("ann@example.org",))


def test_inbound_reply_to_is_a_counterpart() -> None:
    """Portal mail names the real enquirer in Reply-To; that person is a counterpart."""
    msg = make(from_addrs=("noreply@portal.example.net",), reply_to=("ruth@example.org",))
    assert classify(msg, OWNER).counterparts == ("noreply@portal.example.net", "ruth@example.org")


def test_sender_owner_makes_mail_from_someone_else_outbound() -> None:
    """The agent sending on behalf of another From address still sent the message."""
    msg = make(
        from_addrs=("office@example.co.uk",),
        sender_addrs=("agent@example.com",),
        to=("landlord@example.org",),
    )
    assert classify(msg, OWNER) == Classification(Direction.OUTBOUND, ("landlord@example.org",))


def test_owner_from_with_a_foreign_sender_is_outbound() -> None:
    """An assistant sending for the agent sends as the agent."""
    msg = make(
        from_addrs=("agent@example.com",),
        sender_addrs=("assistant@example.com",),
        to=("ann@example.org",),
    )
    assert classify(msg, OWNER).direction is Direction.OUTBOUND


def test_inbound_without_from_takes_the_sender_as_counterpart() -> None:
    """With no From address, Sender is the only originator there is."""
    msg = make(sender_addrs=("relay@example.net",), to=("agent@example.com",))
    assert classify(msg, OWNER) == Classification(Direction.INBOUND, ("relay@example.net",))


def test_inbound_with_from_ignores_the_sender() -> None:
    """A mailing-list Sender is not the person the message is from."""
    msg = make(from_addrs=("ann@example.org",), sender_addrs=("list-bounces@example.net",))
    assert classify(msg, OWNER).counterparts == ("ann@example.org",)


def test_message_without_any_originator_is_inbound_with_no_counterparts() -> None:
    """No From and no Sender: inbound, and nobody to file it against."""
    msg = make(to=("agent@example.com",))
    assert classify(msg, OWNER) == Classification(Direction.INBOUND, ())


def test_owner_addresses_are_never_counterparts() -> None:
    """The agent copying themself or an alias does not make them a counterpart."""
    msg = make(
        from_addrs=("agent@example.com",),
        to=("sue@example.org",),
        cc=("agent@example.com",),
        bcc=("lettings@example.com",),
    )
    assert classify(msg, OWNER).counterparts == ("sue@example.org",)


def test_inbound_owner_reply_to_is_not_a_counterpart() -> None:
    """A Reply-To pointing back at an alias names no outside person."""
    msg = make(from_addrs=("ann@example.org",), reply_to=("lettings@example.com",))
    assert classify(msg, OWNER).counterparts == ("ann@example.org",)


def test_outbound_mail_only_to_the_owner_has_no_counterparts() -> None:
    """A note to self is outbound with nobody to file it against."""
    msg = make(from_addrs=("agent@example.com",), to=("lettings@example.com",))
    assert classify(msg, OWNER) == Classification(Direction.OUTBOUND, ())


def test_counterparts_are_deduplicated_keeping_first_order() -> None:
    """An address in To and Cc is one counterpart, listed where it first appears."""
    msg = make(
        from_addrs=("agent@example.com",),
        to=("b@example.org", "a@example.org"),
        cc=("a@example.org", "c@example.org"),
        bcc=("b@example.org",),
    )
    assert classify(msg, OWNER).counterparts == ("b@example.org", "a@example.org", "c@example.org")


def test_owner_given_in_mixed_case_and_unicode_still_matches() -> None:
    """Owner addresses as configured are normalised before comparing."""
    owner = frozenset({"Agent@Example.COM", "Info@Bücher.example"})
    from_idn = make(from_addrs=("info@xn--bcher-kva.example",), to=("x@example.org",))
    from_agent = make(from_addrs=("agent@example.com",), to=("x@example.org",))
    assert classify(from_idn, owner).direction is Direction.OUTBOUND
    assert classify(from_agent, owner).direction is Direction.OUTBOUND


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "outbound_bcc.eml",
            Classification(
                Direction.OUTBOUND,
                ("sue@example.org", "solicitor@example.net", "hidden@example.org"),
            ),
        ),
        (
            "reply_to.eml",
            Classification(
                Direction.INBOUND, ("noreply@portal.example.net", "ruth.kay@example.org")
            ),
        ),
        ("sender_on_behalf.eml", Classification(Direction.OUTBOUND, ("landlord@example.org",))),
        (
            "undisclosed_recipients.eml",
            Classification(Direction.OUTBOUND, ("buyer.one@example.org", "buyer.two@example.net")),
        ),
        (
            "mixed_case_addresses.eml",
            Classification(Direction.INBOUND, ("big.client@example.org",)),
        ),
        ("no_from.eml", Classification(Direction.INBOUND, ())),
        ("idn_domain.eml", Classification(Direction.INBOUND, ("info@xn--bcher-kva.example",))),
    ],
)
def test_sample_messages_classify_as_a_person_would(name: str, expected: Classification) -> None:
    """Parsed sample mail gets the direction and counterparts an agent would expect."""
    msg = parse_message(1, (DATA / name).read_bytes())
    assert classify(msg, OWNER) == expected
