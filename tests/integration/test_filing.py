"""A sync pass against a real Dovecot: folders, classification, store, moves, idempotency."""

from __future__ import annotations

import io
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import make_msgid
from pathlib import Path

import pytest

from emailsync import cli
from emailsync.config import Settings, load_settings
from emailsync.dev.dovecot import Dovecot, DovecotOptions, running_dovecot
from emailsync.errors import StoreUnavailableError, UidValidityChangedError
from emailsync.filing.decision import PassResult
from emailsync.filing.queuepass import Filer
from emailsync.imap.auth import make_authenticator
from emailsync.imap.session import FILING_KEYWORD, ImapSession, session_for
from emailsync.model import STUCK_KEYWORD, FolderRole
from emailsync.state.base import Store
from emailsync.state.sqlite import SqliteStore
from emailsync.timeline import open_store

from .conftest import MailUser, new_user, settings_for, write_config
from .daemonproc import DaemonFactory, wait_until
from .daemonproc import run_cli as daemon_cli
from .mailenv import folder_message_ids

pytestmark = pytest.mark.dovecot

ROOT = "Rezi-Imported"
CLIENT = "john@clients.example"


def build_message(
    frm: str,
    to: str,
    subject: str,
    *,
    cc: str = "",
    bcc: str = "",
    message_id: str | None = None,
    body: str = "Hello.",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    if bcc:
        msg["Bcc"] = bcc
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = message_id or make_msgid(domain="test.example")
    msg.set_content(body)
    return msg.as_bytes()


@contextmanager
def opened(settings: Settings, address: str) -> Iterator[ImapSession]:
    with session_for(settings, address, timeout_seconds=10) as session:
        session.ensure_folders()
        yield session


def make_folders(settings: Settings, address: str) -> None:
    """Log in once so that the folder tree exists."""
    with opened(settings, address):
        pass


def ready_mailboxes(
    tmp_path: Path, *users: MailUser, groups: dict[str, list[str]] | None = None
) -> tuple[Settings, Store]:
    """Settings for the users' mailboxes, their folders made, and a store holding ``groups``
    (by default Smith: john@clients.example)."""
    settings = settings_for(tmp_path, list(users))
    store = open_store(settings.store_url, settings.daemon.state_dir)
    for name, addresses in (groups or {"Smith": ["john@clients.example"]}).items():
        store.add_group(name, addresses)
    for user in users:
        make_folders(settings, user.address)
    return settings, store


def file_queue(settings: Settings, store: Store, address: str) -> PassResult:
    """One sync pass over a mailbox's Queue."""
    with opened(settings, address) as session:
        return Filer(settings.mailbox(address), store).run_pass(session)


def subjects_filed(filer: Filer, session: ImapSession) -> list[str]:
    """One pass; the subjects of the messages it filed, from its per-batch decisions."""
    subjects: list[str] = []
    filer.run_pass(
        session, on_batch=lambda batch: subjects.extend(d.message.subject for d in batch)
    )
    return subjects


def queue(user: MailUser, *messages: bytes, delimiter: str = ".") -> None:
    with user.client() as client:
        for raw in messages:
            client.append(f"{ROOT}{delimiter}Queue", raw)


def folder_subjects(user: MailUser, folder: str, delimiter: str = ".") -> dict[str, set[str]]:
    """Subject → keywords of every message in a folder of the tree.

    A dict keyed by subject would merge a message filed twice into one entry, so this fails
    (AssertionError) when two messages in the folder share a subject or a Message-ID; a test
    that needs the counts uses ``folder_ids``.
    """
    with user.client() as client:
        name = f"{ROOT}{delimiter}{folder}"
        if not client.folder_exists(name):
            return {}
        client.select_folder(name, readonly=True)
        uids = client.search(["ALL"])
        data = client.fetch(uids, ["ENVELOPE", "FLAGS"]) if uids else {}
    envelopes = [d[b"ENVELOPE"] for d in data.values()]
    subjects = Counter((e.subject or b"").decode() for e in envelopes)
    ids = Counter(e.message_id for e in envelopes if e.message_id)
    doubled = [s for s, n in subjects.items() if n > 1] + [
        i.decode() for i, n in ids.items() if n > 1
    ]
    assert not doubled, f"{folder} holds these more than once: {doubled}"
    return {
        (d[b"ENVELOPE"].subject or b"").decode(): {
            f.decode() for f in d[b"FLAGS"] if f.startswith(b"$")
        }
        for d in data.values()
    }


def folder_ids(user: MailUser, folder: str, delimiter: str = ".") -> Counter[str]:
    """Message-ID → copies of it in a folder of the tree (a multiset: doubles count 2)."""
    return folder_message_ids(user, f"{ROOT}{delimiter}{folder}")


def everywhere(user: MailUser) -> Counter[str]:
    """Message-ID → copies across the whole tree: Sent, Received, Failed and Queue (a message
    filed twice counts 2)."""
    total: Counter[str] = Counter()
    for folder in ("Sent", "Received", "Failed", "Queue"):
        total.update(folder_ids(user, folder))
    return total


def message_id(raw: bytes) -> str:
    """The Message-ID header of a raw message built by ``build_message``."""
    return str(BytesParser().parsebytes(raw, headersonly=True)["Message-ID"])


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(args))
    return code, out.getvalue()


