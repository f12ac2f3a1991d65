"""One sync pass over a mailbox's Queue: decide each message, record events, then move.

The order is always record (idempotent) → move: a crash between the two re-records (a no-op)
and moves on the next pass, so nothing is lost and nothing doubled. A store that cannot be
reached raises StoreUnavailableError before anything of that batch moves, so its messages
stay in Queue. This module knows no IMAP library: it talks to a ``QueueSession``.

A message the server refuses on its own (MOVE/COPY or FETCH answered NO, or a FETCH of it
alone that loses the connection), or whose events the store refuses, fails one *attempt*;
after ``stuck_after`` attempts (one per pass at most) it is quarantined: it keeps
STUCK_KEYWORD in Queue and passes skip it until the keyword goes. A store that is down,
a dropped connection or a busy server (NO [UNAVAILABLE], NO [INUSE], RFC 5530) is no
message's fault and counts for none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import UTC, datetime

import structlog

from emailsync.config import STUCK_AFTER_ATTEMPTS, MailboxSettings
from emailsync.errors import (
    ConnectionLostError,
    StoreError,
    StoreUnavailableError,
)
from emailsync.filing.decision import (
    BatchCallback,
    Decision,
    FiledCallback,
    PassResult,
    RecordedCallback,
    fill_body,
    groups_by_address,
    landed_at,
    linked_groups,
    store_rejection,
)
from emailsync.filing.sessions import FailedCopies, PendingFiling, QueueSession, SendsAhead
from emailsync.imap.bodyfetch import runs_by_cost
from emailsync.imap.translate import response_code
from emailsync.mail.classify import classify
from emailsync.mail.message import parse_headers
from emailsync.model import (
    OUTCOME_FOLDER,
    OUTCOME_KEYWORD,
    STUCK_KEYWORD,
    Classification,
    Direction,
    FetchedMessage,
    Outcome,
    QueuedMessage,
    TimelineEvent,
)
from emailsync.state.base import LeaseBound, Recorded, Store
from emailsync.state.failedindex import UNKNOWN_UID, FailedEntry, FailedIndex

log = structlog.get_logger(__name__)

FETCH_BATCH = 500  # messages per header FETCH and per store transaction
# Batches whose header FETCH is sent ahead (issue 23): with two, the server has the next
# batch's headers ready and builds the one after while this process decides a batch.
HEADERS_AHEAD = 2
# Bytes of message text a batch holds at once (issue 23): 500 linked messages with a 1 MiB
# text part each would otherwise be read in one go. The linked messages are fetched in runs
# of at most this many bytes by their structure, each run parsed and let go before the next
# is read; the next run's FETCHes go out before this one is parsed.
BATCH_TEXT_BYTES = 16 * 1024 * 1024
# Threads that record a backlog's batches while the next one is read and decided (issue 23),
# shared by every Filer: a busy daemon has many workers but few backlogs at once; when all
# are taken, a batch is recorded on the worker's own thread, as a single batch always is.
RECORDER_THREADS = 8
# RFC 5530 codes that say the server or the folder is busy, not that this message is at fault:
# a refusal carrying one counts no attempt. (SERVERBUG does count: a bug one message
# triggers is the very case the quarantine is for.)
NOT_THE_MESSAGE = frozenset({"UNAVAILABLE", "INUSE"})


@dataclass(eq=False)
class Filer:
    """Runs sync passes for one mailbox against a store."""

    mailbox: MailboxSettings
    store: Store
    _: KW_ONLY
    batch_size: int = FETCH_BATCH
    on_filed: FiledCallback | None = None
    on_recorded: RecordedCallback | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    stuck_after: int = STUCK_AFTER_ATTEMPTS
    # Messages filed to Failed for want of a group are indexed here (issue 22), so that a
    # link change brings them back (emailsync.filing.refile).
    index: FailedIndex | None = None
    # Set when indexing found a message due at once (a link change overtook its lookup), or
    # could not be written: the worker runs a re-file after the pass…
    refile_owed: bool = field(default=False, init=False)
    # …which scans Failed when the index lost messages (emailsync.filing.refile).
    index_lost: bool = field(default=False, init=False)
    # When this filer first saw each Queue UID: the latency start on servers without SAVEDATE
    # (RFC 8514). Entries go when the message is filed.
    first_seen: dict[int, datetime] = field(default_factory=dict, init=False)
    # The Queue UIDs the last pass tried (filed or left behind), so a caller can tell mail
    # that arrived after it from mail it could not move.
    attempted: set[int] = field(default_factory=set, init=False)
    # Failed attempts per Queue UID, under ``_uidvalidity``; in memory only (the keyword is
    # what survives a restart). At most one per pass: ``_failed_this_pass``.
    attempts: dict[int, int] = field(default_factory=dict, init=False)
    # The messages quarantined in Queue when the last pass ended.
    stuck_uids: frozenset[int] = field(default=frozenset(), init=False)
    _uidvalidity: int | None = field(default=None, init=False)
    # Queue UIDs seen carrying STUCK_KEYWORD.
    _marked: set[int] = field(default_factory=set, init=False)
    # UIDs of a FETCH that lost the connection.
    _suspects: set[int] = field(default_factory=set, init=False)
    _failed_this_pass: set[int] = field(default_factory=set, init=False)
    _counting: bool = field(default=True, init=False)
    _release: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.log = log.bind(mailbox=self.mailbox.address)
        # A cluster's worker moves nothing once its lease is gone: checked by the session as
        # the last thing before each MOVE goes out, after everything it may wait on.
        store = self.store
        self._confirm = store.check_lease if isinstance(store, LeaseBound) else None

    @property
    def stuck(self) -> int:
        """How many messages were quarantined in Queue when the last pass ended."""
        return len(self.stuck_uids)

    def release_stuck(self) -> None:
        """Ask the next pass to release quarantined messages first; any thread, returns at once.

        The worker thread owns the connection, so the release is a request: the next pass
        takes STUCK_KEYWORD off every Queue message and forgets the attempt counts.
        """
        self._release.set()

    @property
    def release_requested(self) -> bool:
        """True while a ``release_stuck()`` waits for the next pass."""
        return self._release.is_set()

    def run_pass(
        self,
        session: QueueSession,
        *,
        dry_run: bool = False,
        stopping: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int], None] | None = None,
        on_batch: BatchCallback | None = None,
    ) -> PassResult:
        """File every message in Queue, including ones that arrive while the pass runs.

        Mail that lands during a pass is announced only in the untagged responses of the
        pass's own commands, never again in IDLE, so the pass searches the Queue again at
        the end and goes on until nothing new is there. A message it could not move (still in
        Queue) is not tried twice in one pass, so the loop always ends. ``stopping`` is asked
        between batches: on shutdown the batch in flight is finished and the rest wait.
        Quarantined messages (STUCK_KEYWORD, or over ``stuck_after`` attempts) are skipped,
        unless ``release_stuck()`` was called since the last pass.
        ``progress(done, total)`` is told after each batch (the CLI's progress bar), and
        ``on_batch(decisions)`` gets each batch's decisions (moved ones; all in a dry run):
        the result keeps only counts.
        """
        result = PassResult()
        session.select_queue()
        self._check_uidvalidity(session.uidvalidity)
        self._counting = not dry_run
        self._failed_this_pass = set()
        if self._release.is_set() and not dry_run:
            self._release.clear()  # before: a request made during the release is kept
            try:
                self._release_all(session)
            except BaseException:
                self._release.set()  # not done: the next pass does it
                raise
        attempted: set[int] = set()
        self.attempted = attempted
        pass_ = _Pass(session, result, dry_run, progress, on_batch)
        try:
            while True:
                queued = session.queue_uids()
                held = self._held(session, queued)
                self.stuck_uids = frozenset(held)
                attempted.update(held)
                uids = [uid for uid in queued if uid not in attempted]
                if not uids:
                    break
                total = len(attempted) + len(uids)
                chunks = self._chunks(uids)
                for index, chunk in enumerate(chunks):
                    if stopping():
                        self._finish(pass_)
                        return result
                    attempted.update(chunk)
                    following = chunks[index + 1 : index + 1 + HEADERS_AHEAD]
                    self._file_batch(pass_, chunk, following=following)
                    if pass_.filled is not None:
                        pass_.filled.done, pass_.filled.total = len(attempted), total
                self._finish(pass_)  # before searching again: the moves are answered
                if dry_run:
                    break
        except BaseException:
            # The batch in flight was recorded and its MOVEs sent: count what moved. The one
            # whose texts were read is not moved: it stays in Queue for the next pass (its
            # recording, if started, is waited for and its new events told).
            filled, pass_.filled = pass_.filled, None
            if filled is not None and filled.recording is not None:
                self._abandon(filled.recording)
            with contextlib.suppress(Exception):
                self._finish(pass_)
            raise
        return result

    def _abandon(self, recording: _Recording) -> None:
        """Wait for a recording whose batch will not move; its new events are still new."""
        try:
            recorded = recording.result()
        except Exception:  # the pass fails with its own error; this one says nothing more
            return
        if self.on_recorded is not None:
            self.on_recorded(recorded.new)

    def _chunks(self, uids: Sequence[int]) -> list[list[int]]:
        """Fetch batches: a suspect (its batch's FETCH lost the connection) goes on its own."""
        suspects = [uid for uid in uids if uid in self._suspects]
        rest = [uid for uid in uids if uid not in self._suspects]
        singles = [[uid] for uid in suspects]
        return singles + [
            rest[start : start + self.batch_size] for start in range(0, len(rest), self.batch_size)
        ]

    def _check_uidvalidity(self, uidvalidity: int | None) -> None:
        # UIDs counted under another UIDVALIDITY name other messages now (RFC 3501 §2.3.1.1).
        if uidvalidity != self._uidvalidity:
            self.attempts.clear()
            self._marked.clear()
            self._suspects.clear()
            self._uidvalidity = uidvalidity

    def _release_all(self, session: QueueSession) -> None:
        uids = session.keyword_uids(STUCK_KEYWORD)
        session.set_keyword(uids, STUCK_KEYWORD, on=False)
        self.log.info("stuck_released", messages=len(uids), counted=len(self.attempts))
        self.attempts.clear()
        self._marked.clear()
        self._suspects.clear()

    def _held(self, session: QueueSession, queued: Sequence[int]) -> set[int]:
        """The quarantined Queue messages; marks those that just reached the limit.

        A message this filer saw carrying STUCK_KEYWORD that no longer does was released by
        someone (a person, ``retry-failed``): its count starts again from 0.
        """
        if not queued:
            self._marked.clear()
            return set()
        marked = set(session.keyword_uids(STUCK_KEYWORD))
        for uid in self._marked - marked:
            self.attempts.pop(uid, None)
        self._marked = marked
        reached = {
            uid
            for uid in queued
            if self.attempts.get(uid, 0) >= self.stuck_after and uid not in marked
        }
        if reached and self._counting:
            try:
                if session.set_keyword(sorted(reached), STUCK_KEYWORD, on=True):
                    self._marked |= reached
                else:
                    self.log.warning("stuck_keyword_not_allowed", uids=sorted(reached))
            except ConnectionLostError as exc:
                if exc.gone:
                    raise
                # Still held (in memory) for the life of this process.
                self.log.warning("stuck_keyword_refused", uids=sorted(reached), error=str(exc))
        return (marked | reached) & set(queued)

    def _fail(self, uid: int, reason: str, error: str) -> None:
        """Count one failed attempt of a message (once per pass)."""
        if not self._counting or uid in self._failed_this_pass:
            return
        self._failed_this_pass.add(uid)
        count = self.attempts.get(uid, 0) + 1
        self.attempts[uid] = count
        if count >= self.stuck_after:
            self.log.error(
                "message_stuck",
                uid=uid,
                attempts=count,
                reason=reason,
                error=error,
                action=f"fix the cause, then emailsync retry-failed {self.mailbox.address}",
            )

    def _fetch_each(
        self, fetch: Callable[[Sequence[int]], list[FetchedMessage]], uids: Sequence[int]
    ) -> list[FetchedMessage]:
        """FETCH a batch; when the server refuses it, one message at a time.

        A message refused on its own fails an attempt and is left out. A FETCH that loses
        the connection makes its messages suspects, fetched alone next time; a suspect that
        loses the connection alone fails an attempt (a message that kills the server's
        process or never arrives within the timeout must not block the Queue for ever).
        """
        try:
            fetched = fetch(uids)
        except ConnectionLostError as exc:
            if exc.gone:
                if len(uids) == 1 and uids[0] in self._suspects:
                    self._fail(uids[0], "fetch_lost", str(exc))
                else:
                    self._suspects.update(uids)
                raise
            if _busy(exc):
                raise
            self.log.warning("batch_not_fetched", error=str(exc), messages=len(uids))
        else:
            self._suspects.difference_update(uids)
            return fetched
        fetched = []
        for uid in uids:
            try:
                fetched.extend(fetch([uid]))
            except ConnectionLostError as alone:
                if alone.gone:
                    # Lost on its own FETCH: a suspect, counted if that happens again alone.
                    self._suspects.add(uid)
                    raise
                if _busy(alone):
                    raise
                self.log.error("message_not_fetched", uid=uid, error=str(alone))  # noqa: TRY400 -- expected, no traceback
                self._fail(uid, "fetch", str(alone))
        return fetched

    def decide(
        self,
        messages: Iterable[QueuedMessage],
        queued_at: Mapping[int, datetime] | None = None,
    ) -> list[Decision]:
        """Classify messages and look up their groups (one store query for the batch).

        ``queued_at`` gives each decision, by UID, when its message landed in Queue.
        """
        messages = list(messages)
        landed = queued_at or {}
        owner = self.mailbox.owner_addresses
        classified: dict[int, Classification] = {
            m.uid: classify(m, owner) for m in messages if m.usable
        }
        addresses = {a for c in classified.values() for a in c.counterparts}
        # Before the lookup: a link change after it shows in the index (FailedIndex.add).
        seen = self.index.watermark() if self.index is not None and addresses else 0
        groups = self.store.groups_for_addresses(sorted(addresses)) if addresses else []
        by_address = groups_by_address(groups)
        decisions = []
        for message in messages:
            classification = classified.get(message.uid)
            if classification is None:
                decisions.append(
                    Decision(
                        message.uid,
                        Outcome.UNPARSEABLE,
                        message,
                        queued_at=landed.get(message.uid),
                    )
                )
                continue
            linked = linked_groups(classification.counterparts, by_address)
            if not linked:
                outcome = Outcome.NO_GROUP
            elif classification.direction is Direction.OUTBOUND:
                outcome = Outcome.SENT
            else:
                outcome = Outcome.RECEIVED
            decisions.append(
                Decision(
                    message.uid,
                    outcome,
                    message,
                    classification,
                    linked,
                    queued_at=landed.get(message.uid),
                    links_seen=seen,
                )
            )
        return decisions

    def _file_batch(
        self, pass_: _Pass, uids: Sequence[int], *, following: Sequence[Sequence[int]]
    ) -> None:
        """Decide a batch and fetch its texts; record the one before and send its MOVEs.

        The pipeline (issues 10 and 23), for batch n: its headers (sent ahead) are read,
        parsed and decided while the server moves n-2; n's text FETCH and the header FETCH
        of the batches ``following`` not sent ahead yet go out, and n-1 is recorded and
        its MOVEs sent behind them, so the server builds n's texts while n-1 is recorded,
        and moves n-1 and builds later headers while n's texts are parsed and n+1 decided.
        Each answer line finds its command by UID (imap/pipeline.py), so nothing waits for
        a MOVE's answer before sending; n-2's MOVE answers, read on the way by then, are
        counted last. A batch with a suspect (its FETCH lost the connection before) goes
        alone on a quiet connection: if it loses it again, that happens in its own FETCH,
        where it is counted.
        """
        session = pass_.session
        quiet = bool(self._suspects.intersection(uids))
        if quiet:
            self._finish(pass_)
        headers = self._fetch_each(session.fetch_headers, uids)
        pass_.ahead.discard(tuple(uids))
        parsed = [
            parse_headers(f.uid, f.data, internaldate=f.internaldate, size=f.size) for f in headers
        ]
        now = self.clock()
        queued_at = {
            f.uid: landed_at(f.savedate, self.first_seen.setdefault(f.uid, now)) for f in headers
        }
        decisions = self.decide(parsed, queued_at)
        # Only linked messages need their bodies: a no-group message with a 20 MB attachment
        # goes to Failed without being downloaded.
        linked = [d.uid for d in decisions if d.groups] if not pass_.dry_run else []
        sizes = {f.uid: f.size for f in headers}
        # The header FETCH carried each message's BODYSTRUCTURE: its plan saves a round trip.
        plans = {f.uid: f.plan for f in headers}
        runs = runs_by_cost(linked, sizes, plans, BATCH_TEXT_BYTES)
        sender = session if not quiet and isinstance(session, SendsAhead) else None
        if runs and sender is not None:
            sender.prefetch_full(runs[0], sizes, plans)
        for batch in following if not quiet else ():
            if self._suspects.intersection(batch):
                break  # a suspect is never sent ahead, nor anything behind it
            if tuple(batch) not in pass_.ahead:
                session.prefetch_headers(batch)
                pass_.ahead.add(tuple(batch))
        self._send_moves(pass_)
        if runs:
            blocks = {f.uid: f.data for f in headers}
            by_uid = {d.uid: d for d in decisions}
            bodied: dict[int, Decision | None] = {}
            for index, run in enumerate(runs):
                full = {
                    f.uid: f
                    for f in self._fetch_each(
                        lambda chunk: session.fetch_full(chunk, sizes, plans), run
                    )
                }
                if sender is not None and index + 1 < len(runs):
                    sender.prefetch_full(runs[index + 1], sizes, plans)
                for uid in run:
                    bodied[uid] = fill_body(by_uid[uid], full.get(uid), blocks.get(uid, b""))
                del full  # a run's bodies live only until it is parsed
            decisions = [filled for d in decisions if (filled := bodied.get(d.uid, d)) is not None]
            del blocks
        pass_.filled = _Filled(uids, decisions)
        if following and not quiet and not pass_.dry_run:
            pass_.filled.recording = self._record_ahead(decisions)
        self._count_moved(pass_, keep=1)  # n-2's, read on the way by now; n-1's stay in flight

    def _record_ahead(self, decisions: Sequence[Decision]) -> _Recording | None:
        """Start recording a batch's events on a recorder thread; None when it has none or
        no recorder is free (then ``_complete`` records it).

        Only the store call runs there: its answer is read, and anything moved, on this
        thread, by ``_complete``; the store's time (a database server's, a CRM's) overlaps
        the reading and deciding of the next batch.
        """
        events = [event for d in decisions for event in self.events(d)]
        if not events or not _RECORDER_SLOTS.acquire(blocking=False):
            return None
        try:
            future = _recorders().submit(self.store.record_events_checked, events)
        except BaseException:
            _RECORDER_SLOTS.release()
            raise
        future.add_done_callback(lambda _: _RECORDER_SLOTS.release())
        return _Recording(future)

    def _send_moves(self, pass_: _Pass) -> None:
        """Record the filled batch and send its MOVEs."""
        filled, pass_.filled = pass_.filled, None
        if filled is not None:
            pass_.moving.append(self._complete(pass_.session, filled, dry_run=pass_.dry_run))

    def _complete(self, session: QueueSession, filled: _Filled, *, dry_run: bool) -> _InFlight:
        """Record a batch's events and send its MOVEs (nothing of it in a dry run)."""
        uids, decisions = filled.uids, filled.decisions
        if dry_run:
            return _InFlight(uids, unmoved=decisions, done=filled.done, total=filled.total)
        recorded, new_events = self._record(decisions, filled.recording)
        if self.on_recorded is not None:
            # Counted once the store has them, not after the MOVE: a MOVE whose answer is
            # lost files the message on the next pass, where its events are no longer new.
            self.on_recorded(new_events)
        by_outcome: dict[Outcome, list[Decision]] = {}
        for decision in recorded:
            by_outcome.setdefault(decision.outcome, []).append(decision)
        moves = [
            (
                group,
                session.file_later(
                    [d.uid for d in group],
                    OUTCOME_FOLDER[outcome],
                    OUTCOME_KEYWORD.get(outcome),
                    confirm=self._confirm,
                ),
            )
            for outcome, group in by_outcome.items()
        ]
        return _InFlight(
            uids, moves=moves, new_events=new_events, done=filled.done, total=filled.total
        )

    def _finish(self, pass_: _Pass) -> None:
        """Record the filled batch, send its MOVEs and read them: nothing is left in flight."""
        self._send_moves(pass_)
        self._count_moved(pass_, keep=0)

    def _count_moved(self, pass_: _Pass, *, keep: int) -> None:
        """Read the MOVE answers of the batches in flight but the ``keep`` newest; count them."""
        while len(pass_.moving) > keep:
            self._count_batch(pass_, pass_.moving.pop(0))

    def _count_batch(self, pass_: _Pass, in_flight: _InFlight) -> None:
        """Read a batch's MOVE answers, count it and tell the callbacks."""
        if not in_flight.uids:
            return
        decisions = list(in_flight.unmoved)
        if not pass_.dry_run:
            decisions += self._moved(pass_.session, in_flight.moves)
            for uid in in_flight.uids:
                self.first_seen.pop(uid, None)
            for decision in decisions:
                self.attempts.pop(decision.uid, None)
            if self.on_filed is not None:
                self.on_filed(decisions)
        pass_.result.add(decisions)
        pass_.result.new_events += in_flight.new_events
        if pass_.on_batch is not None:
            pass_.on_batch(decisions)
        if pass_.progress is not None:
            pass_.progress(in_flight.done, in_flight.total)

    def events(self, decision: Decision) -> list[TimelineEvent]:
        """The timeline events a decision records: one per linked group (none for Failed)."""
        if decision.outcome not in (Outcome.SENT, Outcome.RECEIVED):
            return []
        assert decision.classification is not None  # noqa: S101 -- linked implies classified
        message = decision.message
        filed_at = self.clock()
        return [
            TimelineEvent.of(
                message, group, decision.classification.direction, self.mailbox.address, filed_at
            )
            for group in decision.groups
        ]

    def _record(
        self, decisions: Sequence[Decision], ahead: _Recording | None = None
    ) -> tuple[list[Decision], int]:
        """Record the batch's events in one transaction; returns what may move, and new events.

        ``ahead``: the recording ``_record_ahead`` started, whose answer is waited for here.
        When the store refuses the batch (not merely unavailable), each message is recorded on
        its own, so that one bad event cannot hold up the queue; a message whose events cannot
        be recorded stays in Queue (logged) and the others go on.
        """
        try:
            if ahead is not None:
                recorded = ahead.result()
            else:
                events = [event for d in decisions for event in self.events(d)]
                if not events:
                    return list(decisions), 0
                recorded = self.store.record_events_checked(events)
            return self._after_recording(decisions, recorded)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            self.log.warning("batch_not_recorded", error=str(exc), messages=len(decisions))
        kept: list[Decision] = []
        new_events = 0
        for decision in decisions:
            own = self.events(decision)
            try:
                recorded = self.store.record_events_checked(own) if own else Recorded()
                decision = self._after_recording([decision], recorded)[0][0]  # noqa: PLW2901 -- a rejection replaces it
                new_events += recorded.new
            except StoreUnavailableError:
                raise
            except StoreError as exc:
                self.log.error("event_not_recorded", uid=decision.uid, error=str(exc))  # noqa: TRY400 -- expected, no traceback
                self._fail(decision.uid, "store", str(exc))
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
            problem = store_rejection(decision, recorded)
            if problem is not None:
                self.log.warning("event_rejected", uid=decision.uid, reason=problem)
                decision = replace(  # noqa: PLW2901 -- the rejected decision replaces it
                    decision,
                    outcome=Outcome.REJECTED,
                    message=replace(decision.message, problem=problem),
                )
            result.append(decision)
        return result, recorded.new

    def _moved(
        self, session: QueueSession, moves: Sequence[tuple[list[Decision], PendingFiling]]
    ) -> list[Decision]:
        """Wait for a batch's MOVEs (one per destination); the decisions whose message moved.

        A MOVE the server refuses (NO/BAD on a live connection) is retried one message at a
        time, so one message the server will not move cannot hold up the others.
        """
        moved: list[Decision] = []
        for group, pending in moves:
            outcome = group[0].outcome
            folder, keyword = OUTCOME_FOLDER[outcome], OUTCOME_KEYWORD.get(outcome)
            try:
                pending.wait()
                moved.extend(group)
                continue
            except ConnectionLostError as exc:
                if exc.gone:
                    raise
                self.log.warning("batch_not_moved", error=str(exc), messages=len(group))
            for decision in group:
                try:
                    session.file([decision.uid], folder, keyword, confirm=self._confirm)
                except ConnectionLostError as exc:
                    if exc.gone:
                        raise
                    self.log.error("message_not_moved", uid=decision.uid, error=str(exc))  # noqa: TRY400 -- expected, no traceback
                    if not _busy(exc):
                        self._fail(decision.uid, "move", str(exc))
                    continue
                moved.append(decision)
        self._log_filed(moved)
        self._index_failed(session, moved)
        return moved

    def _index_failed(self, session: QueueSession, decisions: Sequence[Decision]) -> None:
        """Index the messages just filed to Failed for want of a group (issue 22).

        Their UIDs in Failed come from the MOVEs' COPYUID; without one a message is indexed
        with UNKNOWN_UID and found by a scan of Failed when it is due. An index that cannot
        be written costs the message nothing but coming back by itself: the worker then has
        Failed scanned (``refile_owed``) once the store answers.
        """
        failed = [d for d in decisions if d.outcome is Outcome.NO_GROUP and d.classification]
        if self.index is None or not failed:
            return
        copies = (
            session.copied_to_failed([d.uid for d in failed])
            if isinstance(session, FailedCopies)
            else {}
        )
        entries = [
            FailedEntry(
                *copies.get(d.uid, (UNKNOWN_UID, UNKNOWN_UID)),
                d.message.key,
                d.classification.counterparts,
            )
            for d in failed
            if d.classification is not None
        ]
        try:
            due = self.index.add(
                self.mailbox.address, entries, seen=min(d.links_seen for d in failed)
            )
        except StoreError as exc:
            self.log.warning("failed_not_indexed", messages=len(entries), error=str(exc))
            self.refile_owed = self.index_lost = True
            return
        if due:
            self.refile_owed = True

    def _log_filed(self, decisions: Sequence[Decision]) -> None:
        """One line per destination for linked mail, one per message for Failed.

        A line per linked message cost 11 % of a backlog pass (issue 10 profile); a message
        filed to Failed keeps its own line with the reason, which is what an operator reads.
        """
        linked: dict[Outcome, list[int]] = {}
        for decision in decisions:
            if decision.outcome in (Outcome.SENT, Outcome.RECEIVED):
                linked.setdefault(decision.outcome, []).append(decision.uid)
                continue
            self.log.info(
                "message_filed",
                uid=decision.uid,
                outcome=decision.outcome.value,
                groups=list(decision.groups),
                reason=decision.message.problem,
            )
        for outcome, uids in linked.items():
            self.log.info("messages_filed", outcome=outcome.value, count=len(uids), uids=uids)


@dataclass
class _InFlight:
    """A batch recorded and its MOVEs sent (``moves``), their answers not read yet.

    In a dry run nothing moves: ``unmoved`` holds the decisions. ``done`` and ``total``
    are the pass's progress once this batch is counted.
    """

    uids: Sequence[int]
    moves: list[tuple[list[Decision], PendingFiling]] = field(default_factory=list)
    unmoved: list[Decision] = field(default_factory=list)
    new_events: int = 0
    done: int = 0
    total: int = 0


@dataclass
class _Filled:
    """A batch decided and its texts read: recorded and moved once the next is under way."""

    uids: Sequence[int]
    decisions: list[Decision]
    done: int = 0
    total: int = 0
    recording: _Recording | None = None  # its events' recording, when started ahead


@dataclass(frozen=True)
class _Recording:
    """A batch's ``record_events_checked`` running on a recorder thread."""

    future: Future[Recorded]

    def result(self) -> Recorded:
        """The store's answer, once it came; raises what the store raised."""
        return self.future.result()


_RECORDER_SLOTS = threading.BoundedSemaphore(RECORDER_THREADS)
_recorders_lock = threading.Lock()
_recorder_pool: ThreadPoolExecutor | None = None


def _recorders() -> ThreadPoolExecutor:
    """The recorder threads (started on first use)."""
    global _recorder_pool  # noqa: PLW0603 -- one pool per process, made when first needed
    with _recorders_lock:
        if _recorder_pool is None:
            _recorder_pool = ThreadPoolExecutor(
                max_workers=RECORDER_THREADS, thread_name_prefix="emailsync-record"
            )
        return _recorder_pool


@dataclass
class _Pass:
    """One run_pass's session, result and callbacks, and the batch it has in flight."""

    session: QueueSession
    result: PassResult
    dry_run: bool
    progress: Callable[[int, int], None] | None
    on_batch: BatchCallback | None
    moving: list[_InFlight] = field(default_factory=list)  # MOVEs sent, oldest first
    filled: _Filled | None = None  # the batch whose events are recorded next
    ahead: set[tuple[int, ...]] = field(default_factory=set)  # batches whose headers were sent


def _busy(exc: ConnectionLostError) -> bool:
    """True for a refusal that says the server is busy, which is no message's fault."""
    return response_code(str(exc)) in NOT_THE_MESSAGE
