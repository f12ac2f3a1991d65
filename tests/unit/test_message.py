"""Tests of emailsync.mail.message: raw mail bytes parsed into a QueuedMessage."""

from __future__ import annotations

import email.policy
import random
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from emailsync.mail import key as key_module
from emailsync.mail import message as message_module
from emailsync.mail.message import (
    MAX_BODY_CHARS,
    decode_encoded_words,
    message_key,
    needs_body_for_key,
    parse_headers,
    parse_message,
)
from emailsync.model import Attachment, QueuedMessage

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = sorted(DATA.glob("*.eml"))
HEX_KEY = re.compile(r"[0-9a-f]{64}")


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def parse(name: str, **kwargs: Any) -> QueuedMessage:
    return parse_message(7, load(name), **kwargs)


def header_block(raw: bytes) -> bytes:
    """What an IMAP ``BODY.PEEK[HEADER]`` fetch returns: the header up to the blank line."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator)
        if end != -1:
            return raw[: end + len(separator)]
    return raw


def simple(headers: str, body: str = "Body text.\n") -> bytes:
    """A small message from header lines and a body, with CRLF line ends as on the wire."""
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


BASE_HEADERS = """\
Message-ID: <base-1@example.org>
Date: Mon, 01 Apr 2024 10:00:00 +0000
From: Ann <ann@example.org>
To: agent@example.com
Subject: Viewing"""


# --- header decoding -----------------------------------------------------------------------


def test_q_encoded_utf8_subject_and_display_name_are_decoded() -> None:
    """RFC 2047 Q words in UTF-8, folded over two lines, decode to one subject."""
    msg = parse("rfc2047_q_utf8.eml")
    assert msg.subject == "Café next door — viewing of Flat 2"
    assert msg.display_from == "José Pérez <jose@example.org>"


def test_b_encoded_latin1_words_join_across_a_fold() -> None:
    """RFC 2047 B words in ISO-8859-1, split mid-word over a fold, read as one subject."""
    assert parse("rfc2047_b_latin1.eml").subject == "Mängelliste für die Übergabe"


@pytest.mark.parametrize(
    ("name", "addresses", "shown"),
    [
        pytest.param(
            "rfc2047_b_latin1.eml",
            ("j.mueller@example.de",),
            "Müller, Jürgen <j.mueller@example.de>",
            id="a comma inside an encoded display name does not split the From field",
        ),
        pytest.param(
            "idn_domain.eml",
            ("info@xn--bcher-kva.example",),
            "Käufer <Info@Bücher.example>",
            id="a raw UTF-8 IDN domain becomes its IDNA form, case-folded",
        ),
    ],
)
def test_the_from_field_gives_its_address_and_display(
    name: str, addresses: tuple[str, ...], shown: str
) -> None:
    msg = parse(name)
    assert msg.from_addrs == addresses
    assert msg.display_from == shown


def test_raw_utf8_header_bytes_are_read_as_utf8() -> None:
    """RFC 6532 allows UTF-8 in header fields without encoded-words."""
    msg = parse("raw_utf8_headers.eml")
    assert msg.subject == "Besichtigung \u2013 Straße am Fluß"
    assert msg.display_from == '"Zoë Brontë" <zoe@example.net>'


def test_raw_latin1_header_bytes_fall_back_to_latin1() -> None:
    """Old mailers put Latin-1 bytes in headers; they are read, not replaced."""
    msg = parse("raw_latin1_headers.eml")
    assert msg.subject == "Réunion à propos du bail"
    assert msg.display_from == "Frédéric Lefèvre <fred@example.fr>"
    assert msg.from_addrs == ("fred@example.fr",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Mailers split UTF-8 sequences across adjacent words; the bytes are decoded together.
        pytest.param(
            "=?utf-8?q?caf=C3?= =?utf-8?q?=A9?=",
            "café",
            id="character-split-across-two-encoded-words-is-rejoined",
        ),
        # Only white space between two encoded-words is dropped (RFC 2047 §6.2).
        pytest.param(
            "Re: =?utf-8?q?Caf=C3=A9?= menu",
            "Re: Café menu",
            id="space-between-encoded-word-and-plain-text-is-kept",
        ),
        # In the Q encoding "_" stands for a space (RFC 2047 §4.2).
        pytest.param(
            "=?iso-8859-1?q?Gr=FC=DFe_aus_K=F6ln?=",
            "Grüße aus Köln",
            id="q-encoding-underscore-is-a-space",
        ),
        # RFC 2231 §5 adds ``*lang`` to the charset of an encoded-word.
        pytest.param(
            "=?utf-8*de?q?Stra=C3=9Fe?=", "Straße", id="charset-language-suffix-is-ignored"
        ),
        # A charset Python does not know falls back to UTF-8 instead of failing.
        pytest.param(
            "=?x-klingon?q?caf=C3=A9?=",
            "café",
            id="unknown-charset-of-an-encoded-word-decodes-as-utf8",
        ),
        # Characters outside the base64 alphabet are skipped, missing padding is supplied.
        pytest.param(
            "=?utf-8?b?Y2Fm!w?=", "caf", id="base64-encoded-word-with-junk-keeps-the-readable-part"
        ),
        # Plain text, including question marks and equals signs, passes through.
        pytest.param(
            "Price = 5? Yes", "Price = 5? Yes", id="text-without-encoded-words-is-unchanged"
        ),
    ],
)
def test_encoded_words_decode_to_their_text(raw: str, expected: str) -> None:
    """Each case: a header value with RFC 2047 encoded-words, and the text it reads as."""
    assert decode_encoded_words(raw) == expected


# --- addresses -----------------------------------------------------------------------------


def test_addresses_are_lower_cased_and_deduplicated_in_order() -> None:
    """Mixed-case addresses compare equal and appear once, where first written."""
    msg = parse("mixed_case_addresses.eml")
    assert msg.from_addrs == ("big.client@example.org",)
    assert msg.to == ("agent@example.com", "lettings@example.com")
    assert msg.cc == ("big.client@example.org", "other.person@example.net")


def test_undisclosed_recipients_group_has_no_address() -> None:
    """``To: undisclosed-recipients:;`` is an empty group (RFC 5322 §3.4), not an address."""
    msg = parse("undisclosed_recipients.eml")
    assert msg.to == ()
    assert msg.display_to == "undisclosed-recipients:;"
    assert msg.bcc == ("buyer.one@example.org", "buyer.two@example.net")
    assert msg.usable


def test_group_members_are_addresses_and_empty_groups_add_none() -> None:
    """Members of a named group count; the group name itself does not."""
    msg = parse("group_syntax.eml")
    assert msg.to == ("ann@example.org", "bob@example.net", "tenant@example.org")
    assert msg.cc == ()


def test_semicolon_separated_recipients_are_all_found() -> None:
    """Outlook users separate addresses with ";"; none of them is lost."""
    msg = parse("semicolon_recipients.eml")
    assert msg.to == ("agent@example.com", "lettings@example.com", "bob@example.net")


def test_invalid_addresses_are_skipped_without_failing_the_message() -> None:
    """Garbage in Cc is dropped; the message stays usable."""
    msg = parse("semicolon_recipients.eml")
    assert msg.cc == ()
    assert msg.usable


def test_sender_reply_to_and_bcc_fields_are_read() -> None:
    """Each address field lands in its own attribute."""
    assert parse("sender_on_behalf.eml").sender_addrs == ("agent@example.com",)
    assert parse("reply_to.eml").reply_to == ("ruth.kay@example.org",)
    assert parse("outbound_bcc.eml").bcc == ("lettings@example.com", "hidden@example.org")


def test_repeated_address_fields_are_all_read() -> None:
    """Two To lines (a broken mailer) contribute the addresses of both."""
    raw = simple(BASE_HEADERS + "\nTo: Bob <bob@example.net>")
    assert parse_message(1, raw).to == ("agent@example.com", "bob@example.net")


def test_display_fields_are_empty_when_absent() -> None:
    """A message without Cc shows an empty Cc line, not "None"."""
    msg = parse_message(1, simple(BASE_HEADERS))
    assert msg.display_cc == ""
    assert msg.display_to == "agent@example.com"


# --- identity: Message-ID, Date, size, key -------------------------------------------------


def test_message_id_is_stored_without_angle_brackets() -> None:
    """The Message-ID is kept in its normalised form, as the key uses it."""
    assert parse("multipart_alternative.eml").message_id == "alt-3@example.org"


def test_message_id_with_a_trailing_comment_keeps_only_the_id() -> None:
    """Text outside the angle brackets is not part of the msg-id (RFC 5322 §3.6.4)."""
    raw = simple(BASE_HEADERS.replace("<base-1@example.org>", " <x-9@example.org> (resent)"))
    assert parse_message(1, raw).message_id == "x-9@example.org"


def test_empty_message_id_counts_as_missing() -> None:
    """``Message-ID:`` with no value gives no Message-ID, so the body joins the key."""
    msg = parse_message(1, simple(BASE_HEADERS.replace("<base-1@example.org>", "")))
    assert msg.message_id is None
    assert needs_body_for_key(msg)


def test_date_is_converted_to_utc() -> None:
    """A Date in another zone becomes an aware UTC datetime."""
    assert parse("raw_utf8_headers.eml").date == datetime(2024, 3, 13, 22, 45, 10, tzinfo=UTC)


def test_unparseable_date_falls_back_to_internaldate() -> None:
    """A Date no parser understands gives way to the server's INTERNALDATE."""
    arrived = datetime(2024, 4, 2, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    msg = parse("bad_charset_and_date.eml", internaldate=arrived)
    assert msg.date == datetime(2024, 4, 2, 12, 0, tzinfo=UTC)
    assert msg.date is not None
    assert msg.date.tzinfo is UTC


def test_naive_internaldate_is_taken_as_utc() -> None:
    """An internaldate without a zone is read as UTC rather than local time."""
    msg = parse("bad_charset_and_date.eml", internaldate=datetime(2024, 4, 2, 12, 0))
    assert msg.date == datetime(2024, 4, 2, 12, 0, tzinfo=UTC)


def test_missing_date_and_internaldate_give_no_date() -> None:
    """With neither a usable Date nor INTERNALDATE the date is None."""
    assert parse("bad_charset_and_date.eml").date is None


def test_date_header_wins_over_internaldate() -> None:
    """INTERNALDATE is only a fallback; the author's Date is the event's date."""
    msg = parse("no_from.eml", internaldate=datetime(2030, 1, 1, tzinfo=UTC))
    assert msg.date == datetime(2024, 3, 15, 12, 0, tzinfo=UTC)


def test_size_is_the_raw_length_unless_given() -> None:
    """The size argument (RFC822.SIZE) wins; otherwise the bytes are counted."""
    raw = load("reply_to.eml")
    assert parse_message(1, raw).size == len(raw)
    assert parse_message(1, raw, size=99_999).size == 99_999


def test_key_is_64_lower_case_hex_digits() -> None:
    """The key is a SHA-256 hex digest."""
    assert HEX_KEY.fullmatch(parse("reply_to.eml").key)


def test_key_is_the_same_whatever_the_transport_added() -> None:
    """Trace headers, line ends and INTERNALDATE differ between mailboxes; the key does not."""
    raw = simple(BASE_HEADERS)
    relayed = b"Received: from mx2.example.net by imap.example.com\r\n" + raw.replace(
        b"\r\n", b"\n"
    )
    first = parse_message(1, raw, internaldate=datetime(2024, 4, 1, 10, 1, tzinfo=UTC))
    second = parse_message(2, relayed, internaldate=datetime(2024, 4, 3, 9, 0, tzinfo=UTC))
    assert first.key == second.key


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # Broken mailers reuse Message-IDs; different messages must still get different keys.
        pytest.param("Viewing", "Offer", id="a reused Message-ID with another subject"),
        # Bounces reuse a Message-ID with a new Date; that is another message.
        pytest.param("10:00:00", "10:00:01", id="the date"),
        # The author's address is part of the identity.
        pytest.param("ann@", "anne@", id="the From address"),
    ],
)
def test_key_differs_when_what_identifies_the_message_differs(old: str, new: str) -> None:
    first = parse_message(1, simple(BASE_HEADERS))
    second = parse_message(1, simple(BASE_HEADERS.replace(old, new)))
    assert BASE_HEADERS.replace(old, new) != BASE_HEADERS
    assert first.key != second.key