def test_setup_creates_and_subscribes_the_tree_with_dot_delimiter(
    user: MailUser, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [user])
    code, out = run_cli("--config", str(config), "setup", user.address)
    assert code == 0
    names = [f"{ROOT}", *(f"{ROOT}.{c}" for c in ("Queue", "Sent", "Received", "Failed"))]
    with user.client() as client:
        subscribed = {name for _, _, name in client.list_sub_folders()}
    assert set(names) <= subscribed
    assert out.count("created") == 5
    code, out = run_cli("--config", str(config), "setup", user.address)
    assert code == 0
    assert "created" not in out  # idempotent: a second setup creates nothing


def test_setup_uses_the_servers_slash_delimiter(dovecot_slash: Dovecot, tmp_path: Path) -> None:
    user = new_user(dovecot_slash)
    code, _ = run_cli("--config", str(write_config(tmp_path, [user])), "setup", user.address)
    assert code == 0
    with user.client() as client:
        subscribed = {name for _, _, name in client.list_sub_folders()}
    assert {f"{ROOT}/Queue", f"{ROOT}/Sent", f"{ROOT}/Received", f"{ROOT}/Failed"} <= subscribed


def test_setup_puts_the_tree_under_the_personal_namespace_prefix(tmp_path: Path) -> None:
    with running_dovecot(options=DovecotOptions(prefix="INBOX.")) as server:
        user = new_user(server)
        settings = settings_for(tmp_path, [user])
        with opened(settings, user.address) as session:
            assert session.tree is not None
            assert session.tree.queue == "INBOX.Rezi-Imported.Queue"
        with user.client() as client:
            subscribed = {name for _, _, name in client.list_sub_folders()}
            client.append(
                "INBOX.Rezi-Imported.Queue", build_message("a@b.example", user.address, "x")
            )
        assert {f"INBOX.{ROOT}", f"INBOX.{ROOT}.Queue", f"INBOX.{ROOT}.Failed"} <= subscribed
        store = open_store(settings.store_url, settings.daemon.state_dir)
        file_queue(settings, store, user.address)
        with user.client() as client:
            client.select_folder(f"INBOX.{ROOT}.Failed", readonly=True)
            assert len(client.search(["ALL"])) == 1
        store.close()


def test_folder_names_with_non_ascii_characters_round_trip(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user], extra='[folders]\nroot = "Rezi-Importé"\n')
    # [folders] must come before [daemon]'s keys end; rewrite as a separate table.
    text = config.read_text().replace('[folders]\nroot = "Rezi-Importé"\n', "")
    config.write_text(text + '\n[folders]\nroot = "Rezi-Importé"\n')
    code, _ = run_cli("--config", str(config), "setup", user.address)
    assert code == 0
    with user.client() as client:
        names = {name for _, _, name in client.list_folders()}
    assert "Rezi-Importé.Queue" in names  # imapclient decodes modified UTF-7 (RFC 3501 §5.1.3)


