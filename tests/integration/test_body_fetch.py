"""Bodies fetched by BODYSTRUCTURE (issue 10) agree with the stdlib parse of the whole message."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.filing import queuepass
from emailsync.filing.queuepass import Filer
from emailsync.imap.auth import make_authenticator
from emailsync.imap.session import BODY_FETCH_CAP, WHOLE_FETCH_MAX, ImapSession, _FullFetch
from emailsync.mail.message import parse_headers, parse_message, with_body
from emailsync.model import FetchedMessage, QueuedMessage
from emailsync.timeline import open_store

from .mailenv import MailUser, new_user, settings_for
from .test_filing import build_message, opened

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
        client.append(session.queue_name(), raw)
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


def without_message_id(body: str, *, cte: str, subtype: str = "plain") -> bytes:
    """A message without Message-ID (its key digests the body) with one text part."""
    msg = EmailMessage()
    msg["From"] = "john@clients.example"
    msg["To"] = "b@example.com"
    msg["Subject"] = f"no message-id, {len(body)} characters, {cte}"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg.set_content(body, subtype=subtype, charset="utf-8", cte=cte)
    return msg.as_bytes()


LONG_BODIES = {
    # Each longer than the text fetch cap (BODY_FETCH_CAP) and the whole-message cap
    # (WHOLE_FETCH_MAX), so both paths cut it, each where its own cap falls.
    "ascii_7bit": without_message_id("The quick brown fox. " * 60_000, cte="7bit"),
    "utf8_base64": without_message_id("Grüße aus Köln — 東京 🚀. " * 40_000, cte="base64"),
    "utf8_quoted_printable": without_message_id(
        "Grüße aus Köln — 東京. " * 30_000, cte="quoted-printable"
    ),
    # 1.2 MB of quoted-printable for 97,500 characters: both caps cut it before 100,000.
    "emoji_quoted_printable": without_message_id(
        ("🚀" * 64 + "\n") * 1_500, cte="quoted-printable"
    ),
    "html": without_message_id(
        "<p>Dear John, the <b>lease</b> is attached.</p>\n" * 30_000, cte="7bit", subtype="html"
    ),
}


def by_both_paths(
    user: MailUser, session: ImapSession, raw: bytes
) -> tuple[QueuedMessage, QueuedMessage]:
    """The message as a pass gets it by its structure (text sections), and whole (no plan)."""
    with user.client() as client:
        client.append(session.queue_name(), raw)
    session.select_queue()
    uid = max(session.queue_uids())
    (header,) = session.fetch_headers([uid])
    assert header.plan is not None
    headers = parse_headers(uid, header.data, size=header.size)
    sizes = {uid: header.size}
    (parts,) = session.fetch_full([uid], sizes, {uid: header.plan})
    (whole,) = session.fetch_full([uid], sizes, {uid: None})  # as when the structure is unread
    assert whole.plan is None
    by_parts = with_body(headers, header.plan, parts.sections, header.data, parts.sections_cut)
    return by_parts, parse_message(uid, whole.data, size=header.size, prefix=whole.prefix)


@pytest.mark.parametrize("pad", range(4))
@pytest.mark.parametrize("body", list(LONG_BODIES))
def test_a_long_body_without_message_id_has_one_key_by_either_fetch_path(
    mailbox: tuple[MailUser, ImapSession], body: str, pad: int
) -> None:
    """Issue 19 defect 16: the key digests the same normalised, capped text whether the
    body came by its text sections or in the whole-message fetch. ``pad`` header bytes move
    the whole-message cut through every position in a base64 group."""
    raw = b"X-Pad: " + b"x" * pad + b"\r\n" + LONG_BODIES[body]
    assert len(raw) > max(BODY_FETCH_CAP, WHOLE_FETCH_MAX)
    by_parts, whole = by_both_paths(*mailbox, raw)
    assert by_parts.message_id is None
    assert by_parts.key == whole.key
    itself = parse_message(0, raw)
    assert by_parts.key == itself.key  # and the key of the message itself
    # Issue 19 defect 14: either way the text is cut (at 100,000 characters, or where the
    # fetch's byte cap fell) and flagged so.
    for got in (by_parts, whole):
        assert itself.body_text.startswith(got.body_text)
        assert len(got.body_text) > 50_000
        assert got.body_truncated


class WholeMessageSession(ImapSession):
    """A session that fetches bodies whole, as for a server whose BODYSTRUCTURE is unread:
    no plan for any message, in ``prefetch_full`` (which the Filer sends ahead) as in
    ``fetch_full``."""

    def _send_full(
        self, uids: Sequence[int], sizes: dict[int, int] | None, plans: object
    ) -> _FullFetch:
        return super()._send_full(uids, sizes, dict.fromkeys(uids))


def test_a_long_message_without_message_id_in_two_mailboxes_is_one_event_by_either_path(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Issue 19 defect 16: one mailbox's pass fetches the text sections, the other's the
    whole message; the keys agree, so the group gets one event listing both mailboxes."""
    first, second = new_user(dovecot), new_user(dovecot)
    settings = settings_for(tmp_path, [first, second])
    store = open_store(settings.store_url, settings.daemon.state_dir)
    store.add_group("Smith", ["john@clients.example"])
    raw = LONG_BODIES["utf8_base64"].replace(
        b"To: b@example.com", f"To: {first.address}, {second.address}".encode()
    )
    for user, kind in ((first, ImapSession), (second, WholeMessageSession)):
        mailbox = settings.mailbox(user.address)
        session = kind.open(
            mailbox, settings.folders, make_authenticator(mailbox, settings), timeout_seconds=10
        )
        try:
            session.ensure_folders()
            with user.client() as client:
                client.append(session.queue_name(), raw)
            filer = Filer(mailbox, store)
            assert filer.run_pass(session).new_events == (1 if user is first else 0)
        finally:
            session.logout()
    (event,) = store.list_events()
    assert set(event.mailboxes) == {first.address, second.address}
    store.close()


