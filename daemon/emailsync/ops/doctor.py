"""`emailsync doctor ADDRESS`: log in as the daemon would and report what matters, one line each.

Every line that is not ``ok`` names its fix. The IDLE probe needs a scratch folder in the
mailbox (``emailsync-doctor-<UTC start>-<random>``); doctor deletes it when done, on SIGTERM
and SIGINT too (from a fresh connection: the old one may be halfway through a command), and
each run deletes the scratch folders earlier runs left (SIGKILL, a lost connection).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from types import FrameType
from typing import Any

import structlog

from emailsync.config import MailboxSettings, ServerSettings, Settings
from emailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    IdentityProviderUnavailableError,
    MailboxError,
)
from emailsync.imap.auth import make_authenticator
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
# Courier with IMAP_ENHANCEDIDLE announces the first probe at once and may be slow on the next
# (issue 19): time this many, stopping at the first slow or missing notice.
IDLE_PROBES = 3
# After a failed connect, how long doctor waits for a plain-text greeting before trying TLS.
GREETING_WAIT_SECONDS = 3.0
GREETING_BYTES = 200
SCRATCH_PREFIX = "emailsync-doctor-"
# A run lasts at most a few timeouts plus --idle-timeout (75 s) and two fast probes: a scratch
# folder older than this belongs to no running doctor and is removed; a younger one is reported.
SCRATCH_STALE_SECONDS = 15 * 60
_SCRATCH_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# Names without a time are an earlier version's (emailsync-doctor-<8 hex>).
_SCRATCH_LEAF = re.compile(
    re.escape(SCRATCH_PREFIX) + r"(?:(?P<started>\d{8}T\d{6}Z)-[0-9a-f]+|[0-9a-f]{8})"
)
# Signals that stop doctor after it has removed its scratch folder.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


def tls_verdict(
    security: str, version: str | None, cert: Mapping[str, Any] | None, *, now: datetime
) -> Finding:
    """The TLS line: protocol, certificate subject and expiry."""
    if security == "none":
        return Finding(
            "tls",
            NOTE,
            "none: password and mail cross the network in clear (allow_insecure)",
            'where the server offers TLS, set security = "ssl" (port 993) or "starttls" '
            "(port 143) and drop allow_insecure",
        )
    if not cert:
        return Finding(
            "tls",
            PROBLEM,
            f"{version or 'TLS'} but no peer certificate to check",
            "give the server a certificate (Dovecot: ssl_cert and ssl_key)",
        )
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
    for name, good, fallback, fix in (
        (
            "MOVE",
            "RFC 6851: filing is one atomic MOVE",
            "filing uses COPY + STORE + EXPUNGE",
            "optional: ask the server's admin to enable MOVE (RFC 6851) for one-step filing",
        ),
        (
            "UIDPLUS",
            "RFC 4315: UID EXPUNGE removes only the filed messages",
            "EXPUNGE removes every \\Deleted message in Queue",
            "ask the server's admin to enable UIDPLUS (RFC 4315); until then nobody should "
            "mark messages \\Deleted in Queue",
        ),
        (
            "NAMESPACE",
            "RFC 2342: the folder tree is placed in the personal namespace",
            "the tree is placed at the top level, delimiter from LIST",
            "none needed unless personal folders must live under a prefix such as INBOX.: "
            "then ask the server's admin to enable NAMESPACE (RFC 2342)",
        ),
    ):
        if name in capabilities:
            findings.append(Finding(name, OK, good))
        else:
            findings.append(Finding(name, NOTE, f"not offered: {fallback}", fix))
    if keywords_allowed is None:
        findings.append(
            Finding(
                "keywords",
                NOTE,
                "not checked (no folder could be selected)",
                "see the lines above for why the scratch folder could not be selected",
            )
        )
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
                "none needed: the reason is still logged; a server that allows keywords "
                "(PERMANENTFLAGS \\*, RFC 3501 §7.1) shows it on the message too",
            )
        )
    return findings


def login_verdict(
    mailbox: MailboxSettings,
    error: str,
    *,
    reauth_retry_seconds: float,
    secret_unreadable: bool = False,
    app_only: bool = False,
) -> Finding:
    """The login line when the server (or identity provider) refused the credentials.

    The fix names where the password is read from, never the password.
    """
    server = mailbox.server
    who = mailbox.username or mailbox.address
    table = _branch_table(mailbox.branch)
    detail = f"{server.host}:{server.port} as {who}: {error}"
    source = mailbox.password.describe() if mailbox.password else "the mailbox's password source"
    lockout = (
        "repeated refused logins may lock the account: the daemon retries a refused mailbox "
        f"only every {_duration(reauth_retry_seconds)} (needs_reauth), so fix this before "
        f"running doctor or `emailsync start-sync {mailbox.address}` again"
    )
    if mailbox.auth == "office365":
        if app_only:
            fix = (
                "check the [office365] client secret or certificate (and its expiry), that the "
                "app has IMAP.AccessAsApp with admin consent, and that its service principal has "
                f"FullAccess to {mailbox.address} (Add-MailboxPermission)"
            )
        else:
            fix = f"sign in again: emailsync auth login {mailbox.address}"
    elif secret_unreadable:
        fix = (
            f"put the password of {who} in {source}, readable by the user emailsync runs as "
            f"(mailbox {mailbox.address})"
        )
    elif "LOGINDISABLED" in error:
        fix = (
            f'the server takes no password in plain text: set security = "starttls" '
            f'(port 143) or "ssl" (port 993) in {table}'
        )
    else:
        fix = (
            f"check the password in {source} and that the account {who} exists, is enabled "
            f"and may use IMAP; {lockout}"
        )
    return Finding("login", PROBLEM, detail, fix)


@dataclass(frozen=True)
class PortAnswer:
    """What a server port did when doctor knocked after a failed connect.

    ``kind``: unresolved, refused, unreachable (no answer or an OS error), closed (hung up
    at once), imap (an IMAP greeting in plain text), other (something else in plain text),
    tls (silent in plain text but completed a TLS handshake) or silent (neither).
    """

    kind: str
    text: str = ""  # the first line it sent, or the OS's words


def connection_verdict(
    server: ServerSettings,
    branch: str | None,
    kind: str,
    error: str,
    answer: PortAnswer,
    *,
    timeout: float,
) -> Finding:
    """The login line when no IMAP session could be set up: what answered, and the fix.

    ``kind`` and ``error`` are the ConnectionLostError's; ``answer`` is what ``knock`` found.
    """
    where = f"{server.host}:{server.port}"
    detail = f"{where} (security = {server.security}): {error}"
    return Finding(
        "login",
        PROBLEM,
        detail,
        _connection_fix(
            server, branch=branch, kind=kind, error=error, answer=answer, timeout=timeout
        ),
    )


def _connection_fix(
    server: ServerSettings,
    *,
    branch: str | None,
    kind: str,
    error: str,
    answer: PortAnswer,
    timeout: float,
) -> str:
    where = f"{server.host}:{server.port}"
    table = _branch_table(branch)
    said = f" ({answer.text[:60]!r})" if answer.text else ""
    ports = 'IMAP listens on 993 for security = "ssl", on 143 for "starttls" and "none"'
    if answer.kind == "unresolved":
        return f"{server.host} does not resolve{said}: check host in {table} (now {where})"
    if kind == "tls" and any(w in error for w in ("mismatch", "doesn't match", "not valid for")):
        return (
            f"the certificate of {where} is not valid for {server.host}: set host in {table} "
            "to a name the certificate carries"
        )
    if kind == "tls" and "expired" in error:
        return f"the certificate of {where} has expired: renew it on the server"
    if kind == "tls" and "CERTIFICATE_VERIFY_FAILED" in error:
        return (
            f"the certificate of {where} is not signed by a CA this machine trusts: set "
            f"ca_file in {table} to the CA that signed it, or serve the full chain"
        )
    if answer.kind == "refused" or (kind == "refused" and answer.kind == "unreachable"):
        return (
            f"nothing listens on {where}: check host and port in {table} ({ports}) and that "
            "the IMAP server is running"
        )
    if answer.kind == "unreachable":
        return (
            f"nothing answered from {where} within {timeout:.0f} s{said}: check host and port "
            f"in {table}, and that no firewall drops this machine's packets to it"
        )
    if answer.kind == "imap" and server.security == "ssl":
        return (
            f'{where} answered in plain text{said}, not TLS: try security = "starttls" '
            f'(port 143) or "none" with allow_insecure = true in {table}'
        )
    if answer.kind == "imap" and server.security == "starttls" and "STARTTLS" in error:
        return (
            f'{where} offers no STARTTLS: set security = "ssl" (port 993) in {table}, or '
            '"none" with allow_insecure = true on a network you trust'
        )
    if answer.kind == "tls" and server.security != "ssl":
        return (
            f"{where} answered with TLS at once (implicit TLS, as on port 993), not a "
            f'plain-text greeting: set security = "ssl" in {table}'
        )
    if answer.kind == "other":
        return f"{where} answered{said}, which is not IMAP: check port in {table} ({ports})"
    if answer.kind == "closed":
        return (
            f"{where} accepted the connection and closed it without a greeting: check port in "
            f"{table} and the server's log (connection limits, access rules)"
        )
    if answer.kind == "silent":
        return (
            f"{where} accepted the connection but said nothing, in plain text or TLS: check "
            f"port in {table} ({ports}), and the server's load"
        )
    if answer.kind == "imap":
        return (
            f"{where} answers IMAP{said} but this connection failed: run doctor again in a "
            f"few minutes; if it repeats, see the server's log (security = {server.security})"
        )
    return f"check host, port and security in {table} (now {where}, security = {server.security})"


def midway_verdict(error: MailboxError, timeout: float) -> Finding:
    """The line for a failure after login: the check that was under way, and what to do."""
    if isinstance(error, ConnectionLostError) and error.kind == "timeout":
        fix = (
            f"the server stopped answering for {timeout:.0f} s: run doctor again; if it "
            "repeats, check the network path or raise [daemon] timeout_seconds"
        )
    elif isinstance(error, ConnectionLostError) and error.kind == "bye":
        fix = (
            "the server ended the connection: see its log for why (a per-user connection "
            "limit, a restart) and run doctor again"
        )
    else:
        fix = (
            "the server refused a command doctor needs: check that the account may create, "
            "select and delete folders (quota, ACL), then run doctor again"
        )
    return Finding("server", PROBLEM, str(error), fix)


def scratch_leaf(now: datetime) -> str:
    """A new scratch folder's own name: the fixed prefix, the UTC start time and random hex."""
    return f"{SCRATCH_PREFIX}{now.astimezone(UTC):{_SCRATCH_TIME_FORMAT}}-{secrets.token_hex(2)}"


