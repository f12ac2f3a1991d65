"""The lean FETCH parser (imap/fetch.py) gives what imapclient's parser gives, or ProtocolError."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient.exceptions import IMAPClientError, ProtocolError
from imapclient.response_parser import parse_fetch_response
from imapclient.response_types import BodyData

from emailsync.imap.fetch import parse_fetch_items, parse_values, uid_set
from emailsync.imap.structure import plan_body

# A Dovecot BODYSTRUCTURE: multipart/mixed of (alternative of plain and html), a PDF and a
# forwarded message (RFC 3501 §7.4.2: message/rfc822 carries envelope, body and lines).
STRUCTURE = (
    b'((("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 120 4 NIL NIL NIL NIL)'
    b'("text" "html" ("charset" "utf-8") NIL NIL "base64" 300 5 NIL NIL NIL NIL)'
    b' "alternative" ("boundary" "b2") NIL NIL NIL)'
    b'("application" "pdf" ("name" "c.pdf") NIL NIL "base64" 7800 NIL'
    b' ("attachment" ("filename" "contract \\"v2\\".pdf")) NIL NIL)'
    b'("message" "rfc822" NIL NIL NIL "7bit" 500 ("Mon, 1 Dec 2026 10:00:00 +0000" "fwd"'
    b' (("A" NIL "a" "x.example")) NIL NIL NIL NIL NIL NIL "<m@x>")'
    b' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 1 NIL NIL NIL NIL) 12 NIL'
    b' ("attachment" NIL) NIL NIL)'
    b' "mixed" ("boundary" "b1") NIL NIL NIL)'
)


def imapclient_fetch(data: list[Any]) -> dict[int, dict[bytes, Any]]:
    """What ``IMAPClient.fetch`` makes of imaplib's untagged FETCH data (unnormalised times)."""
    return dict(parse_fetch_response(data, normalise_times=False, uid_is_key=True))


def test_items_with_a_literal_nil_quoted_escapes_and_nested_lists() -> None:
    segments = [
        b'(UID 42 FLAGS (\\Seen $Label) RFC822.SIZE 5120 SAVEDATE NIL X-Q "a \\"b\\" \\\\ c"'
        b' X-E "" X-L nil X-N (1 (2 "three") NIL 007 0) BODY[HEADER] ',
        b"Subject: hi\r\n\r\n",
        b' INTERNALDATE "01-Dec-2026 09:15:00 +0100")',
    ]
    data = parse_fetch_items(7, segments)
    assert data == {
        b"SEQ": 7,
        b"UID": 42,
        b"FLAGS": (b"\\Seen", b"$Label"),
        b"RFC822.SIZE": 5120,
        b"SAVEDATE": None,
        b"X-Q": b'a "b" \\ c',
        b"X-E": b"",
        b"X-L": b"nil",  # RFC 3501 §9: NIL is case-insensitive, but imapclient reads it so
        b"X-N": (1, (2, b"three"), None, b"007", 0),
        b"BODY[HEADER]": b"Subject: hi\r\n\r\n",
        b"INTERNALDATE": datetime(2026, 12, 1, 8, 15, tzinfo=UTC),
    }
    when = data[b"INTERNALDATE"]
    assert when.utcoffset() == timedelta(hours=1)  # its own zone kept, as imapclient keeps it
    imaplib_data = [(b"7 " + segments[0] + b"{15}", segments[1]), segments[2]]
    assert imapclient_fetch(imaplib_data) == {42: {k: v for k, v in data.items() if k != b"UID"}}


def test_section_atoms_keep_their_brackets_spaces_and_origin() -> None:
    segments = [b"(UID 1 BODY[HEADER.FIELDS (MESSAGE-ID TO)] ", b"x", b" BODY[1.2]<0> NIL)"]
    data = parse_fetch_items(1, segments)
    assert data[b"BODY[HEADER.FIELDS (MESSAGE-ID TO)]"] == b"x"
    assert data[b"BODY[1.2]<0>"] is None


def test_a_literal_may_hold_anything_even_parentheses_and_crlf() -> None:
    literal = b')("\r\n{5}\r\n* 3 FETCH'
    assert parse_values([b"(A ", literal, b")"]) == [(b"A", literal)]


