"""Fixtures for integration tests: real Dovecot servers on loopback and fresh users in them."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imapclient
import pytest

from emailsync.config import Settings, load_settings
from emailsync.devserver import Dovecot, DovecotOptions

_user_numbers = itertools.count(1)


@dataclass(frozen=True)
class MailUser:
    """A login on a test Dovecot."""

    address: str
    password: str
    server: Dovecot

    def client(self) -> imapclient.IMAPClient:
        """A plain imapclient connection, logged in, for arranging and checking mail."""
        client = imapclient.IMAPClient(
            self.server.host, port=self.server.port, ssl=False, timeout=10
        )
        client.login(self.address, self.password)
        return client


def _start(options: DovecotOptions) -> Iterator[Dovecot]:
    if os.geteuid() != 0:
        pytest.fail("the Dovecot fixtures run Dovecot as root (its rule for default_login_user)")
    server = Dovecot(None, options)
    server.start()  # raises DovecotStartError with the log tail when it cannot start
    yield server
    server.close()


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A Dovecot with maildir++ (``.`` delimiter) and every capability."""
    yield from _start(DovecotOptions())


@pytest.fixture(scope="session")
def dovecot_slash() -> Iterator[Dovecot]:
    """A Dovecot with LAYOUT=fs and the ``/`` delimiter (as Exchange and Gmail use)."""
    yield from _start(DovecotOptions(separator="/"))


@pytest.fixture(scope="session")
def dovecot_nomove() -> Iterator[Dovecot]:
    """A Dovecot that does not announce MOVE (RFC 6851), so COPY + EXPUNGE is used."""
    yield from _start(DovecotOptions(without_capabilities=("MOVE",)))


def new_user(server: Dovecot, prefix: str = "agent") -> MailUser:
    """Add a fresh login with a random password."""
    user = MailUser(
        f"{prefix}{next(_user_numbers)}-{secrets.token_hex(3)}@example.com",
        secrets.token_urlsafe(12),
        server,
    )
    server.add_user(user.address, user.password)
    return user


@pytest.fixture
def user(dovecot: Dovecot) -> MailUser:
    """A fresh mailbox on the default Dovecot."""
    return new_user(dovecot)


def write_config(
    tmp_path: Path, users: list[MailUser], *, extra: str = "", mailbox_extra: str = ""
) -> Path:
    """Write a config with one branch per server and one mailbox per user; returns its path."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    branches: dict[int, str] = {}
    parts = [f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ntimeout_seconds = 10\n{extra}\n']
    for u in users:
        if u.server.port not in branches:
            name = f"b{len(branches)}"
            branches[u.server.port] = name
            parts.append(
                f'[branches.{name}]\nhost = "127.0.0.1"\nport = {u.server.port}\n'
                'security = "none"\nallow_insecure = true\n'
            )
    for u in users:
        (secrets_dir / u.address).write_text(u.password + "\n", encoding="utf-8")
        parts.append(
            f'[[mailboxes]]\naddress = "{u.address}"\nbranch = "{branches[u.server.port]}"\n'
            f'password_file = "secrets/{u.address}"\n{mailbox_extra}\n'
        )
    path = tmp_path / "emailsync.toml"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def settings_for(tmp_path: Path, users: list[MailUser], **kwargs: str) -> Settings:
    """Write a config for these users and load it through the real loader."""
    return load_settings(write_config(tmp_path, users, **kwargs))
