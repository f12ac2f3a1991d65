"""One doctor run: log in as the daemon would, run every check, and clean up on a signal."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from emailsync.config import MailboxSettings, Settings
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
from emailsync.ops.doctor.connection import connection_verdict, knock, tls_verdict
from emailsync.ops.doctor.finding import NOTE, OK, PROBLEM, Finding
from emailsync.ops.doctor.idle import IDLE_PROBE_TIMEOUT_SECONDS, idle_verdict, probe_idle
from emailsync.ops.doctor.login import login_verdict, midway_verdict
from emailsync.ops.doctor.scratch import (
    SCRATCH_PREFIX,
    delete_if_there,
    leftovers_finding,
    scratch_folder,
    scratch_leaf,
    sort_scratch_folders,
    stopped_finding,
)
from emailsync.ops.doctor.server import as_text, capability_findings, id_reply, server_software
from emailsync.ops.doctor.stop import Stopped, ending, stop_on_signals

log = structlog.get_logger(__name__)


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
    with stop_on_signals():
        try:
            run.check()
        except Stopped as stop:
            error = run.remove_scratch()
            run.add(stopped_finding(stop.signum, run.mailbox.address, run.scratch, error))
            raise SystemExit(128 + stop.signum) from None
    return run.findings


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
        with ending(session):
            try:
                self._checks(session)
            except MailboxError as exc:
                self.add(midway_verdict(exc, self.timeout))

    def remove_scratch(self) -> str | None:
        """Delete the scratch folder (if any) from a fresh connection; the error, or None."""
        if not self.scratch:
            return None
        try:
            with ending(self.open_session()) as session:
                for name in self.scratch:
                    delete_if_there(session, name)
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
        greeting = as_text(getattr(session.client, "welcome", b""))
        software = server_software(greeting, id_reply(session))
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
                as_text(name) for _, _, name in session.client.list_folders(pattern=f"{tree.root}*")
            }
        missing = [name for name in tree.all_names() if name not in existing]
        base = tree.root if tree.root in existing else None
        folders_root = self.settings.folders.root
        scratch = (
            f"{base}{tree.delimiter}" if base else tree.root[: -len(folders_root)]
        ) + scratch_leaf(_now())
        self.scratch.append(scratch)  # before CREATE: a stop may come before its answer
        with scratch_folder(session, scratch) as keywords_allowed:
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
                delays = probe_idle(session, scratch, self.open_session, self.idle_timeout)
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
            [as_text(name) for _, _, name in listing], delimiter, now=_now()
        )
        removed: list[str] = []
        failed: dict[str, str] = {}
        for name in stale:
            try:
                delete_if_there(session, name)
                removed.append(name)
            except MailboxError as exc:
                failed[name] = str(exc)
        if stale or live:
            self.add(leftovers_finding(removed, live, failed))


def _now() -> datetime:
    return datetime.now(UTC)
