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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.errors
import email.policy
import email.utils
import functools
import hashlib
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Policy
from io import BytesIO
from typing import Any, TypeVar

from emailsync.mail.address import ADDRESS_CACHE_SIZE, normalise_address
from emailsync.mail.htmltext import html_to_text
from emailsync.model import Attachment, BodyPlan, QueuedMessage, TextSection

# Cap on the body text kept for a timeline event, in characters (Unicode code points): the
# CRM contract's body_text maxLength (config/crm-api.yaml); a cut sets body_truncated.
MAX_BODY_CHARS = 100_000
# HTML source read for rendering, in characters: far more than can survive MAX_BODY_CHARS of
# text, but bounds the work a hostile multi-megabyte HTML part can cause. A longer source is
# rendered from its start, and the body is then flagged truncated.
MAX_HTML_SOURCE_CHARS = 1024 * 1024
# Nesting depth of multiparts followed, in levels; real mail rarely exceeds 5.
MAX_MIME_DEPTH = 32
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
# Date header texts whose parse is kept, in entries: a message's Date is parsed for its date
# and again for its key, a few calls apart (datetime values are immutable, safe to share).
DATE_CACHE_SIZE = 64

# What the stdlib email package has been seen to raise on malformed input, when reading a
# header object, a parameter or a payload. A failure here degrades one field, not the parse.
_MALFORMED_INPUT_ERRORS: tuple[type[Exception], ...] = (
    email.errors.MessageError,
    AssertionError,
    AttributeError,
    IndexError,
    KeyError,
    LookupError,
    RecursionError,  # the generator re-serialises forwarded messages recursively
    TypeError,
    ValueError,
)

_ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
# Lenient fallback: header values are kept as raw strings and never parsed into objects.
_COMPAT32 = email.policy.compat32.clone(mangle_from_=False, linesep="\r\n")
_DEFAULT = email.policy.default

# RFC 5322 §2.2.3: unfolding removes a CRLF that is followed by white space.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAK = re.compile(r"\r\n?|\n")
# RFC 2047 §2 encoded-word; the optional "*lang" suffix of the charset is RFC 2231 §5.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")
_ANGLE_ADDR = re.compile(r"<([^<>]*)>")
# Every byte but the base64 alphabet and its padding (RFC 2045 §6.8), for bytes.translate.
_NOT_BASE64_BYTES = bytes(
    b
    for b in range(256)
    if b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
)


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


def _chosen_text(plan: BodyPlan, sections: Mapping[str, bytes], cut: Collection[str]) -> _Body:
    """The text shown and the text the key digests, as ``_extract_body`` picks them."""
    for wanted in ("text/plain", "text/html"):
        for part in plan.texts:
            if part.content_type != wanted:
                continue
            text = _section_text(part, sections.get(part.section, b""))
            if not text.strip():
                continue
            if wanted == "text/html":
                return _html_body(text, (), cut=part.section in cut)
            return _text_body(text, (), cut=part.section in cut)
    return _NO_BODY


def _body_key(message: QueuedMessage, header_block: bytes, source: str) -> str:
    """The key of a message without Message-ID: its header fields and its body text."""
    try:
        date_text = _HeaderReader(_header_fields(header_block)).first("date")
    # Same boundary as _parse_safely: a bug in the header reader must not stall the Queue.
    except Exception:
        return message.key
    return message_key(None, date_text, message.from_addrs, message.subject, source)


def _section_text(part: TextSection, data: bytes) -> str:
    """A fetched text part's bytes, transfer encoding and charset undone, as ``_part_text``."""
    return _encoded_text(data, part.encoding, part.charset)


def _encoded_text(data: bytes, encoding: str, charset: str) -> str:
    """A text part's encoded bytes, which may be cut anywhere, as text: the transfer encoding
    (RFC 2045 §6) and the charset undone, line breaks as LF."""
    try:
        if encoding == "base64":
            data = _lenient_base64(data)
        elif encoding == "quoted-printable":
            data = binascii.a2b_qp(data)
    except (binascii.Error, ValueError):
        data = b""
    text = _decode_charset(data, charset)
    return _clean(_newlines(text)).rstrip()


def _newlines(text: str) -> str:
    """Every line break (CRLF, CR or LF) as LF: ``_LINE_BREAK.sub("\n", …)`` without a regex."""
    if "\r" not in text:
        return text
    # split/join is twice as fast as str.replace on CRLF text; what CR is left is bare.
    text = "\n".join(text.split("\r\n"))
    return text.replace("\r", "\n") if "\r" in text else text


