"""Bytes and encoded text of mail as str: charsets, transfer encodings, RFC 2047 words."""

from __future__ import annotations

import base64
import binascii
import re

# RFC 5322 §2.2.3: unfolding removes a CRLF that is followed by white space.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAK = re.compile(r"\r\n?|\n")
# RFC 2047 §2 encoded-word; the optional "*lang" suffix of the charset is RFC 2231 §5.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")
# Every byte but the base64 alphabet and its padding (RFC 2045 §6.8), for bytes.translate.
_NOT_BASE64_BYTES = bytes(
    b
    for b in range(256)
    if b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
)


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
