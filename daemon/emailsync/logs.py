"""structlog set-up: console on a terminal, JSON lines otherwise, the journal under systemd."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Keys whose values are never logged, whatever a caller passes by mistake.
SECRET_KEYS = frozenset(
    {
        "password",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "client_secret",
        "authorization",
    }
)
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Journal priorities (syslog levels, RFC 5424 §6.2.1) for structlog method names.
JOURNAL_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of any secret-looking key with ``***``."""
    for key in event:
        if key.lower() in SECRET_KEYS:
            event[key] = "***"
    return event


def under_journal(stream: TextIO) -> bool:
    """True when ``stream`` is connected to the systemd journal (``$JOURNAL_STREAM``)."""
    journal = os.environ.get("JOURNAL_STREAM", "")
    if not journal or ":" not in journal:
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    device, inode = journal.split(":", 1)
    return f"{stat.st_dev}:{stat.st_ino}" == f"{device}:{inode}"


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` → journal under systemd, console on a TTY, else json."""
    if fmt != "auto":
        return fmt
    if under_journal(stream):
        return "journal"
    return "console" if stream.isatty() else "json"


class JournalRenderer:
    """Sends each event to the journal with structured fields (MAILBOX=, EVENT=, …)."""

    def __init__(self) -> None:
        from systemd import journal  # noqa: PLC0415 -- only needed, and importable, under systemd

        self._send = journal.send

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> str:
        name = str(event.pop("event", ""))
        fields = {
            k.upper(): _journal_value(v)
            for k, v in event.items()
            if k not in ("level", "timestamp")
        }
        summary = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("level", "timestamp"))
        try:
            self._send(
                f"{name} {summary}".strip(),
                PRIORITY=str(JOURNAL_PRIORITY.get(method, 6)),
                EVENT=name,
                SYSLOG_IDENTIFIER="emailsync",
                **fields,
            )
        except OSError:
            # The journal went away: a log line is never worth a worker's life.
            sys.stderr.write(f"{name} {summary}\n")
        raise structlog.DropEvent


def _journal_value(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time (tests and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    def fileno(self) -> int:
        return sys.stderr.fileno()


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> str:
    """Configure structlog for the process; returns the format chosen."""
    out: TextIO = stream or _CurrentStderr()  # type: ignore[assignment]
    chosen = resolve_format(fmt, out)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact_secrets,
    ]
    if chosen == "journal":
        processors.append(structlog.processors.format_exc_info)
        processors.append(JournalRenderer())
    elif chosen == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            # Colour only on a terminal and never with NO_COLOR (https://no-color.org).
            structlog.dev.ConsoleRenderer(colors=out.isatty() and not os.environ.get("NO_COLOR")),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return chosen