def _lenient_base64(data: bytes) -> bytes:
    """Base64 that may be cut anywhere (the fetch cap): whole 4-character groups only."""
    letters = data.translate(None, _NOT_BASE64_BYTES).rstrip(b"=")
    letters = letters[: len(letters) - len(letters) % 4] if len(letters) % 4 == 1 else letters
    return base64.b64decode(letters + b"=" * (-len(letters) % 4))


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


def decode_encoded_words(text: str) -> str:
    """Decode RFC 2047 encoded-words in ``text``; malformed words are decoded best-effort.

    White space between adjacent encoded-words is dropped (RFC 2047 §6.2), and adjacent words
    in one charset are decoded together, because mailers split multi-byte characters
    across words although §5 forbids it.
    """
    if "=?" not in text:
        return text  # no encoded-word can start: the common case, without the regex
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    position = 0
    for match in _ENCODED_WORD.finditer(text):
        gap = text[position : match.start()]
        charset = match.group(1).lower()
        adjacent = bool(pending_charset) and not gap.strip()
        if not adjacent or charset != pending_charset:
            out.append(_decode_charset(bytes(pending), pending_charset))
            pending.clear()
            if not adjacent:
                out.append(gap)
        pending += _decode_word_text(match.group(2), match.group(3))
        pending_charset = charset
        position = match.end()
    out.append(_decode_charset(bytes(pending), pending_charset))
    out.append(text[position:])
    return "".join(out)


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
    """What the MIME walk found: shown text, the text the key digests, and attachments.

    ``truncated``: ``text`` is not all of the part's text (a fetch cut the part, or an HTML
    source was rendered only from its start); the MAX_BODY_CHARS cap comes later.
    """

    text: str
    source: str
    attachments: tuple[Attachment, ...]
    truncated: bool = False


_NO_BODY = _Body("", "", ())


def _text_body(text: str, attachments: tuple[Attachment, ...], *, cut: bool) -> _Body:
    """The body of a plain text part; ``cut``: a byte cap cut the part short."""
    if cut:
        text = _cut_short(text)
    return _Body(text, text, attachments, truncated=cut)


def _html_body(source: str, attachments: tuple[Attachment, ...], *, cut: bool) -> _Body:
    """The body of an HTML text part: rendered from at most MAX_HTML_SOURCE_CHARS of source."""
    if cut:
        source = _cut_short(source)
    shown = html_to_text(source[:MAX_HTML_SOURCE_CHARS])
    return _Body(shown, source, attachments, cut or len(source) > MAX_HTML_SOURCE_CHARS)


def _cut_short(text: str) -> str:
    """The text of a part a byte cap cut, without the partial character the cut may leave
    (decoded as U+FFFD)."""
    return text.rstrip("\ufffd")


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


# --- header fields -------------------------------------------------------------------------


# A header field's value: its text, or the raw lines it was read from (see _HeaderReader).
_FieldValue = str | list[bytes]


class _HeaderReader:
    """The top-level header fields as text, read from the raw values so no policy can raise."""

    def __init__(self, fields: Iterable[tuple[str, _FieldValue]]) -> None:
        """``fields``: (lower-case name, value) pairs in header order.

        A value is its text, or the raw lines ``_raw_header_fields`` read, made text only
        when asked for: most fields of a message (Received, MIME fields) never are.
        """
        self._values: dict[str, list[_FieldValue]] = {}
        for name, value in fields:
            self._values.setdefault(name, []).append(value)
        self.names = self._values.keys()
        self._texts: dict[str, list[str]] = {}

    def all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (lower case), unfolded, 8-bit text decoded."""
        texts = self._texts.get(name)
        if texts is None:
            values = self._values.get(name, [])
            texts = [v if isinstance(v, str) else _field_text(v) for v in values]
            self._texts[name] = texts
        return texts

    def first(self, name: str) -> str:
        """The first value of ``name``, or "" when absent."""
        values = self.all(name)
        return values[0] if values else ""

    def display(self, name: str) -> str:
        """The field as a reader should see it: encoded-words decoded, one line."""
        return _collapse(_clean(", ".join(decode_encoded_words(v) for v in self.all(name))))


# What the stdlib FeedParser takes for a header line: a field name (printable ASCII but ":"),
# possibly empty, then ":"; a continuation (RFC 5322 §2.2.3); or an mbox "From " line.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")


def _header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields of ``raw`` as (lower-case name, text) pairs, read like compat32 does."""
    return [(name, _field_text(lines)) for name, lines in _raw_header_fields(raw)]


