"""Filing's moves beside MOVE itself: the COPY fallback, pending MOVEs and COPYUID.

On a server without MOVE (RFC 6851) ``copy_then_expunge`` files by COPY + \\Deleted + UID
EXPUNGE, marking the messages with FILING_KEYWORD so that a crash in between never leaves a
second copy, and checking UIDVALIDITY at every re-SELECT so that a replaced folder never has
the wrong messages expunged. ``PendingMove`` is a MOVE sent by ``ImapSession.file_later``;
``copyuid`` reads the COPYUID response code (RFC 4315 §3) of a MOVE answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import imapclient

from emailsync.errors import MailboxError, UidValidityChangedError
from emailsync.imap.pipeline import Command
from emailsync.imap.translate import translated
from emailsync.model import FolderRole

if TYPE_CHECKING:
    from emailsync.imap.session import ImapSession

# Keyword on a Queue message between COPY and EXPUNGE on servers without MOVE (RFC 6851);
# the copy carries it too, so a crash in between can be recognised and not copied twice.
FILING_KEYWORD = "$EmailSyncFiling"


class PendingMove:
    """A MOVE sent by ``ImapSession.file_later``; ``wait()`` reads its answer."""

    def __init__(self, session: ImapSession, role: FolderRole) -> None:
        self._session = session
        self.role = role
        self.command: Command | None = None  # None: nothing in flight (done at once, not sent)
        self.error: MailboxError | None = None

    def wait(self) -> None:
        """Return once the messages moved; raises what ``ImapSession.file`` would have."""
        command, self.command = self.command, None
        if command is not None:
            session = self._session
            try:
                with translated(f"file to {self.role.value}"):
                    session._pipeline.moved(command)
            except MailboxError as exc:
                self.error = exc
            session._note_copies()
        if self.error is not None:
            raise self.error


def copy_then_expunge(
    session: ImapSession, uids: list[int], source: str, dest: str, uidvalidity: int | None
) -> None:
    """COPY + \\Deleted + UID EXPUNGE, without leaving a second copy after a crash.

    Before copying, the Queue messages get FILING_KEYWORD, which COPY carries over. A
    message that already has it was copied by an earlier, interrupted attempt: if its copy
    is in ``dest`` it is not copied again. After EXPUNGE the keyword is taken off the copies.
    ``uidvalidity`` is the source's when ``uids`` were read: every re-SELECT of the source
    checks it, so that a source replaced meanwhile never has the wrong messages expunged.
    """
    if not session.keywords_allowed:
        # Without keywords there is nothing to recognise an earlier copy by.
        session.settle().copy(uids, dest)
        delete_and_expunge(session, uids)
        return
    flags = session.settle().get_flags(uids)
    interrupted = [uid for uid in uids if FILING_KEYWORD.encode() in flags.get(uid, ())]
    # Through the session's method, which a test's session overrides to act in between.
    already_copied = session._copies_in(dest, interrupted) if interrupted else set()
    reselect(session, source, uidvalidity)
    to_copy = [uid for uid in uids if uid not in already_copied]
    if to_copy:
        session.settle().add_flags(to_copy, [FILING_KEYWORD], silent=True)
        session.settle().copy(to_copy, dest)
    delete_and_expunge(session, uids)
    # Take the keyword off the copies; a crash before this only leaves a harmless keyword.
    session.settle().select_folder(dest)
    pending = session.settle().search(["KEYWORD", FILING_KEYWORD])
    if pending:
        session.settle().remove_flags(pending, [FILING_KEYWORD], silent=True)
    # The caller goes on with more UIDs of the source: they must still name the same mail.
    reselect(session, source, uidvalidity)


def reselect(session: ImapSession, folder: str, uidvalidity: int | None) -> None:
    """SELECT a folder again; UidValidityChangedError if its UIDVALIDITY is not the one known.

    RFC 3501 §2.3.1.1: UIDs are only meaningful together with UIDVALIDITY. A folder that
    was deleted and re-created (or renamed away and replaced) between two SELECTs has a new
    one, and the UIDs read before would name other messages; UID EXPUNGE (RFC 4315) of them
    would destroy mail that was never copied.
    """
    info = session.settle().select_folder(folder)
    current = int(info.get(b"UIDVALIDITY", 0))
    if uidvalidity is not None and current != uidvalidity:
        session.log.warning(
            "uidvalidity_changed", folder=folder, expected=uidvalidity, found=current
        )
        raise UidValidityChangedError(f"{folder}: UIDVALIDITY changed to {current}")


def copies_in(session: ImapSession, dest: str, uids: list[int]) -> set[int]:
    """Queue UIDs among ``uids`` with a copy in dest (same Message-ID, size, INTERNALDATE)."""
    wanted_items = [b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]", b"INTERNALDATE", b"RFC822.SIZE"]
    key = b"BODY[HEADER.FIELDS (MESSAGE-ID)]"

    def identity(data: dict[bytes, Any]) -> tuple[bytes, object, int]:
        return (
            bytes(data.get(key) or b"").strip(),
            data.get(b"INTERNALDATE"),
            int(data.get(b"RFC822.SIZE", 0)),
        )

    sources = {uid: identity(d) for uid, d in session.settle().fetch(uids, wanted_items).items()}
    session.settle().select_folder(dest, readonly=True)
    pending = session.settle().search(["KEYWORD", FILING_KEYWORD])
    copies = (
        {identity(d) for d in session.settle().fetch(pending, wanted_items).values()}
        if pending
        else set()
    )
    return {uid for uid, ident in sources.items() if ident in copies}


def delete_and_expunge(session: ImapSession, uids: list[int]) -> None:
    session.settle().add_flags(uids, [imapclient.DELETED], silent=True)
    if session.has("UIDPLUS"):
        session.settle().uid_expunge(uids)  # RFC 4315: only these messages
    else:
        session.settle().expunge()


def copyuid(code: object) -> list[tuple[int, tuple[int, int]]]:
    """``COPYUID uidvalidity source-set dest-set`` as (source UID, (uidvalidity, dest UID)).

    The two sets list the UIDs in the same order (RFC 4315 §3); a range ``a:b`` is taken
    in the order written. Anything unreadable gives nothing (the index then finds the
    message by a scan).
    """
    text = code.decode("ascii", "replace") if isinstance(code, bytes) else str(code)
    parts = text.split()
    if len(parts) != 3 or not parts[0].isdigit():
        return []
    try:
        sources, copies = _uid_list(parts[1]), _uid_list(parts[2])
    except ValueError:
        return []
    if len(sources) != len(copies):
        return []
    validity = int(parts[0])
    return [(source, (validity, copy)) for source, copy in zip(sources, copies, strict=True)]


def _uid_list(text: str) -> list[int]:
    """An RFC 3501 §9 uid-set of a COPYUID, expanded in the order written."""
    uids: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition(":")
        start, end = int(first), int(last or first)
        step = 1 if end >= start else -1
        uids.extend(range(start, end + step, step))
    return uids
