"""The lean UID FETCH reader (imap/fetch.py) on real Dovecot: imapclient's answers and errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import imapclient
import pytest
from imapclient.datetime_util import parse_to_datetime
from imapclient.response_types import BodyData

from emailsync.config import load_settings
from emailsync.dev.dovecot import Dovecot
from emailsync.errors import ConnectionLostError, MailboxError
from emailsync.filing.queuepass import Filer
from emailsync.imap.fetch import read_move, send_move, uid_fetch, uid_move
from emailsync.imap.session import ImapSession
from emailsync.imap.structure import plan_body
from emailsync.imap.translate import translated
from emailsync.model import FetchedMessage, FolderRole
from emailsync.timeline import open_store

from .faultproxy import FaultProxy
from .mailenv import MailUser, new_user, write_config
from .test_filing import opened

pytestmark = pytest.mark.dovecot

DATA = Path(__file__).resolve().parent.parent / "data"
ITEMS = [
    b"BODY.PEEK[HEADER]",
    b"INTERNALDATE",
    b"RFC822.SIZE",
    b"FLAGS",
    b"SAVEDATE",
    b"BODYSTRUCTURE",
    b"BODY.PEEK[1]<0.200>",
]


def message(number: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Client {number} <c{number}@clients.example>"
    msg["To"] = "agent@example.com"
    msg["Subject"] = f'Quote "{number}" \\ (draft)'
    msg.set_content(f"Body {number}\n" * 20)
    msg.add_attachment(b"%PDF" * 100, maintype="application", subtype="pdf", filename="q.pdf")
    return msg.as_bytes()


@pytest.fixture(scope="module")
def filled(dovecot: Dovecot) -> MailUser:
    """A mailbox whose INBOX holds the sample messages and a few multipart ones."""
    user = new_user(dovecot)
    with user.client() as client:
        samples = [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
        for raw in [s for s in samples if s] + [message(n) for n in range(5)]:
            client.append("INBOX", raw, flags=[b"$Seen-By-Test"])
        # \Recent goes to the first session that selects the folder (RFC 3501 2.3.2): take
        # it here, so the readers compared below all see the same FLAGS.
        client.select_folder("INBOX")
    return user


def selected(user: MailUser, port: int | None = None, timeout: float = 10) -> imapclient.IMAPClient:
    client = imapclient.IMAPClient(
        user.server.host, port=port or user.server.port, ssl=False, timeout=timeout
    )
    client.login(user.address, user.password)
    client.normalise_times = False  # as ImapSession sets it
    client.select_folder("INBOX")
    return client


def as_imapclient_gives(response: dict[int, dict[bytes, Any]]) -> dict[int, dict[bytes, Any]]:
    return {
        uid: {k: BodyData.create(v) if k == b"BODYSTRUCTURE" else v for k, v in data.items()}
        for uid, data in response.items()
    }


def test_answers_are_imapclient_s_and_the_connection_stays_in_step(filled: MailUser) -> None:
    with selected(filled) as client:
        uids = sorted(client.search(["ALL"]))
        assert len(uids) > 10
        mine = uid_fetch(client._imap, uids, ITEMS)
        theirs = client.fetch(uids, ITEMS)
        assert as_imapclient_gives(mine) == theirs
        assert all(b"BODY[HEADER]" in d and b"BODYSTRUCTURE" in d for d in mine.values())
        # imapclient goes on over the same connection: tags and untagged store stay consistent.
        assert client.noop()[0]
        assert uid_fetch(client._imap, uids[:2], [b"RFC822.SIZE"]) == {
            uid: {b"SEQ": data[b"SEQ"], b"RFC822.SIZE": data[b"RFC822.SIZE"]}
            for uid, data in theirs.items()
            if uid in uids[:2]
        }
        assert uid_fetch(client._imap, [max(uids) + 100], [b"FLAGS"]) == {}
        assert not client._imap.tagged_commands  # no tag left waiting


def test_unsolicited_updates_in_the_middle_are_stored_or_skipped(dovecot: Dovecot) -> None:
    user = new_user(dovecot)
    with user.client() as other:
        for n in range(4):
            other.append("INBOX", message(n))
    with selected(user) as client, user.client() as other:
        uids = sorted(client.search(["ALL"]))
        other.select_folder("INBOX")
        # Another client files one away, flags one and delivers one while we look at them:
        # Dovecot tells us with EXPUNGE, FETCH (FLAGS) and EXISTS in our UID FETCH's answer.
        other.add_flags([uids[0]], [b"\\Flagged"])
        other.delete_messages([uids[1]])
        other.expunge()
        other.append("INBOX", message(9))
        got = uid_fetch(client._imap, uids, [b"RFC822.SIZE", b"BODY.PEEK[HEADER]"])
        untagged = client._imap.untagged_responses
        expunged = untagged.get("EXPUNGE")
        exists = untagged.get("EXISTS")
        assert client.noop()[0]  # still in step
    assert sorted(got) == uids
    # Dovecot still answers for the expunged one, with NIL: the session files nothing of it.
    assert got[uids[1]][b"BODY[HEADER]"] is None
    for uid in (uids[0], *uids[2:]):
        assert got[uid][b"BODY[HEADER]"].startswith(b"From: Client")
    # Its FLAGS update carries no UID, so it names no message of ours and is skipped.
    assert b"FLAGS" not in got[uids[0]]
    assert expunged == [b"2"]  # stored where imaplib stores it
    assert exists is not None
    assert exists[-1] == b"4"


def fetch_error(
    client: imapclient.IMAPClient, fetch: Callable[[], object]
) -> tuple[type[MailboxError], str, bool | None, str] | None:
    """What ``translated`` makes of a FETCH's failure: error type, kind, gone and text.

    The connection's random tag prefix (imaplib) is taken out of the text.
    """
    try:
        with translated("fetch"):
            fetch()
    except MailboxError as exc:
        text = str(exc).replace(client._imap.tagpre.decode(), "TAG")
        return type(exc), getattr(exc, "kind", ""), getattr(exc, "gone", None), text
    return None


@pytest.mark.parametrize(
    ("arm", "alive"),
    [
        pytest.param(lambda p: p.answer_on("UID FETCH", "NO [SERVERBUG] no way"), True, id="NO"),
        pytest.param(lambda p: p.answer_on("UID FETCH", "BAD [PARSE] what?"), True, id="BAD"),
        pytest.param(lambda p: p.answer_on("UID FETCH", "garbage"), False, id="garbage"),
        pytest.param(
            lambda p: p.answer_on("UID FETCH", "BYE shutting down"), True, id="tagged_BYE"
        ),
        pytest.param(lambda p: p.drop_on("UID FETCH"), False, id="EOF"),
        pytest.param(lambda p: p.reset_on("UID FETCH", after_bytes=300), False, id="reset"),
        pytest.param(lambda p: p.stall_on("UID FETCH"), False, id="timeout"),
        pytest.param(lambda p: p.cut_reply_on(rb"\* \d+ FETCH \(UID 2 "), False, id="cut_mid_line"),
        pytest.param(
            lambda p: p.garble_reply_on(rb"\* \d+ FETCH \(UID 2 ", b"%garbage% "),
            False,
            id="garbled_line",
        ),
    ],
)
def test_failures_translate_as_imapclient_s_do(
    filled: MailUser, fault_proxy: FaultProxy, arm: Callable[[FaultProxy], None], alive: bool
) -> None:
    errors = []
    for reader in ("imapclient", "lean"):
        with selected(filled, port=fault_proxy.port, timeout=1.5) as client:
            uids = sorted(client.search(["ALL"]))
            arm(fault_proxy)
            if reader == "lean":
                error = fetch_error(client, lambda: uid_fetch(client._imap, uids, ITEMS))  # noqa: B023
            else:
                error = fetch_error(client, lambda: client.fetch(uids, ITEMS))  # noqa: B023
            fault_proxy.clear()
            errors.append(error)
            if alive:  # a refusal leaves the connection in step: the next FETCH works
                assert uid_fetch(client._imap, uids[:1], [b"FLAGS"])
    assert errors[0] is not None
    assert errors[1] == errors[0]
    assert errors[0][2] is not alive  # the one definition of a lost connection


@pytest.fixture
def proxied(
    dovecot: Dovecot, fault_proxy: FaultProxy, tmp_path: Path
) -> Iterator[tuple[ImapSession, list[int]]]:
    """An ImapSession through the fault proxy, with six messages in its Queue."""
    user = new_user(dovecot)
    config = write_config(tmp_path, [user], ports={dovecot.port: fault_proxy.port})
    with opened(load_settings(config), user.address) as session:
        with user.client() as client:
            for number in range(6):
                client.append(session.queue_name(), message(number))
        session.select_queue()
        yield session, session.queue_uids()


def imapclient_headers(session: ImapSession, uids: list[int]) -> list[FetchedMessage]:
    """What ``fetch_headers`` must give, read by imapclient's own FETCH and parser."""
    items = [b"BODY.PEEK[HEADER]", b"INTERNALDATE", b"RFC822.SIZE", b"FLAGS", b"BODYSTRUCTURE"]
    if session.has("SAVEDATE"):
        items.append(b"SAVEDATE")
    response = session.client.fetch(uids, items)
    return [
        FetchedMessage(
            uid=uid,
            data=data[b"BODY[HEADER]"],
            internaldate=data[b"INTERNALDATE"],
            size=data[b"RFC822.SIZE"],
            flags=tuple(flag.decode() for flag in data[b"FLAGS"]),
            savedate=parse_to_datetime(data[b"SAVEDATE"], normalise=False)
            if data.get(b"SAVEDATE")
            else None,
            plan=plan_body(data[b"BODYSTRUCTURE"]),
        )
        for uid, data in sorted(response.items())
    ]