def test_key_ignores_display_name_and_address_case() -> None:
    """Only the normalised From address counts, not how it was written."""
    first = parse_message(1, simple(BASE_HEADERS))
    second = parse_message(1, simple(BASE_HEADERS.replace("Ann <ann@", '"A. N." <ANN@')))
    assert first.key == second.key


def test_key_equates_one_moment_written_in_two_zones() -> None:
    """Dates are compared as UTC instants."""
    assert message_key("a@b", "Mon, 11 Mar 2024 10:15:02 +0100", ["x@y.z"], "s") == message_key(
        "a@b", "Mon, 11 Mar 2024 09:15:02 +0000", ["x@y.z"], "s"
    )


def test_key_ignores_angle_brackets_and_white_space_of_the_message_id() -> None:
    """``<id>`` and `` id `` are the same Message-ID."""
    assert message_key("<a@b>", "", [], "s") == message_key(" a@b ", "", [], "s")


def test_key_ignores_subject_white_space_runs() -> None:
    """Folding and double spaces in the Subject do not change the key."""
    assert message_key("a@b", "", [], "Re:  offer\t now ") == message_key(
        "a@b", "", [], "Re: offer now"
    )


def test_key_keeps_an_unparseable_date_as_written() -> None:
    """Two different unparseable Dates still give different keys."""
    assert message_key("a@b", "soon", [], "s") != message_key("a@b", "later", [], "s")


