"""The scratch folder the IDLE probe needs: its name, making and deleting it, leftovers.

Its name is ``emailsync-doctor-<UTC start>-<random>``; each run deletes the ones earlier runs
left (SIGKILL, a lost connection) and leaves alone any young enough to be in use.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime

from emailsync.errors import MailboxError
from emailsync.imap.session import ImapSession
from emailsync.imap.translate import translated
from emailsync.ops.doctor.finding import NOTE, PROBLEM, Finding, duration
from emailsync.ops.doctor.stop import Stopped

SCRATCH_PREFIX = "emailsync-doctor-"
# A run lasts at most a few timeouts plus --idle-timeout (75 s) and two fast probes: a scratch
# folder older than this belongs to no running doctor and is removed; a younger one is reported.
SCRATCH_STALE_SECONDS = 15 * 60
_SCRATCH_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# Names without a time are an earlier version's (emailsync-doctor-<8 hex>).
_SCRATCH_LEAF = re.compile(
    re.escape(SCRATCH_PREFIX) + r"(?:(?P<started>\d{8}T\d{6}Z)-[0-9a-f]+|[0-9a-f]{8})"
)


def scratch_leaf(now: datetime) -> str:
    """A new scratch folder's own name: the fixed prefix, the UTC start time and random hex."""
    return f"{SCRATCH_PREFIX}{now.astimezone(UTC):{_SCRATCH_TIME_FORMAT}}-{secrets.token_hex(2)}"


def sort_scratch_folders(
    names: Sequence[str], delimiter: str, *, now: datetime
) -> tuple[list[str], list[str]]:
    """Doctor's scratch folders among ``names``: (left by earlier runs, maybe still in use).

    A folder younger than SCRATCH_STALE_SECONDS may belong to a doctor running right now.
    """
    stale: list[str] = []
    live: list[str] = []
    for name in names:
        leaf = name.rsplit(delimiter, 1)[-1] if delimiter else name
        match = _SCRATCH_LEAF.fullmatch(leaf)
        if match is None:
            continue
        started = match.group("started")
        age = (
            (now - datetime.strptime(started, _SCRATCH_TIME_FORMAT).replace(tzinfo=UTC))
            if started
            else None
        )
        if age is None or age.total_seconds() > SCRATCH_STALE_SECONDS:
            stale.append(name)
        else:
            live.append(name)
    return stale, live


def leftovers_finding(
    removed: Sequence[str], live: Sequence[str], failed: Mapping[str, str]
) -> Finding:
    """The line about scratch folders of other doctor runs found at the start of this one."""
    parts = []
    if removed:
        plural = "s from earlier runs" if len(removed) > 1 else " from an earlier run"
        parts.append(
            f"removed {len(removed)} leftover scratch folder{plural}: {', '.join(removed)}"
        )
    if failed:
        parts.append(
            "could not remove " + ", ".join(f"{name} ({error})" for name, error in failed.items())
        )
    if live:
        parts.append(
            f"left alone (made in the last {duration(SCRATCH_STALE_SECONDS)}, maybe by a "
            f"doctor running now): {', '.join(live)}"
        )
    detail = "; ".join(parts)
    if failed:
        return Finding(
            "leftovers",
            PROBLEM,
            detail,
            f"delete {', '.join(failed)} in a mail client (they hold only doctor's probes)",
        )
    if removed:
        fix = (
            "nothing left to do: only a doctor killed with SIGKILL or cut off from the server "
            "leaves one (Ctrl-C and SIGTERM remove it)"
        )
    else:
        fix = (
            "nothing to do while another doctor runs; if none does, the next run after "
            f"{duration(SCRATCH_STALE_SECONDS)} removes it"
        )
    return Finding("leftovers", NOTE, detail, fix)


def stopped_finding(
    signum: int, address: str, scratch: Sequence[str], error: str | None
) -> Finding:
    """The last line when SIGTERM or SIGINT stopped doctor: was its scratch folder removed?"""
    name = signal.Signals(signum).name
    if error is not None:
        return Finding(
            "interrupted",
            PROBLEM,
            f"stopped by {name}; the scratch folder {', '.join(scratch)} could not be removed: "
            f"{error}",
            f"delete it in a mail client, or run emailsync doctor {address} again after "
            f"{duration(SCRATCH_STALE_SECONDS)}: it removes leftovers",
        )
    done = (
        f"removed the scratch folder {', '.join(scratch)}"
        if scratch
        else "no scratch folder had been made"
    )
    return Finding(
        "interrupted",
        PROBLEM,
        f"stopped by {name} before the checks finished; {done}",
        f"run emailsync doctor {address} again to finish the checks",
    )


def delete_if_there(session: ImapSession, name: str) -> None:
    """DELETE a folder (RFC 3501 §6.3.4) unless it is already gone."""
    with translated(f"delete {name}"):
        if session.client.folder_exists(name):
            session.client.delete_folder(name)


@contextlib.contextmanager
def scratch_folder(session: ImapSession, name: str) -> Iterator[bool | None]:
    """Create and SELECT a scratch folder; yields whether keywords are allowed; deletes it.

    After a stop signal nothing more is said on this connection; doctor deletes the folder
    from a fresh one.
    """
    client = session.client
    with translated("create scratch folder"):
        client.create_folder(name)
    try:
        with translated("select scratch folder"):
            info = client.select_folder(name)
        # RFC 3501 §7.1: \* in PERMANENTFLAGS means new keywords may be stored.
        yield b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
    except Stopped:
        raise
    except BaseException:
        _close_and_delete(session, name)
        raise
    _close_and_delete(session, name)


def _close_and_delete(session: ImapSession, name: str) -> None:
    client = session.client
    # CLOSE (RFC 3501 §6.4.2) rather than UNSELECT, which not every server has.
    with contextlib.suppress(MailboxError), translated("close scratch folder"):
        client.close_folder()
    with translated("delete scratch folder"):
        client.delete_folder(name)