def test_headers_sent_ahead_are_read_by_the_next_use_and_given_once(
    proxied: tuple[ImapSession, list[int]], fault_proxy: FaultProxy
) -> None:
    session, uids = proxied
    expected = imapclient_headers(session, uids[:4])
    assert len(expected) == 4
    assert all(m.plan is not None and m.data.startswith(b"From: ") for m in expected)
    sent = fault_proxy.commands("UID FETCH")
    session.prefetch_headers(uids[:4])
    assert session.queue_uids() == uids  # another command first: it reads the answer ahead
    assert fault_proxy.commands("UID FETCH") == sent + 1  # (the proxy has seen it by now)
    assert session.fetch_headers(uids[:4]) == expected
    assert fault_proxy.commands("UID FETCH") == sent + 1  # not asked again
    assert session.fetch_headers(uids[:4]) == expected  # given once: this one asks again
    assert fault_proxy.commands("UID FETCH") == sent + 2
    # Sent ahead for other UIDs than asked for: kept aside, and the asked ones fetched.
    session.prefetch_headers(uids[4:6])
    assert session.fetch_headers(uids[:4]) == expected
    assert fault_proxy.commands("UID FETCH") == sent + 4
    # The answer sent ahead, read while fetching the others, is given without asking again.
    ahead = session.fetch_headers(uids[4:6])
    assert fault_proxy.commands("UID FETCH") == sent + 4
    assert ahead == imapclient_headers(session, uids[4:6])


