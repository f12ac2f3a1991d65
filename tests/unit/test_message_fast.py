"""The fast paths of message parsing against the stdlib and regex code they replace (issue 10)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.policy
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emailsync.mail import dates, decoding
from emailsync.mail import message as message_module
from emailsync.mail.message import evolved, parse_headers
from emailsync.model import QueuedMessage

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = sorted(DATA.glob("*.eml"))
INTERNALDATE = datetime(2024, 4, 1, 9, 0, tzinfo=UTC)
COMPAT32 = email.policy.compat32


def stdlib_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header fields as the stdlib parser reads them, made text as the reader does."""
    parsed = BytesParser(policy=COMPAT32).parsebytes(raw, headersonly=True)
    return [
        (str(name).lower(), message_module._header_text(str(value)))
        for name, value in parsed.raw_items()
    ]


@contextmanager
def stdlib_only() -> Iterator[None]:
    """parse_headers without its fast path: only the stdlib parsers it falls back on."""

    def unavailable(raw: bytes) -> list[tuple[str, str]]:
        raise RuntimeError("fast header reader switched off")

    fast = message_module._header_fields
    message_module._header_fields = unavailable
    try:
        yield
    finally:
        message_module._header_fields = fast


def stdlib_parse_headers(raw: bytes) -> QueuedMessage:
    with stdlib_only():
        return parse_headers(3, raw, internaldate=INTERNALDATE)


def assert_same(raw: bytes) -> None:
    """Field by field and message by message, the fast path equals the stdlib path."""
    assert message_module._header_fields(raw) == stdlib_fields(raw)
    fast = parse_headers(3, raw, internaldate=INTERNALDATE)
    assert fast == stdlib_parse_headers(raw)


