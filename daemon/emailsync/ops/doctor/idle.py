"""The IDLE probe: how long the server takes to tell an IDLE client of new mail.

Up to IDLE_PROBES messages are appended to the scratch folder from a second connection while
the first IDLEs; the slowest notice is the verdict (new mail waits on the server, not on us).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import structlog

from emailsync.imap.session import ImapSession
from emailsync.imap.translate import translated
from emailsync.ops.doctor.finding import OK, PROBLEM, Finding
from emailsync.ops.doctor.stop import Stopped, ending

log = structlog.get_logger(__name__)

# Above this, new mail waits on the server, not on emailsync (which files within ~0.2 s).
SLOW_IDLE_SECONDS = 5.0
# Courier without IMAP_ENHANCEDIDLE and Cyrus without idled notify after ~60 s: wait past that.
IDLE_PROBE_TIMEOUT_SECONDS = 75.0
# Courier with IMAP_ENHANCEDIDLE announces the first probe at once and may be slow on the next
# (issue 19): time this many, stopping at the first slow or missing notice.
IDLE_PROBES = 3


def idle_delays(
    measure: Callable[[int], float | None], probes: int = IDLE_PROBES
) -> list[float | None]:
    """Time up to ``probes`` IDLE notices with ``measure(probe number)``.

    Stops at the first notice that is slow or did not come: the verdict is known, and each
    further probe would cost as long again.
    """
    delays: list[float | None] = []
    for number in range(1, probes + 1):
        delay = measure(number)
        delays.append(delay)
        if delay is None or delay > SLOW_IDLE_SECONDS:
            break
    return delays


def idle_verdict(delays: Sequence[float | None], software: str | None, timeout: float) -> Finding:
    """The IDLE-delay line, judged by the slowest probe: ok when every one came quickly."""
    who = software or "the server"
    measured = [delay for delay in delays if delay is not None]
    each = ", ".join(f"{delay:.1f}" for delay in measured)
    if not measured or len(measured) < len(delays):
        number = len(measured) + 1
        before = f" (the probes before it: {each} s)" if measured else ""
        what = "a new message" if number == 1 else f"probe {number}"
        return Finding(
            "idle delay",
            PROBLEM,
            f"{who} did not announce {what} to an IDLE client within {timeout:.0f} s{before}",
            _slow_idle_fix(software),
        )
    worst = max(measured)
    if worst <= SLOW_IDLE_SECONDS:
        probes = f"; slowest of {len(measured)} probes: {each} s" if len(measured) > 1 else ""
        return Finding(
            "idle delay", OK, f"{who} announced new mail after {worst:.1f} s (IDLE{probes})"
        )
    which = (
        f" (probe {measured.index(worst) + 1}; all probes: {each} s)" if len(measured) > 1 else ""
    )
    return Finding(
        "idle delay",
        PROBLEM,
        f"{who} announced new mail only after {worst:.1f} s{which}; emailsync files within a "
        "second of the notice, so the delay is the server's",
        _slow_idle_fix(software),
    )


def _slow_idle_fix(software: str | None) -> str:
    if software == "Courier-IMAP":
        return (
            "set IMAP_ENHANCEDIDLE=1 in /etc/courier/imapd (needs inotify/FAM) and restart "
            "courier-imap"
        )
    if software == "Cyrus IMAP":
        return (
            'run idled: add `idled cmd="idled"` to the START section of /etc/cyrus.conf and '
            "restart cyrus-imapd (without it Cyrus polls every imapidlepoll = 60 s)"
        )
    if software == "Dovecot":
        return "check mailbox_idle_check_interval and that inotify works for the mail store"
    return (
        "ask the server's admin how IDLE clients are notified; meanwhile a lower "
        "[daemon] sweep_seconds bounds the wait"
    )


def probe_idle(
    session: ImapSession,
    scratch: str,
    open_second: Callable[[], ImapSession],
    timeout: float,
) -> list[float | None]:
    """APPEND up to IDLE_PROBES probes from a second connection while the first IDLEs.

    Returns, per probe, seconds from the APPEND's completion to the IDLE client's EXISTS for
    it, or None when no notice came within ``timeout`` (see ``idle_delays``).
    """
    client = session.client
    with translated("idle"):
        client.idle()
    try:
        with ending(open_second()) as other:

            def measure(number: int) -> float | None:
                with translated("append probe"):
                    other.client.append(scratch, _probe_message(session.mailbox.address))
                return _await_exists(session, number, time.monotonic(), timeout)

            delays = idle_delays(measure)
    except Stopped:
        raise  # the connection is abandoned, not taken out of IDLE
    except BaseException:
        _idle_done(session)
        raise
    _idle_done(session)
    log.debug("doctor_idle_probe", delay_seconds=delays)
    return delays


def _await_exists(
    session: ImapSession, count: int, appended: float, timeout: float
) -> float | None:
    """Seconds until the IDLE client hears EXISTS of ``count`` or more; None after ``timeout``."""
    deadline = appended + timeout
    while time.monotonic() < deadline:
        with translated("idle"):
            responses = session.client.idle_check(timeout=max(0.1, deadline - time.monotonic()))
        for response in responses:
            # RFC 3501 §7.3.1: "* n EXISTS", n the folder's message count (a fresh folder).
            if (
                isinstance(response, tuple)
                and len(response) >= 2
                and response[1] == b"EXISTS"
                and isinstance(response[0], int)
                and response[0] >= count
            ):
                return time.monotonic() - appended
    return None


def _idle_done(session: ImapSession) -> None:
    with translated("idle done"):
        session.client.idle_done()


def _probe_message(address: str) -> bytes:
    message = EmailMessage()
    message["From"] = address
    message["To"] = address
    message["Subject"] = "emailsync doctor probe (removed automatically)"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid("emailsync-doctor")
    message.set_content("Written by `emailsync doctor` to time the server's IDLE notice.\n")
    return bytes(message)
