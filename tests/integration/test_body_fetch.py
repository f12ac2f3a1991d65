"""Bodies fetched by BODYSTRUCTURE (issue 10) agree with the stdlib parse of the whole message."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from emailsync.devserver import Dovecot
from emailsync.imap.session import BODY_FETCH_CAP, ImapSession
from emailsync.message import parse_headers, parse_message, with_body
from emailsync.model import FetchedMessage, QueuedMessage

from .mailenv import MailUser, new_user, settings_for
from .test_filing import opened

pytestmark = pytest.mark.dovecot

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLES = sorted(DATA.glob("*.eml"))


@pytest.fixture(scope="module")
def mailbox(
    dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MailUser, ImapSession]]:
    user = new_user(dovecot)
    settings = settings_for(tmp_path_factory.mktemp("bodies"), [user])
    with opened(settings, user.address) as session:
        yield user, session


def both_ways(
    user: MailUser, session: ImapSession, raw: bytes
) -> tuple[QueuedMessage, QueuedMessage | None, FetchedMessage]:
    """The message parsed whole, and as a pass now gets it (header parse + fetched body)."""
    whole = parse_message(0, raw)
    if not whole.usable:
        return whole, None, FetchedMessage(0, b"", None, 0)  # never linked: never fetched
    with user.client() as client:
        client.append(session.queue_name, raw)
    session.select_queue()
    uid = max(session.queue_uids())
    (header,) = session.fetch_headers([uid])
    (fetched,) = session.fetch_full([uid], {uid: header.size}, {uid: header.plan})
    # The plan read with the headers is the one a FETCH BODYSTRUCTURE of its own gives.
    assert session.fetch_full([uid], {uid: header.size}) == [fetched]
    whole = parse_message(uid, raw, size=header.size)
    headers = parse_headers(uid, header.data, size=header.size)
    if fetched.plan is None:
        return whole, parse_message(uid, fetched.data, size=header.size), fetched
    return whole, with_body(headers, fetched.plan, fetched.sections, header.data), fetched


def nested(depth: int) -> bytes:
    lines = ["From: a@clients.example", "To: b@example.com", "Subject: deep", "Message-ID: <d@x>"]
    head = "\r\n".join(lines) + "\r\nMIME-Version: 1.0\r\n"
    body = "Content-Type: text/plain\r\n\r\nthe deep text\r\n"
    for level in range(depth):
        boundary = f"b{level}"
        body = (
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\n{body}--{boundary}--\r\n"
        )
    return (head + body).encode()


def encoded_parts() -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@clients.example"
    msg["To"] = "b@example.com"
    msg["Subject"] = "encodings"
    msg.set_content("Grüße aus Köln, " * 40, charset="utf-8", cte="base64")
    msg.add_alternative("<p>Gr=C3=BC=C3=9Fe</p>" * 3, subtype="html", cte="quoted-printable")
    msg.add_attachment(b"%PDF-1.4 " * 500, maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes()


@pytest.mark.parametrize(
    "raw",
    [pytest.param(p.read_bytes(), id=p.stem) for p in SAMPLES]
    + [pytest.param(nested(5), id="nested_5"), pytest.param(encoded_parts(), id="encodings")],
)
def test_fetched_body_matches_the_whole_message_parse(
    mailbox: tuple[MailUser, ImapSession], raw: bytes
) -> None:
    whole, fetched, _ = both_ways(*mailbox, raw)
    if not whole.usable:
        return  # never linked, so its body is never fetched
    assert fetched is not None
    assert fetched.body_text == whole.body_text
    assert fetched.key == whole.key
    assert [(a.filename, a.content_type) for a in fetched.attachments] == [
        (a.filename, a.content_type) for a in whole.attachments
    ]
    for ours, theirs in zip(fetched.attachments, whole.attachments, strict=True):
        # Sizes come from the structure's encoded size: base64 line ends are estimated.
        assert abs(ours.size - theirs.size) <= max(8, theirs.size // 50), (ours, theirs)


def test_a_large_attachment_is_listed_not_downloaded(
    mailbox: tuple[MailUser, ImapSession],
) -> None:
    msg = EmailMessage()
    msg["From"] = "a@clients.example"
    msg["To"] = "b@example.com"
    msg["Subject"] = "contract"
    msg["Message-ID"] = "<big@x>"
    msg.set_content("Please sign the attached contract.")
    payload = b"%PDF" + bytes(range(256)) * (6 * 4096)  # 6 MiB
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="contract.pdf")
    whole, fetched, got = both_ways(*mailbox, msg.as_bytes())
    assert got.data == b""  # no BODY.PEEK[] of the message
    assert got.plan is not None
    assert sum(len(v) for v in got.sections.values()) <= BODY_FETCH_CAP
    assert fetched is not None
    assert fetched.body_text == "Please sign the attached contract."
    (attachment,) = fetched.attachments
    assert attachment.filename == "contract.pdf"
    assert abs(attachment.size - len(payload)) < len(payload) // 100
    assert len(base64.b64encode(payload)) > BODY_FETCH_CAP  # the test's point: it is large
    assert whole.attachments[0].size == len(payload)
