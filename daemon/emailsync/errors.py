"""The exception hierarchy, grouped by what the caller does about each error."""

from __future__ import annotations


class EmailSyncError(Exception):
    """Base of every error emailsync raises on purpose."""


class ConfigError(EmailSyncError):
    """The configuration is unusable; the process exits 78 (EX_CONFIG).

    ``problems`` holds one line per problem, each naming the file, the key and what is wrong.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class MailboxError(EmailSyncError):
    """Something went wrong talking to one mailbox's IMAP server."""


class ConnectionLostError(MailboxError):
    """The IMAP connection dropped or stopped answering; reconnect with back-off.

    ``kind`` is the metric label: timeout, refused, tls, bye or protocol.
    ``retry_after`` is a server-suggested back-off in seconds, when the server gave one.
    ``gone`` is True when the connection cannot be used any more (closed, reset, timed out,
    or out of step after an answer that could not be read), False for a refusal (NO, BAD) on
    a connection that still answers; ``imap.translate.connection_gone`` decides it for
    library errors. Unset, it is True for every kind but protocol.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "protocol",
        retry_after: float | None = None,
        gone: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.gone = kind != "protocol" if gone is None else gone


class IdentityProviderUnavailableError(ConnectionLostError):
    """The identity provider (Microsoft Entra ID) could not be reached or failed; transient.

    Nothing is wrong with the credentials: back off and retry, never mark needs_reauth.
    """


class AuthError(MailboxError):
    """The server or identity provider refused our credentials; the mailbox needs re-auth."""


class FolderMissingError(MailboxError):
    """A folder of the tree is gone (a user deleted it); recreate the tree and retry."""


class UidValidityChangedError(MailboxError):
    """The Queue's UIDVALIDITY changed under us; forget cached UIDs and rescan."""


class StoreError(EmailSyncError):
    """The timeline store failed."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now; leave the message in Queue and retry later.

    ``retry_after`` is a back-off in seconds the store asked for (HTTP ``Retry-After``), if any.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MessageError(EmailSyncError):
    """A message cannot be used; file it to Failed with reason ``unparseable``."""


class KeyUnavailableError(EmailSyncError):
    """The registry key cannot be read: agent links and stored passwords cannot be checked.

    A server fault (an unreadable or damaged key file), never the caller's: a page answers
    500 and asks the agent to tell IT instead of calling a good link expired.
    """


class ControlError(EmailSyncError):
    """The running daemon could not be reached or refused a control request (exit 69)."""


class RegistrationError(EmailSyncError):
    """A run-time registration (API or page) was refused; nothing was stored.

    ``status`` is the HTTP status the listener answers with: 409 for a branch or mailbox of
    the config file (read-only through the API), 422 for a refused login or an unknown
    branch, 403 for an agent's username that is not its mailbox's, 429 when the mailbox or
    client spent its refused logins (``retry_after``), 502 when the mail server cannot be
    reached, 504 when it did not answer in time, 503 when the store keeps no registry.
    The message is one line and never holds a secret.
    """

    def __init__(self, message: str, *, status: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after  # seconds, for 429's Retry-After


class TooManyLoginsError(EmailSyncError):
    """A mailbox or client spent its budget of refused logins (``throttle``); no LOGIN is sent.

    Set-up answers 429 with ``Retry-After: retry_after``; a worker waits as for a refused login.
    """

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLostError(StoreUnavailableError):
    """This instance no longer holds the mailbox's lease (fencing token refused).

    Another instance may own the mailbox now: record nothing, move nothing, stop the worker.
    A subclass of ``StoreUnavailableError`` so that code which does not know about leases
    still leaves the message in Queue.
    """
