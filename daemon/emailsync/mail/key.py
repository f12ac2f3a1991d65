"""The message key (DESIGN.md §1): the identity of a message across mailboxes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from emailsync.mail.address import normalise_address
from emailsync.mail.dates import _normalise_date_text
from emailsync.mail.decoding import _collapse
from emailsync.mail.headers import _normalise_message_id
from emailsync.model import QueuedMessage

# Bumped whenever the key's inputs or their normalisation change, so old and new keys never
# collide by accident.
KEY_VERSION = "v1"
# The body text a key digests (messages without Message-ID), in characters once white space
# is collapsed. Each fetch path cuts a long body somewhere else (the text part at its fetch
# cap, the whole message at its own, or not at all), so the key reads only a prefix that
# every path delivers whole: 1 MiB of the most expensive encoding (quoted-printable 4-byte
# UTF-8, about 12.6 bytes a character) still holds 83,000 characters (issue 19 defect 16).
# Not a KEY_VERSION bump: a body shorter than this digests exactly as before, so keys of
# mail already recorded stay valid; only keys of longer bodies changed (and those were the
# ones two fetch paths disagreed on).
KEY_BODY_CHARS = 32_768


def needs_body_for_key(msg: QueuedMessage) -> bool:
    """True when the key depends on the body (no Message-ID), so a header-only key is not final."""
    return msg.message_id is None


def message_key(
    message_id: str | None,
    date: str,
    from_addrs: Sequence[str],
    subject: str,
    body_text: str | None = None,
) -> str:
    """Return the SHA-256 hex key identifying a message across mailboxes (DESIGN.md §1).

    ``date`` is the Date header as written (normalised to UTC ISO 8601 when parseable),
    ``subject`` the decoded Subject. ``body_text`` is only used when there is no Message-ID,
    and only its first KEY_BODY_CHARS characters once white space is collapsed.
    Each field is length-prefixed, so no choice of field contents can collide with another.
    """
    normalised_id = _normalise_message_id(message_id or "")
    addresses = (normalise_address(a) or a.strip().lower() for a in from_addrs)
    fields = [
        KEY_VERSION,
        normalised_id or "",
        _normalise_date_text(date),
        ",".join(addresses),
        _collapse(subject),
    ]
    if normalised_id is None:
        body = _key_body(body_text or "").encode("utf-8", "surrogatepass")
        fields.append(hashlib.sha256(body).hexdigest())
    digest = hashlib.sha256()
    for value in fields:
        data = value.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return digest.hexdigest()


def _key_body(text: str) -> str:
    """The first KEY_BODY_CHARS characters of ``text`` with its white space collapsed.

    Collapsing a prefix of ``text`` gives a prefix of the whole text collapsed, so a long
    body is collapsed only as far as needed.
    """
    head = _collapse(text[: 4 * KEY_BODY_CHARS])
    if len(head) < KEY_BODY_CHARS and len(text) > 4 * KEY_BODY_CHARS:
        head = _collapse(text)  # mostly white space: read on
    return head[:KEY_BODY_CHARS]
