"""Backlog throughput (issue 10): a Queue of all-linked 5 KB mail, filed until empty.

Four contenders on identical Queues, seeded fresh per trial, in the same run:

* **raw MOVE**: ``UID MOVE 1:*`` of the whole Queue to Sent, the server's own limit;
* **server floor** (issue 23): the IMAP work a filer that puts each message's text on the
  timeline must ask for, per batch of FLOOR_BATCH: the header + ``BODYSTRUCTURE`` FETCH
  (the items emailsync asks for), the capped text-part FETCH (``BODY.PEEK[1]<0.cap>``) and
  one ``UID MOVE``, sent one command after another through plain imaplib, nothing parsed
  or recorded: what the server must do, with the client doing as little as it can;
* **plain script**: what a competent 60-line imapclient script does: header FETCH per 200,
  stdlib ``email`` parse of From/To/Cc, a batched UID MOVE per destination, no store;
* **emailsync**: ``Filer.run_pass`` with a real ``ImapSession`` and ``SqliteStore`` (what
  ``sync --once`` does), checked for its event count and folder counts.

Every message is linked (so each costs a body fetch, a parse and events): half outbound, half
inbound, about 30 % with a second group's address in Cc. Messages are seeded with
MULTIAPPEND (RFC 3502) so that 10,000 of them take seconds, not minutes.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import imapclient
from corpus import Directory
from testbed import OWNER_ALIAS, BenchMailbox, Testbed

from emailsync.filing.decision import Decision
from emailsync.filing.queuepass import FETCH_BATCH, Filer
from emailsync.imap.fetch import uid_set
from emailsync.imap.folders import FolderTree
from emailsync.imap.session import BODY_FETCH_CAP
from emailsync.model import FolderRole, Outcome
from emailsync.timeline import open_store

BODY_BYTES = 4400  # with ~600 bytes of header: about 5 KB a message
CC_SHARE = 0.3
SEED_CHUNK = 500  # messages per MULTIAPPEND
FLOOR_BATCH = 500  # messages per command of the server floor (issue 23)
_WORDS = ("tenancy", "deposit", "inventory", "offer", "survey", "keys", "completion", "rent")


@dataclass(frozen=True)
class BacklogMessage:
    """One queued message with its destination and the events it must record."""

    raw: bytes
    outcome: Outcome
    events: int


@dataclass
class BacklogTrials:
    """Seconds per trial of each contender, and what went wrong."""

    messages: int
    raw_move: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    emailsync: list[float] = field(default_factory=list)
    emailsync_cpu: list[float] = field(default_factory=list)  # CPU seconds of each pass
    problems: list[str] = field(default_factory=list)


def make_backlog(count: int, directory: Directory, rng: random.Random) -> list[BacklogMessage]:
    """``count`` linked messages of about 5 KB: half outbound, half inbound, ~30 % with a Cc."""
    group_of = directory.group_of()
    addresses = sorted(group_of)
    clock = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
    messages = []
    for n in range(count):
        clock += timedelta(seconds=rng.randint(1, 600))
        client = rng.choice(addresses)
        cc = [rng.choice([a for a in rng.sample(addresses, 3) if group_of[a] != group_of[client]])]
        cc = cc if rng.random() < CC_SHARE else []
        outbound = n % 2 == 0
        sender, to = (OWNER_ALIAS, client) if outbound else (client, OWNER_ALIAS)
        # Inbound: the counterparts are the sender's side only, so a Cc'd client links nothing.
        events = 1 + len(cc) if outbound else 1
        messages.append(
            BacklogMessage(
                _mail(n, sender, to, cc, clock, rng),
                Outcome.SENT if outbound else Outcome.RECEIVED,
                events,
            )
        )
    return messages


def _mail(  # noqa: PLR0917 -- a private builder called once
    n: int, sender: str, to: str, cc: list[str], when: datetime, rng: random.Random
) -> bytes:
    words = " ".join(rng.choices(_WORDS, k=BODY_BYTES // 7))
    body = "\r\n".join(words[i : i + 76] for i in range(0, min(len(words), BODY_BYTES), 76))
    lines = [
        "Received: from relay1.example.net (relay1.example.net [192.0.2.11]) by mx.example.com"
        f" with ESMTPS id {rng.getrandbits(48):012x}; {format_datetime(when)}",
        f"From: {sender}",
        f"To: {to}",
        *([f"Cc: {', '.join(cc)}"] if cc else []),
        f"Subject: Backlog message {n} about the {rng.choice(_WORDS)}",
        f"Date: {format_datetime(when)}",
        f"Message-ID: <backlog.{n}.{rng.getrandbits(32):08x}@bench.example.com>",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 7bit",
        "",
        body,
        "",
    ]
    return "\r\n".join(lines).encode()


def seed(mailbox: BenchMailbox, messages: Sequence[BacklogMessage]) -> None:
    """Put the messages into the mailbox's Queue with MULTIAPPEND (RFC 3502)."""
    client = mailbox.client()
    try:
        for start in range(0, len(messages), SEED_CHUNK):
            chunk = messages[start : start + SEED_CHUNK]
            client.multiappend(mailbox.tree.queue, [m.raw for m in chunk])
    finally:
        client.logout()


