"""One sync pass over a mailbox's Queue: decide each message, record events, then move.

The order is always record (idempotent) → move: a crash between the two re-records (a no-op)
and moves on the next pass, so nothing is lost and nothing doubled. A store that cannot be
reached raises StoreUnavailableError before anything of that batch moves, so its messages
stay in Queue. This module knows no IMAP library: it talks to a ``QueueSession``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from emailsync.classify import classify
from emailsync.config import MailboxSettings
from emailsync.errors import ConnectionLostError, StoreError, StoreUnavailableError
from emailsync.message import parse_headers, parse_message
from emailsync.model import (
    OUTCOME_FOLDER,
    OUTCOME_KEYWORD,
    Classification,
    Direction,
    FetchedMessage,
    FolderRole,
    Group,
    Outcome,
    QueuedMessage,
    TimelineEvent,
)
from emailsync.store.base import Recorded, Store

log = structlog.get_logger(__name__)

FETCH_BATCH = 200  # messages per header FETCH and per store transaction
SAVEDATE_RESOLUTION = timedelta(seconds=1)  # RFC 8514 SAVEDATE is a date-time to the second


class QueueSession(Protocol):
    """What a pass needs from a connection: the Queue's messages and a way to move them."""

    def select_queue(self) -> int: ...

    def queue_uids(self) -> list[int]: ...

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]: ...

    def fetch_full(
        self, uids: Sequence[int], sizes: dict[int, int] | None = None
    ) -> list[FetchedMessage]: ...

    def file(self, uids: Sequence[int], role: FolderRole, keyword: str | None = None) -> None: ...


@dataclass(frozen=True)
class Decision:
    """What the pass decided for one message, and why."""

    uid: int
    outcome: Outcome
    message: QueuedMessage
    classification: Classification | None = None
    groups: tuple[str, ...] = ()
    queued_at: datetime | None = None  # when it landed in Queue (for filing latency)

    @property
    def destination(self) -> FolderRole:
        """The folder the message goes to."""
        return OUTCOME_FOLDER[self.outcome]


@dataclass
class PassResult:
    """Everything one pass decided, and how many new timeline events it recorded."""

    decisions: list[Decision] = field(default_factory=list)
    new_events: int = 0

    def count(self, outcome: Outcome) -> int:
        """How many messages had this outcome."""
        return sum(1 for d in self.decisions if d.outcome is outcome)


FiledCallback = Callable[[Sequence[Decision], int], None]


