"""CPU and bytes of one ``/metrics`` exposition with N mailboxes, without IMAP (issue 23).

    .venv/bin/python bench/scrape_cost.py 300 2000

Each mailbox's record is filled as a worker's report would (state, passes of three triggers,
filed messages of each outcome, a connection error); the exposition is what ``web.py`` answers
(``generate_latest``), at both ``[daemon] metrics_detail`` values. CPU time, not wall time, the
best of a few, so the figure holds on a machine shared with other work. Addresses are 31
characters (``agent0001@branch01.example.com``): the ``mailbox`` label is most of the bytes.
"""

from __future__ import annotations

import gzip
import sys
import time

from prometheus_client import CollectorRegistry, generate_latest

from emailsync.config import METRICS_DETAIL
from emailsync.metrics import Metrics

REPEATS = 5


def filled(mailboxes: int, detail: str) -> CollectorRegistry:
    """A registry whose metrics hold ``mailboxes`` busy mailboxes at ``detail``."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, detail)
    for n in range(mailboxes):
        address = f"agent{n:04d}@branch{n % 50:02d}.example.com"
        series = metrics.init_mailbox(address)
        metrics.set_state(address, "idle")
        for trigger in ("startup", "idle", "sweep"):
            series.pass_done(trigger, 0.2, 1_700_000_000.0)
        for outcome in ("sent", "received", "no_group"):
            series.filed(outcome)
        series.connection_error("timeout")
        series.timeline_events(2)
        series.set_queue(1)
    return registry


def measure(mailboxes: int, detail: str) -> str:
    """One line: CPU, bytes (and gzipped, as Prometheus asks for it), series a mailbox."""
    registry = filled(mailboxes, detail)
    body = generate_latest(registry)
    cpu = []
    for _ in range(REPEATS):
        started = time.process_time()
        body = generate_latest(registry)
        cpu.append(time.process_time() - started)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return (
        f"{mailboxes:>6} mailboxes  {detail:<8} {min(cpu) * 1000:6.0f} ms CPU"
        f"  {len(body) / 1e6:6.2f} MB ({len(gzip.compress(body)) / 1e6:.2f} MB gzipped)"
        f"  {series:>7} series, {series / mailboxes:.1f} a mailbox"
    )


def main(argv: list[str]) -> int:
    """Print a line per mailbox count and detail."""
    for mailboxes in [int(arg) for arg in argv] or [300, 2000]:
        for detail in METRICS_DETAIL:
            print(measure(mailboxes, detail), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
