"""Failed mail comes back by itself when its group appears (issue 22): the re-file pass.

A mailbox's owner runs it on its own connection, between IDLEs, when the Failed-for-no-group
index (``emailsync.state.failedindex``) says some of its messages are due: a link change of
one of their counterpart addresses. Only those UIDs are fetched from Failed; a mailbox with
nothing due costs no IMAP command. The rules are the sync pass's (``emailsync.filing.queuepass``):
the same classification and lookup, the same events, and the same order — record
(idempotent on group and message key), then move to Sent or Received, taking
``$EmailSyncNoGroup`` off on the way — so a crash anywhere leaves the message in Failed,
still indexed and due, and the next pass records nothing new and moves it once.

What a pass does with each due message:

- gone from Failed (moved or deleted by someone), or carrying ``$EmailSyncRejected`` or
  ``$EmailSyncUnparseable``: dropped from the index, left alone;
- still no group: stays, no longer due for the changes looked at (``settle``);
- linked: events recorded, moved; a message the store rejects, or whose body cannot be
  parsed, stays in Failed with that keyword instead of ``$EmailSyncNoGroup``.

A Failed folder the index does not cover (never scanned, its UIDVALIDITY changed, messages
filed there without COPYUID, or index writes lost) is scanned first: ``SEARCH KEYWORD
$EmailSyncNoGroup``, every such message looked at as above and indexed anew.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Protocol

import structlog

from emailsync.errors import ConnectionLostError, StoreError, StoreUnavailableError
from emailsync.filing.decision import Decision, fill_body, store_rejection
from emailsync.filing.queuepass import Filer
from emailsync.filing.sessions import FolderSession
from emailsync.mail.message import parse_headers
from emailsync.model import (
    OUTCOME_FOLDER,
    OUTCOME_KEYWORD,
    FetchedMessage,
    FolderRole,
    Outcome,
)
from emailsync.state.base import LeaseBound
from emailsync.state.failedindex import UNKNOWN_UID, FailedEntry, FailedIndex

log = structlog.get_logger(__name__)

NO_GROUP_KEYWORD = OUTCOME_KEYWORD[Outcome.NO_GROUP]
# Failed mail a person or the store has ruled on: never re-filed by a link change.
LEFT_ALONE = frozenset({OUTCOME_KEYWORD[Outcome.REJECTED], OUTCOME_KEYWORD[Outcome.UNPARSEABLE]})
# Messages a pass re-files at most before the mailbox goes back to its Queue (config:
# refile_per_pass); the rest wait for the next pass, which follows at once.
REFILE_PER_PASS = 500
# The log's trigger for a pass that scanned Failed to (re)build the index.
SCAN = "scan"


class FailedSession(FolderSession, Protocol):
    """What a re-file pass needs of a connection (``ImapSession``)."""

    def failed_status(self) -> tuple[int, int]:
        """Failed's UIDVALIDITY and message count, without selecting it (STATUS)."""
        ...

    def select_failed(self) -> tuple[int, int]:
        """SELECT Failed; its UIDVALIDITY and message count."""
        ...

    def refile(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> None:
        """Move messages from Failed to a folder, taking ``keyword`` off first."""
        ...


RefiledCallback = Callable[[Sequence[Decision], str], None]


@dataclass
class RefileResult:
    """What one re-file pass did; ``trigger`` None: nothing was due (no IMAP command)."""

    trigger: str | None = None
    filed: list[Decision] = field(default_factory=list)
    looked_at: int = 0
    more: bool = False  # due messages left for the next pass
    lag_seconds: float | None = None  # from the link change to the last move


@dataclass(eq=False)
class Refiler:
    """Re-files one mailbox's due Failed mail with its filer's rules and store."""

    filer: Filer
    index: FailedIndex
    _: KW_ONLY
    per_pass: int = REFILE_PER_PASS
    on_refiled: RefiledCallback | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.address = self.filer.mailbox.address
        self.log = log.bind(mailbox=self.address)
        store = self.filer.store
        self._confirm = store.check_lease if isinstance(store, LeaseBound) else None

    def run(self, session: FailedSession, *, stopping: Callable[[], bool] = bool) -> RefileResult:
        """Re-file the mailbox's due messages (scanning Failed first where the index asks).

        Leaves Failed selected when it did anything: the caller selects Queue again.
        Raises what the filer's pass would (StoreUnavailableError, ConnectionLostError…).
        """
        folder = self.index.folder(self.address)
        due = self.index.due(self.address, self.per_pass + 1)
        result = RefileResult(more=len(due) > self.per_pass)
        due = due[: self.per_pass]
        scan = folder is None or self.filer.index_lost or any(d.uid == UNKNOWN_UID for d in due)
        if not due and not scan:
            return result
        if scan and not due and folder is None:
            # A mailbox never indexed (every mailbox at its first start): an empty Failed is
            # indexed from a STATUS, so starting 2,000 mailboxes costs no SELECT of Failed.
            uidvalidity, messages = session.failed_status()
            if messages == 0:
                self.filer.index_lost = False
                self.index.finish_scan(self.address, uidvalidity, set())
                return result
        uidvalidity, exists = session.select_failed()
        if folder is not None and folder != uidvalidity:
            self.log.info("failed_folder_changed", uidvalidity=uidvalidity, indexed=folder)
            scan = True
        if scan:
            self.filer.index_lost = False
            result.trigger = SCAN
            candidates = session.keyword_uids(NO_GROUP_KEYWORD) if exists else []
            result.more = False
        else:
            newest = max(due, key=lambda d: d.change)
            result.trigger = newest.trigger
            candidates = sorted({d.uid for d in due if d.uidvalidity == uidvalidity})
            stale = sorted({d.uid for d in due if d.uidvalidity != uidvalidity})
            if stale:
                self.index.drop(self.address, folder or 0, stale)
        changed_at = [d.changed_at for d in due if d.changed_at is not None]
        present: set[int] = set()
        batch = max(1, self.filer.batch_size)
        for start in range(0, len(candidates), batch):
            if stopping():
                result.more = True
                break
            chunk = candidates[start : start + batch]
            present |= self._batch(session, uidvalidity, chunk, result)
        else:
            if scan:
                self.index.finish_scan(self.address, uidvalidity, present)
        if result.filed and changed_at:
            result.lag_seconds = max(0.0, self.clock() - min(changed_at))
        self._log(result, scanned=len(candidates) if scan else None)
        return result

    def _batch(
        self,
        session: FailedSession,
        uidvalidity: int,
        uids: Sequence[int],
        result: RefileResult,
    ) -> set[int]:
        """Look at one batch of Failed UIDs; returns those still in Failed for want of a group.

        Whatever became of them, they are no longer due for the changes up to the lookup's
        (``settle``): one the server or the store refused waits for the next change, instead
        of being tried again on every pass.
        """
        upto = self.index.watermark()  # every change up to here is in the lookup below
        waiting = self._look_at(session, uidvalidity, uids, result, upto)
        self.index.settle(self.address, uidvalidity, uids, upto)
        return waiting

    def _look_at(
        self,
        session: FailedSession,
        uidvalidity: int,
        uids: Sequence[int],
        result: RefileResult,
        upto: int,
    ) -> set[int]:
        """Fetch, decide, record and move one batch (see ``_batch``)."""
        try:
            headers = session.fetch_headers(uids)
        except ConnectionLostError as exc:
            if exc.gone:
                raise
            # The server will not give these now: they wait for the next change.
            self.log.warning("refile_not_fetched", uids=list(uids), error=str(exc))
            return set(uids)
        result.looked_at += len(headers)
        here = {f.uid for f in headers}
        alone = {f.uid for f in headers if LEFT_ALONE.intersection(f.flags)}
        self.index.drop(self.address, uidvalidity, (set(uids) - here) | alone)
        fetched = [f for f in headers if f.uid not in alone]
        if not fetched:
            return set()
        parsed = [
            parse_headers(f.uid, f.data, internaldate=f.internaldate, size=f.size) for f in fetched
        ]
        decisions = self.filer.decide(parsed)
        unlinked = [d for d in decisions if d.outcome is Outcome.NO_GROUP]
        waiting = {d.uid for d in unlinked}
        if unlinked:
            self.index.add(
                self.address,
                [
                    FailedEntry(uidvalidity, d.uid, d.message.key, d.classification.counterparts)
                    for d in unlinked
                    if d.classification is not None
                ],
                seen=upto,
            )
        linked = [d for d in decisions if d.groups]
        rejected = [d for d in decisions if d.outcome is Outcome.UNPARSEABLE]
        if linked:
            filed, refused = self._record(session, linked, fetched)
            rejected += refused
            self._move(session, uidvalidity, filed, result)
        for decision in rejected:
            self._rule_out(session, uidvalidity, decision)
        return waiting

    def _record(
        self,
        session: FailedSession,
        linked: Sequence[Decision],
        headers: Sequence[FetchedMessage],
    ) -> tuple[list[Decision], list[Decision]]:
        """Fetch the texts and record the events; (to move, to keep in Failed as ruled out)."""
        sizes = {f.uid: f.size for f in headers}
        plans = {f.uid: f.plan for f in headers}
        blocks = {f.uid: f.data for f in headers}
        full = {f.uid: f for f in session.fetch_full([d.uid for d in linked], sizes, plans)}
        filled = [
            d
            for d in (fill_body(d, full.get(d.uid), blocks.get(d.uid, b"")) for d in linked)
            if d is not None
        ]
        ruled_out = [d for d in filled if not d.groups]
        ready = [d for d in filled if d.groups]
        events = [event for d in ready for event in self.filer.events(d)]
        if not events:
            return [], ruled_out
        try:
            recorded = self.filer.store.record_events_checked(events)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            # Refused for good, not rejected per event: they stay in Failed, no longer due,
            # until the next change, rather than being tried on every pass.
            self.log.warning("refile_not_recorded", uids=[d.uid for d in ready], error=str(exc))
            return [], ruled_out
        if self.filer.on_recorded is not None:
            self.filer.on_recorded(recorded.new)
        filed: list[Decision] = []
        for decision in ready:
            problem = store_rejection(decision, recorded)
            if problem is not None:
                self.log.warning("event_rejected", uid=decision.uid, reason=problem)
                ruled_out.append(_rejected(decision, problem))
            else:
                filed.append(decision)
        return filed, ruled_out

    def _move(
        self,
        session: FailedSession,
        uidvalidity: int,
        decisions: Sequence[Decision],
        result: RefileResult,
    ) -> None:
        """Move recorded messages to Sent or Received (keyword off), then drop them."""
        by_folder: dict[FolderRole, list[Decision]] = {}
        for decision in decisions:
            by_folder.setdefault(OUTCOME_FOLDER[decision.outcome], []).append(decision)
        for role, group in by_folder.items():
            uids = [d.uid for d in group]
            try:
                session.refile(uids, role, NO_GROUP_KEYWORD, confirm=self._confirm)
            except ConnectionLostError as exc:
                if exc.gone:
                    raise
                self.log.warning("refile_not_moved", uids=uids, error=str(exc))
                continue
            self.index.drop(self.address, uidvalidity, uids)
            result.filed.extend(group)
            if self.on_refiled is not None:
                self.on_refiled(group, result.trigger or SCAN)

    def _rule_out(self, session: FailedSession, uidvalidity: int, decision: Decision) -> None:
        """Keep a message in Failed with the reason it cannot be filed, out of the index."""
        keyword = OUTCOME_KEYWORD[decision.outcome]
        try:
            session.set_keyword([decision.uid], keyword, on=True)
            session.set_keyword([decision.uid], NO_GROUP_KEYWORD, on=False)
        except ConnectionLostError as exc:
            if exc.gone:
                raise
            self.log.warning("refile_keyword_refused", uid=decision.uid, error=str(exc))
        self.index.drop(self.address, uidvalidity, [decision.uid])
        self.log.info(
            "message_kept_in_failed",
            uid=decision.uid,
            outcome=decision.outcome.value,
            reason=decision.message.problem,
        )

    def _log(self, result: RefileResult, *, scanned: int | None) -> None:
        if result.trigger is None:
            return
        self.log.info(
            "messages_refiled",
            trigger=result.trigger,
            count=len(result.filed),
            looked_at=result.looked_at,
            uids=[d.uid for d in result.filed],
            scanned=scanned,
            more=result.more,
            lag_seconds=None if result.lag_seconds is None else round(result.lag_seconds, 3),
        )


def _rejected(decision: Decision, problem: str) -> Decision:
    """The decision of a message the store rejected: it stays in Failed with the reason."""
    return replace(
        decision,
        outcome=Outcome.REJECTED,
        groups=(),
        message=replace(decision.message, problem=problem),
    )
