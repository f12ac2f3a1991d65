"""The self-service registrar alone: a real state database (SQLite and PostgreSQL), the worker
lifecycle a recording stand-in (``Workers``). What it acts on when the registry's rows change,
and Stop Email Sync as rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.config import MailboxSettings, Settings, load_settings
from emailsync.runtime.registrar import MailboxRegistrar
from emailsync.runtime.throttle import LoginThrottle
from emailsync.runtime.worker import WorkerStatus
from emailsync.state.base import RegisteredBranch, RegisteredMailbox
from emailsync.state.legacystop import stopped_marker
from emailsync.state.postgres import PostgresStore
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import Vault

CONFIGURED = "agent1@example.com"
REGISTERED = "self@example.com"


def write_settings(tmp_path: Path) -> Settings:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / CONFIGURED).write_text("pw\n")
    path = tmp_path / "emailsync.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        '[branches.b0]\nhost = "127.0.0.1"\nport = 1\nsecurity = "none"\nallow_insecure = true\n'
        f'[[mailboxes]]\naddress = "{CONFIGURED}"\nbranch = "b0"\n'
        f'password_file = "secrets/{CONFIGURED}"\n',
        encoding="utf-8",
    )
    return load_settings(path)


class Workers:
    """The worker lifecycle, recording what the registrar asks of it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls: list[tuple[str, str]] = []

    def replace_worker(self, mailbox: MailboxSettings) -> bool:
        self.calls.append(("replace", mailbox.address))
        return True

    def queue_worker(self, mailbox: MailboxSettings) -> bool:
        self.calls.append(("queue", mailbox.address))
        return True

    def end_worker(self, address: str, *, forget: bool, wait: bool) -> None:
        self.calls.append(("forget" if forget else "end", address))

    def mark_stopped(self, mailbox: MailboxSettings) -> None:
        self.calls.append(("stopped", mailbox.address))

    def stop_configured(self, mailbox: MailboxSettings) -> None:
        self.calls.append(("stop_configured", mailbox.address))

    def resume_configured(self, mailbox: MailboxSettings) -> None:
        self.calls.append(("resume_configured", mailbox.address))

    def status_of(self, address: str) -> WorkerStatus | None:
        return WorkerStatus(address, "idle", "auto")

    def recent_outcomes(self, address: str) -> list[dict[str, str | None]]:
        return []


@pytest.fixture(params=["sqlite", "postgres"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStore | PostgresStore]:
    opened: SqliteStore | PostgresStore = (
        SqliteStore(tmp_path / "state" / "emailsync.db")
        if request.param == "sqlite"
        else PostgresStore(request.getfixturevalue("pg_url"))
    )
    yield opened
    opened.close()


def registrar_on(
    state: SqliteStore | PostgresStore, settings: Settings
) -> tuple[MailboxRegistrar, Workers]:
    workers = Workers(settings)
    vault = Vault(settings.daemon.state_dir)
    registrar = MailboxRegistrar(
        workers,
        state,
        vault,
        LoginThrottle(),
        lambda mailbox, settings: None,  # type: ignore[arg-type,return-value]
    )
    return registrar, workers


def register(state: SqliteStore | PostgresStore, *, secret: bytes | None = b"sealed") -> None:
    state.put_mailbox(
        RegisteredMailbox(REGISTERED, "high", "password", REGISTERED, secret is not None, False),
        secret,
    )


def test_a_change_is_acted_on_once_however_often_it_is_announced(
    state: SqliteStore | PostgresStore, tmp_path: Path
) -> None:
    """Another instance's set-up (a new row): the worker is (re)started once, not again for
    the same row read again (an instance's own notification, a heartbeat's read); a new
    set-up restarts it; a branch change restarts it with the new server; the row gone ends
    it and forgets it."""
    registrar, workers = registrar_on(state, write_settings(tmp_path))
    state.put_branch(RegisteredBranch("high", "imap.example.com", 993, "ssl"))
    registrar.load()
    assert workers.calls == []
    register(state)
    for _ in range(3):
        registrar.refresh(REGISTERED)
    registrar.refresh_all()
    assert workers.calls == [("replace", REGISTERED)]
    register(state)  # set up again: a new row, the same settings
    registrar.refresh(REGISTERED)
    state.put_branch(RegisteredBranch("high", "imap2.example.com", 993, "ssl"))
    registrar.refresh("")  # a branch: everything
    assert registrar.registered[REGISTERED].server.host == "imap2.example.com"
    state.remove_mailbox(REGISTERED)
    registrar.refresh(REGISTERED)
    registrar.refresh(REGISTERED)
    assert workers.calls == [("replace", REGISTERED)] * 3 + [("forget", REGISTERED)]
    assert registrar.registered == {}
    assert registrar.wanted() == [CONFIGURED]


def test_a_registered_mailbox_without_its_password_is_shown_stopped_and_not_shared(
    state: SqliteStore | PostgresStore, tmp_path: Path
) -> None:
    registrar, workers = registrar_on(state, write_settings(tmp_path))
    state.put_branch(RegisteredBranch("high", "imap.example.com", 993, "ssl"))
    register(state, secret=None)
    registrar.load()
    assert workers.calls == [("end", REGISTERED), ("stopped", REGISTERED)]
    assert registrar.wanted() == [CONFIGURED]
    register(state)
    assert sorted(registrar.wanted()) == [CONFIGURED, REGISTERED]  # the heartbeat's read
    assert workers.calls[-1] == ("replace", REGISTERED)


def test_a_stop_recorded_anywhere_stops_the_configured_mailbox_here_and_a_start_resumes_it(
    state: SqliteStore | PostgresStore, tmp_path: Path
) -> None:
    settings = write_settings(tmp_path)
    here, workers = registrar_on(state, settings)
    elsewhere, _ = registrar_on(state, settings)
    here.load()
    elsewhere.record_stop(CONFIGURED)
    assert state.is_stopped(CONFIGURED)
    here.refresh(CONFIGURED)
    here.refresh(CONFIGURED)
    assert here.is_stopped(CONFIGURED)
    assert here.wanted() == []
    elsewhere.clear_stop(CONFIGURED)
    here.refresh(CONFIGURED)
    assert workers.calls == [("stop_configured", CONFIGURED), ("resume_configured", CONFIGURED)]
    assert here.wanted() == [CONFIGURED]


def test_an_older_versions_stop_marker_becomes_a_row_once(
    state: SqliteStore | PostgresStore, tmp_path: Path
) -> None:
    """Upgrading: the marker file of a stopped mailbox is read as a stop, recorded in the
    state database (every instance, every restart) and removed."""
    settings = write_settings(tmp_path)
    marker = stopped_marker(settings, CONFIGURED)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    registrar, _ = registrar_on(state, settings)
    registrar.load()
    assert registrar.is_stopped(CONFIGURED)
    assert state.stopped_mailboxes() == {CONFIGURED}
    assert not marker.exists()
    again, _ = registrar_on(state, settings)
    again.load()
    assert again.is_stopped(CONFIGURED)