def test_a_refusal_of_headers_sent_ahead_is_raised_by_fetch_headers_only(
    proxied: tuple[ImapSession, list[int]], fault_proxy: FaultProxy
) -> None:
    session, uids = proxied
    fault_proxy.answer_on("UID FETCH", "NO [SERVERBUG] not now")
    session.prefetch_headers(uids[:3])
    assert session.queue_uids() == uids  # unharmed by the refusal it read first
    with pytest.raises(ConnectionLostError) as refused:
        session.fetch_headers(uids[:3])
    assert refused.value.kind == "protocol"
    assert "SERVERBUG" in str(refused.value)
    assert len(session.fetch_headers(uids[:3])) == 3  # asked again: answered


@pytest.mark.parametrize(
    ("arm", "alive"),
    [
        pytest.param(lambda p: p.answer_on("UID MOVE", "NO [SERVERBUG] no way"), True, id="NO"),
        pytest.param(lambda p: p.answer_on("UID MOVE", "NO [TRYCREATE] where?"), True, id="gone"),
        pytest.param(lambda p: p.answer_on("UID MOVE", "BAD [PARSE] what?"), True, id="BAD"),
        pytest.param(lambda p: p.answer_on("UID MOVE", "garbage"), False, id="garbage"),
        pytest.param(lambda p: p.drop_on("UID MOVE"), False, id="EOF"),
        pytest.param(lambda p: p.stall_on("UID MOVE"), False, id="timeout"),
    ],
)
def test_move_failures_translate_as_imapclient_s_do(
    dovecot: Dovecot, fault_proxy: FaultProxy, arm: Callable[[FaultProxy], None], alive: bool
) -> None:
    user = new_user(dovecot)
    with user.client() as client:
        client.create_folder("Done")
        for number in range(4):
            client.append("INBOX", message(number))
    errors = []
    for reader in ("imapclient", "lean"):
        with selected(user, port=fault_proxy.port, timeout=1.5) as client:
            uids = sorted(client.search(["ALL"]))[:2]
            arm(fault_proxy)
            if reader == "lean":
                error = fetch_error(client, lambda: uid_move(client._imap, uids, b'"Done"'))  # noqa: B023
            else:
                error = fetch_error(client, lambda: client.move(uids, "Done"))  # noqa: B023
            fault_proxy.clear()
            errors.append(error)
            if alive:
                assert client.noop()[0]
    assert errors[0] is not None
    assert errors[1] == errors[0]
    assert errors[0][2] is not alive  # the one definition of a lost connection