def raw_move(client: imapclient.IMAPClient, tree: FolderTree) -> None:
    """``UID MOVE 1:*`` (RFC 6851): the whole Queue in one command."""
    client.select_folder(tree.queue)
    client.move("1:*", tree.name(FolderRole.SENT))


def server_floor(client: imapclient.IMAPClient, tree: FolderTree) -> None:
    """The server's share of a backlog pass, with the client doing as little as it can.

    Per batch of FLOOR_BATCH UIDs, one after another through plain imaplib (answers read
    by imaplib, nothing parsed or recorded): the header FETCH emailsync sends (with the
    BODYSTRUCTURE, and SAVEDATE where the server has it), the FETCH of the text part each
    of these single-part messages has (section 1, cut at BODY_FETCH_CAP) and one MOVE.
    """
    imap = client._imap
    client.select_folder(tree.queue)
    header_items = [b"BODY.PEEK[HEADER]", b"INTERNALDATE", b"RFC822.SIZE", b"FLAGS"]
    header_items.append(b"BODYSTRUCTURE")
    if client.has_capability("SAVEDATE"):
        header_items.append(b"SAVEDATE")
    headers = "(" + b" ".join(header_items).decode() + ")"
    text = f"(BODY.PEEK[1]<0.{BODY_FETCH_CAP}>)"
    folder = client._normalise_folder(tree.name(FolderRole.SENT))
    typ, data = imap.uid("SEARCH", "ALL")
    uids = [int(u) for u in data[0].split()] if typ == "OK" and data[0] else []
    for start in range(0, len(uids), FLOOR_BATCH):
        chunk = uid_set(uids[start : start + FLOOR_BATCH]).decode()
        for command, args in (("FETCH", (chunk, headers)), ("FETCH", (chunk, text))):
            if imap.uid(command, *args)[0] != "OK":
                raise RuntimeError(f"server floor: {command} refused")
            imap.untagged_responses.clear()  # read, not kept: nothing is parsed
        if imap.uid("MOVE", chunk, folder)[0] != "OK":
            raise RuntimeError("server floor: MOVE refused")
        imap.untagged_responses.clear()


