"""CPU and bytes of one ``/metrics`` exposition with N mailboxes, without IMAP (issue 23).

    .venv/bin/python bench/scrape_cost.py 300 2000

Each mailbox's record is filled as a worker's report would (state, passes of three triggers,
filed messages of each outcome, a connection error), at both ``[daemon] metrics_detail``
values. Three scrapes are timed: prometheus_client's ``generate_latest`` (the baseline: every
sample built and written), and what the listener answers
(``emailsync.telemetry.metrics.exposition``, gzip when asked for) once every mailbox changed
since the last scrape and once 10 % of them did (a mailbox's text is written again only when
its numbers changed). CPU time, not wall time, the
median of a few, so the figure holds on a machine shared with other work. Addresses are 31
characters (``agent0001@branch01.example.com``): the ``mailbox`` label is most of the bytes.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from emailsync.config import METRICS_DETAIL
from emailsync.telemetry.metrics import MailboxSeries, Metrics, exposition
from emailsync.web.api import gzip_body

REPEATS = 5


def filled(mailboxes: int, detail: str) -> tuple[CollectorRegistry, list[MailboxSeries]]:
    """A registry whose metrics hold ``mailboxes`` busy mailboxes at ``detail``."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, detail)
    records = []
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
        records.append(series)
    return registry, records


def cpu_ms(scrape: Callable[[], object], before: Callable[[], object] = lambda: None) -> float:
    """The median CPU milliseconds of ``scrape`` (``before`` runs untimed ahead of each)."""
    cpu = []
    for _ in range(REPEATS):
        before()
        started = time.process_time()
        scrape()
        cpu.append(time.process_time() - started)
    return statistics.median(cpu) * 1000


def measure(mailboxes: int, detail: str) -> str:
    """One line: CPU of each scrape, bytes (and gzipped, as Prometheus asks), series a mailbox."""
    registry, records = filled(mailboxes, detail)
    body = generate_latest(registry)
    assert exposition(registry) == body, "exposition differs from generate_latest"
    baseline = cpu_ms(lambda: generate_latest(registry))

    def change(share: float) -> Callable[[], None]:
        def touch() -> None:
            for series in records[: max(1, int(len(records) * share))]:
                series.filed("sent")

        return touch

    every = cpu_ms(lambda: gzip_body(exposition(registry)), change(1.0))
    tenth = cpu_ms(lambda: gzip_body(exposition(registry)), change(0.1))
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return (
        f"{mailboxes:>6} mailboxes  {detail:<8} generate_latest {baseline:5.0f} ms CPU;"
        f" /metrics gzipped: all changed {every:5.0f} ms, 10 % changed {tenth:4.0f} ms"
        f"  {len(body) / 1e6:6.2f} MB ({len(gzip_body(body)) / 1e6:.2f} MB gzipped)"
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
