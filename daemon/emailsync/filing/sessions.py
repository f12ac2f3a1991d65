"""What a filing pass needs of a connection, as protocols: ``filing`` imports no IMAP library.

``ImapSession`` (emailsync.imap.session) is the one implementation; tests use fakes. A
``FolderSession`` reads and marks the selected folder, a ``QueueSession`` also lists and moves
the Queue's messages; ``FailedCopies`` and ``SendsAhead`` are what a session may do besides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from emailsync.model import BodyPlan, FetchedMessage, FolderRole


class FolderSession(Protocol):
    """What a pass reads and marks in the selected folder: Queue, or Failed for a re-file."""

    def keyword_uids(self, keyword: str) -> list[int]:
        """UIDs in the selected folder that carry a keyword."""
        ...

    def set_keyword(self, uids: Sequence[int], keyword: str, *, on: bool) -> bool:
        """Set or clear a keyword in the selected folder."""
        ...

    def fetch_headers(self, uids: Sequence[int]) -> list[FetchedMessage]:
        """Header blocks, flags and body plans of messages of the selected folder."""
        ...

    def fetch_full(
        self,
        uids: Sequence[int],
        sizes: dict[int, int] | None = None,
        plans: Mapping[int, BodyPlan | None] | None = None,
    ) -> list[FetchedMessage]:
        """What events need of these messages' bodies."""
        ...


class QueueSession(FolderSession, Protocol):
    """What a pass needs from a connection: the Queue's messages and a way to move them."""

    uidvalidity: int | None  # the Queue's, from the last SELECT (RFC 3501 §2.3.1.1)

    def select_queue(self) -> int: ...

    def queue_uids(self) -> list[int]: ...

    def prefetch_headers(self, uids: Sequence[int]) -> None: ...

    def file(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str | None = None,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> None: ...

    def file_later(
        self,
        uids: Sequence[int],
        role: FolderRole,
        keyword: str | None = None,
        *,
        confirm: Callable[[], None] | None = None,
    ) -> PendingFiling: ...


@runtime_checkable
class FailedCopies(Protocol):
    """A session that can say where in Failed the messages it filed there went (COPYUID)."""

    def copied_to_failed(self, uids: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Of these Queue UIDs filed to Failed, each copy's (UIDVALIDITY, UID) there."""
        ...


@runtime_checkable
class SendsAhead(Protocol):
    """A session that can send a batch's body FETCHes before they are read (imap/pipeline.py)."""

    def prefetch_full(
        self,
        uids: Sequence[int],
        sizes: dict[int, int] | None = None,
        plans: Mapping[int, BodyPlan | None] | None = None,
    ) -> None:
        """Send what ``fetch_full(uids, …)`` reads, now; never raises."""
        ...


class PendingFiling(Protocol):
    """A move started by ``QueueSession.file_later``; never raises until waited for."""

    def wait(self) -> None:
        """Return once the messages moved; raises what ``QueueSession.file`` would."""
        ...