def plain_script(client: imapclient.IMAPClient, tree: FolderTree, owner: str) -> None:
    """What a plain imapclient script does: FETCH headers, parse, batched MOVE; no store."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    client.select_folder(tree.queue)
    while True:
        uids = sorted(client.search(["ALL"]))
        if not uids:
            return
        for start in range(0, len(uids), FETCH_BATCH):
            chunk = uids[start : start + FETCH_BATCH]
            fetched = client.fetch(chunk, [b"BODY.PEEK[HEADER]"])
            sent, received = [], []
            for uid, data in fetched.items():
                msg = parser.parsebytes(data[b"BODY[HEADER]"])
                senders = [a.lower() for _, a in email.utils.getaddresses(msg.get_all("from", []))]
                (sent if owner in senders else received).append(uid)
            if sent:
                client.move(sent, tree.name(FolderRole.SENT))
            if received:
                client.move(received, tree.name(FolderRole.RECEIVED))


def emailsync_pass(mailbox: BenchMailbox) -> tuple[float, dict[Outcome, int], int, float]:
    """``Filer.run_pass`` as ``sync --once`` runs it; seconds, outcomes, new events, CPU s.

    The CPU seconds are this process's (all its threads) over the pass.
    """
    settings = mailbox.settings()
    store = open_store(settings.store_url, settings.daemon.state_dir)
    session = mailbox.open_session()
    counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)

    def count(decisions: Sequence[Decision]) -> None:
        for decision in decisions:
            counts[decision.outcome] += 1

    try:
        filer = Filer(settings.mailboxes[0], store, batch_size=settings.daemon.fetch_batch)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = filer.run_pass(session, on_batch=count)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        session.logout()
        store.close()
    return seconds, counts, result.new_events, cpu


def run_backlog(testbed: Testbed, count: int, repeats: int, seed_value: int) -> BacklogTrials:
    """``repeats`` trials of each contender on a fresh Queue of ``count`` messages."""
    trials = BacklogTrials(count)
    for trial in range(repeats):
        rng = random.Random(seed_value + trial)  # noqa: S311 -- test data, not cryptography
        messages = make_backlog(count, testbed.directory, rng)
        trials.raw_move.append(_timed_client(testbed, messages, raw_move))
        floor_mailbox = testbed.new_mailbox()
        trials.floor.append(_timed_client(testbed, messages, server_floor, floor_mailbox))
        trials.problems.extend(_check_floor(floor_mailbox, len(messages)))
        trials.plain.append(
            _timed_client(testbed, messages, lambda c, t: plain_script(c, t, OWNER_ALIAS))
        )
        mailbox = testbed.new_mailbox()
        seed(mailbox, messages)
        seconds, outcomes, events, cpu = emailsync_pass(mailbox)
        trials.emailsync.append(seconds)
        trials.emailsync_cpu.append(cpu)
        trials.problems.extend(_check(mailbox, messages, outcomes, events))
    return trials


def _timed_client(
    testbed: Testbed,
    messages: Sequence[BacklogMessage],
    work: object,
    mailbox: BenchMailbox | None = None,
) -> float:
    mailbox = mailbox or testbed.new_mailbox()
    seed(mailbox, messages)
    client = mailbox.client()
    try:
        started = time.perf_counter()
        work(client, mailbox.tree)  # type: ignore[operator]
        return time.perf_counter() - started
    finally:
        client.logout()


def _check_floor(mailbox: BenchMailbox, count: int) -> list[str]:
    """The server floor did the whole backlog's work: everything moved."""
    counts = mailbox.counts()
    if counts[FolderRole.QUEUE] or counts[FolderRole.SENT] != count:
        return [f"server floor: {counts[FolderRole.SENT]} of {count} moved"]
    return []


def _check(
    mailbox: BenchMailbox,
    messages: Sequence[BacklogMessage],
    outcomes: dict[Outcome, int],
    events: int,
) -> list[str]:
    problems = []
    want_sent = sum(1 for m in messages if m.outcome is Outcome.SENT)
    want = {FolderRole.SENT: want_sent, FolderRole.RECEIVED: len(messages) - want_sent}
    counts = mailbox.counts()
    for role, number in want.items():
        if counts[role] != number:
            problems.append(f"backlog: {counts[role]} in {role.value}, want {number}")
    if counts[FolderRole.QUEUE]:
        problems.append(f"backlog: {counts[FolderRole.QUEUE]} left in Queue")
    if outcomes[Outcome.SENT] != want_sent:
        problems.append(f"backlog: {outcomes[Outcome.SENT]} decided sent, want {want_sent}")
    want_events = sum(m.events for m in messages)
    if events != want_events:
        problems.append(f"backlog: {events} new events, want {want_events}")
    return problems