class Filer:
    """Runs sync passes for one mailbox against a store."""

    def __init__(
        self,
        mailbox: MailboxSettings,
        store: Store,
        *,
        batch_size: int = FETCH_BATCH,
        on_filed: FiledCallback | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.mailbox = mailbox
        self.store = store
        self.batch_size = batch_size
        self.on_filed = on_filed
        self.clock = clock
        self.log = log.bind(mailbox=mailbox.address)
        # When this filer first saw each Queue UID: the latency start on servers without
        # SAVEDATE (RFC 8514). Entries go when the message is filed.
        self.first_seen: dict[int, datetime] = {}
        # The Queue UIDs the last pass tried (filed or left behind), so a caller can tell
        # mail that arrived after it from mail it could not move.
        self.attempted: set[int] = set()

    def run_pass(
        self,
        session: QueueSession,
        *,
        dry_run: bool = False,
        stopping: Callable[[], bool] = lambda: False,
    ) -> PassResult:
        """File every message in Queue, including ones that arrive while the pass runs.

        Mail that lands during a pass is announced only in the untagged responses of the
        pass's own commands, never again in IDLE, so the pass searches the Queue again at
        the end and goes on until nothing new is there. A message it could not move (still in
        Queue) is not tried twice in one pass, so the loop always ends. ``stopping`` is asked
        between batches: on shutdown the batch in flight is finished and the rest wait.
        """
        result = PassResult()
        session.select_queue()
        attempted: set[int] = set()
        self.attempted = attempted
        while True:
            uids = [uid for uid in session.queue_uids() if uid not in attempted]
            if not uids:
                break
            for start in range(0, len(uids), self.batch_size):
                chunk = uids[start : start + self.batch_size]
                if stopping():
                    return result
                attempted.update(chunk)
                decisions, new_events = self._file_batch(session, chunk, dry_run=dry_run)
                result.decisions.extend(decisions)
                result.new_events += new_events
            if dry_run:
                break
        return result

    def decide(self, messages: Iterable[QueuedMessage]) -> list[Decision]:
        """Classify messages and look up their groups (one store query for the batch)."""
        messages = list(messages)
        owner = self.mailbox.owner_addresses
        classified: dict[int, Classification] = {
            m.uid: classify(m, owner) for m in messages if m.usable
        }
        addresses = {a for c in classified.values() for a in c.counterparts}
        groups = self.store.groups_for_addresses(sorted(addresses)) if addresses else []
        by_address = _groups_by_address(groups)
        decisions = []
        for message in messages:
            classification = classified.get(message.uid)
            if classification is None:
                decisions.append(Decision(message.uid, Outcome.UNPARSEABLE, message))
                continue
            linked = _linked_groups(classification.counterparts, by_address)
            if not linked:
                outcome = Outcome.NO_GROUP
            elif classification.direction is Direction.OUTBOUND:
                outcome = Outcome.SENT
            else:
                outcome = Outcome.RECEIVED
            decisions.append(Decision(message.uid, outcome, message, classification, linked))
        return decisions

    def _file_batch(
        self, session: QueueSession, uids: Sequence[int], *, dry_run: bool
    ) -> tuple[list[Decision], int]:
        headers = session.fetch_headers(uids)
        parsed = [
            parse_headers(f.uid, f.data, internaldate=f.internaldate, size=f.size) for f in headers
        ]
        now = self.clock()
        queued_at = {
            f.uid: landed_at(f.savedate, self.first_seen.setdefault(f.uid, now)) for f in headers
        }
        decisions = [replace(d, queued_at=queued_at.get(d.uid)) for d in self.decide(parsed)]
        # Only linked messages need their bodies: a no-group message with a 20 MB attachment
        # goes to Failed without being downloaded.
        linked = [d for d in decisions if d.groups]
        if linked and not dry_run:
            sizes = {f.uid: f.size for f in headers}
            full = {f.uid: f for f in session.fetch_full([d.uid for d in linked], sizes)}
            decisions = [
                filled
                for d in decisions
                if (filled := self._with_body(d, full.get(d.uid))) is not None
            ]
        new_events = 0
        if not dry_run:
            recorded, new_events = self._record(decisions)
            decisions = self._move(session, recorded)
            for uid in uids:
                self.first_seen.pop(uid, None)
            if self.on_filed is not None:
                self.on_filed(decisions, new_events)
        return decisions, new_events

    def _with_body(self, decision: Decision, fetched: FetchedMessage | None) -> Decision | None:
        if not decision.groups:
            return decision
        if fetched is None:
            return None  # gone between the header and body fetches (another client moved it)
        message = parse_message(
            fetched.uid, fetched.data, internaldate=fetched.internaldate, size=fetched.size
        )
        if not message.usable:
            return replace(decision, outcome=Outcome.UNPARSEABLE, message=message, groups=())
        return replace(decision, message=message)

    def _events(self, decision: Decision) -> list[TimelineEvent]:
        if decision.outcome not in (Outcome.SENT, Outcome.RECEIVED):
            return []
        assert decision.classification is not None  # noqa: S101 -- linked implies classified
        message = decision.message
        filed_at = self.clock()
        return [
            TimelineEvent(
                group=group,
                direction=decision.classification.direction,
                mailbox=self.mailbox.address,
                message_key=message.key,
                message_id=message.message_id,
                subject=message.subject,
                from_=message.display_from,
                to=message.display_to,
                cc=message.display_cc,
                date=message.date,
                body_text=message.body_text,
                attachments=message.attachments,
                size=message.size,
                filed_at=filed_at,
            )
            for group in decision.groups
        ]

    def _record(self, decisions: Sequence[Decision]) -> tuple[list[Decision], int]:
        """Record the batch's events in one transaction; returns what may move, and new events.

        When the store refuses the batch (not merely unavailable), each message is recorded on
        its own, so that one bad event cannot hold up the queue; a message whose events cannot
        be recorded stays in Queue (logged) and the others go on.
        """
        events = [event for d in decisions for event in self._events(d)]
        if not events:
            return list(decisions), 0
        try:
            return self._after_recording(decisions, self.store.record_events_checked(events))
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            self.log.warning("batch_not_recorded", error=str(exc), messages=len(decisions))
        kept: list[Decision] = []
        new_events = 0
        for decision in decisions:
            own = self._events(decision)
            try:
                recorded = self.store.record_events_checked(own) if own else Recorded()
                decision = self._after_recording([decision], recorded)[0][0]  # noqa: PLW2901 -- a rejection replaces it
                new_events += recorded.new
            except StoreUnavailableError:
                raise
            except StoreError as exc:
                self.log.error("event_not_recorded", uid=decision.uid, error=str(exc))  # noqa: TRY400 -- expected, no traceback
                continue
            kept.append(decision)
        return kept, new_events

    def _after_recording(
        self, decisions: Sequence[Decision], recorded: Recorded
    ) -> tuple[list[Decision], int]:
        """Turn the store's per-event rejections into REJECTED decisions (to Failed).

        A message any of whose events the store refused goes to Failed with the store's reason;
        its other events stay recorded (idempotent, so a retry from Failed doubles nothing).
        """
        if not recorded.rejected:
            return list(decisions), recorded.new
        result: list[Decision] = []
        for decision in decisions:
            reasons = [
                reason
                for group in decision.groups
                if (reason := recorded.rejected.get((group, decision.message.key))) is not None
            ]
            if reasons:
                problem = "rejected by the store: " + "; ".join(dict.fromkeys(reasons))
                self.log.warning("event_rejected", uid=decision.uid, reason=problem)
                decision = replace(  # noqa: PLW2901 -- the rejected decision replaces it
                    decision,
                    outcome=Outcome.REJECTED,
                    message=replace(decision.message, problem=problem),
                )
            result.append(decision)
        return result, recorded.new

    def _move(self, session: QueueSession, decisions: Sequence[Decision]) -> list[Decision]:
        """Move by destination in batches; returns the decisions whose message moved.

        A batch the server refuses (NO/BAD on a live connection) is retried one message at a
        time, so one message the server will not move cannot hold up the others.
        """
        by_outcome: dict[Outcome, list[Decision]] = {}
        for decision in decisions:
            by_outcome.setdefault(decision.outcome, []).append(decision)
        moved: list[Decision] = []
        for outcome, group in by_outcome.items():
            folder, keyword = OUTCOME_FOLDER[outcome], OUTCOME_KEYWORD.get(outcome)
            try:
                session.file([d.uid for d in group], folder, keyword)
                moved.extend(group)
                continue
            except ConnectionLostError as exc:
                if exc.kind != "protocol":
                    raise
                self.log.warning("batch_not_moved", error=str(exc), messages=len(group))
            for decision in group:
                try:
                    session.file([decision.uid], folder, keyword)
                except ConnectionLostError as exc:
                    if exc.kind != "protocol":
                        raise
                    self.log.error("message_not_moved", uid=decision.uid, error=str(exc))  # noqa: TRY400 -- expected, no traceback
                    continue
                moved.append(decision)
        self._log_filed(moved)
        return moved

    def _log_filed(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions:
            self.log.info(
                "message_filed",
                uid=decision.uid,
                outcome=decision.outcome.value,
                groups=list(decision.groups),
                reason=decision.message.problem,
            )


def landed_at(savedate: datetime | None, first_seen: datetime) -> datetime:
    """Best estimate of when a message landed in Queue, for the filing-latency histogram.

    SAVEDATE (RFC 8514) has whole-second resolution, so the moment lies in
    [savedate, savedate + 1 s), and not after we first saw it: take the middle of what is left.
    Without SAVEDATE, the first time a pass saw it (which misses the server's notice delay).
    """
    if savedate is None:
        return first_seen
    latest = min(savedate + SAVEDATE_RESOLUTION, first_seen)
    if latest < savedate:
        return first_seen  # clocks disagree: trust our own
    return savedate + (latest - savedate) / 2


def _groups_by_address(groups: Iterable[Group]) -> dict[str, list[str]]:
    by_address: dict[str, list[str]] = {}
    for group in groups:
        for address in group.addresses:
            by_address.setdefault(address, []).append(group.ref)
    return by_address


def _linked_groups(
    counterparts: Iterable[str], by_address: dict[str, list[str]]
) -> tuple[str, ...]:
    linked: dict[str, None] = {}
    for address in counterparts:
        for name in by_address.get(address, ()):
            linked[name] = None
    return tuple(linked)
