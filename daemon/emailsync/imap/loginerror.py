"""How a failed LOGIN or AUTHENTICATE is sorted and what its message may say.

A refusal is an ``AuthError`` (a person must fix the credentials); a dropped connection or
an RFC 5530 "try again later" code is a ``ConnectionLostError``. The server's text is cut
to ERROR_TEXT_CHARS and any secret sent (password, token) is blanked out of it.
"""

from __future__ import annotations

import imaplib

from imapclient.exceptions import LoginError

from emailsync.errors import AuthError, ConnectionLostError, MailboxError
from emailsync.imap.translate import is_transient, server_text

ERROR_TEXT_CHARS = 300


def login_failure(
    exc: LoginError, address: str, action: str, secrets: tuple[str, ...]
) -> MailboxError:
    """Sort a failed LOGIN/AUTHENTICATE: refused (AuthError) or transient (ConnectionLostError)."""
    text = _redact(short(server_text(exc)), secrets)
    # imapclient wraps every imaplib error in LoginError, a dropped connection included.
    if isinstance(exc.__context__, imaplib.IMAP4.abort):
        return ConnectionLostError(
            f"{address}: connection lost during {action}: {text}", kind="bye"
        )
    if is_transient(text):
        # RFC 5530 §3: [UNAVAILABLE] and friends are the server's problem, not ours.
        return ConnectionLostError(
            f"{address}: {action}: server unavailable: {text}", kind="protocol"
        )
    return AuthError(f"{address}: {action} refused: {text}")


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_TEXT_CHARS else text[: ERROR_TEXT_CHARS - 1] + "…"