def test_key_with_message_id_ignores_the_body() -> None:
    """With a Message-ID the body is not part of the key, so headers alone suffice."""
    assert message_key("a@b", "", [], "s", "one") == message_key("a@b", "", [], "s", "two")


def test_key_without_message_id_depends_on_the_body() -> None:
    """Without a Message-ID two messages with equal headers differ by their text."""
    first = parse_message(1, simple(BASE_HEADERS.replace("<base-1@example.org>", ""), "Yes.\n"))
    second = parse_message(1, simple(BASE_HEADERS.replace("<base-1@example.org>", ""), "No.\n"))
    assert first.key != second.key


def test_key_without_message_id_ignores_body_white_space() -> None:
    """Re-wrapping or re-encoding line ends does not change a body-based key."""
    assert message_key(None, "", [], "s", "a  b\nc") == message_key(None, "", [], "s", "a b c")


def test_key_without_message_id_reads_the_first_key_body_chars_of_the_collapsed_body() -> None:
    """Issue 19 defect 16: every fetch path delivers this prefix whole, so the key agrees;
    a body shorter than it digests as it always did (keys already recorded stay valid)."""
    cap = message_module.KEY_BODY_CHARS
    body = "word " * cap
    assert message_key(None, "", [], "s", body) == message_key(None, "", [], "s", body[: 2 * cap])
    assert message_key(None, "", [], "s", body[: cap - 1]) != message_key(
        None, "", [], "s", body[:cap]
    )
    assert key_module._key_body("a  b\nc") == "a b c"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 200_000,
        " " * 200_000 + "late text",  # white space beyond the collapsed-prefix shortcut
        ("ab\t \n" * 40_000) + "tail",
        "ünïcödé " * 20_000,
    ],
)
def test_key_body_is_the_collapsed_text_cut_at_key_body_chars(text: str) -> None:
    collapsed = " ".join(text.split())
    assert key_module._key_body(text) == collapsed[: message_module.KEY_BODY_CHARS]


