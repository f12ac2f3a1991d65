"""Which IMAP server this is (greeting, RFC 2971 ID) and the capabilities the daemon uses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from emailsync.errors import MailboxError
from emailsync.imap.session import ImapSession
from emailsync.imap.translate import translated
from emailsync.ops.doctor.finding import NOTE, OK, PROBLEM, Finding


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


def id_reply(session: ImapSession) -> str:
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
            yield as_text(key)
            yield from _flatten(item)
    elif value is not None:
        yield as_text(value)


def as_text(value: object) -> str:
    """A server's bytes (or anything) as text; None as ""."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")
