"""The private parts of imaplib and imapclient that emailsync.imap uses are there, as used.

The lean FETCH/MOVE reader (imap/fetch.py), the pipelined header fetches and MOVEs
(imap/session.py) and the IDLE buffer check (imap/idle.py) reach under imapclient's API
into its imaplib connection. Neither library promises any of this, so pyproject.toml pins
imapclient to the versions it was tested with. A failure here means an upgrade (of
imapclient, or of Python for imaplib) changed one of them: re-test the pin with the
integration suite against Dovecot and ``bench/run.py --smoke`` before widening it.
"""

from __future__ import annotations

import imaplib
import inspect
import io
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import metadata

import imapclient
import pytest
from imapclient.datetime_util import parse_to_datetime
from imapclient.imapclient import SocketTimeout
from imapclient.response_parser import parse_response

from emailsync.imap import fetch

VERSIONS = f"imapclient {metadata.version('imapclient')}, Python {sys.version.split()[0]}"


def changed(what: str) -> str:
    """The failure text: which internal changed, and that the pin must be re-tested."""
    return (
        f"{what} is not as emailsync.imap uses it on {VERSIONS}: "
        "re-test the imapclient pin in pyproject.toml (and imaplib on this Python) "
        "before allowing this version"
    )


# Private methods called on imaplib.IMAP4 (imap/fetch.py, imap/idle.py), with their
# parameters, and the public-but-undocumented ones the lean reader calls beside them.
IMAPLIB_METHODS = {
    "_new_tag": ["self"],
    "_check_bye": ["self"],
    "_append_untagged": ["self", "typ", "dat"],
    "_get_line": ["self"],
    "readline": ["self"],
    "read": ["self", "size"],
    "send": ["self", "data"],
}
# Private methods called on imapclient.IMAPClient (imap/session.py).
IMAPCLIENT_METHODS = {
    "_normalise_folder": ["self", "folder_name"],
    "socket": ["self"],
}


def parameters(function: Callable[..., object]) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    ("owner", "name", "expected"),
    [(imaplib.IMAP4, name, expected) for name, expected in IMAPLIB_METHODS.items()]
    + [(imapclient.IMAPClient, name, expected) for name, expected in IMAPCLIENT_METHODS.items()],
)
def test_library_methods_emailsync_calls_keep_their_parameters(
    owner: type, name: str, expected: list[str]
) -> None:
    """The methods called on imaplib's and imapclient's objects take the arguments passed."""
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    method = getattr(owner, name, None)
    assert callable(method), changed(where)
    assert parameters(method) == expected, changed(f"{where}'s signature")


def test_imapclient_helpers_from_its_modules_are_there() -> None:
    """SocketTimeout, parse_response and parse_to_datetime keep the parameters we pass."""
    assert SocketTimeout(connect=1.0, read=2.0).read == 2.0, changed(
        "imapclient.imapclient.SocketTimeout"
    )
    assert parameters(parse_response) == ["data"], changed(
        "imapclient.response_parser.parse_response"
    )
    assert parameters(parse_to_datetime)[:2] == ["timestamp", "normalise"], changed(
        "imapclient.datetime_util.parse_to_datetime"
    )


def test_imaplib_overlong_line_error_keeps_its_words() -> None:
    """imap/translate.py recognises imaplib's ``got more than _MAXLINE bytes`` error."""
    assert isinstance(getattr(imaplib, "_MAXLINE", None), int), changed("imaplib._MAXLINE")
    assert "got more than" in inspect.getsource(imaplib.IMAP4.readline), changed(
        "imaplib.IMAP4.readline's overlong-line error"
    )


@pytest.mark.parametrize(
    "line",
    [
        b"* 3 EXISTS",
        b"* 7 EXPUNGE",
        b"* OK [COPYUID 12 1:3 7:9] Moved",
        b"* NO [ALERT] careful",
        b"* BYE [UNAVAILABLE] later",
        b"* FLAGS (\\Seen \\Deleted)",
        b'* LIST () "/" {5}',
        b"* VANISHED 3:4",
    ],
)
def test_fetch_copies_of_imaplib_patterns_read_lines_as_imaplib_does(line: bytes) -> None:
    """imap/fetch.py stores untagged responses with copies of imaplib's regexes."""
    pairs = [
        (fetch._UNTAGGED_RESPONSE, imaplib.Untagged_response),
        (fetch._UNTAGGED_STATUS, imaplib.Untagged_status),
        (fetch._IMAPLIB_LITERAL, imaplib.Literal),
    ]
    for ours, theirs in pairs:
        mine, its = ours.match(line), theirs.match(line)
        assert (mine and mine.groupdict()) == (its and its.groupdict()), changed(
            f"imaplib.{theirs.pattern!r} on {line!r}"
        )
    text = line.partition(b" ")[2].partition(b" ")[2]
    mine, its = fetch._RESPONSE_CODE.match(text), imaplib.Response_code.match(text)
    assert (mine and mine.groupdict()) == (its and its.groupdict()), changed(
        "imaplib.Response_code"
    )