def test_key_fields_cannot_bleed_into_each_other() -> None:
    """Moving text from one field to the next gives another key (fields are length-framed)."""
    assert message_key("a@b", "", ["x@example.org"], "s") != message_key(
        "a@b", "", [], "x@example.org s"
    )
    assert message_key(None, "d", [], "s\x00t") != message_key(None, "d\x00s", [], "t")


# --- header-only parse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [p.name for p in SAMPLES if b"message-id:" in p.read_bytes().lower()],
)
def test_header_only_parse_gives_the_full_key_when_there_is_a_message_id(name: str) -> None:
    """The cheap first fetch phase yields the final key for every message with a Message-ID."""
    raw = load(name)
    from_headers = parse_headers(3, header_block(raw), size=len(raw))
    full = parse_message(3, raw)
    assert not needs_body_for_key(from_headers)
    assert from_headers.key == full.key
    assert from_headers.message_id == full.message_id
    assert from_headers.to == full.to
    assert from_headers.problem == full.problem


def test_header_only_parse_has_no_body_or_attachments() -> None:
    """parse_headers does not look past the header block."""
    msg = parse_headers(3, header_block(load("attachment_rfc2231.eml")))
    assert msg.body_text == ""
    assert msg.attachments == ()
    assert msg.subject == "Unterlagen"


def test_header_only_key_is_provisional_without_message_id() -> None:
    """Without a Message-ID the key needs the body, and the header-only key is not final."""
    raw = load("no_message_id.eml")
    from_headers = parse_headers(3, header_block(raw))
    assert needs_body_for_key(from_headers)
    assert from_headers.key != parse_message(3, raw).key


