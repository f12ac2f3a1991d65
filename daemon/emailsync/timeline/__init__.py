"""The timeline: where groups come from and events go.

Either the built-in tables of the state database (``emailsync.state``: the state database is
itself a ``Store``) or a CRM over signed HTTP (``emailsync.timeline.crm``), which keeps its own
state (the Failed-for-no-group index) in the state database it is given.

May import: ``emailsync.state`` and everything below it (config, telemetry, mail, model,
errors). Imported by filing, cluster, runtime, service and the command line.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from emailsync.config import CrmSettings
from emailsync.state import POSTGRES_SCHEMES, StateStore, Store, open_state, sqlite_path

__all__ = ["open_store", "open_timeline"]


def open_timeline(state: StateStore, crm: CrmSettings | None) -> Store:
    """The timeline over an open state database: its own tables, or the CRM of ``[crm]``.

    The CRM's store keeps its state (the Failed-for-no-group index) in ``state``; closing it
    leaves ``state`` open for its owner. ``ConfigError`` for an unreadable CRM secret.
    """
    if crm is None:
        return state
    from emailsync.timeline.crm.store import HttpStore  # noqa: PLC0415 -- loaded only with a [crm]

    return HttpStore(crm, state=state)


def open_store(url: str, state_dir: Path, crm: CrmSettings | None = None) -> Store:
    """The timeline for one-off use (the CLI's commands, tests): closing it closes everything.

    Without a ``[crm]`` that is the state database of ``url`` itself (``open_state``). With
    one, the CRM, keeping its state in the database of ``url`` (a SQLite file is opened when
    first needed).
    """
    if crm is None:
        return open_state(url, state_dir)
    from emailsync.timeline.crm.store import HttpStore  # noqa: PLC0415 -- loaded only with a [crm]

    if urlsplit(url.strip()).scheme.lower() in POSTGRES_SCHEMES:
        return HttpStore(crm, state=open_state(url, state_dir), owns_state=True)
    return HttpStore(crm, state_path=sqlite_path(url, state_dir))
