"""A message's BODYSTRUCTURE (RFC 3501 §7.4.2) → which text parts to fetch, which attachments.

It lets a pass fetch only the text an event needs (``BODY.PEEK[n]<0.cap>``) and list the
attachments by name and size without downloading them. It follows the choices of
``message._extract_body``: message/rfc822 and message/global parts are attachments, a part
with an attachment disposition or a file name is an attachment, text/plain and text/html
parts are text. A structure it cannot read with confidence gives None, and the caller
falls back to fetching the message (whole, or a capped prefix when it is large), so the
stdlib parser decides as before. Never raises.
"""

from __future__ import annotations

from collections.abc import Sequence

from emailsync.mail.message import MAX_MIME_DEPTH, display_filename
from emailsync.model import Attachment, BodyPlan, TextSection

# Base64 (RFC 2045 §6.8) writes at most 76 characters and a CRLF per line: the decoded size
# of an attachment is estimated from its encoded size without fetching it.
_BASE64_LINE = 78


class _UnreadableError(Exception):
    """The structure is not what RFC 3501 §7.4.2 describes, or uses what is not handled."""


def plan_body(structure: object) -> BodyPlan | None:
    """The text parts and attachments of a BODYSTRUCTURE as imapclient parses it; None if odd."""
    texts: list[TextSection] = []
    attachments: list[Attachment] = []
    try:
        _walk(structure, "", 0, texts, attachments)
    except (_UnreadableError, TypeError, ValueError, IndexError, UnicodeError):
        return None
    return BodyPlan(tuple(texts), tuple(attachments))


def _walk(
    part: object, prefix: str, depth: int, texts: list[TextSection], found: list[Attachment]
) -> None:
    if not isinstance(part, tuple | list) or not part:
        raise _UnreadableError("not a body")
    if isinstance(part[0], list | tuple):  # multipart: the children, then the subtype
        children = part[0] if isinstance(part[0], list) else _leading_tuples(part)
        rest = part[1:] if isinstance(part[0], list) else part[len(children) :]
        if not children or depth >= MAX_MIME_DEPTH:
            raise _UnreadableError("empty or too deep multipart")
        if len(rest) < 2 or "boundary" not in _params(rest[1]):
            # RFC 2046 §5.1.1 requires one; without it the server's split is a guess, and
            # the stdlib parser keeps the raw text instead.
            raise _UnreadableError("multipart without boundary")
        for number, child in enumerate(children, start=1):
            _walk(
                child,
                f"{prefix}{number}" if not prefix else f"{prefix}.{number}",
                depth + 1,
                texts,
                found,
            )
        return
    section = prefix or "1"  # RFC 3501 §6.4.5: a non-multipart message's body is part 1
    maintype, subtype = _text(part[0]).lower(), _text(part[1]).lower()
    content_type = f"{maintype}/{subtype}"
    params = _params(part[2])
    encoding = _text(part[5]).lower() if part[5] is not None else "7bit"
    size = int(part[6] or 0)
    if maintype == "message" and subtype in ("rfc822", "global"):
        extension = 11  # envelope, body and lines come first (§7.4.2)
    elif maintype == "text":
        extension = 9  # body-fld-lines first, then md5
    else:
        extension = 8  # md5, then disposition
    disposition, disposition_params = _disposition(part, extension)
    filename = _filename(disposition_params.get("filename"), params.get("name"))
    if content_type in ("message/rfc822", "message/global"):
        found.append(Attachment(filename or "forwarded.eml", content_type, size))
    elif disposition == "attachment" or filename is not None:
        found.append(Attachment(filename or "unnamed", content_type, _decoded_size(size, encoding)))
    elif content_type in ("text/plain", "text/html"):
        charset = params.get("charset", "")
        texts.append(TextSection(section, content_type, charset, encoding, size))
    elif maintype == "multipart":
        raise _UnreadableError("multipart without parts")  # a lost boundary: let the parser see it


def _leading_tuples(part: Sequence[object]) -> list[object]:
    children: list[object] = []
    for item in part:
        if not isinstance(item, tuple | list):
            break
        children.append(item)
    return children


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return value
    raise _UnreadableError(f"expected a string, got {type(value).__name__}")


def _params(value: object) -> dict[str, str]:
    """A body-fld-param list ``(name value …)`` as a dict; RFC 2231 parameters are not handled."""
    if value is None:
        return {}
    if not isinstance(value, tuple | list) or len(value) % 2:
        raise _UnreadableError("odd parameter list")
    params: dict[str, str] = {}
    for name, val in zip(value[::2], value[1::2], strict=True):
        key = _text(name).lower()
        if "*" in key:
            # RFC 2231 continuations or charsets: the stdlib parser decodes them.
            raise _UnreadableError("RFC 2231 parameter")
        params.setdefault(key, _text(val) if val is not None else "")
    return params


def _disposition(part: Sequence[object], index: int) -> tuple[str | None, dict[str, str]]:
    """body-fld-dsp (RFC 3501 §7.4.2): ``("attachment" ("filename" "x.pdf"))`` or NIL."""
    if len(part) <= index or part[index] is None:
        return None, {}
    value = part[index]
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise _UnreadableError("odd disposition")
    return _text(value[0]).lower(), _params(value[1])


def _filename(*candidates: str | None) -> str | None:
    for candidate in candidates:
        if candidate is not None:
            return display_filename(candidate)
    return None


def _decoded_size(size: int, encoding: str) -> int:
    """The decoded size of a part from its encoded size (exact but for base64's line ends)."""
    if encoding != "base64":
        return size
    lines = -(-size // _BASE64_LINE)
    return max(0, (size - 2 * lines) * 3 // 4)
