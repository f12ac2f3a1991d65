"""`emailsync doctor ADDRESS`: log in as the daemon would and report what matters, one line each."""

from __future__ import annotations

import contextlib
import secrets
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import structlog

from emailsync.config import Settings
from emailsync.errors import MailboxError
from emailsync.imap.auth import Authenticator, make_authenticator
from emailsync.imap.session import ImapSession
from emailsync.imap.translate import translated

log = structlog.get_logger(__name__)

OK = "ok"
NOTE = "note"  # worth knowing, not a fault: exit code stays 0
PROBLEM = "problem"  # the mailbox will not work, or not as designed: exit code 1

# Above this, new mail waits on the server, not on emailsync (which files within ~0.2 s).
SLOW_IDLE_SECONDS = 5.0
# Courier without IMAP_ENHANCEDIDLE and Cyrus without idled notify after ~60 s: wait past that.
IDLE_PROBE_TIMEOUT_SECONDS = 75.0
# A certificate expiring this soon is reported, so it is renewed before logins start failing.
CERT_WARN_DAYS = 14


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    check: str
    status: str  # OK, NOTE or PROBLEM
    detail: str
    fix: str | None = None

    def line(self) -> str:
        """The human-readable line (and the fix, when there is one)."""
        text = f"{self.status:8}{self.check:14}{self.detail}"
        return text + (f"\n{'':22}fix: {self.fix}" if self.fix else "")

    def as_json(self) -> dict[str, str | None]:
        """The ``doctor --json`` object for this line."""
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


# -- pure verdicts (unit-tested) -----------------------------------------------------------------


def server_software(greeting: str, server_id: str = "") -> str | None:
    """Which IMAP server this is, from its greeting and RFC 2971 ID reply; None if unknown."""
    text = f"{greeting} {server_id}".lower()
    for needle, name in (
        ("dovecot", "Dovecot"),
        ("courier", "Courier-IMAP"),
        ("cyrus", "Cyrus IMAP"),
        ("microsoft exchange", "Exchange"),
        ("gimap", "Gmail"),
    ):
        if needle in text:
            return name
    return None


def idle_verdict(delay: float | None, software: str | None, timeout: float) -> Finding:
    """The IDLE-delay line: ok when the server announced the probe quickly, else the fix."""
    who = software or "the server"
    if delay is None:
        return Finding(
            "idle delay",
            PROBLEM,
            f"{who} did not announce a new message to an IDLE client within {timeout:.0f} s",
            _slow_idle_fix(software),
        )
    if delay <= SLOW_IDLE_SECONDS:
        return Finding("idle delay", OK, f"{who} announced new mail after {delay:.1f} s (IDLE)")
    return Finding(
        "idle delay",
        PROBLEM,
        f"{who} announced new mail only after {delay:.1f} s; emailsync files within a second "
        "of the notice, so the delay is the server's",
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


def tls_verdict(
    security: str, version: str | None, cert: Mapping[str, Any] | None, *, now: datetime
) -> Finding:
    """The TLS line: protocol, certificate subject and expiry."""
    if security == "none":
        return Finding(
            "tls", NOTE, "none: password and mail cross the network in clear (allow_insecure)"
        )
    if not cert:
        return Finding("tls", PROBLEM, f"{version or 'TLS'} but no peer certificate to check")
    subject = ", ".join(f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn)
    not_after = str(cert.get("notAfter", ""))
    expires = datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)
    days = (expires - now).days
    detail = (
        f"{security} {version or '?'}, certificate {subject or '(no subject)'}, "
        f"expires {expires:%Y-%m-%d} ({days} days)"
    )
    if days < CERT_WARN_DAYS:
        return Finding("tls", PROBLEM, detail, "renew the server certificate")
    return Finding("tls", OK, detail)