def with_done_folder(dovecot: Dovecot, messages: int) -> MailUser:
    """A new user with ``messages`` sample messages in INBOX and an empty folder "Done"."""
    user = new_user(dovecot)
    with user.client() as client:
        client.create_folder("Done")
        for number in range(messages):
            client.append("INBOX", message(number))
    return user


def test_a_move_files_the_messages_and_keeps_the_connection_in_step(dovecot: Dovecot) -> None:
    user = with_done_folder(dovecot, 5)
    with selected(user) as client:
        uids = sorted(client.search(["ALL"]))
        uid_move(client._imap, [uids[0], *uids[2:4]], b'"Done"')
        assert sorted(client._imap.untagged_responses["EXPUNGE"]) == [b"1", b"3", b"4"]
        assert sorted(client.search(["ALL"])) == [uids[1], uids[4]]
        assert not client._imap.tagged_commands
        client.select_folder("Done")
        assert len(client.search(["ALL"])) == 3


def test_a_pass_asks_one_header_and_one_text_fetch_per_batch_of_linked_mail(
    dovecot: Dovecot, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    user = new_user(dovecot)
    config = write_config(tmp_path, [user], ports={dovecot.port: fault_proxy.port})
    settings = load_settings(config)
    store = open_store(settings.store_url, settings.daemon.state_dir)
    store.add_group("Clients", [f"c{n}@clients.example" for n in range(7)])
    with opened(settings, user.address) as session:
        with user.client() as client:
            for number in range(7):
                client.append(session.queue_name(), message(number))
        filer = Filer(settings.mailbox(user.address), store, batch_size=3)
        before = fault_proxy.commands("UID FETCH")
        result = filer.run_pass(session)
    assert result.new_events == 7  # all linked: every batch fetches its text parts
    # Batches of 3, 3 and 1: a header FETCH (BODYSTRUCTURE included) and a text FETCH
    # each; no FETCH of the structures on their own.
    assert fault_proxy.commands("UID FETCH") - before == 6
    assert fault_proxy.commands(r"UID FETCH \S+ \(BODYSTRUCTURE\)") == 0
    assert fault_proxy.commands(r"UID FETCH \S+ \(BODY\.PEEK\[HEADER\].*BODYSTRUCTURE") == 3
    # Once a batch is decided, its texts and the headers of the next two batches (those not
    # asked for yet) are asked for, then the batch before is recorded and its MOVE sent
    # behind them (issue 23): the server builds the texts while that batch is recorded, and
    # moves it while the next one is decided.
    (connection,) = [c for c in fault_proxy.connections if c.logins]
    kinds = [
        "headers" if "BODY.PEEK[HEADER]" in line else "text" if "FETCH" in line else "move"
        for line in (line.split(" ", 1)[1] for line in connection.commands)
        if line.startswith(("UID FETCH", "UID MOVE"))
    ]
    assert kinds == [
        "headers",  # 1
        "text",  # 1
        "headers",  # 2
        "headers",  # 3
        "text",  # 2
        "move",  # 1
        "text",  # 3
        "move",  # 2
        "move",  # 3
    ]


def test_moves_sent_ahead_are_answered_whichever_is_read_first(dovecot: Dovecot) -> None:
    user = with_done_folder(dovecot, 3)
    with selected(user, timeout=2) as client:
        uids = sorted(client.search(["ALL"]))
        first = send_move(client._imap, uids[:1], b'"Done"')
        second = send_move(client._imap, uids[1:2], b'"Done"')
        read_move(client._imap, second)  # reads the first one's answer on its way
        read_move(client._imap, first)  # kept: not waited for (2 s timeout) nor lost
        assert not client._imap.tagged_commands
        assert sorted(client.search(["ALL"])) == uids[2:]
        client.select_folder("Done")
        assert len(client.search(["ALL"])) == 2


@pytest.fixture
def three_queued(
    dovecot: Dovecot, fault_proxy: FaultProxy, tmp_path: Path
) -> Iterator[ImapSession]:
    """An ImapSession through the fault proxy (5 s timeout), three messages in its Queue."""
    user = new_user(dovecot)
    config = write_config(tmp_path, [user], ports={dovecot.port: fault_proxy.port})
    settings = load_settings(config)
    with opened(settings, user.address) as session:
        with user.client() as client:
            for number in range(3):
                client.append(session.queue_name(), message(number))
        session.select_queue()
        session._client._imap.sock.settimeout(5)
        yield session


def test_moves_in_flight_are_read_in_order_and_each_keeps_its_own_answer(
    three_queued: ImapSession, fault_proxy: FaultProxy
) -> None:
    session = three_queued
    uids = session.queue_uids()
    fault_proxy.answer_on("UID MOVE .*Received", "NO [SERVERBUG] not this one")
    sent = session.file_later(uids[:1], FolderRole.SENT)
    received = session.file_later(uids[1:2], FolderRole.RECEIVED)
    assert session.has("MOVE")  # asks nothing of the server: the answers stay unread
    with pytest.raises(ConnectionLostError) as refused:
        received.wait()  # reads the first answer on its way
    assert refused.value.kind == "protocol"
    assert "SERVERBUG" in str(refused.value)
    sent.wait()  # already read: OK
    assert session.queue_uids() == uids[1:]  # in step
    session.file_later(uids[2:], FolderRole.FAILED).wait()
    assert session.queue_uids() == uids[1:2]


def test_a_connection_lost_under_moves_in_flight_fails_each_of_them(
    three_queued: ImapSession, fault_proxy: FaultProxy
) -> None:
    session = three_queued
    uids = session.queue_uids()
    fault_proxy.drop_on("UID MOVE", forward=False)
    pending = [session.file_later([uid], FolderRole.SENT) for uid in uids]
    errors = []
    for move in reversed(pending):
        with pytest.raises(ConnectionLostError) as lost:
            move.wait()
        errors.append(lost.value.kind)
    assert errors == ["bye", "bye", "bye"]


def test_a_pass_of_many_batches_files_every_message_with_moves_in_flight(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot)
    config = write_config(tmp_path, [user])
    settings = load_settings(config)
    store = open_store(settings.store_url, settings.daemon.state_dir)
    store.add_group("Clients", [f"c{n}@clients.example" for n in range(0, 1000, 2)])
    with opened(settings, user.address) as session:
        with user.client() as client:
            for number in range(1000):  # half linked, half to Failed
                client.append(session.queue_name(), message(number))
        result = Filer(settings.mailbox(user.address), store).run_pass(session)
        assert session.queue_uids() == []
    assert result.messages == 1000
    assert result.new_events == 500
    with user.client() as client:
        counts = {
            role: client.select_folder(session.tree.name(role))[b"EXISTS"]  # type: ignore[union-attr]
            for role in (FolderRole.RECEIVED, FolderRole.FAILED)
        }
    assert counts == {FolderRole.RECEIVED: 500, FolderRole.FAILED: 500}


def test_fetches_behind_unanswered_moves_on_dovecot_get_exactly_their_own_answers(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Issue 23: FETCHes sent behind MOVEs in flight, read in any order, lose nothing.

    Dovecot runs them side by side: the FETCH lines, the MOVEs' EXPUNGEs and the tagged
    answers come interleaved. Each answer must be what imapclient alone reads, and the
    Queue must end as the MOVEs left it.
    """
    user = new_user(dovecot)
    config = write_config(tmp_path, [user])
    with opened(load_settings(config), user.address) as session:
        with user.client() as client:
            for number in range(240):
                client.append(session.queue_name(), message(number))
        session.select_queue()
        session.select_queue()  # \Recent (RFC 3501 §2.3.2) went with the first SELECT
        uids = session.queue_uids()
        headers = imapclient_headers(session, uids[80:])
        plans = {m.uid: m.plan for m in headers}
        texts = session.fetch_full(uids[80:160], plans=plans)
        first = session.file_later(uids[:40], FolderRole.SENT)
        second = session.file_later(uids[40:80], FolderRole.RECEIVED)
        session.prefetch_full(uids[80:160], plans=plans)
        session.prefetch_headers(uids[160:])
        assert session.busy
        third = session.file_later(uids[200:], FolderRole.FAILED)  # read last of all
        assert session.fetch_full(uids[80:160], plans=plans) == texts
        assert session.fetch_headers(uids[160:]) == [m for m in headers if m.uid in uids[160:]]
        for pending in (second, first, third):
            pending.wait()
        assert not session.busy
        assert session.queue_uids() == uids[80:200]
        assert len(session.copied_to_failed(uids[200:])) == 40  # each MOVE's COPYUID kept
