"""What ``ImapSession.fetch_full`` reads of message bodies, and how FETCH answers become messages.

The plan: by each message's BODYSTRUCTURE (RFC 3501 §7.4.2), only its text parts, each cut
at BODY_FETCH_CAP, one FETCH per set of part numbers and per FULL_FETCH_BYTES; a message
whose structure cannot be read is fetched whole (up to WHOLE_FETCH_MAX) or its first
BODY_FETCH_CAP bytes. ``send_full`` sends those FETCHes through the connection's
``CommandPipeline`` (maybe ahead, for ``prefetch_full``), ``read_full`` reads their answers.
``messages_of`` turns a FETCH answer into FetchedMessages (the header fetch uses it too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from emailsync.imap.fetch import FetchData, internaldate
from emailsync.imap.pipeline import Command, CommandPipeline
from emailsync.imap.structure import plan_body
from emailsync.imap.translate import translated
from emailsync.mail.message import MAX_HTML_SOURCE_CHARS
from emailsync.model import BodyPlan, FetchedMessage

# Cap on bytes fetched in one FETCH of bodies, so one batch cannot hold a socket read for
# minutes nor the memory of many large texts at once.
FULL_FETCH_BYTES = 4 * 1024 * 1024
# Cap on the bytes of one text part fetched for an event (issue 10: a 50 MB message costs
# at most this): 1 MiB is what message.py reads of HTML source at most.
BODY_FETCH_CAP = MAX_HTML_SOURCE_CHARS
# A message whose BODYSTRUCTURE cannot be read is fetched whole up to this size, else only
# its first BODY_FETCH_CAP bytes.
WHOLE_FETCH_MAX = BODY_FETCH_CAP

# ``ImapSession._items``: the FETCH items for a body item, with or without BODYSTRUCTURE.
Items = Callable[..., list[bytes]]


@dataclass
class _FullFetch:
    """The FETCHes ``fetch_full`` reads, sent (maybe ahead, ``prefetch_full``)."""

    uids: tuple[int, ...]
    plans: dict[int, BodyPlan | None]
    textless: list[int] = field(default_factory=list)  # nothing to fetch: the plan says all
    texts: list[tuple[tuple[str, ...], Command]] = field(default_factory=list)
    whole: list[Command] = field(default_factory=list)
    prefix: list[Command] = field(default_factory=list)


def send_full(
    pipeline: CommandPipeline,
    uids: Sequence[int],
    sizes: dict[int, int] | None,
    plans: Mapping[int, BodyPlan | None] | None,
    items_for: Items,
) -> _FullFetch:
    """Send the FETCHes ``fetch_full`` reads (see there); the structures are read here."""
    sizes = sizes or {}
    known = plans or {}
    found = {uid: known[uid] for uid in uids if uid in known}
    found.update(fetch_plans(pipeline, [uid for uid in uids if uid not in known]))
    sent = _FullFetch(tuple(uids), found)
    by_sections: dict[tuple[str, ...], list[int]] = {}
    whole: list[int] = []
    prefix: list[int] = []
    for uid in uids:
        if uid not in found:
            continue  # expunged by someone else meanwhile
        plan = found[uid]
        if plan is not None:
            by_sections.setdefault(tuple(t.section for t in plan.texts), []).append(uid)
        elif sizes.get(uid, 0) <= WHOLE_FETCH_MAX:
            whole.append(uid)
        else:
            prefix.append(uid)
    with translated("fetch text"):
        for sections, group in by_sections.items():
            if not sections:  # no text part at all: the structure says all an event needs
                sent.textless.extend(group)
                continue
            items = [b"BODY.PEEK[%s]<0.%d>" % (s.encode(), BODY_FETCH_CAP) for s in sections]
            cost = {uid: _text_bytes(found[uid]) for uid in group}
            for chunk in _by_bytes(group, cost):
                sent.texts.append((sections, pipeline.fetch(chunk, items)))
    with translated("fetch"):
        for chunk in _by_bytes(whole, sizes):
            items = items_for(b"BODY.PEEK[]", structure=False)
            sent.whole.append(pipeline.fetch(chunk, items))
        for chunk in _by_bytes(prefix, dict.fromkeys(prefix, BODY_FETCH_CAP)):
            items = items_for(b"BODY.PEEK[]<0.%d>" % BODY_FETCH_CAP, structure=False)
            sent.prefix.append(pipeline.fetch(chunk, items))
    return sent


def read_full(pipeline: CommandPipeline, sent: _FullFetch) -> list[FetchedMessage]:
    """The answers to the FETCHes of ``send_full``, as ``fetch_full`` gives them."""
    plans = sent.plans
    result = [FetchedMessage(uid, b"", None, 0, plan=plans[uid]) for uid in sent.textless]
    for sections, command in sent.texts:
        with translated("fetch text"):
            response = pipeline.fetched(command)
        result.extend(_text_messages(response, sections, plans))
    for command in sent.whole:
        with translated("fetch"):
            response = pipeline.fetched(command)
        result.extend(messages_of(response, b"BODY[]", structure=False))
    for command in sent.prefix:
        with translated("fetch"):
            response = pipeline.fetched(command)
        result.extend(
            # A full cap's worth came: the rest of the message was left on the server.
            replace(m, prefix=len(m.data) >= BODY_FETCH_CAP)
            for m in messages_of(response, b"BODY[]<0>", structure=False)
        )
    return sorted(result, key=lambda m: m.uid)


def fetch_plans(pipeline: CommandPipeline, uids: Sequence[int]) -> dict[int, BodyPlan | None]:
    """Each message's body plan from one FETCH BODYSTRUCTURE; None where unreadable."""
    if not uids:
        return {}
    with translated("fetch structure"):
        response = pipeline.fetched(pipeline.fetch(uids, [b"BODYSTRUCTURE"]))
    return {
        int(uid): plan_body(data.get(b"BODYSTRUCTURE"))
        for uid, data in response.items()
        if b"BODYSTRUCTURE" in data
    }


