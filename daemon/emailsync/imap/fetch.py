"""A lean UID FETCH (RFC 3501 §6.4.5, §7.4.2) on an imapclient connection, for the hot path.

imapclient's FETCH reads the response through imaplib's untagged-response store and
parses it with a character-at-a-time lexer: 45 % of a backlog pass (issue 10 profile).
Here the command goes out on the same imaplib object (its tag counter, its socket and
timeout), the response lines and ``{n}`` literals are read from its file, and a regex
tokenizer builds what ``imapclient.IMAPClient.fetch`` would have returned: a dict per UID
with upper-case item names, ints for numbers, bytes for strings and literals, None for
NIL, tuples for lists, INTERNALDATE as a datetime, plus ``SEQ``.

Errors are raised as imapclient's (``IMAPClientError``, ``IMAPClientAbortError``,
``ProtocolError``) with the texts imaplib and imapclient use, so callers translate them
in ``imap/translate.py`` exactly as before. Untagged responses other than FETCH are
stored in imaplib's ``untagged_responses`` as imaplib would; a FETCH without a UID, or
for a UID not asked for, is dropped as imapclient drops it.

Library internals used here (no API promises them; pyproject.toml pins imapclient and
tests/unit/test_library_internals.py checks each): imaplib.IMAP4's ``_new_tag``,
``_check_bye``, ``_append_untagged``, ``tagged_commands``, ``untagged_responses``,
``state``, ``readline``/``read``/``send`` and its tagged-line pattern, plus copies of
imaplib's module regexes (``Untagged_response``, ``Untagged_status``, ``Literal``,
``Response_code``); reached through imapclient's ``IMAPClient._imap``.
"""

from __future__ import annotations

import functools
import imaplib
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from imapclient.datetime_util import parse_to_datetime
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, ProtocolError

FetchData = dict[bytes, Any]

# One token after whitespace: "(", ")", a quoted string with its quotes (RFC 3501 §4.3,
# backslash escapes only for "\\" and "\""), an atom (with any "[...]" section part and
# "<n>" origin, as in BODY[HEADER.FIELDS (TO)]<0>) or else one character nothing else
# accepts (a stray: _STRAY). One group and possessive quantifiers (no backtracking into a
# token): half the time of five groups (issue 23 profile: the tokenizer was 12 % of a pass).
_TOKEN = re.compile(
    rb'[ \t\r\n]*+(\(|\)|"[^"\\]*+(?:\\.[^"\\]*+)*+"'
    rb'|(?:[^\x00-\x20()"\[%]++|\[[^\]]*+\])++|[^ \t\r\n])',
    re.DOTALL,
)
# The one-character tokens that are no atom: controls, a lone quote, "[" unclosed, "%".
_STRAY = frozenset((set(range(0x21)) - set(b" \t\r\n")) | set(b'"[%'))
_ESCAPE = re.compile(rb'\\([\\"])')
_FETCH_LINE = re.compile(rb"\* (\d+) FETCH (.*)", re.DOTALL)
_LITERAL = re.compile(rb"\{(\d+)\}$")
# imaplib's own patterns (Lib/imaplib.py), for the responses stored as it stores them.
_IMAPLIB_LITERAL = re.compile(rb".*\{(?P<size>\d+)\}$", re.ASCII)
_UNTAGGED_RESPONSE = re.compile(rb"\* (?P<type>[A-Z-]+)( (?P<data>.*))?", re.ASCII)
_UNTAGGED_STATUS = re.compile(rb"\* (?P<data>\d+) (?P<type>[A-Z-]+)( (?P<data2>.*))?", re.ASCII)
_RESPONSE_CODE = re.compile(rb"\[(?P<type>[A-Z-]+)( (?P<data>.*))?\]", re.ASCII)
_TAGGED = re.compile(rb"(?P<tag>[A-Z]+\d+) (?P<type>[A-Z]+) (?P<data>.*)", re.ASCII)


def uid_fetch(
    imap: imaplib.IMAP4, uids: Sequence[int], items: Sequence[bytes]
) -> dict[int, FetchData]:
    """``UID FETCH uids (items)``: each asked-for UID that came back → its items.

    ``imap`` is an ``IMAPClient``'s underlying imaplib object (``client._imap``), in
    SELECTED state; the response is read to its tagged end before anything is parsed, so
    the connection stays in step even when a response cannot be parsed (ProtocolError).
    """
    if not uids:
        return {}
    return read_fetch(imap, send_fetch(imap, uids, items), uids)