# --- body ----------------------------------------------------------------------------------


def test_plain_text_is_preferred_over_html() -> None:
    """In multipart/alternative the text/plain part is the body, verbatim."""
    msg = parse("multipart_alternative.eml")
    assert msg.body_text == "We would like to offer 250,000 for 12 Park Lane."
    assert msg.attachments == ()


def test_html_only_body_is_rendered_to_text() -> None:
    """Quoted-printable HTML becomes readable text without scripts, styles or tags."""
    body = parse("html_only.eml").body_text
    assert body == (
        "New enquiry\n\nName: Ruth Kay\nPhone: 0123\n\n- 2 bedrooms\n- Garden & parking\n\n"
        "Café nearby"
    )


def test_blank_text_part_gives_way_to_html() -> None:
    """Some mailers send an empty text/plain alternative; the HTML is then the body."""
    raw = simple(
        BASE_HEADERS + '\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="b"',
        "--b\nContent-Type: text/plain\n\n \n--b\nContent-Type: text/html\n\n<p>Real text</p>\n"
        "--b--\n",
    )
    assert parse_message(1, raw).body_text == "Real text"


def test_latin1_body_is_decoded_by_its_charset() -> None:
    """An 8-bit ISO-8859-1 body reads as the characters it encodes."""
    assert parse("rfc2047_b_latin1.eml").body_text == "Anbei die Mängelliste.\nGrüße"


def test_unknown_body_charset_decodes_utf8_text() -> None:
    """A charset nobody knows falls back to UTF-8 with replacement, never an error."""
    assert parse("bad_charset_and_date.eml").body_text == "Naïve café text."


def test_undeclared_8bit_body_is_read_as_utf8() -> None:
    """A body with no charset but UTF-8 bytes is not mangled into replacement characters."""
    raw = simple(BASE_HEADERS + "\nContent-Transfer-Encoding: 8bit", "Grüße\n")
    assert parse_message(1, raw).body_text == "Grüße"


def test_body_line_ends_become_newlines() -> None:
    """CRLF from the wire is stored as "\\n"."""
    raw = simple(BASE_HEADERS, "one\ntwo\n")
    assert parse_message(1, raw).body_text == "one\ntwo"


def test_nul_characters_are_dropped_from_the_body() -> None:
    """NUL cannot be stored in a text column and means nothing to a reader."""
    raw = simple(BASE_HEADERS, "a\x00b\n")
    assert parse_message(1, raw).body_text == "ab"


def test_missing_boundary_keeps_the_text() -> None:
    """A multipart without a boundary parameter still shows its text."""
    msg = parse("broken_missing_boundary.eml")
    assert msg.body_text == "This is the only text in a multipart without a boundary."
    assert msg.usable


def test_unclosed_multipart_keeps_text_and_attachment() -> None:
    """A multipart cut off before its closing boundary keeps what arrived."""
    msg = parse("broken_unclosed_multipart.eml")
    assert msg.body_text == "Text before the truncation survives."
    assert [a.filename for a in msg.attachments] == ["survey.pdf"]


def test_bad_base64_body_keeps_the_decodable_text() -> None:
    """Invalid base64 characters are skipped instead of failing the message."""
    msg = parse("broken_base64.eml")
    assert msg.body_text.startswith("Hello from a")
    assert msg.usable


def test_long_body_is_cut_at_max_body_chars_characters_and_flagged() -> None:
    """A body over MAX_BODY_CHARS characters keeps that many (not bytes) and is flagged."""
    raw = simple(
        BASE_HEADERS + "\nContent-Type: text/plain; charset=utf-8",
        "é€🚀" * 40_000 + "\n",
    )
    message = parse_message(1, raw)
    assert message.body_text == ("é€🚀" * 40_000)[:MAX_BODY_CHARS]
    assert message.body_truncated


def test_body_of_exactly_the_limit_is_not_cut() -> None:
    """The cap is inclusive: MAX_BODY_CHARS characters are kept whole, not flagged."""
    text = "ü" * MAX_BODY_CHARS
    message = parse_message(
        1, simple(BASE_HEADERS + "\nContent-Type: text/plain; charset=utf-8", text + "\n")
    )
    assert message.body_text == text
    assert not message.body_truncated


