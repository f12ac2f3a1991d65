"""The MIME walk: the text body chosen and decoded, the attachments listed, the caps."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO
from typing import Any

from emailsync.mail.decoding import (
    _clean,
    _collapse,
    _decode_charset,
    _encoded_text,
    _newlines,
    decode_encoded_words,
)
from emailsync.mail.headers import _COMPAT32, _MALFORMED_INPUT_ERRORS, _header_text
from emailsync.mail.htmltext import html_to_text
from emailsync.model import Attachment, BodyPlan, TextSection

# Cap on the body text kept for a timeline event, in characters (Unicode code points): the
# CRM contract's body_text maxLength (config/crm-api.yaml); a cut sets body_truncated.
MAX_BODY_CHARS = 100_000
# HTML source read for rendering, in characters: far more than can survive MAX_BODY_CHARS of
# text, but bounds the work a hostile multi-megabyte HTML part can cause. A longer source is
# rendered from its start, and the body is then flagged truncated.
MAX_HTML_SOURCE_CHARS = 1024 * 1024
# Nesting depth of multiparts followed, in levels; real mail rarely exceeds 5.
MAX_MIME_DEPTH = 32


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


def _section_text(part: TextSection, data: bytes) -> str:
    """A fetched text part's bytes, transfer encoding and charset undone, as ``_part_text``."""
    return _encoded_text(data, part.encoding, part.charset)


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
