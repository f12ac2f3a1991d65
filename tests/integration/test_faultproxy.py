"""The fault proxy itself, against real Dovecot: it forwards, counts, and breaks as asked."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import imapclient
import pytest

from emailsync.dev.dovecot import Dovecot

from .conftest import MailUser
from .faultproxy import FaultProxy

pytestmark = pytest.mark.dovecot


@pytest.fixture
def proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    with FaultProxy(dovecot.port) as running:
        yield running


def connect(proxy: FaultProxy, timeout: float = 5) -> socket.socket:
    """A raw socket through the proxy, greeting read."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    assert sock.recv(4096).startswith(b"* OK")
    return sock


def command(sock: socket.socket, line: bytes, tag: bytes = b"a") -> bytes:
    """Send one tagged command; read up to its tagged answer."""
    sock.sendall(tag + b" " + line + b"\r\n")
    answer = b""
    while not any(
        row.startswith(tag + b" ") for row in answer.split(b"\r\n") if answer.endswith(b"\r\n")
    ):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; got {answer!r}")
        answer += chunk
    return answer


def read_to_end(sock: socket.socket, into: bytearray | None = None) -> None:
    """Read until EOF (or the error a reset raises), keeping what came in ``into``."""
    while chunk := sock.recv(65536):
        if into is not None:
            into += chunk


def login(proxy: FaultProxy, user: MailUser) -> socket.socket:
    sock = connect(proxy)
    assert b"a OK" in command(sock, f'LOGIN "{user.address}" "{user.password}"'.encode())
    return sock


def test_forwards_and_counts_connections_commands_and_logins(
    proxy: FaultProxy, user: MailUser
) -> None:
    client = imapclient.IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=5)
    client.login(user.address, user.password)
    client.select_folder("INBOX")
    client.logout()
    with user.client() as direct:  # not through the proxy: not counted
        direct.noop()
    assert len(proxy.connections) == 1
    assert proxy.logins(user.address) == 1
    assert proxy.logins("someone@else.example") == 0
    assert proxy.commands(r"^\S+ SELECT ") == 1
    assert not any(user.password in line for line in proxy.connections[0].commands)
    assert not proxy.faults


def test_reset_on_login_before_forwarding_refuses_with_rst(
    proxy: FaultProxy, user: MailUser
) -> None:
    proxy.reset_on(r" LOGIN ", forward=False)
    sock = connect(proxy)
    sock.sendall(f'a LOGIN "{user.address}" "{user.password}"\r\n'.encode())
    with pytest.raises(ConnectionResetError):
        read_to_end(sock)
    sock.close()
    assert proxy.faults["reset_on"] == 1
    assert proxy.logins(user.address) == 1  # seen, though it never reached Dovecot
    login(proxy, user).close()  # the rule fired once: the next connection works


def test_reset_after_bytes_cuts_a_fetch_answer_short(proxy: FaultProxy, user: MailUser) -> None:
    with user.client() as direct:
        direct.append("INBOX", b"Subject: big\r\n\r\n" + b"x" * 50_000 + b"\r\n")
    sock = login(proxy, user)
    command(sock, b"SELECT INBOX", b"b")
    proxy.reset_on(r"UID FETCH", after_bytes=1000)
    sock.sendall(b"c UID FETCH 1:* BODY.PEEK[]\r\n")
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        read_to_end(sock, got)
    sock.close()
    assert 0 < len(got) <= 1000
    assert proxy.faults["reset_on"] == 1
    assert proxy.faults["reset"] == 1


def test_stall_keeps_the_socket_open_and_silent_until_resumed(
    proxy: FaultProxy, user: MailUser
) -> None:
    sock = login(proxy, user)
    proxy.stall()
    sock.settimeout(1)
    sock.sendall(b"b NOOP\r\n")
    with pytest.raises(TimeoutError):  # no answer, no FIN, no RST
        sock.recv(4096)
    assert proxy.open_connections() == 1
    proxy.resume()
    sock.settimeout(5)
    assert b"b OK" in sock.recv(4096)
    sock.close()


