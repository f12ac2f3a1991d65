"""Parse raw mail bytes into a QueuedMessage: addresses, identity key, text body, attachments.

Parsing never raises on bad mail. A message is **unusable** (``problem`` is set, and the
message goes to Failed as ``unparseable``) when, and only when:

* the bytes are empty or only white space ("empty message");
* no header field can be read at all, so it is not an RFC 5322 message ("no header fields");
* none of the originator fields (From, Sender, Reply-To; RFC 5322 §3.6.2) nor the
  destination fields (To, Cc, Bcc; §3.6.3) holds a single usable address
  ("no sender or recipient address") — with neither side there is nothing to classify;
* the stdlib parser crashes on it even in its lenient ``compat32`` mode ("parser error: …").

Everything else is usable, however broken: a message without From but with recipients is
classified inbound and will probably end up "no group", which is the filer's decision, not
the parser's. Broken MIME (lost boundary, bad base64, truncated multipart) yields whatever
text can be had.

The message key (DESIGN.md §1) covers Message-ID, Date, From and Subject. Without a
Message-ID it also covers a digest of the body, so ``parse_headers`` (the cheap first phase of
a fetch) cannot compute the final key for such a message: check ``needs_body_for_key`` and
parse the whole message with ``parse_message`` when it is true. The key never uses
INTERNALDATE, which differs between the mailboxes the same message was queued in.

This module puts the message together; the work is done by one module a job: ``headers``
(header fields, addresses, Message-ID), ``dates`` (the Date header), ``body`` (the MIME walk:
text body, attachments, caps), ``key`` (the message key) and ``decoding`` (charsets, transfer
encodings, RFC 2047 words). Its public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Mapping
from datetime import datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import Policy
from typing import TypeVar

from emailsync.mail.body import (
    _NO_BODY,
    MAX_BODY_CHARS,
    MAX_HTML_SOURCE_CHARS,
    MAX_MIME_DEPTH,
    _cap,
    _chosen_text,
    _extract_body,
    display_filename,
)
from emailsync.mail.dates import _as_utc, _parse_date
from emailsync.mail.decoding import _clean, _collapse, decode_encoded_words
from emailsync.mail.headers import (
    _ADDRESS_FIELDS,
    _COMPAT32,
    _DEFAULT,
    _addresses,
    _header_fields,
    _header_text,
    _HeaderReader,
    _normalise_message_id,
    _raw_header_fields,
)
from emailsync.mail.key import KEY_BODY_CHARS, KEY_VERSION, message_key, needs_body_for_key
from emailsync.model import BodyPlan, QueuedMessage

# Re-exported: callers import the parser's public names from here.
__all__ = [
    "KEY_BODY_CHARS",
    "KEY_VERSION",
    "MAX_BODY_CHARS",
    "MAX_HTML_SOURCE_CHARS",
    "MAX_MIME_DEPTH",
    "decode_encoded_words",
    "display_filename",
    "evolved",
    "message_key",
    "needs_body_for_key",
    "parse_headers",
    "parse_message",
    "with_body",
]


def parse_message(
    uid: int,
    raw: bytes,
    *,
    internaldate: datetime | None = None,
    size: int | None = None,
    prefix: bool = False,
) -> QueuedMessage:
    """Parse a whole message (RFC 5322 header and MIME body); never raises on bad mail.

    ``prefix``: ``raw`` is only the start of the message (a fetch cap cut it), so a text
    part that runs to its end may be cut, and the body is flagged truncated.
    """
    return _parse_safely(uid, raw, internaldate, size, headers_only=False, prefix=prefix)


def parse_headers(
    uid: int,
    raw_header_bytes: bytes,
    *,
    internaldate: datetime | None = None,
    size: int | None = None,
) -> QueuedMessage:
    """Parse only a message's header block; body_text is "" and attachments are ().

    The key equals ``parse_message``'s when the message has a Message-ID; otherwise it is
    provisional (see ``needs_body_for_key``). Pass the message's RFC822.SIZE as ``size``.
    """
    return _parse_safely(uid, raw_header_bytes, internaldate, size, headers_only=True)


def with_body(
    message: QueuedMessage,
    plan: BodyPlan,
    sections: Mapping[str, bytes],
    header_block: bytes,
    cut: Collection[str] = (),
) -> QueuedMessage:
    """A header-parsed message completed from its BODYSTRUCTURE plan and fetched text parts.

    ``sections`` holds each text part's encoded bytes (possibly cut at the fetch cap; ``cut``
    names those that were), and ``header_block`` the header bytes ``message`` was parsed
    from (its key needs the Date as written when there is no Message-ID). The text is chosen
    as ``parse_message`` chooses it: the first non-empty text/plain, else text/html rendered,
    else none. The header fields are not parsed again. Never raises: a part that cannot be
    decoded gives no text.
    """
    body = _NO_BODY
    # Same boundary as _parse_safely: untrusted bytes meet codecs and the HTML renderer.
    with contextlib.suppress(Exception):
        body = _chosen_text(plan, sections, cut)
    key = message.key
    if needs_body_for_key(message):
        key = _body_key(message, header_block, body.source)
    text, capped = _cap(body.text)
    return evolved(
        message,
        key=key,
        body_text=text,
        body_truncated=capped or body.truncated,
        attachments=plan.attachments,
    )


_T = TypeVar("_T")


def evolved(instance: _T, **changes: object) -> _T:
    """``dataclasses.replace`` for the hot path: a copy of a dataclass with some fields changed.

    For dataclasses whose fields are all init fields with no ``__post_init__`` and no
    ``__slots__`` (QueuedMessage, Decision): their instance dict is copied, which is what
    replace's ``__init__`` call would build, at a sixth of its cost (issue 23 profile:
    replace was 4 % of a backlog pass). A name that is no field raises TypeError, as there
    (tests/unit/test_message_fast.py compares the two).
    """
    fields = getattr(type(instance), "__dataclass_fields__", {})
    if not changes.keys() <= fields.keys():
        raise TypeError(f"no such fields: {sorted(changes.keys() - fields.keys())}")
    copy = object.__new__(type(instance))
    values = copy.__dict__
    values.update(instance.__dict__)
    values.update(changes)
    return copy


def _body_key(message: QueuedMessage, header_block: bytes, source: str) -> str:
    """The key of a message without Message-ID: its header fields and its body text."""
    try:
        date_text = _HeaderReader(_header_fields(header_block)).first("date")
    # Same boundary as _parse_safely: a bug in the header reader must not stall the Queue.
    except Exception:
        return message.key
    return message_key(None, date_text, message.from_addrs, message.subject, source)


def _parse_safely(
    uid: int,
    raw: bytes,
    internaldate: datetime | None,
    size: int | None,
    *,
    headers_only: bool,
    prefix: bool = False,
) -> QueuedMessage:
    """Try compat32, then the strict policy; turn a crash of both into an unusable message.

    compat32 first: header fields are read raw and decoded here anyway, and the strict
    policy's header objects made parsing twice as slow (bench/: 1.7 → 0.8 ms a message).
    """
    total = len(raw) if size is None else size
    if not raw.strip():
        return _unusable(uid, raw, "empty message", internaldate, total)
    if headers_only:
        # The header block alone needs no MIME parser: _header_fields reads it as the stdlib
        # compat32 parser would, at a fraction of the cost (the backlog's hot path, issue 10).
        # Should it ever fail, the stdlib parsers below still give the never-raising result.
        with contextlib.suppress(Exception):
            headers = _HeaderReader(_raw_header_fields(raw))
            return _message(uid, headers, None, internaldate, total)
    failure = "parser error"
    for policy in (_COMPAT32, _DEFAULT):
        try:
            return _parse(
                uid, raw, policy, internaldate, total, headers_only=headers_only, prefix=prefix
            )
        # Why so broad: this is the boundary where untrusted bytes meet the stdlib parser,
        # whose failure modes on hostile input are not enumerable; the contract is "never
        # raises", and a crash files the message to Failed instead of stalling the Queue.
        except Exception as exc:
            failure = f"parser error: {type(exc).__name__}"
    return _unusable(uid, raw, failure, internaldate, total)


def _parse(
    uid: int,
    raw: bytes,
    policy: Policy,
    internaldate: datetime | None,
    total: int,
    *,
    headers_only: bool,
    prefix: bool = False,
) -> QueuedMessage:
    parsed = BytesParser(policy=policy).parsebytes(raw, headersonly=headers_only)
    fields = [(str(name).lower(), _header_text(str(value))) for name, value in parsed.raw_items()]
    body = None if headers_only else parsed
    return _message(uid, _HeaderReader(fields), body, internaldate, total, prefix=prefix)


def _message(
    uid: int,
    headers: _HeaderReader,
    parsed: Message | None,
    internaldate: datetime | None,
    total: int,
    *,
    prefix: bool = False,
) -> QueuedMessage:
    """The QueuedMessage of read header fields and, unless None, the parsed MIME body."""
    addresses = {name: _addresses(headers.all(name)) for name in _ADDRESS_FIELDS}
    message_id = _normalise_message_id(headers.first("message-id"))
    date_text = headers.first("date")
    subject = _collapse(_clean(decode_encoded_words(headers.first("subject"))))
    body = _NO_BODY if parsed is None else _extract_body(parsed, prefix=prefix)
    body_text, capped = _cap(body.text)

    problem: str | None = None
    if not headers.names:
        problem = "no header fields: not an RFC 5322 message"
    elif not any(addresses.values()):
        problem = "no sender or recipient address"

    return QueuedMessage(
        uid=uid,
        key=message_key(message_id, date_text, addresses["from"], subject, body.source),
        message_id=message_id,
        subject=subject,
        from_addrs=addresses["from"],
        sender_addrs=addresses["sender"],
        reply_to=addresses["reply-to"],
        to=addresses["to"],
        cc=addresses["cc"],
        bcc=addresses["bcc"],
        date=_parse_date(date_text) or _as_utc(internaldate),
        size=total,
        body_text=body_text,
        body_truncated=capped or body.truncated,
        attachments=body.attachments,
        problem=problem,
        display_from=headers.display("from"),
        display_to=headers.display("to"),
        display_cc=headers.display("cc"),
    )


def _unusable(
    uid: int, raw: bytes, problem: str, internaldate: datetime | None, total: int
) -> QueuedMessage:
    """A message with nothing readable; its key is a digest of the raw bytes."""
    key = hashlib.sha256(f"{KEY_VERSION}-raw:".encode() + raw).hexdigest()
    return QueuedMessage(
        uid=uid,
        key=key,
        message_id=None,
        subject="",
        from_addrs=(),
        sender_addrs=(),
        reply_to=(),
        to=(),
        cc=(),
        bcc=(),
        date=_as_utc(internaldate),
        size=total,
        problem=problem,
    )
