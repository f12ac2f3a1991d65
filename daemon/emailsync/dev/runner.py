"""The daemon as a child process of a test, a benchmark or the CI's README walk.

``start_daemon`` runs ``emailsync run`` on a config the way all of them do, and
``NotifyListener`` stands in for systemd's NOTIFY_SOCKET, so the command, its environment and
the socket's reading loop are written once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

# systemd's variables: a child started outside a unit must not talk to this process's manager.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC")
# How often the listener's thread looks whether it should stop.
NOTIFY_POLL_SECONDS = 0.2
NOTIFY_DATAGRAM_BYTES = 4096
NOTIFY_JOIN_SECONDS = 2.0


def start_daemon(config: Path, log: IO[bytes], **environ: str) -> subprocess.Popen[bytes]:
    """``emailsync --config CONFIG run`` in a subprocess, its output and errors into ``log``.

    The environment is this process's without systemd's variables, plus ``environ``.
    """
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update(environ)
    return subprocess.Popen(
        [sys.executable, "-m", "emailsync.cli", "--config", str(config), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


class NotifyListener:
    """A unix datagram socket at ``path`` in place of NOTIFY_SOCKET.

    A thread hands every message, decoded, to ``on_message`` until ``close()``. ``mode`` is
    given to the socket file when a daemon of another user must reach it.
    """

    def __init__(
        self, path: Path, on_message: Callable[[str], None], *, mode: int | None = None
    ) -> None:
        self.path = path
        self._on_message = on_message
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path.unlink(missing_ok=True)  # left by an earlier daemon in the same directory
        self.sock.bind(str(path))
        if mode is not None:
            path.chmod(mode)
        self.sock.settimeout(NOTIFY_POLL_SECONDS)
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(NOTIFY_DATAGRAM_BYTES)
            except TimeoutError:
                continue
            except OSError:
                return
            self._on_message(data.decode("utf-8", "replace"))

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._running = False
        self._thread.join(NOTIFY_JOIN_SECONDS)
        self.sock.close()