def sort_scratch_folders(
    names: Sequence[str], delimiter: str, *, now: datetime
) -> tuple[list[str], list[str]]:
    """Doctor's scratch folders among ``names``: (left by earlier runs, maybe still in use).

    A folder younger than SCRATCH_STALE_SECONDS may belong to a doctor running right now.
    """
    stale: list[str] = []
    live: list[str] = []
    for name in names:
        leaf = name.rsplit(delimiter, 1)[-1] if delimiter else name
        match = _SCRATCH_LEAF.fullmatch(leaf)
        if match is None:
            continue
        started = match.group("started")
        age = (
            (now - datetime.strptime(started, _SCRATCH_TIME_FORMAT).replace(tzinfo=UTC))
            if started
            else None
        )
        if age is None or age.total_seconds() > SCRATCH_STALE_SECONDS:
            stale.append(name)
        else:
            live.append(name)
    return stale, live


def leftovers_finding(
    removed: Sequence[str], live: Sequence[str], failed: Mapping[str, str]
) -> Finding:
    """The line about scratch folders of other doctor runs found at the start of this one."""
    parts = []
    if removed:
        plural = "s from earlier runs" if len(removed) > 1 else " from an earlier run"
        parts.append(
            f"removed {len(removed)} leftover scratch folder{plural}: {', '.join(removed)}"
        )
    if failed:
        parts.append(
            "could not remove " + ", ".join(f"{name} ({error})" for name, error in failed.items())
        )
    if live:
        parts.append(
            f"left alone (made in the last {_duration(SCRATCH_STALE_SECONDS)}, maybe by a "
            f"doctor running now): {', '.join(live)}"
        )
    detail = "; ".join(parts)
    if failed:
        return Finding(
            "leftovers",
            PROBLEM,
            detail,
            f"delete {', '.join(failed)} in a mail client (they hold only doctor's probes)",
        )
    if removed:
        fix = (
            "nothing left to do: only a doctor killed with SIGKILL or cut off from the server "
            "leaves one (Ctrl-C and SIGTERM remove it)"
        )
    else:
        fix = (
            "nothing to do while another doctor runs; if none does, the next run after "
            f"{_duration(SCRATCH_STALE_SECONDS)} removes it"
        )
    return Finding("leftovers", NOTE, detail, fix)


