"""The throwaway Dovecot's connection sharing (issue 23): how many imap processes serve whom."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from imapclient import IMAPClient

from emailsync.dev.dovecot import Dovecot, DovecotOptions

PASSWORD = "dev-dovecot-password"  # a throwaway server's users; nothing secret


@contextlib.contextmanager
def sessions_on(options: DovecotOptions, users: int) -> Iterator[Dovecot]:
    """A Dovecot with ``users`` users, each logged in with INBOX selected, for a with block."""
    with Dovecot(None, options) as server, contextlib.ExitStack() as clients:
        for n in range(users):
            address = f"share{n}@example.com"
            server.add_user(address, PASSWORD)
            client = clients.enter_context(IMAPClient(server.host, server.port, ssl=False))
            client.login(address, PASSWORD)
            client.select_folder("INBOX")
        yield server


def processes_serving(server: Dovecot) -> Counter[str]:
    """How many sessions each imap process serves (``doveadm who -1``: user proto pid ip)."""
    out = server.doveadm("who", "-1").stdout
    return Counter(line.split()[2] for line in out.splitlines()[1:] if line.strip())


def test_by_default_each_connection_has_its_own_imap_process() -> None:
    with sessions_on(DovecotOptions(), 4) as server:
        assert sorted(processes_serving(server).values()) == [1, 1, 1, 1]


def test_imap_client_limit_shares_imap_processes_without_warnings() -> None:
    with sessions_on(DovecotOptions(imap_client_limit=3), 5) as server:
        assert sorted(processes_serving(server).values()) == [2, 3]
        # Dovecot warns at start when a service's limits do not fit (auth's client_limit).
        assert "Warning" not in server.log_path.read_text(), server.log_tail()