@pytest.fixture
def client() -> Iterator[imapclient.IMAPClient]:
    """An IMAPClient connected to a greeting-and-CAPABILITY-only listener on loopback.

    No mail is served: only the connection objects are looked at, not IMAP behaviour.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            conn.sendall(b"* OK ready\r\n")
            reader = conn.makefile("rb")
            tag = reader.readline().split(b" ", 1)[0]  # imaplib's CAPABILITY at connect
            conn.sendall(b"* CAPABILITY IMAP4rev1 IDLE MOVE\r\n" + tag + b" OK done\r\n")
            reader.read()  # until the client shuts down

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    connected = imapclient.IMAPClient(
        "127.0.0.1", port=listener.getsockname()[1], ssl=False, timeout=5
    )
    try:
        yield connected
    finally:
        connected.shutdown()
        server.join(timeout=5)
        listener.close()


def test_imapclient_keeps_its_imaplib_connection_in_imap(client: imapclient.IMAPClient) -> None:
    """``IMAPClient._imap`` is the imaplib connection the lean reader talks through."""
    imap = getattr(client, "_imap", None)
    assert isinstance(imap, imaplib.IMAP4), changed("imapclient.IMAPClient._imap")


def test_imaplib_connection_state_is_where_the_lean_reader_looks(
    client: imapclient.IMAPClient,
) -> None:
    """tagged_commands, untagged_responses, state and a peekable file, as fetch/idle use."""
    imap = client._imap
    assert isinstance(getattr(imap, "tagged_commands", None), dict), changed(
        "imaplib.IMAP4.tagged_commands"
    )
    assert isinstance(getattr(imap, "untagged_responses", None), dict), changed(
        "imaplib.IMAP4.untagged_responses"
    )
    assert imap.state == "NONAUTH", changed("imaplib.IMAP4.state")
    # imap/idle.py peeks at the buffered reader; imap/session.py replaces it after login.
    assert isinstance(getattr(imap, "file", None), io.BufferedReader), changed("imaplib.IMAP4.file")


def test_imaplib_new_tag_registers_it_unanswered(client: imapclient.IMAPClient) -> None:
    """fetch._send takes a tag; fetch._read_until_tagged expects it pending as None."""
    imap = client._imap
    tag = imap._new_tag()
    assert isinstance(tag, bytes), changed("imaplib.IMAP4._new_tag's result")
    assert tag in imap.tagged_commands, changed("imaplib.IMAP4._new_tag")
    assert imap.tagged_commands[tag] is None, changed("imaplib.IMAP4._new_tag")
    assert imap.tagre.match(tag + b" OK done") is not None, changed("imaplib's tag format")
    assert fetch._TAGGED.match(tag + b" OK done") is not None, changed("imaplib's tag format")


def test_imaplib_untagged_store_and_bye_check(client: imapclient.IMAPClient) -> None:
    """_append_untagged stores by type; _check_bye aborts once a BYE is stored."""
    imap = client._imap
    imap._append_untagged("EXISTS", b"3")
    assert imap.untagged_responses.get("EXISTS") == [b"3"], changed(
        "imaplib.IMAP4._append_untagged"
    )
    imap._check_bye()
    imap._append_untagged("BYE", b"going")
    with pytest.raises(imaplib.IMAP4.abort):
        imap._check_bye()


def test_imapclient_normalise_folder_gives_a_quoted_name(
    client: imapclient.IMAPClient,
) -> None:
    """imap/session.py hands ``_normalise_folder``'s result to UID MOVE as it stands."""
    folder = client._normalise_folder("Queue/Failed")
    assert isinstance(folder, bytes | str), changed("imapclient.IMAPClient._normalise_folder")
    as_bytes = folder if isinstance(folder, bytes) else folder.encode()
    assert as_bytes == b'"Queue/Failed"', changed("imapclient.IMAPClient._normalise_folder")