def capability_findings(
    capabilities: frozenset[str], keywords_allowed: bool | None
) -> list[Finding]:
    """One line per capability the daemon relies on or falls back from."""
    findings = []
    if "IDLE" in capabilities:
        findings.append(Finding("IDLE", OK, "RFC 2177: new mail is seen as it arrives"))
    else:
        findings.append(
            Finding(
                "IDLE",
                PROBLEM,
                "not offered: the daemon polls the Queue every poll_seconds (default 60 s)",
                "enable IDLE on the server (every current IMAP server has it)",
            )
        )
    for name, good, fallback in (
        ("MOVE", "RFC 6851: filing is one atomic MOVE", "filing uses COPY + STORE + EXPUNGE"),
        (
            "UIDPLUS",
            "RFC 4315: UID EXPUNGE removes only the filed messages",
            "EXPUNGE removes every \\Deleted message in Queue",
        ),
        (
            "NAMESPACE",
            "RFC 2342: the folder tree is placed in the personal namespace",
            "the tree is placed at the top level, delimiter from LIST",
        ),
    ):
        if name in capabilities:
            findings.append(Finding(name, OK, good))
        else:
            findings.append(Finding(name, NOTE, f"not offered: {fallback}"))
    if keywords_allowed is None:
        findings.append(Finding("keywords", NOTE, "not checked (no folder could be selected)"))
    elif keywords_allowed:
        findings.append(
            Finding("keywords", OK, "PERMANENTFLAGS has \\*: Failed messages carry their reason")
        )
    else:
        findings.append(
            Finding(
                "keywords",
                NOTE,
                "PERMANENTFLAGS lacks \\*: Failed messages cannot carry $EmailSyncNoGroup / "
                "$EmailSyncUnparseable",
            )
        )
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when nothing is a problem, else 1."""
    return 1 if any(f.status == PROBLEM for f in findings) else 0


# -- the live checks -----------------------------------------------------------------------------


def diagnose(
    settings: Settings,
    address: str,
    *,
    idle_timeout: float = IDLE_PROBE_TIMEOUT_SECONDS,
    emit: Callable[[Finding], None] | None = None,
) -> list[Finding]:
    """Run every check against the live server; findings in report order.

    ``emit`` sees each finding as soon as it is known, so a slow IDLE probe does not hide
    the lines before it.
    """
    findings: list[Finding] = []

    def add(finding: Finding) -> None:
        findings.append(finding)
        if emit is not None:
            emit(finding)

    mailbox = settings.mailbox(address)
    authenticator = make_authenticator(mailbox, settings)
    timeout = settings.daemon.timeout_seconds
    server = mailbox.server
    try:
        session = ImapSession.open(
            mailbox, settings.folders, authenticator, timeout_seconds=timeout
        )
    except MailboxError as exc:
        add(Finding("login", PROBLEM, f"{server.host}:{server.port}: {exc}"))
        return findings
    try:
        greeting = _text(getattr(session.client, "welcome", b""))
        server_id = _server_id(session)
        software = server_software(greeting, server_id)
        add(
            Finding(
                "login",
                OK,
                f"{server.host}:{server.port} as {mailbox.username or mailbox.address} "
                f"({mailbox.auth}); server: {software or greeting[:60] or 'unknown'}",
            )
        )
        sock = session.client.socket()
        if isinstance(sock, ssl.SSLSocket):
            add(tls_verdict(server.security, sock.version(), sock.getpeercert(), now=_now()))
        else:
            add(tls_verdict(server.security, None, None, now=_now()))

        capabilities = session.capabilities()
        tree = session.resolve_tree()
        with translated("list folders"):
            existing = {
                _text(name) for _, _, name in session.client.list_folders(pattern=f"{tree.root}*")
            }
        missing = [name for name in tree.all_names() if name not in existing]
        base = tree.root if tree.root in existing else None
        scratch = (
            f"{base}{tree.delimiter}" if base else tree.root[: -len(settings.folders.root)]
        ) + f"emailsync-doctor-{secrets.token_hex(4)}"
        with _scratch_folder(session, scratch) as keywords_allowed:
            for finding in capability_findings(capabilities, keywords_allowed):
                add(finding)
            if missing:
                add(
                    Finding(
                        "folders",
                        PROBLEM,
                        f"missing: {', '.join(missing)} (delimiter {tree.delimiter!r})",
                        f"emailsync setup {mailbox.address}",
                    )
                )
            else:
                add(
                    Finding(
                        "folders",
                        OK,
                        f"{', '.join(tree.all_names())} present (delimiter {tree.delimiter!r})",
                    )
                )
            if "IDLE" in capabilities:
                delay = _probe_idle(
                    session,
                    scratch,
                    lambda: _second_session(settings, address, authenticator),
                    idle_timeout,
                )
                add(idle_verdict(delay, software, idle_timeout))
            else:
                add(Finding("idle delay", NOTE, "not measured: the server has no IDLE"))
    except MailboxError as exc:
        add(Finding("server", PROBLEM, str(exc)))
    finally:
        session.logout()
    return findings


def _second_session(settings: Settings, address: str, authenticator: Authenticator) -> ImapSession:
    mailbox = settings.mailbox(address)
    return ImapSession.open(
        mailbox,
        settings.folders,
        authenticator,
        timeout_seconds=settings.daemon.timeout_seconds,
    )


@contextlib.contextmanager
def _scratch_folder(session: ImapSession, name: str) -> Iterator[bool | None]:
    """Create and SELECT a scratch folder; yields whether keywords are allowed; deletes it."""
    client = session.client
    with translated("create scratch folder"):
        client.create_folder(name)
    try:
        with translated("select scratch folder"):
            info = client.select_folder(name)
        # RFC 3501 §7.1: \* in PERMANENTFLAGS means new keywords may be stored.
        yield b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
    finally:
        # CLOSE (RFC 3501 §6.4.2) rather than UNSELECT, which not every server has.
        with contextlib.suppress(MailboxError), translated("close scratch folder"):
            client.close_folder()
        with translated("delete scratch folder"):
            client.delete_folder(name)


def _probe_idle(
    session: ImapSession,
    scratch: str,
    open_second: Callable[[], ImapSession],
    timeout: float,
) -> float | None:
    """APPEND a probe from a second connection while the first IDLEs on ``scratch``.

    Returns seconds from the APPEND's completion to the IDLE client's EXISTS, or None when
    no notice came within ``timeout``.
    """
    client = session.client
    with translated("idle"):
        client.idle()
    delay: float | None = None
    try:
        other = open_second()
        try:
            with translated("append probe"):
                other.client.append(scratch, _probe_message(session.mailbox.address))
            appended = time.monotonic()
        finally:
            other.logout()
        deadline = appended + timeout
        while delay is None and time.monotonic() < deadline:
            with translated("idle"):
                responses = client.idle_check(timeout=max(0.1, deadline - time.monotonic()))
            for response in responses:
                if isinstance(response, tuple) and len(response) >= 2 and response[1] == b"EXISTS":
                    delay = time.monotonic() - appended
    finally:
        with translated("idle done"):
            client.idle_done()
    log.debug("doctor_idle_probe", delay_seconds=delay)
    return delay


def _probe_message(address: str) -> bytes:
    message = EmailMessage()
    message["From"] = address
    message["To"] = address
    message["Subject"] = "emailsync doctor probe (removed automatically)"
    message["Date"] = format_datetime(_now())
    message["Message-ID"] = make_msgid("emailsync-doctor")
    message.set_content("Written by `emailsync doctor` to time the server's IDLE notice.\n")
    return bytes(message)


def _server_id(session: ImapSession) -> str:
    """The server's RFC 2971 ID reply as one line of text ("" without the command)."""
    if "ID" not in session.capabilities():
        return ""
    with contextlib.suppress(MailboxError), translated("id"):
        return " ".join(_flatten(session.client.id_()))
    return ""


def _flatten(value: object) -> Iterator[str]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield _text(key)
            yield from _flatten(item)
    elif value is not None:
        yield _text(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def _now() -> datetime:
    return datetime.now(UTC)
