"""Library exceptions of an IMAP conversation → ``emailsync.errors``, grouped by what to do."""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Iterator

from imapclient.exceptions import (
    CapabilityError,
    IMAPClientAbortError,
    IMAPClientError,
    LoginError,
)

from emailsync.errors import AuthError, ConnectionLostError, FolderMissingError, MailboxError

# RFC 5530 response codes that mean "try again later", not "your credentials are wrong".
TRANSIENT_RESPONSE_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"})
_RESPONSE_CODE_RE = re.compile(r"\[([A-Z][A-Z0-9-]*)")
# Exchange: "Request is throttled. Suggested Backoff Time: 299961 milliseconds".
_BACKOFF_RE = re.compile(r"Suggested Backoff Time:\s*(\d+)\s*milliseconds", re.IGNORECASE)
# imaplib's words when a line exceeds its _MAXLINE (Lib/imaplib.py, IMAP4.readline).
_OVERLONG_LINE_RE = re.compile(r"got more than \d+ bytes")


def response_code(text: str) -> str | None:
    """The first RFC 3501 §7.1 response code in a server text (``UNAVAILABLE``…), if any."""
    match = _RESPONSE_CODE_RE.search(text)
    return match.group(1) if match else None


def is_transient(text: str) -> bool:
    """True when a NO carries a response code that means "later", not "refused"."""
    return response_code(text) in TRANSIENT_RESPONSE_CODES


def backoff_hint(text: str) -> float | None:
    """A server-suggested back-off in seconds (Exchange throttling), if the text has one."""
    match = _BACKOFF_RE.search(text)
    return int(match.group(1)) / 1000 if match else None


def connection_gone(exc: BaseException) -> bool:
    """True when a library error means the connection cannot be used any more.

    The one definition of a lost connection for the IMAP package (``ConnectionLostError.gone``):
    a socket or TLS error, a timeout, and every imaplib *abort* — EOF, BYE, a line cut short
    ("unterminated line") or an answer that cannot belong to the conversation ("unexpected
    response"): after those the client no longer knows where the server's next answer starts.
    imaplib's line-length error leaves the rest of that line unread, so it is out of step too.
    A NO or BAD answer, a FETCH answer read to its end that did not parse (ProtocolError), or
    a missing capability leave the connection usable.
    """
    if isinstance(exc, (OSError, IMAPClientAbortError)):  # TimeoutError, SSLError: OSErrors
        return True
    return isinstance(exc, IMAPClientError) and bool(_OVERLONG_LINE_RE.search(server_text(exc)))


def server_text(exc: BaseException) -> str:
    """The server's words in an imaplib/imapclient exception, as plain text."""
    parts = []
    for arg in exc.args:
        text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
        # imaplib passes LOGIN's NO text as bytes, which LoginError turned into "b'...'".
        if len(text) >= 3 and text[:2] in ("b'", 'b"') and text[-1] == text[1]:
            text = text[2:-1]
        parts.append(text)
    return " ".join(parts)


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn imapclient, socket and TLS exceptions into ``emailsync.errors`` ones."""
    try:
        yield
    except MailboxError:
        raise
    except LoginError as exc:
        text = server_text(exc)
        if is_transient(text):
            raise ConnectionLostError(f"{action}: server unavailable: {text}") from exc
        raise AuthError(f"{action}: login refused by the server: {text}") from exc
    except IMAPClientAbortError as exc:
        text = server_text(exc)
        # Closed by the peer (BYE, EOF, a line cut short, a send on a dead socket: imaplib's
        # "socket error: …") is counted as bye; out of step (an answer that is no IMAP
        # response) as protocol. Either way the connection is gone.
        closed = isinstance(exc.__cause__ or exc.__context__, OSError) or any(
            word in text.upper() for word in ("BYE", "EOF", "SOCKET ERROR")
        )
        raise ConnectionLostError(
            f"{action}: {text}",
            kind="bye" if closed else "protocol",
            retry_after=backoff_hint(text),
            gone=connection_gone(exc),
        ) from exc
    except CapabilityError as exc:
        raise ConnectionLostError(f"{action}: {server_text(exc)}", kind="protocol") from exc
    except IMAPClientError as exc:
        text = server_text(exc)
        if response_code(text) in ("TRYCREATE", "NONEXISTENT"):
            raise FolderMissingError(f"{action}: {text}") from exc
        raise ConnectionLostError(
            f"{action}: {text}",
            kind="protocol",
            retry_after=backoff_hint(text),
            gone=connection_gone(exc),
        ) from exc
    except TimeoutError as exc:
        raise ConnectionLostError(f"{action}: timed out", kind="timeout") from exc
    except ssl.SSLError as exc:
        # Includes certificate verification failures: never retried without verification.
        raise ConnectionLostError(f"{action}: TLS failed: {exc}", kind="tls") from exc
    except ConnectionRefusedError as exc:
        raise ConnectionLostError(f"{action}: connection refused", kind="refused") from exc
    except OSError as exc:
        raise ConnectionLostError(f"{action}: {exc.strerror or exc}", kind="bye") from exc