def test_messages_are_filed_to_sent_received_and_failed(user: MailUser, tmp_path: Path) -> None:
    settings, store = ready_mailboxes(tmp_path, user)
    queue(
        user,
        build_message(user.address, "John <JOHN@clients.example>", "outbound linked"),
        build_message("john@clients.example", user.address, "inbound linked"),
        build_message("stranger@else.example", user.address, "inbound unlinked"),
        build_message(user.address, "stranger@else.example", "outbound unlinked"),
        b"\x00\x01\x02 not a message",
    )
    result = file_queue(settings, store, user.address)
    assert result.messages == 5
    assert result.new_events == 2
    assert folder_subjects(user, "Sent") == {"outbound linked": set()}
    assert folder_subjects(user, "Received") == {"inbound linked": set()}
    failed = folder_subjects(user, "Failed")
    assert failed["inbound unlinked"] == {"$EmailSyncNoGroup"}
    assert failed["outbound unlinked"] == {"$EmailSyncNoGroup"}
    assert {"$EmailSyncUnparseable"} in failed.values()
    assert folder_subjects(user, "Queue") == {}
    events = store.list_events()
    assert {(e.group, e.direction.value, e.subject) for e in events} == {
        ("Smith", "outbound", "outbound linked"),
        ("Smith", "inbound", "inbound linked"),
    }
    assert all(e.body_text.strip() == "Hello." for e in events)
    store.close()


def test_alias_from_is_outbound_and_cc_bcc_are_counterparts(user: MailUser, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [user], mailbox_extra='aliases = ["Lettings@Example.com"]')
    store = open_store(settings.store_url, settings.daemon.state_dir)
    store.add_group("Cc group", ["cc@clients.example"])
    store.add_group("Bcc group", ["bcc@clients.example"])
    make_folders(settings, user.address)
    queue(
        user,
        build_message(
            "lettings@example.com",
            "nobody@else.example",
            "from the alias",
            cc="cc@clients.example",
            bcc="bcc@clients.example",
        ),
    )
    file_queue(settings, store, user.address)
    assert folder_subjects(user, "Sent") == {"from the alias": set()}
    assert sorted(e.group for e in store.list_events()) == ["Bcc group", "Cc group"]
    assert {e.direction.value for e in store.list_events()} == {"outbound"}
    store.close()


def test_one_message_linked_to_several_groups_gets_one_event_each(
    user: MailUser, tmp_path: Path
) -> None:
    buyer, seller = "buyer@clients.example", "seller@clients.example"
    groups = {"Buyer": [buyer], "Seller": [seller], "Both": [buyer, seller]}
    settings, store = ready_mailboxes(tmp_path, user, groups=groups)
    queue(
        user, build_message(user.address, "buyer@clients.example, seller@clients.example", "deal")
    )
    result = file_queue(settings, store, user.address)
    assert result.new_events == 3
    assert sorted(e.group for e in store.list_events()) == ["Both", "Buyer", "Seller"]
    store.close()