def test_bodystructure_gives_the_plan_imapclient_s_gives() -> None:
    (mine,) = parse_values([b"(UID 9 BODYSTRUCTURE " + STRUCTURE + b")"])
    theirs = imapclient_fetch([b"1 (UID 9 BODYSTRUCTURE " + STRUCTURE + b")"])[9]
    assert BodyData.create(mine[3]) == theirs[b"BODYSTRUCTURE"]
    plan = plan_body(mine[3])
    assert plan is not None
    assert plan == plan_body(theirs[b"BODYSTRUCTURE"])
    assert [t.section for t in plan.texts] == ["1.1", "1.2"]
    assert [a.filename for a in plan.attachments] == ['contract "v2".pdf', "forwarded.eml"]


@pytest.mark.parametrize(
    "segments",
    [
        [b"(UID 1 FLAGS (\\Seen)"],  # unclosed list
        [b"(UID 1 FLAGS \\Seen))"],  # one ")" too many
        [b'(UID 1 X "unterminated)'],
        [b"(UID 1 BODY[HEADER NIL)"],  # unclosed section
        [b"(UID 1 FLAGS)"],  # odd number of items
        [b"(UID NIL)"],
        [b"(UID x)"],
        [b"(1 2)"],  # an item name that is a number
        [b"((A) 1)"],
        [b"UID 1"],  # not a list
        [b"(UID 1) (UID 2)"],
        [b"(UID 1 X %)"],
        [b"(UID 1 X \x01)"],
        [b""],
    ],
)
def test_garbage_raises_protocol_error(segments: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        parse_fetch_items(1, segments)


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_raise_protocol_error(chunks: list[bytes]) -> None:
    try:
        data = parse_fetch_items(1, chunks)
    except IMAPClientError as exc:
        assert isinstance(exc, ProtocolError)  # noqa: PT017 -- the kind is the point
        return
    assert data[b"SEQ"] == 1


def test_uid_sets_write_runs_as_ranges() -> None:
    assert uid_set([5]) == b"5"
    assert uid_set([3, 1, 2, 7, 9, 10, 11, 2]) == b"1:3,7,9:11"


# -- differential: generated FETCH responses, this parser against imapclient's --------------

# An atom never starts with "{" (that is a literal's marker) nor a digit (that is a number).
_ATOM = st.from_regex(rb"[A-Za-z$\\][A-Za-z0-9.$\\\]{}<>*-]{0,7}", fullmatch=True)
_QUOTED_TEXT = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_LEAF = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=2**32),
    st.tuples(st.just("atom"), _ATOM),
    st.tuples(st.just("quoted"), _QUOTED_TEXT),
    st.tuples(st.just("literal"), st.binary(max_size=30)),
)
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
_NAMES = st.sampled_from(
    [b"FLAGS", b"X-GM-LABELS", b"BODY[1]<0>", b"BODY[HEADER.FIELDS (TO CC)]", b"savedate"]
)


def _wire(value: Any, out: list[bytes]) -> None:
    """Write a generated value the way a server would; out[-1] is the open text segment."""
    if value is None:
        out[-1] += b"NIL"
    elif isinstance(value, int):
        out[-1] += b"%d" % value
    elif isinstance(value, list):
        out[-1] += b"("
        for index, item in enumerate(value):
            if index:
                out[-1] += b" "
            _wire(item, out)
        out[-1] += b")"
    elif value[0] == "atom":
        out[-1] += value[1]
    elif value[0] == "quoted":
        out[-1] += b'"' + value[1].replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    else:
        out.extend([value[1], b""])  # the {n} marker is cut off the text, as the reader does


@given(
    st.integers(min_value=1, max_value=2**31),
    st.lists(st.tuples(_NAMES, _VALUE), max_size=4),
    st.sampled_from([None, b'"01-Dec-2026 09:15:00 -0500"', b'"17-Jul-1996 02:44:25 -0700"']),
)
@settings(max_examples=400, deadline=None)
def test_generated_responses_parse_as_imapclient_parses_them(
    uid: int, items: list[tuple[bytes, Any]], date: bytes | None
) -> None:
    out = [b"(UID %d" % uid]
    for name, value in items:
        out[-1] += b" " + name + b" "
        _wire(value, out)
    if date is not None:
        out[-1] += b" INTERNALDATE " + date
    out[-1] += b")"
    mine = parse_fetch_items(3, out)
    assert mine.pop(b"UID") == uid
    # imaplib hands imapclient each literal with the text before it, marker included.
    imaplib_data: list[Any] = []
    text = b"3 " + out[0]
    for index in range(1, len(out), 2):
        marker = b"{%d}" % len(out[index])
        imaplib_data.append((text + marker, out[index]))
        text = out[index + 1]
    imaplib_data.append(text)
    theirs = imapclient_fetch(imaplib_data)
    assert theirs == {uid: mine}
