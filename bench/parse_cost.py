"""CPU cost per message of the filer's parsing and recording steps, without IMAP (issue 10).

    .venv/bin/python bench/parse_cost.py 5000

The backlog of ``backlog.py`` is parsed as a pass parses it (``parse_headers`` on the
header block, ``with_body`` on the text part as fetched; classification left out) and one
event a message recorded in a fresh SQLite store. Prints process CPU microseconds a message
for each step: CPU time, not wall time (so the COMMIT's fsync is not counted), so the figure
holds on a machine shared with other work.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from backlog import make_backlog
from corpus import Directory

from emailsync.filing.queuepass import FETCH_BATCH
from emailsync.mail.message import parse_headers, with_body
from emailsync.model import BodyPlan, Direction, QueuedMessage, TextSection, TimelineEvent
from emailsync.state.sqlite import SqliteStore

REPEATS = 3  # best of, to shed the scheduler's noise
GROUPS = 40


def _split(raw: bytes) -> tuple[bytes, bytes]:
    end = raw.index(b"\r\n\r\n") + 4
    return raw[:end], raw[end:]


def _best(work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    """Time each step over the backlog; print microseconds of CPU a message."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    directory = Directory.build(random.Random(1))  # noqa: S311 -- test data
    raws = [m.raw for m in make_backlog(count, directory, random.Random(2))]  # noqa: S311
    blocks = [_split(raw) for raw in raws]
    plan = BodyPlan((TextSection("1", "text/plain", "utf-8", "7bit", 4400),), ())
    parsed: list[QueuedMessage] = []

    def headers() -> None:
        parsed[:] = [parse_headers(n, block) for n, (block, _) in enumerate(blocks)]

    def bodies() -> None:
        for message, (block, body) in zip(parsed, blocks, strict=True):
            with_body(message, plan, {"1": body}, block)

    figures = {"parse_headers": _best(headers), "with_body": _best(bodies)}
    with tempfile.TemporaryDirectory() as scratch:
        figures |= _record_cost(parsed, Path(scratch))
    for step, seconds in figures.items():
        print(f"{step:15} {1e6 * seconds / count:7.1f} µs/message")


def _record_cost(parsed: list[QueuedMessage], scratch: Path) -> dict[str, float]:
    """Recording one event a message into a fresh store, one transaction per fetch batch."""
    groups = [f"group-{n}" for n in range(GROUPS)]
    filed_at = datetime.now(UTC)
    events = [
        TimelineEvent.of(
            message, groups[n % GROUPS], Direction.INBOUND, "agent@example.com", filed_at
        )
        for n, message in enumerate(parsed)
    ]
    best = float("inf")
    for attempt in range(REPEATS):
        store = SqliteStore(scratch / f"store-{attempt}.sqlite3")
        for name in groups:
            store.add_group(name, [f"{name}@example.org"])
        started = time.process_time()
        for start in range(0, len(events), FETCH_BATCH):
            store.record_events(events[start : start + FETCH_BATCH])
        best = min(best, time.process_time() - started)
        store.close()
    return {"record_events": best}


if __name__ == "__main__":
    main()