def send_fetch(imap: imaplib.IMAP4, uids: Sequence[int], items: Sequence[bytes]) -> bytes:
    """Send ``UID FETCH uids (items)`` (``uids`` not empty) without reading; returns its tag.

    RFC 3501 §5.5: the client may send a command before the previous one is answered; the
    answer is read later with ``read_fetch``, before anything else reads the connection.
    """
    items_list = b" (" + b" ".join(items) + b")"
    return _send(imap, b"UID FETCH " + uid_set(uids) + items_list, "FETCH")


def read_fetch(imap: imaplib.IMAP4, tag: bytes, uids: Sequence[int]) -> dict[int, FetchData]:
    """Read and parse the answer to the FETCH sent as ``tag`` (see ``uid_fetch``)."""
    responses = _read_until_tagged(imap, tag, "FETCH", "fetch failed")
    wanted = set(uids)
    result: dict[int, FetchData] = {}
    for seq, segments in responses:
        data = parse_fetch_items(seq, segments)
        uid = data.pop(b"UID", None)
        if uid is not None and uid in wanted:
            result.setdefault(uid, {}).update(data)
    return result


def uid_move(imap: imaplib.IMAP4, uids: Sequence[int], folder: bytes) -> None:
    """``UID MOVE uids folder`` (RFC 6851), answered as ``IMAPClient.move`` answers it.

    ``folder`` is already encoded and quoted (``IMAPClient._normalise_folder``). Its
    answer (a COPYUID and one EXPUNGE per message, §4.3) is read here rather than by
    imaplib, which stores each line by a regex match per kind: 7 % of a backlog pass.
    """
    if uids:
        read_move(imap, send_move(imap, uids, folder))


def send_move(imap: imaplib.IMAP4, uids: Sequence[int], folder: bytes) -> bytes:
    """Send ``UID MOVE uids folder`` (``uids`` not empty) without reading; returns its tag.

    Its answer is read later with ``read_move``, which drops any FETCH lines on its way:
    Dovecot runs pipelined commands side by side, so the untagged FETCH lines of a FETCH
    sent behind a MOVE can come before the MOVE's tagged answer. Only
    ``imap.pipeline.CommandPipeline`` (which routes each line by its UID) sends a FETCH
    behind an unanswered MOVE.
    """
    return _send(imap, b"UID MOVE " + uid_set(uids) + b" " + folder, "MOVE")


def read_move(imap: imaplib.IMAP4, tag: bytes) -> None:
    """Read the answer to the MOVE sent as ``tag``; raises as ``IMAPClient.move`` would."""
    _read_until_tagged(imap, tag, "UID", "move failed")


def uid_set(uids: Iterable[int]) -> bytes:
    """An RFC 3501 §9 sequence-set of UIDs, runs of consecutive ones written ``a:b``."""
    ordered = sorted(set(uids))
    runs: list[bytes] = []
    start = previous = ordered[0]
    for uid in ordered[1:]:
        if uid != previous + 1:
            runs.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
            start = uid
        previous = uid
    runs.append(b"%d" % start if start == previous else b"%d:%d" % (start, previous))
    return b",".join(runs)


def _send(imap: imaplib.IMAP4, command: bytes, name: str) -> bytes:
    """Send a tagged command the way ``imaplib.IMAP4.uid`` does; returns its tag."""
    if imap.state != "SELECTED":
        raise IMAPClientError(
            f"command {name} illegal in state {imap.state}, only allowed in states SELECTED"
        )
    imap._check_bye()
    untagged = imap.untagged_responses
    # imaplib drops these before each command; imapclient's fetch takes FETCH ones out
    # after it (unsolicited FETCHes of an earlier command must not pile up here).
    for typ in ("OK", "NO", "BAD", "FETCH"):
        untagged.pop(typ, None)
    tag: bytes = imap._new_tag()
    try:
        imap.send(tag + b" " + command + b"\r\n")
    except OSError as exc:
        raise IMAPClientAbortError(f"socket error: {exc}") from exc
    return tag