def test_same_message_in_two_mailboxes_gives_one_event_listing_both(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    first, second = new_user(dovecot), new_user(dovecot)
    settings, store = ready_mailboxes(tmp_path, first, second)
    raw = build_message(
        "john@clients.example", f"{first.address}, {second.address}", "to both agents"
    )
    for u in (first, second):
        queue(u, raw)
        file_queue(settings, store, u.address)
    events = store.list_events()
    assert len(events) == 1
    assert set(events[0].mailboxes) == {first.address, second.address}
    store.close()


def test_one_message_filed_by_its_sender_and_its_recipient_keeps_each_direction(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """Issue 19 defect 15: outbound in the sender's mailbox, inbound in the recipient's; one
    event for the group, via both mailboxes, each with its own direction (store and JSON)."""
    sender, recipient = new_user(dovecot), new_user(dovecot)
    config = write_config(tmp_path, [sender, recipient])
    # The client, and the sending agent (the recipient's counterpart), are the group's.
    run_cli("--config", str(config), "groups", "add", "Smith", CLIENT, sender.address)
    raw = build_message(sender.address, CLIENT, "copied to a colleague", cc=recipient.address)
    expected = {sender.address: "outbound", recipient.address: "inbound"}
    for agent in (recipient, sender):  # the recipient files first: the event starts inbound
        run_cli("--config", str(config), "setup", agent.address)
        queue(agent, raw)
        assert run_cli("--config", str(config), "sync", agent.address, "--once")[0] == 0
    code, out = run_cli("--config", str(config), "timeline", "--json")
    assert code == 0
    (line,) = out.splitlines()
    event = json.loads(line)
    assert sorted(event["mailboxes"]) == sorted(expected)
    assert {v["mailbox"]: v["direction"] for v in event["via"]} == expected
    settings = load_settings(config)
    store = open_store(settings.store_url, settings.daemon.state_dir)
    (stored,) = store.list_events()
    store.close()
    assert {v.mailbox: v.direction.value for v in stored.via if v.direction} == expected


def test_refiling_the_same_message_records_no_new_event(user: MailUser, tmp_path: Path) -> None:
    settings, store = ready_mailboxes(tmp_path, user)
    raw = build_message("john@clients.example", user.address, "again")
    filer = Filer(settings.mailbox(user.address), store)
    new_counts = []
    for _ in range(2):
        queue(user, raw)
        with opened(settings, user.address) as session:
            new_counts.append(filer.run_pass(session).new_events)
    assert new_counts == [1, 0]
    assert len(store.list_events()) == 1
    assert folder_ids(user, "Queue") == Counter()
    assert folder_ids(user, "Received") == Counter({message_id(raw): 2})  # queued twice
    store.close()


def test_messages_reusing_a_message_id_are_not_merged(user: MailUser, tmp_path: Path) -> None:
    settings, store = ready_mailboxes(tmp_path, user)
    queue(
        user,
        build_message("john@clients.example", user.address, "first", message_id="<same@broken>"),
        build_message("john@clients.example", user.address, "second", message_id="<same@broken>"),
    )
    file_queue(settings, store, user.address)
    assert sorted(e.subject for e in store.list_events()) == ["first", "second"]
    store.close()


def test_dry_run_prints_decisions_and_changes_nothing(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    run_cli("--config", str(config), "groups", "add", "Smith", "john@clients.example")
    run_cli("--config", str(config), "setup", user.address)
    queue(user, build_message("john@clients.example", user.address, "dry"))
    code, out = run_cli("--config", str(config), "sync", "--dry-run")
    assert code == 0
    assert "inbound" in out
    assert "counterparts=john@clients.example" in out
    assert "groups=Smith" in out
    assert "→ received" in out
    assert folder_subjects(user, "Queue") == {"dry": set()}
    code, out = run_cli("--config", str(config), "timeline", "--json")
    assert code == 0  # a failing command prints nothing on stdout either
    assert out == ""


def test_sync_command_files_and_timeline_lists_as_json(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    run_cli("--config", str(config), "groups", "add", "Smith", "john@clients.example")
    run_cli("--config", str(config), "setup", user.address)
    queue(user, build_message(user.address, "john@clients.example", "by the cli"))
    code, out = run_cli("--config", str(config), "sync", "--once")
    assert code == 0
    assert "1 to Sent" in out
    code, out = run_cli("--config", str(config), "timeline", "--json", "--group", "Smith")
    assert '"subject": "by the cli"' in out
    assert '"direction": "outbound"' in out


def test_without_move_copy_and_expunge_files_each_message_once(
    dovecot_nomove: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot_nomove)
    settings, store = ready_mailboxes(tmp_path, user)
    with opened(settings, user.address) as session:
        assert not session.has("MOVE")
    inbound = build_message("john@clients.example", user.address, "in")
    outbound = build_message(user.address, "john@clients.example", "out")
    queue(user, inbound, outbound)
    file_queue(settings, store, user.address)
    assert folder_ids(user, "Received") == Counter({message_id(inbound): 1})
    assert folder_ids(user, "Sent") == Counter({message_id(outbound): 1})
    assert folder_ids(user, "Queue") == Counter()
    store.close()


def test_copy_fallback_after_a_crash_between_copy_and_expunge_leaves_one_copy(
    dovecot_nomove: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot_nomove)
    settings, store = ready_mailboxes(tmp_path, user)
    raw = build_message("john@clients.example", user.address, "crashed")
    queue(user, raw)
    # What an interrupted earlier attempt leaves: the marker on the Queue message and its
    # copy in Received, but no EXPUNGE.
    with user.client() as client:
        client.select_folder(f"{ROOT}.Queue")
        uids = client.search(["ALL"])
        client.add_flags(uids, [FILING_KEYWORD])
        client.copy(uids, f"{ROOT}.Received")
    file_queue(settings, store, user.address)
    with user.client() as client:
        client.select_folder(f"{ROOT}.Received", readonly=True)
        assert client.search(["KEYWORD", FILING_KEYWORD]) == []
    assert folder_ids(user, "Received") == Counter({message_id(raw): 1})
    assert folder_ids(user, "Queue") == Counter()
    assert len(store.list_events()) == 1
    store.close()


def test_unreachable_store_leaves_messages_in_queue(user: MailUser, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [user])
    setup = open_store(settings.store_url, settings.daemon.state_dir)
    setup.add_group("Smith", ["john@clients.example"])
    setup.close()
    db = settings.daemon.state_dir / "emailsync.db"
    store = SqliteStore(db, busy_timeout_seconds=0.05)
    make_folders(settings, user.address)
    queue(user, build_message("john@clients.example", user.address, "waits"))
    blocker = sqlite3.connect(db)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    try:
        with opened(settings, user.address) as session, pytest.raises(StoreUnavailableError):
            Filer(settings.mailbox(user.address), store).run_pass(session)
    finally:
        blocker.rollback()
        blocker.close()
    assert folder_subjects(user, "Queue") == {"waits": set()}
    assert folder_subjects(user, "Failed") == {}
    file_queue(settings, store, user.address)
    assert folder_subjects(user, "Received") == {"waits": set()}
    store.close()


def test_retry_failed_moves_messages_back_to_queue_without_keywords(
    user: MailUser, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [user])
    run_cli("--config", str(config), "setup", user.address)
    queue(user, build_message("later@clients.example", user.address, "linked later"))
    run_cli("--config", str(config), "sync")
    assert folder_subjects(user, "Failed") == {"linked later": {"$EmailSyncNoGroup"}}
    run_cli("--config", str(config), "groups", "add", "Later", "later@clients.example")
    code, out = run_cli("--config", str(config), "retry-failed", user.address)
    assert code == 0
    assert "moved 1" in out
    assert folder_subjects(user, "Queue") == {"linked later": set()}
    run_cli("--config", str(config), "sync")
    assert folder_subjects(user, "Received") == {"linked later": set()}


def test_a_deleted_folder_is_recreated_by_the_next_sync(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    run_cli("--config", str(config), "setup", user.address)
    with user.client() as client:
        client.delete_folder(f"{ROOT}.Failed")
    queue(user, build_message("nobody@else.example", user.address, "orphan"))
    code, _ = run_cli("--config", str(config), "sync")
    assert code == 0
    assert folder_subjects(user, "Failed") == {"orphan": {"$EmailSyncNoGroup"}}


def test_wrong_password_exits_nonzero_without_showing_it(
    user: MailUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [user])
    (tmp_path / "secrets" / user.address).write_text("not-the-password-xyz\n")
    code, _ = run_cli("--config", str(config), "setup", user.address)
    assert code == 1
    err = capsys.readouterr().err
    assert "authentication failed" in err
    assert "not-the-password-xyz" not in err
    assert user.password not in err


def test_folder_role_names_follow_the_config(user: MailUser, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [user])
    with opened(settings, user.address) as session:
        assert session.tree is not None
        assert session.tree.name(FolderRole.FAILED) == f"{ROOT}.Failed"


class GroupRemovedMidPass(SqliteStore):
    """The real store, with an admin deleting a group just before the pass records events."""

    def __init__(self, path: Path, doomed: str) -> None:
        super().__init__(path)
        self.doomed = doomed

    def record_events(self, events):  # type: ignore[no-untyped-def]
        with sqlite3.connect(self.path) as admin:
            admin.execute("PRAGMA foreign_keys = ON")
            admin.execute(
                "DELETE FROM group_addresses WHERE group_id IN "
                "(SELECT id FROM groups WHERE name = ?)",
                (self.doomed,),
            )
            admin.execute("DELETE FROM groups WHERE name = ?", (self.doomed,))
        return super().record_events(events)


def test_one_message_whose_events_cannot_be_recorded_does_not_hold_up_the_others(
    user: MailUser, tmp_path: Path
) -> None:
    groups = {"Smith": ["john@clients.example"], "Gone": ["gone@clients.example"]}
    settings, setup = ready_mailboxes(tmp_path, user, groups=groups)
    setup.close()
    store = GroupRemovedMidPass(settings.daemon.state_dir / "emailsync.db", doomed="Gone")
    queue(
        user,
        build_message("john@clients.example", user.address, "fine"),
        build_message("gone@clients.example", user.address, "group vanished"),
        build_message("stranger@else.example", user.address, "no group"),
    )
    with opened(settings, user.address) as session:
        filed = subjects_filed(Filer(settings.mailbox(user.address), store), session)
    assert folder_subjects(user, "Received") == {"fine": set()}
    assert folder_subjects(user, "Failed") == {"no group": {"$EmailSyncNoGroup"}}
    assert folder_subjects(user, "Queue") == {"group vanished": set()}  # waits, never lost
    assert sorted(filed) == ["fine", "no group"]
    assert [e.subject for e in store.list_events()] == ["fine"]
    store.close()


class QueueReplacedBeforeExpunge(ImapSession):
    """The real session, with another client replacing Queue while dest is selected.

    What a user or an admin tool can do between the COPY of an interrupted attempt and our
    EXPUNGE: rename Queue away and create a new one holding other mail. The new Queue has a
    new UIDVALIDITY, and the old UIDs name its messages (RFC 3501 §2.3.1.1).
    """

    user: MailUser
    newcomer: bytes

    def _copies_in(self, dest: str, uids: list[int]) -> set[int]:
        found = super()._copies_in(dest, uids)
        with self.user.client() as client:
            client.rename_folder(f"{ROOT}.Queue", f"{ROOT}.Queue-old")
            client.create_folder(f"{ROOT}.Queue")
            client.append(f"{ROOT}.Queue", self.newcomer)
        return found


def test_copy_fallback_refuses_to_expunge_when_queue_uidvalidity_changed(
    dovecot_nomove: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot_nomove)
    settings, store = ready_mailboxes(tmp_path, user)
    queue(user, build_message("john@clients.example", user.address, "crashed"))
    with user.client() as client:  # an interrupted attempt: marker and copy, no EXPUNGE
        client.select_folder(f"{ROOT}.Queue")
        uids = client.search(["ALL"])
        client.add_flags(uids, [FILING_KEYWORD])
        client.copy(uids, f"{ROOT}.Received")
        old_validity = client.folder_status(f"{ROOT}.Queue", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    mailbox = settings.mailbox(user.address)
    session = QueueReplacedBeforeExpunge.open(
        mailbox, settings.folders, make_authenticator(mailbox, settings), timeout_seconds=10
    )
    session.user = user
    session.newcomer = build_message("john@clients.example", user.address, "newcomer")
    raised: Exception | None = None
    try:
        session.ensure_folders()
        Filer(mailbox, store).run_pass(session)
    except UidValidityChangedError as exc:
        raised = exc
    finally:
        session.logout()
    with user.client() as client:
        new_validity = client.folder_status(f"{ROOT}.Queue", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    assert new_validity != old_validity
    # The newcomer carries the old message's UID in the new Queue: it must not be expunged.
    assert folder_subjects(user, "Queue") == {"newcomer": set()}
    assert folder_subjects(user, "Received") == {"crashed": {FILING_KEYWORD}}
    assert isinstance(raised, UidValidityChangedError)
    # The next pass (a fresh session) files the newcomer once; nothing lost, nothing doubled.
    file_queue(settings, store, user.address)
    assert folder_subjects(user, "Queue") == {}
    with user.client() as client:
        client.select_folder(f"{ROOT}.Received", readonly=True)
        data = client.fetch(client.search(["ALL"]), ["ENVELOPE"])
    subjects = sorted((d[b"ENVELOPE"].subject or b"").decode() for d in data.values())
    assert subjects == ["crashed", "newcomer"]
    store.close()


# -- messages the server will not move: quarantine ($EmailSyncStuck) --------------------------

# Dovecot's ACL plugin (RFC 4314): the owner can take the insert right off Received with
# SETACL, and a MOVE there then gets "NO [NOPERM] Permission denied" for every message, a
# refusal of this message by this server, like NO [OVERQUOTA].
ACL_CONFIG = """
mail_plugins = $mail_plugins acl
protocol imap {
  mail_plugins = $mail_plugins imap_acl
}
plugin {
  acl = vfile
}
"""
ALL_RIGHTS = "lrwstipekxa"


@pytest.fixture(scope="module")
def dovecot_acl() -> Iterator[Dovecot]:
    """A Dovecot with the ACL plugin, so a test can make a folder refuse new messages."""
    with running_dovecot(options=DovecotOptions(extra_config=ACL_CONFIG)) as server:
        yield server


def refuse_received(user: MailUser, refuse: bool = True) -> None:
    rights = ALL_RIGHTS.replace("i", "") if refuse else ALL_RIGHTS  # i: insert (RFC 4314)
    with user.client() as client:
        client.setacl(f"{ROOT}.Received", "owner", rights)


def keywords_in_queue(user: MailUser) -> dict[str, set[str]]:
    return folder_subjects(user, "Queue")


def test_a_message_the_server_will_not_move_is_quarantined_after_five_passes(
    dovecot_acl: Dovecot, tmp_path: Path
) -> None:
    user = new_user(dovecot_acl)
    config = write_config(tmp_path, [user])
    settings, store = ready_mailboxes(tmp_path, user)
    refuse_received(user)
    queue(user, build_message("john@clients.example", user.address, "refused"))
    filer = Filer(settings.mailbox(user.address), store)
    for attempt in range(1, 6):
        assert keywords_in_queue(user) == {"refused": set()}, f"stuck before attempt {attempt}"
        with opened(settings, user.address) as session:
            filer.run_pass(session)
    assert keywords_in_queue(user) == {"refused": {STUCK_KEYWORD}}
    assert filer.stuck == 1
    # Later passes leave it alone: another message is filed meanwhile (the pass ran) and the
    # stuck one is neither decided nor counted again.
    queue(user, build_message(user.address, "john@clients.example", "goes on"))
    with opened(settings, user.address) as session:
        assert subjects_filed(filer, session) == ["goes on"]
    assert folder_subjects(user, "Sent") == {"goes on": set()}
    assert list(filer.attempts.values()) == [5]
    # A restart forgets the counts; the keyword keeps the quarantine.
    with opened(settings, user.address) as session:
        fresh = Filer(settings.mailbox(user.address), store)
        assert fresh.run_pass(session).messages == 0
        assert fresh.stuck == 1
    # retry-failed releases it; with the cause gone, the next pass files it.
    code, out = run_cli("--config", str(config), "retry-failed", user.address)
    assert code == 0
    assert "released 1 stuck" in out
    assert keywords_in_queue(user) == {"refused": set()}
    refuse_received(user, refuse=False)
    with opened(settings, user.address) as session:
        assert subjects_filed(filer, session) == ["refused"]
    assert folder_subjects(user, "Received") == {"refused": set()}
    assert folder_subjects(user, "Queue") == {}
    assert filer.attempts == {}
    store.close()


def test_the_daemon_quarantines_counts_and_shows_stuck_mail_and_start_sync_includes_it(
    dovecot_acl: Dovecot, daemons: DaemonFactory
) -> None:
    user = new_user(dovecot_acl)
    settings = settings_for(daemons.tmp_path, [user])
    make_folders(settings, user.address)
    refuse_received(user)
    queue(user, build_message("john@clients.example", user.address, "over quota"))
    daemon = daemons.start([user], groups={"Smith": ["john@clients.example"]})
    address = user.address

    def passes(trigger: str) -> float:
        return daemon.metric("emailsync_sync_passes_total", mailbox=address, trigger=trigger) or 0

    def refusals() -> int:
        return daemon.log().count('"event": "message_not_moved"')

    wait_until(lambda: passes("startup") == 1 and refusals() == 1)  # attempt 1
    for attempt in range(2, 6):
        assert daemon.post(f"/v1/mailboxes/{address}/sync")[0] == 202
        wait_until(lambda n=attempt: passes("start_sync") == n - 1)
        wait_until(lambda n=attempt: refusals() == n)
    wait_until(lambda: daemon.metric("emailsync_messages_stuck", mailbox=address) == 1)
    assert keywords_in_queue(user) == {"over quota": {STUCK_KEYWORD}}
    status = daemon_cli(daemon.config, "status")
    assert "stuck=1" in status.stdout, status
    assert daemon.mailboxes()[address]["stuck"] == 1
    # Later passes skip it: new mail is filed (IDLE) and no further MOVE of it is tried.
    queue(user, build_message(address, "john@clients.example", "next one"))
    wait_until(lambda: "next one" in folder_subjects(user, "Sent"))
    assert daemon.post(f"/v1/mailboxes/{address}/sync")[0] == 202
    wait_until(lambda: passes("start_sync") == 5)
    assert refusals() == 5
    assert daemon.metric("emailsync_messages_stuck", mailbox=address) == 1
    # retry-failed releases it, and pokes the daemon, which tries it again (a fresh count).
    result = daemon_cli(daemon.config, "retry-failed", address)
    assert "released 1 stuck" in result.stdout, result
    wait_until(lambda: refusals() == 6)
    wait_until(lambda: daemon.metric("emailsync_messages_stuck", mailbox=address) == 0)
    assert keywords_in_queue(user) == {"over quota": set()}
    for attempt in range(7, 11):  # four more refusals: quarantined again
        assert daemon.post(f"/v1/mailboxes/{address}/sync")[0] == 202
        wait_until(lambda n=attempt: refusals() == n)
    wait_until(lambda: daemon.metric("emailsync_messages_stuck", mailbox=address) == 1)
    assert keywords_in_queue(user) == {"over quota": {STUCK_KEYWORD}}
    # The cause goes (the ACL is fixed; a new login sees it): still skipped until asked for.
    refuse_received(user, refuse=False)
    dovecot_acl.kick(address)
    wait_until(lambda: passes("startup") == 2, timeout=20)
    assert keywords_in_queue(user) == {"over quota": {STUCK_KEYWORD}}
    result = daemon_cli(daemon.config, "start-sync", "--include-stuck", address)
    assert result.returncode == 0, result
    wait_until(lambda: "over quota" in folder_subjects(user, "Received"))
    assert folder_subjects(user, "Queue") == {}
    wait_until(lambda: daemon.metric("emailsync_messages_stuck", mailbox=address) == 0)
    assert daemon.mailboxes()[address]["stuck"] == 0