def test_long_html_body_is_rendered_and_capped() -> None:
    """A large HTML-only body is rendered and capped like a text one."""
    html = "<p>" + "Viewing booked. " * 20_000 + "</p>"
    raw = simple(BASE_HEADERS + "\nContent-Type: text/html; charset=utf-8", html)
    message = parse_message(1, raw)
    assert message.body_text.startswith("Viewing booked. Viewing booked.")
    assert len(message.body_text) == MAX_BODY_CHARS
    assert message.body_truncated


def test_html_source_over_its_rendering_cap_is_flagged_though_short_when_rendered() -> None:
    """Only MAX_HTML_SOURCE_CHARS of HTML are rendered: the rest of the text is not shown."""
    html = "<p>a</p>" + "<!-- padding -->" * 70_000 + "<p>the end</p>"
    raw = simple(BASE_HEADERS + "\nContent-Type: text/html; charset=utf-8", html)
    message = parse_message(1, raw)
    assert "the end" not in message.body_text
    assert message.body_truncated


def test_a_message_cut_by_a_fetch_cap_flags_a_body_in_its_last_part_only() -> None:
    """Fetched up to a byte cap (``prefix``): the text is cut when it runs to the cut."""
    text_part = simple(BASE_HEADERS, "Hello, the start of a long text.\n" * 100)
    message = parse_message(1, text_part[:2000], prefix=True)
    assert message.body_truncated
    assert message.body_text.startswith("Hello")
    assert not parse_message(1, text_part).body_truncated
    # The text part before an attachment that the cut fell in is whole.
    mixed = EmailMessage()
    mixed["From"], mixed["To"], mixed["Subject"] = "a@clients.example", "b@example.com", "x"
    mixed.set_content("The whole text.")
    mixed.add_attachment(b"%PDF" * 5000, maintype="application", subtype="pdf", filename="a.pdf")
    cut = parse_message(1, mixed.as_bytes()[:3000], prefix=True)
    assert cut.body_text == "The whole text."
    assert not cut.body_truncated


# --- attachments ---------------------------------------------------------------------------


def test_attachment_names_are_decoded_from_rfc2231_and_rfc2047() -> None:
    """Percent-encoded, continued and encoded-word file names all decode; none is the body."""
    msg = parse("attachment_rfc2231.eml")
    assert msg.body_text == "Die Unterlagen im Anhang."
    assert msg.attachments == (
        Attachment("Mietvertrag Müller.pdf", "application/pdf", 9),
        Attachment("Hausordnung 2024\u2013.txt", "text/plain", 20),
        Attachment("Grundriss Erdgeschoß.png", "image/png", 8),
        Attachment("unnamed", "application/octet-stream", 4),
    )


def test_forwarded_message_is_an_attachment_not_the_body() -> None:
    """A message/rfc822 part is listed as forwarded.eml and its text stays out of the body."""
    msg = parse("forwarded_rfc822.eml")
    assert msg.body_text == "See the tenant's message below."
    assert len(msg.attachments) == 1
    forwarded = msg.attachments[0]
    assert (forwarded.filename, forwarded.content_type) == ("forwarded.eml", "message/rfc822")
    assert 150 < forwarded.size < 400


def test_inline_part_without_a_name_is_not_an_attachment() -> None:
    """An inline image with no file name (an HTML signature logo) is not listed."""
    raw = simple(
        BASE_HEADERS + '\nMIME-Version: 1.0\nContent-Type: multipart/related; boundary="r"',
        "--r\nContent-Type: text/plain\n\nHello\n--r\nContent-Type: image/gif\n"
        "Content-Transfer-Encoding: base64\n\nR0lGODlh\n--r--\n",
    )
    msg = parse_message(1, raw)
    assert msg.attachments == ()
    assert msg.body_text == "Hello"


# --- unusable messages ---------------------------------------------------------------------


def test_empty_message_is_unusable() -> None:
    """Zero bytes are no message at all."""
    msg = parse("empty.eml")
    assert msg.problem == "empty message"
    assert not msg.usable


def test_binary_garbage_is_unusable() -> None:
    """Bytes without a single header field are not an RFC 5322 message."""
    msg = parse("binary_garbage.eml")
    assert msg.problem == "no header fields: not an RFC 5322 message"


def test_message_without_any_address_is_unusable() -> None:
    """With no originator and no recipient there is nothing to classify."""
    assert parse("no_addresses.eml").problem == "no sender or recipient address"