def test_stall_on_a_command_stalls_only_that_connection(proxy: FaultProxy, user: MailUser) -> None:
    proxy.stall_on(r" NOOP$")
    stalled = login(proxy, user)
    stalled.settimeout(1)
    stalled.sendall(b"b NOOP\r\n")
    with pytest.raises(TimeoutError):
        stalled.recv(4096)
    other = login(proxy, user)  # a second connection is not affected
    assert b"b OK" in command(other, b"NOOP", b"b")
    other.close()
    stalled.close()
    # The proxy notices the client gave up and closes its side (and Dovecot's).
    deadline = time.monotonic() + 5
    while proxy.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.open_connections() == 0


def test_half_close_sends_fin_to_the_client(proxy: FaultProxy, user: MailUser) -> None:
    sock = login(proxy, user)
    proxy.half_close()
    sock.settimeout(5)
    assert sock.recv(4096) == b""  # EOF, not a reset
    sock.sendall(b"b NOOP\r\n")  # still writable; the proxy swallows it
    sock.close()
    assert proxy.faults["half_close"] == 1


def test_drop_closes_every_open_connection(proxy: FaultProxy, user: MailUser) -> None:
    socks = [login(proxy, user), login(proxy, user)]
    proxy.drop()
    for sock in socks:
        sock.settimeout(5)
        assert sock.recv(4096) == b""
        sock.close()
    assert proxy.faults["drop"] == 2
    assert proxy.open_connections() == 0


def test_trickle_sends_one_byte_at_a_time(proxy: FaultProxy, user: MailUser) -> None:
    sock = login(proxy, user)
    proxy.trickle(0.01)
    started = time.monotonic()
    answer = command(sock, b"NOOP", b"b")  # "b OK NOOP completed (…)" is > 25 bytes
    assert time.monotonic() - started >= 0.25
    proxy.trickle(None)
    assert b"b OK" in answer
    sock.close()


def test_before_client_command_runs_before_the_line_is_forwarded(
    proxy: FaultProxy, user: MailUser
) -> None:
    seen: list[int] = []

    def append_first() -> None:
        # The IDLE line has not reached Dovecot yet: the proxy holds it for this callback.
        seen.append(proxy.commands(r" IDLE$"))
        with user.client() as direct:
            direct.append("INBOX", b"Subject: just before idle\r\n\r\nhi\r\n")

    proxy.before_client_command(r" IDLE$", append_first)
    sock = login(proxy, user)
    command(sock, b"SELECT INBOX", b"b")  # empty mailbox
    sock.sendall(b"c IDLE\r\n")
    sock.settimeout(5)
    got = b""
    while b"EXISTS" not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    assert b"+ idling" in got.lower() or b"+ " in got
    assert seen == [1]  # counted on arrival, forwarded after the callback
    assert proxy.faults["callback"] == 1
    sock.sendall(b"DONE\r\n")
    sock.close()


def test_cut_reply_on_ends_the_connection_in_the_middle_of_a_matching_line(
    proxy: FaultProxy, user: MailUser
) -> None:
    with user.client() as direct:
        for n in (1, 2, 3):
            direct.append("INBOX", f"Subject: {n}\r\n\r\nhi\r\n".encode())
    sock = login(proxy, user)
    command(sock, b"SELECT INBOX", b"b")
    proxy.cut_reply_on(rb"\* \d+ FETCH \(UID 2 ")
    sock.sendall(b"c UID FETCH 1:* (FLAGS)\r\n")
    got = bytearray()
    read_to_end(sock, got)  # FIN, not RST: everything sent before the cut arrives
    sock.close()
    assert re.search(rb"\* 1 FETCH \(UID 1 [^\r\n]*\)\r\n", got)
    assert got.endswith(b"* 2 FETCH (UID 2 ")  # the line cut short, no CRLF
    assert proxy.faults["cut_reply"] == 1


def test_garble_reply_on_replaces_the_matching_bytes(proxy: FaultProxy, user: MailUser) -> None:
    with user.client() as direct:
        for n in (1, 2):
            direct.append("INBOX", f"Subject: {n}\r\n\r\nhi\r\n".encode())
    sock = login(proxy, user)
    command(sock, b"SELECT INBOX", b"b")
    proxy.garble_reply_on(rb"\* \d+ FETCH \(UID 2 ", b"%garbage% ")
    answer = command(sock, b"UID FETCH 1:* (FLAGS)", b"c")
    sock.close()
    assert b"* 1 FETCH (UID 1 " in answer
    assert b"\r\n%garbage% FLAGS" in answer
    assert b"UID 2 " not in answer
    assert proxy.faults["garble_reply"] == 1