def _read_until_tagged(
    imap: imaplib.IMAP4, tag: bytes, name: str, refused: str
) -> list[tuple[int, list[bytes]]]:
    """Read untagged FETCH responses up to the tagged one, which must be OK.

    ``name`` and ``refused`` word the errors as imaplib (``command: {name} => …``) and
    imapclient (``{refused}: …`` for a NO) word them.

    Each FETCH comes back as its sequence number and segments (see ``read_until``).
    """
    fetches: list[tuple[int, list[bytes]]] = []
    try:
        answer = read_until(imap, tag, lambda seq, segments: fetches.append((seq, segments)))
    except IMAPClientError as exc:
        raise reworded(exc, name) from exc
    check_answer(answer, name, refused)
    return fetches


FetchSink = Callable[[int, list[bytes]], None]


def read_until(imap: imaplib.IMAP4, tag: bytes, on_fetch: FetchSink) -> tuple[str, list[bytes]]:
    """Read responses up to the tagged answer of ``tag``; returns its type and text.

    Each untagged FETCH goes to ``on_fetch(seq, segments)``: the text after ``FETCH`` and,
    for each ``{n}`` literal, the literal then the text after it (the ``{n}`` markers are
    cut off the texts). Other untagged responses are stored as imaplib stores them; the
    tagged answers of other commands are kept in imaplib's ``tagged_commands``, where a
    later ``read_until`` of theirs (or imaplib) finds them. Every read goes through the
    connection's file, so with its socket timeout. A lost connection raises
    IMAPClientAbortError, a line longer than imaplib's _MAXLINE IMAPClientError, both
    without the ``command: …`` prefix (``reworded`` adds it).
    """
    tagged: dict[bytes, Any] = imap.tagged_commands
    result = tagged.get(tag)  # set when another command's reader read this answer already
    while result is None:
        line = _line(imap)
        if line[:2] == b"* ":
            match = _FETCH_LINE.match(line)
            if match is not None:
                on_fetch(int(match[1]), _segments(imap, match[2]))
            elif line[-8:] == b" EXPUNGE" and line[2:-8].isdigit():
                imap._append_untagged("EXPUNGE", line[2:-8])  # a MOVE's, one per message
            else:
                _store_untagged(imap, line)
                imap._check_bye()
            continue
        if line[:1] == b"+":
            continue  # a continuation request is not ours to answer; imaplib ignores it too
        line_tag, answer = _tagged(imap, line)
        if line_tag == tag:
            result = answer
        else:
            tagged[line_tag] = answer  # another command's: kept, as imaplib does
    # Forgotten only once answered: after a timeout imaplib may still read the late answer.
    del tagged[tag]
    imap._check_bye()
    return result  # type: ignore[no-any-return]


def reworded(exc: IMAPClientError, name: str) -> IMAPClientError:
    """A read error as imaplib words it for command ``name`` (``command: NAME => …``)."""
    if isinstance(exc, IMAPClientAbortError):
        return IMAPClientAbortError(f"command: {name} => {exc}")
    return IMAPClientError(f"command: {name} => {exc}")


def check_answer(answer: tuple[str, list[bytes]], name: str, refused: str) -> None:
    """Raise for a tagged answer other than OK, as imaplib (BAD) and imapclient (NO) do."""
    typ, data = answer
    if typ == "BAD":
        raise IMAPClientError(f"{name} command error: {typ} {data}")
    if typ != "OK":
        text = data[0].decode("utf-8", "replace") if data[0] is not None else ""
        raise IMAPClientError(f"{refused}: {text}")


def _tagged(imap: imaplib.IMAP4, line: bytes) -> tuple[bytes, tuple[str, list[bytes]]]:
    """A tagged response's tag, type and text; aborts on anything else, as imaplib does."""
    match = _TAGGED.match(line)
    if match is None:
        raise IMAPClientAbortError(f"unexpected response: {line!r}")
    if match["tag"] not in imap.tagged_commands:
        raise IMAPClientAbortError(f"unexpected tagged response: {line!r}")
    return match["tag"], (match["type"].decode("ascii"), [match["data"]])


def _line(imap: imaplib.IMAP4) -> bytes:
    """One response line without its CRLF; EOF and unterminated lines abort, as in imaplib."""
    line: bytes = imap.readline()
    if not line:
        raise IMAPClientAbortError("socket error: EOF")
    if line[-2:] != b"\r\n":
        raise IMAPClientAbortError(f"socket error: unterminated line: {line!r}")
    return line[:-2]


def _literal(imap: imaplib.IMAP4, size: int) -> bytes:
    data: bytes = imap.read(size)
    if len(data) != size:
        raise IMAPClientAbortError("socket error: EOF")
    return data


