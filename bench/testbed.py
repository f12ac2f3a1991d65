"""What a benchmark runs against: one throwaway Dovecot, fresh mailboxes, their configs and stores.

Each ``BenchMailbox`` is a new Dovecot user with the folder tree created and subscribed by
emailsync itself, a config file written the way an operator would, and a state database
holding the run's groups: a SQLite file, or (``state="postgresql"``) a fresh database in a
throwaway PostgreSQL cluster (``emailsync.dev.postgres``). Everything lives in one temporary
directory that ``close()`` removes.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imapclient
from corpus import BenchMessage, Directory

from emailsync.config import Settings, load_settings
from emailsync.dev.dovecot import Dovecot
from emailsync.dev.postgres import Postgres
from emailsync.imap.auth import make_authenticator
from emailsync.imap.folders import FolderTree
from emailsync.imap.session import ImapSession
from emailsync.model import FolderRole
from emailsync.timeline import open_store

CLIENT_TIMEOUT_SECONDS = 30.0
# Every bench mailbox has this alias, so one corpus (written for it) suits them all.
OWNER_ALIAS = "lettings@example.com"
# RFC 4315: "OK [APPENDUID <uidvalidity> <uid>]" names the UID the server gave the message.
_APPENDUID_RE = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


@dataclass(frozen=True)
class BenchMailbox:
    """A Dovecot user with emailsync's folder tree, a config file and a store with groups."""

    address: str
    password: str
    host: str
    port: int
    config_path: Path
    tree: FolderTree

    def settings(self) -> Settings:
        """The mailbox's config, through emailsync's own loader."""
        return load_settings(self.config_path)

    def client(self) -> imapclient.IMAPClient:
        """A bare imapclient connection, logged in."""
        client = imapclient.IMAPClient(
            self.host, port=self.port, ssl=False, timeout=CLIENT_TIMEOUT_SECONDS
        )
        client.login(self.address, self.password)
        return client

    def counts(self) -> dict[FolderRole, int]:
        """Messages in each folder of the tree, over a connection of their own."""
        client = self.client()
        try:
            return folder_counts(client, self.tree)
        finally:
            client.logout()

    def open_session(self) -> ImapSession:
        """An emailsync ``ImapSession`` opened the way the worker opens one."""
        return open_session(self.config_path)


class Testbed:
    """One Dovecot on 127.0.0.1 and a scratch directory; a context manager."""

    def __init__(
        self, directory: Directory, state: str = "sqlite", *, with_postgres: bool = False
    ) -> None:
        self.directory = directory
        self.workdir = Path(tempfile.mkdtemp(prefix="emailsync-bench-"))
        self.server = Dovecot()
        # The mailboxes' state database by default: "sqlite" (a file each) or "postgresql";
        # with_postgres starts the cluster anyway, for mailboxes that ask for it.
        self.state = state
        self.postgres = Postgres() if state == "postgresql" or with_postgres else None
        self._count = 0

    def __enter__(self) -> Testbed:
        self.server.start()
        if self.postgres is not None:
            self.postgres.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop Dovecot (and PostgreSQL) and remove every file of the run."""
        self.server.close()
        if self.postgres is not None:
            self.postgres.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def new_mailbox(self, daemon_extra: str = "", state: str | None = None) -> BenchMailbox:
        """A fresh user with the folder tree, a config and a store holding the groups.

        ``state``: "sqlite" or "postgresql" for this mailbox (default: the testbed's).
        """
        self._count += 1
        home = self.workdir / f"mailbox{self._count}"
        (home / "state").mkdir(parents=True)
        address = f"agent{self._count}@example.com"
        password = secrets.token_urlsafe(12)
        self.server.add_user(address, password)
        (home / "password").write_text(password + "\n", encoding="utf-8")
        config_path = home / "emailsync.toml"
        url = f"sqlite://{home / 'state' / 'emailsync.db'}"
        if (state or self.state) == "postgresql":
            assert self.postgres is not None, "Testbed(with_postgres=True) for PostgreSQL state"
            url = self.postgres.create_database("bench")
        config_path.write_text(
            _config(home, address, self.server.port, daemon_extra, url), encoding="utf-8"
        )
        settings = load_settings(config_path)
        store = open_store(settings.store_url, settings.daemon.state_dir)
        try:
            store.import_groups(self.directory.rows())
        finally:
            store.close()
        session = open_session(config_path)
        try:
            session.ensure_folders()
            tree = session.tree or session.resolve_tree()
        finally:
            session.logout()
        return BenchMailbox(address, password, "127.0.0.1", self.server.port, config_path, tree)


def open_session(config_path: Path) -> ImapSession:
    """An emailsync ``ImapSession`` for a config's only mailbox, opened as the worker does."""
    settings = load_settings(config_path)
    mailbox = settings.mailboxes[0]
    session = ImapSession.open(
        mailbox,
        settings.folders,
        make_authenticator(mailbox, settings),
        timeout_seconds=settings.daemon.timeout_seconds,
    )
    session.resolve_tree()
    return session


def _config(home: Path, address: str, port: int, daemon_extra: str, state: str) -> str:
    return f"""[daemon]
state_dir = "{home / "state"}"
store = "{state}"
timeout_seconds = 30
{daemon_extra}

[branches.bench]
host = "127.0.0.1"
port = {port}
security = "none"
allow_insecure = true

[[mailboxes]]
address = "{address}"
branch = "bench"
password_file = "{home / "password"}"
aliases = ["{OWNER_ALIAS}"]
"""


def append_all(
    client: imapclient.IMAPClient, folder: str, messages: Sequence[BenchMessage]
) -> dict[int, BenchMessage]:
    """APPEND each message (one command each); returns them by the UID the server gave."""
    return {append_one(client, folder, message): message for message in messages}


def append_one(client: imapclient.IMAPClient, folder: str, message: BenchMessage) -> int:
    """APPEND one message; returns its UID from the APPENDUID response code."""
    response = client.append(folder, message.raw)
    match = _APPENDUID_RE.search(response if isinstance(response, bytes) else b"")
    if match is None:
        raise RuntimeError(f"APPEND gave no APPENDUID: {response!r}")
    return int(match.group(1))


def folder_counts(client: imapclient.IMAPClient, tree: FolderTree) -> dict[FolderRole, int]:
    """Messages in each folder of the tree (STATUS MESSAGES)."""
    return {
        role: int(client.folder_status(tree.name(role), [b"MESSAGES"])[b"MESSAGES"])
        for role in FolderRole
    }