def stopped_finding(
    signum: int, address: str, scratch: Sequence[str], error: str | None
) -> Finding:
    """The last line when SIGTERM or SIGINT stopped doctor: was its scratch folder removed?"""
    name = signal.Signals(signum).name
    if error is not None:
        return Finding(
            "interrupted",
            PROBLEM,
            f"stopped by {name}; the scratch folder {', '.join(scratch)} could not be removed: "
            f"{error}",
            f"delete it in a mail client, or run emailsync doctor {address} again after "
            f"{_duration(SCRATCH_STALE_SECONDS)}: it removes leftovers",
        )
    done = (
        f"removed the scratch folder {', '.join(scratch)}"
        if scratch
        else "no scratch folder had been made"
    )
    return Finding(
        "interrupted",
        PROBLEM,
        f"stopped by {name} before the checks finished; {done}",
        f"run emailsync doctor {address} again to finish the checks",
    )


def _branch_table(branch: str | None) -> str:
    return f"[branches.{branch}]" if branch else "the mailbox's server settings"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


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
    the lines before it. SIGTERM or SIGINT (when called in the main thread) ends the run
    cleanly: the scratch folder is removed, an ``interrupted`` line is emitted and
    ``SystemExit(128 + signal number)`` raised, the shell's exit status for that signal.
    """
    run = _Run(settings, settings.mailbox(address), idle_timeout, emit)
    with _stop_on_signals():
        try:
            run.check()
        except _Stopped as stop:
            error = run.remove_scratch()
            run.add(stopped_finding(stop.signum, run.mailbox.address, run.scratch, error))
            raise SystemExit(128 + stop.signum) from None
    return run.findings


class _Stopped(BaseException):
    """SIGTERM or SIGINT arrived; like KeyboardInterrupt it unwinds past ``except Exception``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While doctor runs, SIGTERM and SIGINT raise _Stopped; a second one acts as it did before.

    Python lets only the main thread set handlers; elsewhere (a test's thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def stop(signum: int, _frame: FrameType | None) -> None:
        restore()  # a second signal while cleaning up is not held back
        raise _Stopped(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        restore()


class _Run:
    """One doctor run: its findings, its connections and the scratch folder it made."""

    def __init__(
        self,
        settings: Settings,
        mailbox: MailboxSettings,
        idle_timeout: float,
        emit: Callable[[Finding], None] | None,
    ) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.idle_timeout = idle_timeout
        self.timeout = settings.daemon.timeout_seconds
        self.authenticator = make_authenticator(mailbox, settings)
        self.findings: list[Finding] = []
        self.scratch: list[str] = []  # the scratch folder, from just before its CREATE
        self._emit = emit

    def add(self, finding: Finding) -> None:
        """Record a finding and show it at once."""
        self.findings.append(finding)
        if self._emit is not None:
            self._emit(finding)

    def open_session(self) -> ImapSession:
        """A new logged-in connection, as the daemon would open it."""
        return ImapSession.open(
            self.mailbox,
            self.settings.folders,
            self.authenticator,
            timeout_seconds=self.timeout,
        )

    def check(self) -> None:
        """Log in, then run the checks on that connection; every outcome is a finding."""
        session = self._login()
        if session is None:
            return
        with _ending(session):
            try:
                self._checks(session)
            except MailboxError as exc:
                self.add(midway_verdict(exc, self.timeout))

    def remove_scratch(self) -> str | None:
        """Delete the scratch folder (if any) from a fresh connection; the error, or None."""
        if not self.scratch:
            return None
        try:
            with _ending(self.open_session()) as session:
                for name in self.scratch:
                    _delete_if_there(session, name)
        except MailboxError as exc:
            return str(exc)
        return None

    def _login(self) -> ImapSession | None:
        mailbox, server = self.mailbox, self.mailbox.server
        try:
            return self.open_session()
        except IdentityProviderUnavailableError as exc:
            self.add(
                Finding(
                    "login",
                    PROBLEM,
                    f"Microsoft Entra ID: {exc}",
                    "check this machine's HTTPS access to the [office365] authority "
                    "(login.microsoftonline.com by default), then run doctor again",
                )
            )
        except ConnectionLostError as exc:
            answer = knock(server.host, server.port, timeout=self.timeout)
            log.debug("doctor_knock", answer=answer.kind)
            self.add(
                connection_verdict(
                    server, mailbox.branch, exc.kind, str(exc), answer, timeout=self.timeout
                )
            )
        except AuthError as exc:
            office365 = self.settings.office365
            self.add(
                login_verdict(
                    mailbox,
                    str(exc),
                    reauth_retry_seconds=self.settings.daemon.reauth_retry_seconds,
                    secret_unreadable=isinstance(exc.__cause__, ConfigError),
                    app_only=office365 is not None and office365.app_only,
                )
            )
        return None

    def _checks(self, session: ImapSession) -> None:
        mailbox, server = self.mailbox, self.mailbox.server
        greeting = _text(getattr(session.client, "welcome", b""))
        software = server_software(greeting, _server_id(session))
        self.add(
            Finding(
                "login",
                OK,
                f"{server.host}:{server.port} as {mailbox.username or mailbox.address} "
                f"({mailbox.auth}); server: {software or greeting[:60] or 'unknown'}",
            )
        )
        sock = session.client.socket()
        if isinstance(sock, ssl.SSLSocket):
            self.add(tls_verdict(server.security, sock.version(), sock.getpeercert(), now=_now()))
        else:
            self.add(tls_verdict(server.security, None, None, now=_now()))

        capabilities = session.capabilities()
        tree = session.resolve_tree()
        self._remove_leftovers(session, tree.delimiter)
        with translated("list folders"):
            existing = {
                _text(name) for _, _, name in session.client.list_folders(pattern=f"{tree.root}*")
            }
        missing = [name for name in tree.all_names() if name not in existing]
        base = tree.root if tree.root in existing else None
        folders_root = self.settings.folders.root
        scratch = (
            f"{base}{tree.delimiter}" if base else tree.root[: -len(folders_root)]
        ) + scratch_leaf(_now())
        self.scratch.append(scratch)  # before CREATE: a stop may come before its answer
        with _scratch_folder(session, scratch) as keywords_allowed:
            for finding in capability_findings(capabilities, keywords_allowed):
                self.add(finding)
            if missing:
                self.add(
                    Finding(
                        "folders",
                        PROBLEM,
                        f"missing: {', '.join(missing)} (delimiter {tree.delimiter!r})",
                        f"emailsync setup {mailbox.address}",
                    )
                )
            else:
                self.add(
                    Finding(
                        "folders",
                        OK,
                        f"{', '.join(tree.all_names())} present (delimiter {tree.delimiter!r})",
                    )
                )
            if "IDLE" in capabilities:
                delays = _probe_idle(session, scratch, self.open_session, self.idle_timeout)
                self.add(idle_verdict(delays, software, self.idle_timeout))
            else:
                self.add(
                    Finding(
                        "idle delay",
                        NOTE,
                        "not measured: the server has no IDLE",
                        "enable IDLE on the server (see the IDLE line)",
                    )
                )
        self.scratch.clear()  # deleted

    def _remove_leftovers(self, session: ImapSession, delimiter: str) -> None:
        """Delete the scratch folders earlier runs left; report them (and any in use)."""
        with translated("list scratch folders"):
            listing = session.client.list_folders(pattern=f"*{SCRATCH_PREFIX}*")
        stale, live = sort_scratch_folders(
            [_text(name) for _, _, name in listing], delimiter, now=_now()
        )
        removed: list[str] = []
        failed: dict[str, str] = {}
        for name in stale:
            try:
                _delete_if_there(session, name)
                removed.append(name)
            except MailboxError as exc:
                failed[name] = str(exc)
        if stale or live:
            self.add(leftovers_finding(removed, live, failed))


@contextlib.contextmanager
def _ending(session: ImapSession) -> Iterator[ImapSession]:
    """Yield ``session``, then LOGOUT; after a stop signal only close the socket.

    The signal may have come halfway through a command, so nothing more is said on it.
    """
    try:
        yield session
    except _Stopped:
        session.close()
        raise
    except BaseException:
        session.logout()
        raise
    session.logout()


def _delete_if_there(session: ImapSession, name: str) -> None:
    """DELETE a folder (RFC 3501 §6.3.4) unless it is already gone."""
    with translated(f"delete {name}"):
        if session.client.folder_exists(name):
            session.client.delete_folder(name)


def knock(host: str, port: int, *, timeout: float) -> PortAnswer:
    """What answers on ``host:port``: an IMAP greeting in plain text, TLS, something, nothing.

    Asked after a failed connect, so that the fix can say what the server does speak.
    """
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return PortAnswer("unresolved", str(exc.strerror or exc))
    first: bytes | None = None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(min(timeout, GREETING_WAIT_SECONDS))
            with contextlib.suppress(TimeoutError):
                first = sock.recv(GREETING_BYTES)
    except ConnectionRefusedError:
        return PortAnswer("refused")
    except TimeoutError:
        return PortAnswer("unreachable", "timed out")
    except OSError as exc:
        return PortAnswer("unreachable", exc.strerror or str(exc))
    if first == b"":
        return PortAnswer("closed")
    if first:
        line = first.split(b"\r\n", 1)[0].decode("utf-8", "replace")
        # RFC 3501 §7.1.1-7.1.5: a server greets with an untagged OK, PREAUTH or BYE.
        imap = first.startswith((b"* OK", b"* PREAUTH", b"* BYE"))
        return PortAnswer("imap" if imap else "other", line)
    # Silent in plain text: with implicit TLS (RFC 8314 §3) the server waits for our hello.
    context = ssl.create_default_context()
    # Only asks whether TLS answers: nothing is sent over it, so whose certificate is moot.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return PortAnswer("tls")
    except OSError:
        return PortAnswer("silent")


@contextlib.contextmanager
def _scratch_folder(session: ImapSession, name: str) -> Iterator[bool | None]:
    """Create and SELECT a scratch folder; yields whether keywords are allowed; deletes it.

    After a stop signal nothing more is said on this connection; doctor deletes the folder
    from a fresh one.
    """
    client = session.client
    with translated("create scratch folder"):
        client.create_folder(name)
    try:
        with translated("select scratch folder"):
            info = client.select_folder(name)
        # RFC 3501 §7.1: \* in PERMANENTFLAGS means new keywords may be stored.
        yield b"\\*" in tuple(info.get(b"PERMANENTFLAGS", ()))
    except _Stopped:
        raise
    except BaseException:
        _close_and_delete(session, name)
        raise
    _close_and_delete(session, name)


def _close_and_delete(session: ImapSession, name: str) -> None:
    client = session.client
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
) -> list[float | None]:
    """APPEND up to IDLE_PROBES probes from a second connection while the first IDLEs.

    Returns, per probe, seconds from the APPEND's completion to the IDLE client's EXISTS for
    it, or None when no notice came within ``timeout`` (see ``idle_delays``).
    """
    client = session.client
    with translated("idle"):
        client.idle()
    try:
        with _ending(open_second()) as other:

            def measure(number: int) -> float | None:
                with translated("append probe"):
                    other.client.append(scratch, _probe_message(session.mailbox.address))
                return _await_exists(session, number, time.monotonic(), timeout)

            delays = idle_delays(measure)
    except _Stopped:
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
