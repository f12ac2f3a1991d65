"""Stop markers of older versions: files in ``state_dir/stopped`` that held a mailbox stopped.

Stop Email Sync is a row of the state database now (``mailbox_stops``); a marker found at
start is recorded there once (``emailsync.runtime.registrar``, ``emailsync stop``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from emailsync.config import Settings


def stopped_marker(settings: Settings, address: str) -> Path:
    """The file by which an older version marked a mailbox stopped (``take_legacy_stop``).

    Named by a SHA-256 of the address, never by the address itself: an RFC 5321 local part
    may hold ``/`` (and a quoted one ``../``), and a path built from it could leave
    ``state_dir``. A marker from an older version (named by the address) is renamed here when
    its name is one safe path component.
    """
    directory = settings.daemon.state_dir / "stopped"
    marker = directory / hashlib.sha256(address.encode("utf-8")).hexdigest()
    if _is_plain_file_name(address):
        legacy = directory / address
        if legacy.is_file() and not marker.exists():
            legacy.rename(marker)
    return marker


def take_legacy_stop(settings: Settings, address: str, *, remove: bool) -> bool:
    """Whether a stop marker file of an older version holds the mailbox stopped.

    Stop Email Sync is a row of the state database now (``mailbox_stops``), seen by every
    instance; a marker found at start is recorded there once, then ``remove`` deletes it.
    """
    marker = stopped_marker(settings, address)
    found = marker.is_file()
    if remove:
        marker.unlink(missing_ok=True)
    return found


def _is_plain_file_name(name: str) -> bool:
    return name not in (".", "..") and "/" not in name and "\0" not in name
