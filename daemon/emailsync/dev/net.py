"""Throwaway local servers' plumbing: a free loopback port, waiting on one, stopping one.

``LocalServer`` makes each a context manager the same way (``with`` starts and closes it).

One copy for ``emailsync.dev.dovecot``, ``demo``, the bench's servers and daemons and the test
fixtures, so a change to how a port is probed or a process stopped is made once.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

# A probe to loopback answers at once; the bound keeps a wedged stack from hanging a wait.
PROBE_TIMEOUT_SECONDS = 0.5
POLL_SECONDS = 0.05
# After SIGKILL a process is gone at once; the bound only keeps a zombie from hanging us.
KILL_WAIT_SECONDS = 5.0


class LocalServer:
    """A throwaway server as a context manager: entering starts it, leaving closes it.

    A subclass defines ``start()`` (serving once it returns) and ``close()``.
    """

    def start(self) -> object:
        """Start serving."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop serving and drop what the server made."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(PROBE_TIMEOUT_SECONDS)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    alive: Callable[[], bool] = lambda: True,
    open_: bool = True,
) -> bool:
    """Wait until ``host:port`` listens (``open_``) or stops listening; True when it did.

    False after ``timeout`` seconds, or as soon as ``alive()`` is false (the server's
    process exited): the caller then says which, with the server's log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        if port_open(host, port) == open_:
            return True
        time.sleep(POLL_SECONDS)
    return False


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``process`` (if it runs) and wait ``timeout`` s, then SIGKILL; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(KILL_WAIT_SECONDS)
    return int(process.returncode)


def share_registry_key(shared_dir: Path, state_dir: Path) -> None:
    """Give a throwaway instance the registry key of its cluster (``shared_dir``).

    Every instance sharing a state database must hold the same key: the database's key check
    refuses any other (``emailsync.state.keycheck``). The key is made in ``shared_dir`` on first use
    and copied, 0600, into ``state_dir``, as an operator copies it to each host.
    """
    from emailsync.state.vault import KEY_FILE_NAME, Vault  # noqa: PLC0415 -- dev helper only

    if not (shared_dir / KEY_FILE_NAME).exists():
        Vault(shared_dir).generation  # noqa: B018 -- reading it creates the key file
    state_dir.mkdir(parents=True, exist_ok=True)
    copy = state_dir / KEY_FILE_NAME
    copy.write_bytes((shared_dir / KEY_FILE_NAME).read_bytes())
    copy.chmod(0o600)
