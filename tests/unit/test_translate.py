"""Reading server answers: response codes (RFC 5530), throttling hints, error grouping."""

from __future__ import annotations

import ssl

import pytest
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError, ProtocolError

from emailsync.errors import AuthError, ConnectionLostError, FolderMissingError, MailboxError
from emailsync.imap.translate import (
    backoff_hint,
    connection_gone,
    is_transient,
    response_code,
    translated,
)


def test_response_code_is_read_from_the_server_text() -> None:
    assert response_code("[UNAVAILABLE] Temporary authentication failure.") == "UNAVAILABLE"
    assert response_code("Logged in") is None


@pytest.mark.parametrize("code", ["UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT"])
def test_try_again_codes_are_transient(code: str) -> None:
    assert is_transient(f"[{code}] later")


def test_authenticationfailed_is_not_transient() -> None:
    assert not is_transient("[AUTHENTICATIONFAILED] Authentication failed.")


def test_exchange_throttling_hint_is_read_in_seconds() -> None:
    text = "Request is throttled. Suggested Backoff Time: 299961 milliseconds"
    assert backoff_hint(text) == pytest.approx(299.961)
    assert backoff_hint("BYE bye") is None


def raised(exc: BaseException) -> BaseException:
    with pytest.raises(MailboxError) as info, translated("test"):
        raise exc
    return info.value


def test_refused_login_needs_reauth_and_unavailable_login_is_transient() -> None:
    assert isinstance(raised(LoginError("[AUTHENTICATIONFAILED] no")), AuthError)
    assert isinstance(raised(LoginError("[UNAVAILABLE] later")), ConnectionLostError)


def test_trycreate_means_the_folder_is_missing() -> None:
    err = raised(IMAPClientError("[TRYCREATE] Mailbox doesn't exist: Rezi-Imported.Sent"))
    assert isinstance(err, FolderMissingError)


def test_a_send_on_a_dead_socket_is_a_lost_connection_not_a_protocol_error() -> None:
    # imaplib (and our pipelined send) wrap the OSError as "socket error: [Errno 32] …".
    # "protocol" would make the filer retry message by message on the dead connection.
    try:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except OSError as exc:
            raise IMAPClientAbortError(f"socket error: {exc}") from exc
    except IMAPClientAbortError as abort:
        err = raised(abort)
    assert isinstance(err, ConnectionLostError)
    assert err.kind == "bye"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (IMAPClientAbortError("socket error: EOF"), "bye"),
        (TimeoutError(), "timeout"),
        (ssl.SSLCertVerificationError("certificate verify failed"), "tls"),
        (ConnectionRefusedError(111, "refused"), "refused"),
        (ConnectionResetError(104, "reset"), "bye"),
        (IMAPClientError("BAD Error in IMAP command"), "protocol"),
    ],
)
def test_connection_trouble_is_grouped_by_kind(exc: BaseException, kind: str) -> None:
    err = raised(exc)
    assert isinstance(err, ConnectionLostError)
    assert err.kind == kind
    assert err.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "kind", "gone"),
    [
        # Cut short mid-line by a peer that went away (imaplib's and the lean reader's words).
        (
            IMAPClientAbortError(
                "command: FETCH => socket error: unterminated line: b'* 2 FETCH (UID 2 '"
            ),
            "bye",
            True,
        ),
        # Garbage where a response should be: out of step, so gone, counted as protocol.
        (
            IMAPClientAbortError("command: FETCH => unexpected response: b'%garbage%'"),
            "protocol",
            True,
        ),
        (IMAPClientAbortError("unexpected tagged response: b'X9 OK done'"), "protocol", True),
        (IMAPClientError("command: FETCH => got more than 1000000 bytes"), "protocol", True),
        (IMAPClientError("fetch failed: [SERVERBUG] Internal error"), "protocol", False),
        (IMAPClientError("FETCH command error: BAD [b'Error in IMAP command']"), "protocol", False),
        (ProtocolError("bad FETCH response for message 2"), "protocol", False),
        (TimeoutError(), "timeout", True),
        (ConnectionResetError(104, "reset"), "bye", True),
    ],
)
def test_one_table_says_whether_the_connection_is_gone(
    exc: BaseException, kind: str, gone: bool
) -> None:
    """Issue 19 defect 3: a line cut short or garbage is a lost connection, not a refusal;
    the filer retries a refused message alone on the same connection, a lost one never."""
    assert connection_gone(exc) is gone
    err = raised(exc)
    assert isinstance(err, ConnectionLostError)
    assert (err.kind, err.gone) == (kind, gone)