def test_message_without_from_but_with_recipients_is_usable() -> None:
    """A missing From is the filer's concern (no group), not a parse failure."""
    msg = parse("no_from.eml")
    assert msg.usable
    assert msg.from_addrs == ()
    assert msg.to == ("agent@example.com",)


def test_message_with_only_a_reply_to_address_is_usable() -> None:
    """Reply-To is an originator field (RFC 5322 §3.6.2), enough to classify on."""
    raw = simple("Message-ID: <r@example.org>\nReply-To: ann@example.org\nSubject: Hi")
    assert parse_message(1, raw).usable


class _CrashingParser:
    """Stands in for BytesParser and raises the way a stdlib bug would."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def parsebytes(self, raw: bytes, headersonly: bool = False) -> Any:
        raise IndexError("simulated stdlib parser bug")


def test_parser_crash_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in both parser modes files the message as unparseable with the reason."""
    monkeypatch.setattr(message_module, "BytesParser", _CrashingParser)
    msg = parse("reply_to.eml")
    assert msg.problem == "parser error: IndexError"
    assert HEX_KEY.fullmatch(msg.key)


def test_strict_policy_crash_falls_back_to_compat32(monkeypatch: pytest.MonkeyPatch) -> None:
    """When only policy.default fails, the lenient compat32 parse gives the same result."""
    expected = parse("attachment_rfc2231.eml")

    def parser_failing_on_default(policy: Any) -> Any:
        if policy is email.policy.default:
            return _CrashingParser(policy)
        return BytesParser(policy=policy)

    monkeypatch.setattr(message_module, "BytesParser", parser_failing_on_default)
    fallback = parse("attachment_rfc2231.eml")
    assert fallback == expected


def test_deeply_nested_multipart_does_not_raise() -> None:
    """Hostile nesting is walked to a bounded depth without recursion errors."""
    depth = 300
    opening = "".join(
        f'--b{i}\nContent-Type: multipart/mixed; boundary="b{i + 1}"\n\n' for i in range(depth)
    )
    body = opening + f"--b{depth}\nContent-Type: text/plain\n\ndeep\n"
    raw = simple(BASE_HEADERS + '\nContent-Type: multipart/mixed; boundary="b0"', body)
    msg = parse_message(1, raw)
    assert msg.usable
    assert HEX_KEY.fullmatch(msg.key)


def test_deeply_nested_forwarded_messages_do_not_raise() -> None:
    """Hundreds of message/rfc822 levels still give a usable message with one attachment."""
    levels = "".join(
        f"Content-Type: message/rfc822\n\nFrom: x@example.org\nSubject: level {i}\n"
        for i in range(400)
    )
    raw = simple(BASE_HEADERS + "\n" + levels.rstrip("\n"), "innermost\n")
    msg = parse_message(1, raw)
    assert msg.usable
    assert [a.filename for a in msg.attachments] == ["forwarded.eml"]


# --- robustness ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_every_sample_parses_to_a_message_with_a_hex_key(path: Path) -> None:
    """No sample raises, and each has a full-length key."""
    raw = path.read_bytes()
    for msg in (parse_message(1, raw), parse_headers(1, header_block(raw))):
        assert isinstance(msg, QueuedMessage)
        assert HEX_KEY.fullmatch(msg.key)


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    """One random corruption of the kinds mail suffers: flips, cuts, insertions, splices."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(len(data) + 1)
        choice = rng.randrange(6)
        if choice == 0 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 2:
            del data[position : position + rng.randint(1, 40)]
        elif choice == 3:
            data[position:position] = rng.choice(
                [b"=?utf-8?b?", b"?=", b"\r\n", b"\r\n ", b"--", b":", b"<", b">", b";", b'"', b"@"]
            )
        elif choice == 4:
            del data[position:]
        else:
            start = rng.randrange(len(data) + 1)
            data[position:position] = data[start : start + rng.randint(1, 80)]
    return bytes(data)


def test_random_mutations_of_the_samples_never_raise() -> None:
    """Thousands of seeded corruptions each parse to a QueuedMessage with a hex key."""
    rng = random.Random(5322)
    sources = [p.read_bytes() for p in SAMPLES]
    started = time.monotonic()
    for _ in range(3000):
        raw = _mutate(rng, rng.choice(sources))
        for msg in (parse_message(1, raw), parse_headers(1, raw)):
            assert isinstance(msg, QueuedMessage)
            assert HEX_KEY.fullmatch(msg.key)
    assert time.monotonic() - started < 20
