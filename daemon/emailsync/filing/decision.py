"""What a pass decides for each message, and what it counts: ``Decision``, ``PassResult``.

Pure functions over parsed messages and the store's answers; no connection, no thread.
``fill_body`` gives a linked decision its text from a body fetch, ``landed_at`` estimates when
a message landed in Queue (the filing-latency histogram), ``groups_by_address`` and
``linked_groups`` turn a batch's group lookup into each message's groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from emailsync.mail.message import evolved, parse_message, with_body
from emailsync.model import (
    OUTCOME_FOLDER,
    Classification,
    FetchedMessage,
    FolderRole,
    Group,
    Outcome,
    QueuedMessage,
)
from emailsync.state.base import Recorded

SAVEDATE_RESOLUTION = timedelta(seconds=1)  # RFC 8514 SAVEDATE is a date-time to the second


@dataclass(frozen=True)
class Decision:
    """What the pass decided for one message, and why."""

    uid: int
    outcome: Outcome
    message: QueuedMessage
    classification: Classification | None = None
    groups: tuple[str, ...] = ()
    queued_at: datetime | None = None  # when it landed in Queue (for filing latency)
    # The newest link change (emailsync.state.failedindex) before its groups were looked up.
    links_seen: int = 0

    @property
    def destination(self) -> FolderRole:
        """The folder the message goes to."""
        return OUTCOME_FOLDER[self.outcome]


@dataclass
class PassResult:
    """How many messages one pass decided per outcome, and the new timeline events it recorded.

    Counts only: a pass over a backlog of 10,000 messages must not keep 10,000 decisions
    (with their bodies) alive until it ends (issue 10). Whoever needs the decisions
    themselves takes each batch's from ``run_pass(on_batch=…)``.
    """

    counts: dict[Outcome, int] = field(default_factory=dict)
    new_events: int = 0

    @property
    def messages(self) -> int:
        """How many messages the pass decided (filed, or would file in a dry run)."""
        return sum(self.counts.values())

    def count(self, outcome: Outcome) -> int:
        """How many messages had this outcome."""
        return self.counts.get(outcome, 0)

    def add(self, decisions: Iterable[Decision]) -> None:
        """Count a batch's decisions."""
        for decision in decisions:
            self.counts[decision.outcome] = self.counts.get(decision.outcome, 0) + 1


FiledCallback = Callable[[Sequence[Decision]], None]
RecordedCallback = Callable[[int], None]
BatchCallback = Callable[[Sequence[Decision]], None]


def store_rejection(decision: Decision, recorded: Recorded) -> str | None:
    """Why the store refused any of this decision's events (its reasons, once each), or None."""
    reasons = [
        reason
        for group in decision.groups
        if (reason := recorded.rejected.get((group, decision.message.key))) is not None
    ]
    return "rejected by the store: " + "; ".join(dict.fromkeys(reasons)) if reasons else None


def fill_body(
    decision: Decision, fetched: FetchedMessage | None, header_block: bytes
) -> Decision | None:
    """A linked decision with its message's text from a body fetch; None if it was gone.

    A message whose whole-message fetch cannot be parsed becomes UNPARSEABLE (no groups).
    Decisions without groups come back as they are.
    """
    if not decision.groups:
        return decision
    if fetched is None:
        return None  # gone between the header and body fetches (another client moved it)
    if fetched.plan is not None:
        # Fetched by its structure: the headers were parsed already, only the text is new.
        body = with_body(
            decision.message,
            fetched.plan,
            fetched.sections,
            header_block,
            fetched.sections_cut,
        )
        return evolved(decision, message=body)
    message = parse_message(
        fetched.uid,
        fetched.data,
        internaldate=fetched.internaldate,
        size=fetched.size,
        prefix=fetched.prefix,
    )
    if not message.usable:
        return replace(decision, outcome=Outcome.UNPARSEABLE, message=message, groups=())
    return evolved(decision, message=message)


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


def groups_by_address(groups: Iterable[Group]) -> dict[str, list[str]]:
    by_address: dict[str, list[str]] = {}
    for group in groups:
        for address in group.addresses:
            by_address.setdefault(address, []).append(group.ref)
    return by_address


def linked_groups(counterparts: Iterable[str], by_address: dict[str, list[str]]) -> tuple[str, ...]:
    linked: dict[str, None] = {}
    for address in counterparts:
        for name in by_address.get(address, ()):
            linked[name] = None
    return tuple(linked)