class CountingSession(ImapSession):
    """A session that notes the UIDs of each body fetch it sends (ahead or not)."""

    sent: list[list[int]]

    def _send_full(self, uids: Sequence[int], *sizes_and_plans: Any) -> _FullFetch:
        self.sent.append(list(uids))
        return super()._send_full(uids, *sizes_and_plans)


def test_a_batch_of_long_texts_is_read_in_runs_of_bounded_bytes(
    dovecot: Dovecot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23: 500 linked messages with a 1 MiB text each were read in one go (~500 MB);
    the texts of a batch are now fetched, parsed and let go in runs of BATCH_TEXT_BYTES."""
    monkeypatch.setattr(queuepass, "BATCH_TEXT_BYTES", 2 * BODY_FETCH_CAP + 1024)
    user = new_user(dovecot)
    settings = settings_for(tmp_path, [user])
    store = open_store(settings.store_url, settings.daemon.state_dir)
    store.add_group("Smith", ["john@clients.example"])
    mailbox = settings.mailbox(user.address)
    session = CountingSession.open(
        mailbox, settings.folders, make_authenticator(mailbox, settings), timeout_seconds=10
    )
    session.sent = []
    try:
        session.ensure_folders()
        with user.client() as client:
            for n in range(5):
                line = f"line {n} of a long letter\n"
                body = line * (BODY_FETCH_CAP // len(line) + 100)  # over the cap: cut there
                raw = build_message("john@clients.example", user.address, f"long {n}", body=body)
                client.append(session.queue_name(), raw)
        result = Filer(mailbox, store).run_pass(session)
    finally:
        session.logout()
    assert result.new_events == 5
    # Two texts of ~1 MiB fit the limit, a third does not: runs of 2, 2 and 1.
    assert [len(run) for run in session.sent] == [2, 2, 1]
    events = sorted(store.list_events(), key=lambda e: e.subject)
    assert [e.subject for e in events] == [f"long {n}" for n in range(5)]
    for n, event in enumerate(events):
        assert event.body_text.startswith(f"line {n} of a long letter\n")
        assert event.body_truncated
    store.close()
