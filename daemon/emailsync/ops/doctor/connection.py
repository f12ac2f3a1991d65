"""Getting through to the server: what answers on its port when a connect fails, and TLS.

``knock`` looks at the port after a failed connect (plain-text greeting, TLS, nothing), so the
fix can say what the server does speak; ``tls_verdict`` reads the certificate of a session.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from emailsync.config import ServerSettings
from emailsync.ops.doctor.finding import NOTE, OK, PROBLEM, Finding, branch_table

# A certificate expiring this soon is reported, so it is renewed before logins start failing.
CERT_WARN_DAYS = 14
# After a failed connect, how long doctor waits for a plain-text greeting before trying TLS.
GREETING_WAIT_SECONDS = 3.0
GREETING_BYTES = 200


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
            server, branch_table(branch), kind=kind, error=error, answer=answer, timeout=timeout
        ),
    )


def _connection_fix(
    server: ServerSettings, table: str, *, kind: str, error: str, answer: PortAnswer, timeout: float
) -> str:
    """The fix for ``connection_verdict``; ``table``: the config table of ``server``."""
    where = f"{server.host}:{server.port}"
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
