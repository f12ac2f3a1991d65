"""How a mailbox logs in to IMAP: the ``Authenticator`` protocol, a password, and the choice.

``make_authenticator`` gives a mailbox the authenticator its settings ask for: IMAP LOGIN
with a password (``PasswordAuthenticator``, here) or an Office 365 OAuth2 token via MSAL
(``Office365Authenticator``, imap/office365.py, over the HTTP session of imap/idpsession.py).
Errors are sorted by what the worker does: ``AuthError`` (needs_reauth) versus
``ConnectionLostError`` (back off and retry), see imap/loginerror.py. A password never
reaches a log line, an exception message or a repr.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import imapclient
import requests
import structlog
from imapclient.exceptions import LoginError

from emailsync.config import MailboxSettings, Settings
from emailsync.errors import AuthError, ConfigError
from emailsync.imap.idpsession import identity_provider_session
from emailsync.imap.loginerror import login_failure
from emailsync.imap.office365 import MSAL_EXPIRY_MARGIN_SECONDS, Office365Authenticator
from emailsync.imap.tokencache import (
    TokenCacheStore,
    token_cache_lock_path,
    token_cache_path,
)
from emailsync.imap.translate import translated
from emailsync.secret import Secret

log = structlog.get_logger(__name__)

# Office 365's authenticator, its HTTP session and the token cache's file helpers have
# modules of their own; named here still for the callers.
__all__ = [
    "MSAL_EXPIRY_MARGIN_SECONDS",
    "Authenticator",
    "Office365Authenticator",
    "PasswordAuthenticator",
    "identity_provider_session",
    "make_authenticator",
    "token_cache_lock_path",
    "token_cache_path",
]


class Authenticator(Protocol):
    """How a mailbox worker logs in, and what it may ask about its credentials."""

    def login(self, client: imapclient.IMAPClient) -> None:
        """Log in on a connected client.

        Raises AuthError when the server or identity provider refuses (needs_reauth), and
        ConnectionLostError (IdentityProviderUnavailableError included) when it is transient.
        """
        ...

    def token_expiry(self) -> datetime | None:
        """When the current access token expires; None for passwords or when there is none."""
        ...

    def forget(self) -> None:
        """Drop cached tokens (Stop Email Sync); a no-op for passwords."""
        ...


class PasswordAuthenticator:
    """IMAP LOGIN with the mailbox's password, read from its secret source at every login."""

    def __init__(
        self, mailbox: MailboxSettings, *, password: Callable[[], Secret] | None = None
    ) -> None:
        """``password``: reads the secret at each login (a registered mailbox's, decrypted
        from the store); by default the mailbox's configured secret source."""
        if password is None:
            if mailbox.password is None:
                raise ConfigError([f"mailbox {mailbox.address}: auth = password needs a password"])
            password = mailbox.password.read
        self._mailbox = mailbox
        self._read_password = password
        self._log = log.bind(mailbox=mailbox.address)

    def login(self, client: imapclient.IMAPClient) -> None:
        """LOGIN as the mailbox's username; see ``Authenticator.login``."""
        address = self._mailbox.address
        try:
            password = self._read_password()
        except ConfigError as exc:
            # The message names the source only; a missing secret needs a person, not retries.
            raise AuthError(f"{address}: {exc}") from exc
        with translated(f"{address}: login"):
            if client.has_capability("LOGINDISABLED"):
                raise AuthError(
                    f"{address}: the server refuses LOGIN on this connection (LOGINDISABLED); "
                    "use security = ssl or starttls"
                )
            if not (self._mailbox.username.isascii() and password.reveal().isascii()):
                # imaplib sends LOGIN's strings as ASCII (RFC 3501 strings are 7-bit unless
                # the server accepts UTF8=ACCEPT): it would raise UnicodeEncodeError. No
                # retry can help; a person must change the credentials.
                raise AuthError(
                    f"{address}: the username or password holds non-ASCII characters, "
                    "which IMAP LOGIN cannot send"
                )
            try:
                client.login(self._mailbox.username, password.reveal())
            except LoginError as exc:
                error = login_failure(exc, address, "password login", (password.reveal(),))
                if isinstance(error, AuthError):
                    self._log.warning("login_refused", reason=str(error))
                # Not chained: the library's exception repeats the server's text unredacted.
                raise error from None
        self._log.debug("logged_in", method="LOGIN")

    def token_expiry(self) -> datetime | None:
        """Passwords do not expire from our point of view."""
        return None

    def forget(self) -> None:
        """Nothing is cached for passwords."""


def make_authenticator(
    mailbox: MailboxSettings,
    settings: Settings,
    *,
    http_session: requests.Session | None = None,
    token_caches: TokenCacheStore | None = None,
) -> Authenticator:
    """The authenticator a mailbox's settings ask for (raises ConfigError when incomplete).

    ``token_caches``: where delegated Office 365 token caches live; files in ``state_dir``
    by default (``emailsync.state.tokencache_sql.token_caches_for`` picks the state's).
    """
    if mailbox.auth != "office365":
        return PasswordAuthenticator(mailbox)
    if settings.office365 is None:
        raise ConfigError([f"mailbox {mailbox.address}: auth = office365 needs [office365]"])
    session = http_session or identity_provider_session(
        settings.office365, timeout_seconds=settings.daemon.timeout_seconds
    )
    return Office365Authenticator(
        mailbox,
        settings.office365,
        state_dir=settings.daemon.state_dir,
        http_session=session,
        token_caches=token_caches,
    )