def test_every_sample_reads_the_same_fields_and_message() -> None:
    """Each message fixture, whole and cut at its header block, reads the same both ways."""
    for path in SAMPLES:
        raw = path.read_bytes()
        assert_same(raw)
        assert_same(raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        assert_same(raw.split(b"\n\n")[0] + b"\n\n")


def test_mutated_samples_read_the_same() -> None:
    """Seeded corruptions of the fixtures (bytes flipped, lines cut and spliced) agree."""
    rng = random.Random(2822)
    sources = [p.read_bytes() for p in SAMPLES]
    junk = [b"\r", b"\n", b"\r\n ", b"\t", b":", b"From ", b"\x00", b"\xe9", b"=?utf-8?q?", b"?="]
    for _ in range(1500):
        data = bytearray(rng.choice(sources)[:1500])
        for _ in range(rng.randint(1, 5)):
            position = rng.randrange(len(data) + 1)
            if rng.random() < 0.5:
                data[position:position] = rng.choice(junk)
            else:
                del data[position : position + rng.randint(1, 20)]
        assert_same(bytes(data))


def test_header_fields_keep_the_stdlib_quirks() -> None:
    """The rules that are easy to get wrong, each checked against a known reading."""
    raw = (
        b"From ann@example.org Mon Apr  1 10:00:00 2024\r\n"  # mbox envelope line: skipped
        b" lost continuation\r\n"  # continues nothing: dropped
        b"SUBJECT: folded\r\n\tonce\r twice\n"  # CRLF fold removed, bare CR becomes a space
        b": no name\r\n"  # a field without a name: dropped
        b" dropped with it\r\n"
        b"To: a@example.org\r\n"
        b"To: b@example.org\r\n"
        b"X-8bit: caf\xc3\xa9 \xe9t\xe9\r\n"  # not UTF-8 as a whole: Windows-1252
        b"not a field\r\n"
        b"From: after the end@example.org\r\n"
    )
    assert message_module._header_fields(raw) == [
        ("subject", "folded\tonce  twice"),
        ("to", "a@example.org"),
        ("to", "b@example.org"),
        ("x-8bit", "cafÃ© été"),
    ]
    assert message_module._header_fields(raw) == stdlib_fields(raw)


# --- generated header blocks ---------------------------------------------------------------

NAMES = st.sampled_from(
    [
        b"From",
        b"from",
        b"To",
        b"CC",
        b"Bcc",
        b"Sender",
        b"Reply-To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"X-Mailer",
        b"",
        b"Bad Name",
        b"X-\x00",
    ]
)
TOKENS = st.sampled_from(
    [
        b"ann@example.org",
        b"<bob@example.com>",
        b'"Ann, B" <ann@example.org>',
        b"undisclosed-recipients:;",
        b"team: c@example.org, d@example.org;",
        b"e@example.org; f@example.org",
        b"=?utf-8?q?Caf=C3=A9?=",
        b"=?iso-8859-1?b?Y2Fm6Q==?=",
        b"=?utf-8?b?broken",
        b"Mon, 01 Apr 2024 10:00:00 +0200",
        b"1 Apr 2024 25:61:00 -0000",
        b"<id-1@example.org>",
        b"caf\xc3\xa9",
        b"\xe9t\xe9",
        b"\x00",
        b"\x0b\x0c\x1c",
        b" ",
        b"\t",
        b":",
        b"From ",
        b"?=",
    ]
)
ENDS = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"])


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    """One line of a header block: a field, a continuation, or something malformed."""
    kind = draw(st.integers(0, 9))
    value = b" ".join(draw(st.lists(TOKENS, max_size=4)))
    if kind <= 5:
        line = draw(NAMES) + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + value
    elif kind <= 7:
        line = draw(st.sampled_from([b" ", b"\t"])) + value
    elif kind == 8:
        line = draw(st.sampled_from([b"From ", b"no colon ", b":", b""])) + value
    else:
        line = draw(st.binary(max_size=30))
    return line + draw(ENDS)


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    """A header block, sometimes followed by a separator and a body line."""
    block = b"".join(draw(st.lists(header_lines(), min_size=1, max_size=12)))
    if draw(st.booleans()):
        block += draw(ENDS) + b"Body: text\r\n"
    return block


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_blocks())
@example(b"From: ann@example.org\r\n\r")
@example(b"Subject: x\r\n \r\nTo: a@example.org\r\n")
@example(b"To: a@example.org\r\nFrom bob\r\n")
def test_generated_header_blocks_read_the_same(raw: bytes) -> None:
    """Folded lines, 8-bit bytes, encoded words, duplicates, bare CR/LF, NUL: equal readings."""
    assert_same(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_read_the_same(raw: bytes) -> None:
    """Bytes with no structure at all: both ways agree, including on "unusable"."""
    assert_same(raw)


# --- body text -----------------------------------------------------------------------------

LINE_BREAK = re.compile(r"\r\n?|\n")
BODY_TEXT = st.text(alphabet=st.sampled_from(["a", "é", "\r", "\n", "\x00", " ", "\udcff"]))


def regex_lenient_base64(data: bytes) -> bytes:
    """The regex version ``_lenient_base64`` replaced: alphabet kept, cut to whole groups."""
    letters = re.sub(rb"[^A-Za-z0-9+/=]", b"", data).rstrip(b"=")
    letters = letters[: len(letters) - len(letters) % 4] if len(letters) % 4 == 1 else letters
    return base64.b64decode(letters + b"=" * (-len(letters) % 4))


def outcome(decode: Callable[[bytes], bytes], data: bytes) -> bytes | str:
    """The decoded bytes, or the name of the error (which _section_text turns into no text)."""
    try:
        return decode(data)
    except (binascii.Error, ValueError) as exc:
        return type(exc).__name__


def encoded_cap(text: str) -> tuple[str, bool]:
    """``_cap`` without its ASCII shortcut: always through UTF-8."""
    cap = message_module.MAX_BODY_CHARS
    return text[:cap].encode("utf-8", "replace").decode("utf-8"), len(text) > cap


@settings(max_examples=300, deadline=None)
@given(BODY_TEXT)
def test_newlines_equal_the_line_break_regex(text: str) -> None:
    """CRLF, lone CR and LF all become LF, exactly as the regex made them."""
    assert decoding._newlines(text) == LINE_BREAK.sub("\n", text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80) | st.text("QUJD+/=\r\n -_!é", max_size=80).map(str.encode))