def _raw_header_fields(raw: bytes) -> list[tuple[str, list[bytes]]]:
    """The header fields of ``raw`` as (lower-case name, value lines) pairs, as compat32 reads.

    A hand-written equivalent of ``BytesParser(policy=compat32).parsebytes(raw,
    headersonly=True).raw_items()``, several times faster; ``_field_text`` of the lines equals
    ``_header_text`` of compat32's value (tests/unit/test_message_fast.py proves it). Lines
    end at CRLF, CR or LF; the block ends at the first line that is neither a field, a
    continuation nor a "From " line.
    Continuations before any field, after a "From " line or after a field without a name are
    dropped, as the stdlib drops them.
    """
    fields: list[tuple[str, list[bytes]]] = []
    name = b""
    value: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        if not _HEADER_LINE.match(line):
            break
        if line[0] in b" \t":
            if name:
                value.append(line)
            continue
        if name:
            fields.append((name.decode("ascii").lower(), value))
            name = b""
        if line.startswith(b"From "):
            continue  # an mbox envelope line (RFC 4155), not a field
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon]
            value = [line[colon + 1 :].lstrip(b" \t")]
    if name:
        fields.append((name.decode("ascii").lower(), value))
    return fields


def _field_text(lines: list[bytes]) -> str:
    """The text of one field's value lines, as ``_header_text`` makes it of compat32's value."""
    data = b"".join(lines).rstrip(b"\r\n") if len(lines) > 1 else lines[0].rstrip(b"\r\n")
    value = data.decode("ascii") if data.isascii() else _decode_8bit(data)
    if "\n" in value or "\r" in value:
        return _LINE_BREAK.sub(" ", _FOLD.sub("", value)).strip()
    return value.strip()


def _header_text(value: str) -> str:
    """A raw header value as text: 8-bit bytes decoded (RFC 6532), unfolded (RFC 5322 §2.2.3)."""
    if not value.isascii():
        # BytesParser keeps 8-bit header bytes as surrogate escapes; get the bytes back.
        try:
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "replace")
        value = _decode_8bit(data)
    return _LINE_BREAK.sub(" ", _FOLD.sub("", value)).strip()


def _decode_8bit(data: bytes) -> str:
    """Decode unlabelled 8-bit text: UTF-8 (RFC 6532) when valid, else Windows-1252/Latin-1."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        # Windows-1252 is what "latin-1" mail really is (curly quotes in 0x80 to 0x9f).
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_charset(data: bytes, charset: str) -> str:
    """Decode ``data`` in a declared MIME charset; unknown or missing charsets never fail."""
    charset = charset.strip().strip('"').lower()
    if not data:
        return ""
    if charset in {"", "us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown"}:
        # Undeclared or mislabelled 8-bit text is common; guess instead of replacing it all.
        return _decode_8bit(data)
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        # Unknown charset, or a codec that is not a text encoding ("base64", "idna").
        return data.decode("utf-8", "replace")


def _decode_word_text(encoding: str, text: str) -> bytes:
    """The bytes an RFC 2047 encoded-text stands for, in the "Q" or "B" encoding (§4)."""
    if encoding in "Qq":
        data = text.replace("_", " ").encode("utf-8", "surrogateescape")
        return _Q_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    letters = _NOT_BASE64.sub("", text)
    if len(letters) % 4 == 1:
        letters = letters[:-1]  # one dangling 6-bit group cannot complete a byte
    try:
        return base64.b64decode(letters + "=" * (-len(letters) % 4))
    except (binascii.Error, ValueError):
        return text.encode("utf-8", "surrogateescape")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _clean(text: str) -> str:
    """Drop NUL characters, which no store column can hold and no reader needs."""
    return text.replace("\x00", "")


def _addresses(values: Iterable[str]) -> tuple[str, ...]:
    """Normalised, de-duplicated addresses of address header values; invalid ones skipped."""
    found: list[str] = []
    for value in values:
        found.extend(_value_addresses(value))
    return tuple(dict.fromkeys(found))


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _value_addresses(value: str) -> tuple[str, ...]:
    """The normalised addresses of one header value (the same values recur: To the owner)."""
    found: list[str] = []
    for candidate in _address_candidates(value):
        address = normalise_address(candidate)
        if address is not None:
            found.append(address)
    return tuple(found)


def _address_candidates(value: str) -> list[str]:
    """Every addr-spec either stdlib address parser finds in one header value.

    The RFC 5322 parser of ``policy.default`` understands groups and encoded display names,
    but stops at the first ";" where Outlook users separate addresses; ``getaddresses``
    is lax about that. Their union misses the fewest real addresses; anything that is not a
    valid address is dropped later by ``normalise_address``.
    """
    candidates: list[str] = []
    # The RFC 5322 parser costs about ten times as much as getaddresses; it is only needed
    # for group syntax and ";" separators, which always show a ":" or ";".
    if ":" in value or ";" in value:
        with contextlib.suppress(*_MALFORMED_INPUT_ERRORS):
            header: Any = _DEFAULT.header_factory("to", value)
            candidates.extend(str(address.addr_spec) for address in header.addresses)
    with contextlib.suppress(*_MALFORMED_INPUT_ERRORS):
        candidates.extend(addr for _, addr in email.utils.getaddresses([value]))
    return candidates


def _normalise_message_id(value: str) -> str | None:
    """The msg-id without angle brackets or white space (RFC 5322 §3.6.4); None when empty."""
    match = _ANGLE_ADDR.search(value)
    text = match.group(1) if match else value
    text = "".join(text.split()).strip("<>")
    return text or None


@functools.lru_cache(maxsize=DATE_CACHE_SIZE)
def _parse_date(text: str) -> datetime | None:
    """The Date header (RFC 5322 §3.3) as an aware UTC datetime; None when unparseable."""
    if not text.strip():
        return None
    match = _CANONICAL_DATE.fullmatch(text)
    if match is not None:
        # Any surprise (day 31 of April, an offset of a day or more) is left to the stdlib.
        with contextlib.suppress(ArithmeticError, ValueError):
            return _canonical_date(match)
    return _stdlib_date(text)


def _canonical_date(match: re.Match[str]) -> datetime:
    """The UTC moment of a Date written as RFC 5322 §3.3 recommends, as the stdlib reads it."""
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    # _parsedate_tz's arithmetic: "+0099" is 99 minutes; datetime.timezone refuses ±24 h.
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    if offset >= _DAY_SECONDS:
        raise ValueError(offset)
    moment = datetime(
        int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=UTC
    )
    return moment - timedelta(seconds=-offset if sign == "-" else offset)


def _stdlib_date(text: str) -> datetime | None:
    """The Date header read by ``email.utils``: any form RFC 5322 §4.3 allows, and more."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return _as_utc(parsed)


