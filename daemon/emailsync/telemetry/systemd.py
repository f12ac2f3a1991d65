"""sd_notify glue: READY, STATUS, WATCHDOG, RELOADING, STOPPING; a no-op outside systemd."""

from __future__ import annotations

import os

import structlog
from systemd import daemon

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify(3) messages (via systemd-python) when ``$NOTIFY_SOCKET`` is set."""

    def __init__(self) -> None:
        self.socket_path = os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_seconds = int(usec) / 1_000_000 if watchdog_for_us else 0.0

    @property
    def enabled(self) -> bool:
        """True under systemd (or a test's NOTIFY_SOCKET)."""
        return bool(self.socket_path)

    def notify(self, message: str) -> None:
        """Send one message such as ``READY=1``; never raises."""
        if not self.socket_path:
            return
        try:
            sent = daemon.notify(message)  # libsystemd's sd_notify(3) reads $NOTIFY_SOCKET
        except (OSError, ValueError) as exc:
            log.warning("sd_notify_failed", error=str(exc))
            return
        if not sent:
            log.warning("sd_notify_failed", error="sd_notify sent nothing")

    def ready(self, status: str) -> None:
        """READY=1 with a status line."""
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """STATUS= one-line summary."""
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        """WATCHDOG=1; only called while the supervisor loop is healthy."""
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        """RELOADING=1 (followed by READY=1 when the reload is done)."""
        self.notify("RELOADING=1")

    def stopping(self) -> None:
        """STOPPING=1."""
        self.notify("STOPPING=1")
