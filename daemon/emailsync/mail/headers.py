"""A message's header fields read as text, and the addresses and Message-ID in them."""

from __future__ import annotations

import contextlib
import email.errors
import email.policy
import email.utils
import functools
import re
from collections.abc import Iterable
from typing import Any

from emailsync.mail.address import ADDRESS_CACHE_SIZE, normalise_address
from emailsync.mail.decoding import (
    _FOLD,
    _LINE_BREAK,
    _clean,
    _collapse,
    _decode_8bit,
    decode_encoded_words,
)

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
_ANGLE_ADDR = re.compile(r"<([^<>]*)>")


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
