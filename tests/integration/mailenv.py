"""Mail users on test Dovecots and configs for them (shared by fixtures and tests)."""

from __future__ import annotations

import itertools
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import imapclient

from emailsync.config import Settings, load_settings
from emailsync.dev.dovecot import Dovecot

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


def new_user(server: Dovecot, prefix: str = "agent") -> MailUser:
    """Add a fresh login with a random password."""
    user = MailUser(
        f"{prefix}{next(_user_numbers)}-{secrets.token_hex(3)}@example.com",
        secrets.token_urlsafe(12),
        server,
    )
    server.add_user(user.address, user.password)
    return user


def write_config(
    tmp_path: Path,
    users: list[MailUser],
    *,
    extra: str = "",
    mailbox_extra: str = "",
    ports: dict[int, int] | None = None,
) -> Path:
    """Write a config with one branch per server and one mailbox per user; returns its path.

    ``ports`` maps a server's port to the one the branch uses instead (a fault proxy's).
    """
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    branches: dict[int, str] = {}
    timeout = "" if "timeout_seconds" in extra else "timeout_seconds = 10\n"
    parts = [f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n{timeout}{extra}\n']
    for u in users:
        if u.server.port not in branches:
            name = f"b{len(branches)}"
            branches[u.server.port] = name
            parts.append(
                f'[branches.{name}]\nhost = "127.0.0.1"\n'
                f"port = {(ports or {}).get(u.server.port, u.server.port)}\n"
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


def settings_for(
    tmp_path: Path, users: list[MailUser], *, extra: str = "", mailbox_extra: str = ""
) -> Settings:
    """Write a config for these users and load it through the real loader."""
    return load_settings(write_config(tmp_path, users, extra=extra, mailbox_extra=mailbox_extra))


def session_log(server: Dovecot, address: str, pid: str) -> list[str]:
    """Dovecot's log lines for one IMAP session: this user, served by imap process ``pid``.

    The log is shared by every test of the session, so a check on it must name the session.
    """
    try:
        text = server.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    marker = f"imap({address})<{pid}>"
    return [line for line in text.splitlines() if marker in line]


def folder_message_ids(user: MailUser, folder: str) -> Counter[str]:
    """Message-ID → how many copies of it ``folder`` (a full name) holds; {} when it is absent.

    A multiset: a message filed twice counts 2, where a dict keyed by subject would merge it.
    """
    with user.client() as client:
        if not client.folder_exists(folder):
            return Counter()
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        data = client.fetch(uids, ["ENVELOPE"]) if uids else {}
        return Counter(
            (d[b"ENVELOPE"].message_id or b"").decode("utf-8", "replace") for d in data.values()
        )