def test_lenient_base64_equals_the_regex_version(data: bytes) -> None:
    """Clean or dirty, cut or padded: the same bytes as the regex filter gave."""
    assert outcome(decoding._lenient_base64, data) == outcome(regex_lenient_base64, data)


@example("a" * (message_module.MAX_BODY_CHARS + 1))
@example("é" * message_module.MAX_BODY_CHARS)
@example("\udcff")
@settings(max_examples=200, deadline=None)
@given(BODY_TEXT)
def test_cap_shortcut_changes_nothing(text: str) -> None:
    """ASCII text under the limit comes back as it was, as the UTF-8 round trip gave it."""
    assert message_module._cap(text) == encoded_cap(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["=", "?", "q", "b", "utf-8", "Q", "A", " ", "é"])).map("".join))
def test_text_without_encoded_word_start_is_returned_as_is(text: str) -> None:
    """Without "=?" no encoded-word can match, so the shortcut's answer is the decoder's."""
    decoded = message_module.decode_encoded_words(text)
    if "=?" not in text:
        assert decoding._ENCODED_WORD.search(text) is None
        assert decoded == text


# --- dates ---------------------------------------------------------------------------------

DIGITS2 = st.sampled_from(["00", "07", "23", "24", "59", "60", "99"])


@st.composite
def date_texts(draw: st.DrawFn) -> str:
    """Dates in and near RFC 5322's recommended form, valid or not."""
    day_name = draw(st.sampled_from(["", "Mon, ", "Sun, ", "mon, ", "Xyz, "]))
    day = draw(st.sampled_from(["1", "01", "29", "30", "31", "0", "32", "7"]))
    month = draw(st.sampled_from(["Jan", "Feb", "Apr", "Dec", "dec", "Foo"]))
    year = draw(st.sampled_from(["2024", "1999", "9999", "1000", "0099", "24", "2100"]))
    clock = ":".join(draw(st.lists(DIGITS2, min_size=2, max_size=3)))
    zone = draw(st.sampled_from(["+", "-"])) + draw(DIGITS2) + draw(DIGITS2)
    tail = draw(st.sampled_from(["", " (UTC)", " ", "\t", "GMT"]))
    return f"{day_name}{day} {month} {year} {clock} {zone}{tail}"


@example("Fri, 31 Dec 9999 23:59:59 -0100")  # past datetime.max in UTC
@example("Mon, 01 Apr 2024 10:00:00 +2400")  # a whole day of offset
@example("Mon, 01 Apr 2024 10:00:00 -0000")  # "no zone information" (RFC 5322 §3.3)
@example("Mon, 31 Apr 2024 10:00:00 +0000")
@example("Thu, 01 Apr 0099 10:00:00 +0000")  # email.utils takes it for 1999
@settings(max_examples=500, deadline=None)
@given(date_texts())
def test_canonical_dates_read_as_email_utils_reads_them(text: str) -> None:
    """The regex reading of a Date gives the stdlib's moment, or None when the stdlib does."""
    fast = dates._parse_date.__wrapped__(text)
    stdlib = dates._stdlib_date(text)
    assert (fast and fast.isoformat()) == (stdlib and stdlib.isoformat())


def test_evolved_copies_as_dataclasses_replace_does() -> None:
    """``evolved`` (the hot path's replace) gives what ``dataclasses.replace`` gives."""
    message = parse_headers(7, b"From: a@b.example\r\nTo: c@d.example\r\nSubject: hi\r\n\r\n")
    changes: dict[str, object] = {"body_text": "text", "key": "k", "attachments": ()}
    copy = evolved(message, **changes)
    assert copy == dataclasses.replace(message, **changes)  # type: ignore[arg-type]
    assert type(copy) is QueuedMessage
    assert copy is not message
    assert message.body_text == ""  # the original untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.body_text = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError, match="no such fields"):
        evolved(message, body="misspelt")
