"""Decide a message's direction and counterpart addresses, seen from the mailbox owner.

Rules (DESIGN.md §1):

* **Outbound** when any From address *or* any Sender address belongs to the owner (the
  mailbox address or an alias). Sender (RFC 5322 §3.6.2) names who actually sent a message
  on behalf of the From author, so From=someone-else + Sender=owner is an agent sending for
  a colleague or a shared address: the owner sent it, it is outbound. From=owner +
  Sender=someone-else (an assistant sending for the owner) is outbound as well.
* **Inbound** otherwise, including a message with no originator address at all.
* **Counterparts**: outbound → To, Cc, Bcc; inbound → From and Reply-To, plus Sender when
  From holds no usable address (Sender is then the only originator there is). The owner's
  own addresses are never counterparts; duplicates are dropped, first occurrence kept.
"""

from __future__ import annotations

from collections.abc import Iterable

from emailsync.mail.address import normalise_address
from emailsync.model import Classification, Direction, QueuedMessage


def classify(msg: QueuedMessage, owner: frozenset[str]) -> Classification:
    """Return the direction of ``msg`` and its counterparts for the owner's addresses.

    ``owner`` holds the mailbox address and its aliases; they are normalised here again so a
    caller passing addresses as configured (mixed case, Unicode domain) still matches.
    """
    own = frozenset(normalise_address(address) or address.strip().lower() for address in owner)
    if any(address in own for address in (*msg.from_addrs, *msg.sender_addrs)):
        return Classification(Direction.OUTBOUND, _counterparts((msg.to, msg.cc, msg.bcc), own))
    originators = msg.from_addrs or msg.sender_addrs
    return Classification(Direction.INBOUND, _counterparts((originators, msg.reply_to), own))


def _counterparts(fields: Iterable[tuple[str, ...]], own: frozenset[str]) -> tuple[str, ...]:
    """The addresses of ``fields`` in order, without duplicates or the owner's own."""
    ordered = (address for field in fields for address in field if address not in own)
    return tuple(dict.fromkeys(ordered))
