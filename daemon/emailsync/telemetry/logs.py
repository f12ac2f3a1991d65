"""structlog set-up: console on a terminal, JSON lines otherwise, the journal under systemd.

There is one chain, and it redacts: the standard library's loggers (msal, apscheduler, urllib3,
requests) are handed to structlog by ``StdlibBridge`` and go through the same processors as
our own events. Tracebacks are printed plainly, never with local variables (rich's
``show_locals`` would print a token held in a local).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
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
        "id_token",
        "assertion",
        "client_assertion",
        "device_code",
        "private_key",
        "cookie",
        "set-cookie",
    }
)
_VALUE = r"""(?:b?["'])?)[^"'&,;\s}\]]+"""
# Compound names (access_token, client_secret) are secrets wherever they are followed by : or =;
# plain words (token, password) only as a quoted key (`"password": …`) or before `=`, since
# prose such as "the server refused the token: AUTHENTICATE failed" must stay readable.
_COMPOUND = "|".join(sorted((re.escape(k) for k in SECRET_KEYS if not k.isalpha()), key=len))
_WORDS = "|".join(sorted(k for k in SECRET_KEYS if k.isalpha()))
# Secrets inside text: those, `Bearer …`, and any JWT (RFC 7519: three base64url parts, the
# header starting `eyJ`, i.e. `{"`).
_SECRET_IN_TEXT = (
    (re.compile(rf"""(?i)(["']?\b(?:{_COMPOUND})\b["']?\s*[:=]\s*{_VALUE}"""), r"\1***"),
    (
        re.compile(rf"""(?i)((?:["'](?:{_WORDS})["']\s*:|\b(?:{_WORDS})\s*=)\s*{_VALUE}"""),
        r"\1***",
    ),
    (re.compile(r"(?i)\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "***"),
)
# Nesting is followed this deep in dicts and lists; deeper values are replaced whole.
MAX_REDACT_DEPTH = 6
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
    """Replace secret-looking values with ``***``: by key, in nested data and inside text."""
    for key in list(event):
        event[key] = _redacted(key, event[key], 0)
    return event


def redact_text(text: str) -> str:
    """``text`` with tokens, passwords and bearer credentials in it replaced by ``***``."""
    for pattern, replacement in _SECRET_IN_TEXT:
        text = pattern.sub(replacement, text)
    return text


def _redacted(key: object, value: Any, depth: int) -> Any:
    if isinstance(key, str) and key.lower() in SECRET_KEYS:
        return "***"
    if depth >= MAX_REDACT_DEPTH:
        return "***" if isinstance(value, Mapping | list | tuple) else value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: _redacted(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(None, v, depth + 1) for v in value]
    return value


class StdlibBridge(logging.Handler):
    """Hands the standard library's log records to structlog, so one chain redacts them all.

    The record's message is rendered (``%`` formatting of its args) and then goes through
    ``redact_secrets`` like any of our events; the logger's name goes in ``logger``.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not lose the line or raise
            message = f"{record.msg!r} {record.args!r}"
        method = _STDLIB_METHOD.get(record.levelno, "info")
        if record.levelno >= logging.CRITICAL:
            method = "critical"
        log = structlog.get_logger(record.name)
        kwargs: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[0] is not None:
            kwargs["exc_info"] = record.exc_info
        getattr(log, method)(message, **kwargs)


_STDLIB_METHOD = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
}


def _route_stdlib(level: int) -> None:
    """Send every stdlib logger's records through structlog (and nowhere else)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(StdlibBridge())
    # Libraries' warnings and errors only: their info and debug lines (apscheduler's every job
    # run, urllib3's every request) would drown ours.
    root.setLevel(max(level, logging.WARNING))
    # The fallback handler prints straight to stderr when no handler is set: never needed now.
    logging.lastResort = None


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
    # Tracebacks become text first and are redacted like any value (an exception's message
    # can quote a token); plain text only, never rich's with local variables.
    text_traceback = [structlog.processors.format_exc_info, redact_secrets]
    if chosen == "journal":
        processors += [*text_traceback, JournalRenderer()]
    elif chosen == "json":
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *text_traceback,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            *text_traceback,
            # Colour only on a terminal and never with NO_COLOR (https://no-color.org).
            structlog.dev.ConsoleRenderer(
                colors=out.isatty() and not os.environ.get("NO_COLOR"),
                exception_formatter=structlog.dev.plain_traceback,
            ),
        ]
    _route_stdlib(LEVELS.get(level, logging.INFO))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return chosen