def _segments(imap: imaplib.IMAP4, text: bytes) -> list[bytes]:
    segments: list[bytes] = []
    while text[-1:] == b"}" and (marker := _LITERAL.search(text)) is not None:
        segments.append(text[: marker.start()])
        segments.append(_literal(imap, int(marker[1])))
        text = _line(imap)
    segments.append(text)
    return segments


def _store_untagged(imap: imaplib.IMAP4, line: bytes) -> None:
    """Keep an untagged response other than FETCH where imaplib's ``_get_response`` would.

    RFC 3501 §7: a server may send EXISTS, EXPUNGE, RECENT or status responses at any
    time; they land in ``untagged_responses`` by type, as after any imapclient command.
    """
    match = _UNTAGGED_RESPONSE.match(line)
    data2 = None
    if match is None:
        match = _UNTAGGED_STATUS.match(line)
        if match is None:
            raise IMAPClientAbortError(f"unexpected response: {line!r}")
        data2 = match["data2"]
    typ = match["type"].decode("ascii")
    data = match["data"] or b""
    if data2:
        data = data + b" " + data2
    while (literal := _IMAPLIB_LITERAL.match(data)) is not None:
        imap._append_untagged(typ, (data, _literal(imap, int(literal["size"]))))
        data = _line(imap)
    imap._append_untagged(typ, data)
    if typ in ("OK", "NO", "BAD") and (code := _RESPONSE_CODE.match(data)) is not None:
        imap._append_untagged(code["type"].decode("ascii"), code["data"])


def parse_fetch_items(seq: int, segments: Sequence[bytes]) -> FetchData:
    """One FETCH response's ``(name value …)`` list as imapclient's ``fetch`` gives it.

    ``segments`` alternate text and literal (see ``_read_until_tagged``). The UID, if any,
    is under ``UID``; raises ProtocolError when the text is not a FETCH item list.
    """
    values = parse_values(segments)
    if len(values) != 1 or not isinstance(values[0], tuple):
        raise ProtocolError(f"bad FETCH response for message {seq}")
    pairs = values[0]
    if len(pairs) % 2:
        raise ProtocolError(f"uneven number of FETCH items for message {seq}")
    data: FetchData = {b"SEQ": seq}
    for index in range(0, len(pairs), 2):
        name, value = pairs[index], pairs[index + 1]
        if not isinstance(name, bytes):
            raise ProtocolError(f"bad FETCH item name for message {seq}: {name!r}")
        name = name.upper()
        if name == b"UID":
            try:
                value = int(value)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"invalid UID: {value!r}") from exc
        elif name == b"INTERNALDATE":
            value = internaldate(value)
        data[name] = value
    return data


def parse_values(segments: Sequence[bytes]) -> list[Any]:
    """The IMAP values (RFC 3501 §4) in text segments and the literals between them."""
    stack: list[list[Any]] = []
    current: list[Any] = []
    append = current.append
    for index, segment in enumerate(segments):
        if index % 2:
            append(segment)  # a literal: bytes as they came
            continue
        for token in _TOKEN.findall(segment):
            first = token[0]
            if first == 0x28:  # (
                stack.append(current)
                current = []
                append = current.append
            elif first == 0x29:  # )
                if not stack:
                    raise ProtocolError("unbalanced ')' in FETCH response")
                done = tuple(current)
                current = stack.pop()
                append = current.append
                append(done)
            elif first == 0x22 and len(token) > 1:  # a quoted string (maybe empty)
                quoted = token[1:-1]
                append(_ESCAPE.sub(rb"\1", quoted) if b"\\" in quoted else quoted)
            elif token == b"NIL":
                append(None)
            elif token.isdigit():
                append(int(token) if first != 0x30 or len(token) == 1 else token)
            elif len(token) == 1 and first in _STRAY:
                raise ProtocolError(f"unexpected {token!r} in FETCH response")
            else:
                append(token)
    if stack:
        raise ProtocolError("unclosed '(' in FETCH response")
    return current


@functools.lru_cache(maxsize=256)
def internaldate(value: object) -> datetime | None:
    """An IMAP date-time as imapclient gives it unnormalised (its own time zone); None if odd.

    For INTERNALDATE and SAVEDATE (RFC 8514). Cached: a backlog's messages were mostly
    appended, and moved to Queue, within the same few seconds.
    """
    if not isinstance(value, bytes):
        return None
    try:
        return parse_to_datetime(value, normalise=False)  # type: ignore[no-any-return]
    except ValueError:
        return None