# "Sat, 01 Mar 2025 09:00:07 +0000", as nearly every mailer writes it (RFC 5322 §3.3): read
# without email.utils, whose pure-Python _parsedate_tz was 3 % of a backlog pass (issue 10).
# Years below 1000 are left to the stdlib, which takes "0099" for 1999.
_CANONICAL_DATE = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?(\d{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9]\d{3}) "
    r"(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)",
    re.ASCII,
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
_DAY_SECONDS = 24 * 3600


def _as_utc(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC; a naive time (zone "-0000", RFC 5322 §3.3) is taken as UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _normalise_date_text(text: str) -> str:
    """The Date as UTC ISO 8601 when parseable, else the header text with white space collapsed."""
    parsed = _parse_date(text)
    return parsed.isoformat() if parsed is not None else _collapse(text)


# --- MIME body -----------------------------------------------------------------------------


def _extract_body(root: Message, *, prefix: bool = False) -> _Body:
    """Pick the text body and list the attachments (RFC 2045/2046 structure).

    ``prefix``: the message was cut at a byte cap, so its last part may be cut: the body is
    truncated when the text comes from that part.
    """
    plain: list[tuple[str, Message]] = []
    html: list[tuple[str, Message]] = []
    unsplit: list[tuple[str, Message]] = []
    attachments: list[Attachment] = []
    part: Message | None = None
    for part in _leaves(root):
        content_type = _content_type(part)
        filename = _filename(part)
        # RFC 2046 §5.2.1 message/rfc822 and RFC 6532 §3.7 message/global: a forwarded
        # message is an attachment, and its own text is not our body.
        if content_type in {"message/rfc822", "message/global"}:
            attachments.append(
                Attachment(filename or "forwarded.eml", content_type, _embedded_size(part))
            )
        elif _disposition(part) == "attachment" or filename is not None:
            attachments.append(
                Attachment(filename or "unnamed", content_type, len(_payload_bytes(part)))
            )
        elif content_type == "text/plain":
            plain.append((_part_text(part), part))
        elif content_type == "text/html":
            html.append((_part_text(part), part))
        elif content_type.startswith("multipart/"):
            # A multipart whose boundary is missing was left as one opaque body
            # (RFC 2046 §5.1.1 defect); its raw text is the only text there is.
            unsplit.append((_part_text(part), part))
    last = part  # the part a cut of the message's bytes falls in

    for text, leaf in plain:
        if text.strip():
            cut = prefix and leaf is last
            return _text_body(_cut_part_text(leaf) if cut else text, tuple(attachments), cut=cut)
    for source, leaf in html:
        if source.strip():
            cut = prefix and leaf is last
            return _html_body(_cut_part_text(leaf) if cut else source, tuple(attachments), cut=cut)
    for text, leaf in unsplit:
        if text.strip():
            cut = prefix and leaf is last
            return _text_body(_cut_part_text(leaf) if cut else text, tuple(attachments), cut=cut)
    return _Body("", "", tuple(attachments))


def _leaves(root: Message) -> Iterator[Message]:
    """The non-multipart parts in document order; message/* parts are leaves, not entered."""
    stack: list[tuple[Message, int]] = [(root, 0)]
    while stack:
        part, depth = stack.pop()
        payload = _raw_payload(part)
        is_container = isinstance(payload, list) and depth < MAX_MIME_DEPTH
        if is_container and not _content_type(part).startswith("message/"):
            children = [child for child in payload if isinstance(child, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))
        else:
            yield part


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except _MALFORMED_INPUT_ERRORS:
        # RFC 2045 §5.2: a part without a usable Content-Type is text/plain.
        return "text/plain"


def _disposition(part: Message) -> str | None:
    try:
        disposition = part.get_content_disposition()
    except _MALFORMED_INPUT_ERRORS:
        return None
    return disposition.lower() if disposition else None


def _filename(part: Message) -> str | None:
    """The decoded file name (RFC 2231 parameters, or RFC 2047 words as Outlook writes them)."""
    try:
        name = part.get_filename()
    except _MALFORMED_INPUT_ERRORS:
        return None
    if name is None:
        return None
    return display_filename(str(name))


def display_filename(text: str) -> str:
    """A file name parameter as shown: 8-bit text and RFC 2047 words decoded, one line."""
    if not text.isascii():
        text = _header_text(text)
    return _collapse(_clean(decode_encoded_words(text)))


def _payload_bytes(part: Message) -> bytes:
    """The part's content with its transfer encoding (RFC 2045 §6) undone, best-effort."""
    try:
        data = part.get_payload(decode=True)
    except _MALFORMED_INPUT_ERRORS:
        data = None
    if isinstance(data, bytes):
        return data
    payload = _raw_payload(part)
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


def _part_text(part: Message) -> str:
    text = _decode_charset(_payload_bytes(part), _charset(part))
    # Trailing blank lines are the boundary's or the mailer's padding, not the writer's text.
    return _clean(_newlines(text)).rstrip()


def _cut_part_text(part: Message) -> str:
    """The text of a part a byte cap cut short, decoded as a fetched section is.

    The stdlib gives up on base64 cut one character past a whole group and returns the
    encoded letters as the "decoded" payload (``email._encoded_words.decode_b``); a cut part
    is decoded like ``_section_text``, so both fetch paths give the same text and key.
    """
    payload = _raw_payload(part)
    data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    try:
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    except _MALFORMED_INPUT_ERRORS:
        encoding = ""
    return _encoded_text(data, encoding, _charset(part))


def _charset(part: Message) -> str:
    try:
        return str(part.get_content_charset() or "")
    except _MALFORMED_INPUT_ERRORS:
        return ""


def _raw_payload(part: Message) -> Any:
    """The parsed payload: a list of sub-parts, a string, or None when unreadable."""
    try:
        return part.get_payload()
    except _MALFORMED_INPUT_ERRORS:
        return None


def _embedded_size(part: Message) -> int:
    """Size in bytes of a forwarded message/rfc822 part, as re-serialised."""
    payload = _raw_payload(part)
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        buffer = BytesIO()
        try:
            BytesGenerator(buffer, policy=_COMPAT32).flatten(payload[0])
        except _MALFORMED_INPUT_ERRORS:
            return 0
        return len(buffer.getvalue())
    return len(_payload_bytes(part))


def _cap(text: str) -> tuple[str, bool]:
    """``text`` cut to MAX_BODY_CHARS characters, and whether it was cut.

    Lone surrogates (undecodable input kept by ``surrogateescape``) become "?", one
    character each, so the text is valid UTF-8 for every store and for JSON.
    """
    cut = len(text) > MAX_BODY_CHARS
    if cut:
        text = text[:MAX_BODY_CHARS]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text, cut
