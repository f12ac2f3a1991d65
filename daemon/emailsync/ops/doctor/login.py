"""Why a login was refused, and what to do when the server fails a command after it."""

from __future__ import annotations

from emailsync.config import MailboxSettings
from emailsync.errors import ConnectionLostError, MailboxError
from emailsync.ops.doctor.finding import PROBLEM, Finding, branch_table, duration


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
    table = branch_table(mailbox.branch)
    detail = f"{server.host}:{server.port} as {who}: {error}"
    source = mailbox.password.describe() if mailbox.password else "the mailbox's password source"
    lockout = (
        "repeated refused logins may lock the account: the daemon retries a refused mailbox "
        f"only every {duration(reauth_retry_seconds)} (needs_reauth), so fix this before "
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