def _text_messages(
    response: dict[int, FetchData],
    sections: tuple[str, ...],
    plans: Mapping[int, BodyPlan | None],
) -> list[FetchedMessage]:
    """The messages of a FETCH of text parts (each cut at BODY_FETCH_CAP), with their plans."""
    keys = {s: b"BODY[%s]<0>" % s.encode() for s in sections}
    messages = []
    for uid, data in response.items():
        plan = plans.get(int(uid))
        if plan is None:
            continue
        texts = {s: bytes(data.get(key) or b"") for s, key in keys.items()}
        messages.append(
            FetchedMessage(
                uid=int(uid),
                data=b"",
                internaldate=None,
                size=0,
                plan=plan,
                sections=texts,
                # A full cap's worth of a part the structure says is longer: cut short.
                sections_cut=frozenset(
                    t.section
                    for t in plan.texts
                    if t.size > BODY_FETCH_CAP and len(texts.get(t.section, b"")) >= BODY_FETCH_CAP
                ),
            )
        )
    return messages


def messages_of(
    response: dict[int, FetchData], key: bytes, *, structure: bool
) -> list[FetchedMessage]:
    """The FetchedMessages of a FETCH answer, by UID; a message without ``key`` is left out."""
    messages = []
    for uid, data in sorted(response.items()):
        if key not in data:
            continue  # expunged by someone else meanwhile
        messages.append(
            FetchedMessage(
                uid=int(uid),
                data=bytes(data[key] or b""),
                internaldate=data.get(b"INTERNALDATE"),
                size=int(data.get(b"RFC822.SIZE", 0)),
                flags=tuple(as_text(f) for f in data.get(b"FLAGS", ())),
                savedate=savedate(data.get(b"SAVEDATE")),
                plan=plan_body(data.get(b"BODYSTRUCTURE")) if structure else None,
            )
        )
    return messages


def _text_bytes(plan: BodyPlan | None) -> int:
    """Bytes the text parts of a plan cost to fetch, each cut at BODY_FETCH_CAP."""
    return sum(min(t.size, BODY_FETCH_CAP) for t in plan.texts) if plan else 0


def runs_by_cost(
    uids: Sequence[int],
    sizes: Mapping[int, int],
    plans: Mapping[int, BodyPlan | None],
    limit: int,
) -> list[list[int]]:
    """``uids`` in runs whose ``fetch_full`` reads at most ``limit`` bytes (one message at
    least): a message costs its text parts by its plan, else what its whole or prefix
    fetch reads (at most BODY_FETCH_CAP)."""
    cost = {
        uid: _text_bytes(plan)
        if (plan := plans.get(uid)) is not None
        else min(sizes.get(uid, BODY_FETCH_CAP), BODY_FETCH_CAP)
        for uid in uids
    }
    return _by_bytes(uids, cost, limit)


def _by_bytes(
    uids: Sequence[int], sizes: Mapping[int, int], limit: int = FULL_FETCH_BYTES
) -> list[list[int]]:
    """``uids`` in runs of at most ``limit`` bytes by ``sizes`` (one message at least)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    chunk_bytes = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if chunk and chunk_bytes + size > limit:
            chunks.append(chunk)
            chunk, chunk_bytes = [], 0
        chunk.append(uid)
        chunk_bytes += size
    if chunk:
        chunks.append(chunk)
    return chunks


def savedate(value: object) -> datetime | None:
    """A SAVEDATE (RFC 8514) as imapclient gives it, or None (NIL, absent)."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, bytes) and value not in (b"NIL", b""):
        return internaldate(value)
    return None


def as_text(value: object) -> str:
    """A folder name or flag as imapclient gives it (bytes or str), as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
