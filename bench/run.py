"""One-command benchmarks of emailsync, each as a ratio against a baseline measured in the same run.

    .venv/bin/python bench/run.py [--smoke] [--messages N] [--latency-messages N] [--json FILE]

1. Pass throughput: ``Filer.run_pass`` versus a bare imapclient loop doing the same IMAP work
   (see ``throughput.py``); median of REPEATS fresh Queues each.
2. APPEND→filed latency: the daemon as a subprocess versus Dovecot's own IDLE notification
   delay on the same messages (see ``latency.py``).
3. CRM throughput: an all-linked backlog filed against the reference CRM (its own process,
   signed HTTP on loopback) versus the SQLite store, same corpus (see ``crm.py``).

Prints a table; ``--json FILE`` also writes the figures. Exits 1 when anything failed (a
message not filed, a wrong folder count, the daemon not stopping cleanly), never on timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corpus import Directory
from crm import CrmThroughputResult, run_crm_throughput
from latency import LatencyResult, run_latency
from testbed import Testbed
from throughput import PHASES, ThroughputResult, Trial, run_throughput

from emailsync.logs import configure_logging

REPEATS = 3
SEED = 20250301
DEFAULT_MESSAGES = 1000
DEFAULT_LATENCY_MESSAGES = 200
SMOKE_MESSAGES = 100
SMOKE_LATENCY_MESSAGES = 20
PERCENTILES = (50, 90, 99, 100)


def main(argv: Sequence[str] | None = None) -> int:
    """Run both benchmarks, print the table, write JSON if asked; 0 when nothing failed."""
    args = _parser().parse_args(argv)
    messages = args.messages or (SMOKE_MESSAGES if args.smoke else DEFAULT_MESSAGES)
    latency_messages = args.latency_messages or (
        SMOKE_LATENCY_MESSAGES if args.smoke else DEFAULT_LATENCY_MESSAGES
    )
    # The Filer logs every message as the daemon would (JSON), but not onto the table.
    with Path(os.devnull).open("w", encoding="utf-8") as sink:
        configure_logging("json", "info", stream=sink)
        started = time.monotonic()
        try:
            report = _run(messages, latency_messages, args.crm_messages or messages)
        except Exception:
            traceback.print_exc()
            return 1
    report["seconds"] = round(time.monotonic() - started, 1)
    print(_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for problem in report["problems"]:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"small and quick: {SMOKE_MESSAGES} messages, {SMOKE_LATENCY_MESSAGES} latency",
    )
    parser.add_argument(
        "--messages", type=_positive, help=f"queue size per pass (default {DEFAULT_MESSAGES})"
    )
    parser.add_argument(
        "--latency-messages",
        type=_positive,
        help=f"messages timed one by one (default {DEFAULT_LATENCY_MESSAGES})",
    )
    parser.add_argument(
        "--crm-messages",
        type=_positive,
        help="all-linked backlog for the CRM-vs-SQLite row (default: --messages)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _run(messages: int, latency_messages: int, crm_messages: int) -> dict[str, Any]:
    directory = Directory.build(random.Random(SEED))  # noqa: S311 -- test data, not cryptography
    with Testbed(directory) as testbed:
        throughput = run_throughput(testbed, messages, REPEATS, SEED)
        latency = run_latency(testbed, latency_messages, SEED + 100, testbed.workdir)
        crm = run_crm_throughput(testbed, crm_messages, REPEATS, SEED + 200)
    return {
        "messages": messages,
        "repeats": REPEATS,
        "groups": len(directory.groups),
        "throughput": _throughput_figures(throughput),
        "latency": _latency_figures(latency),
        "crm": _crm_figures(crm, crm_messages),
        "problems": throughput.problems + latency.problems + crm.problems,
    }


def _throughput_figures(result: ThroughputResult) -> dict[str, Any]:
    baseline = statistics.median(t.rate for t in result.baseline)
    emailsync = statistics.median(t.rate for t in result.emailsync)
    return {
        "baseline_messages_per_second": round(baseline, 1),
        "emailsync_messages_per_second": round(emailsync, 1),
        "ratio": round(emailsync / baseline, 3),
        "baseline_seconds": [round(t.seconds, 4) for t in result.baseline],
        "emailsync_seconds": [round(t.seconds, 4) for t in result.emailsync],
        "emailsync_phase_share": _phase_shares(result.emailsync),
    }


def _crm_figures(result: CrmThroughputResult, messages: int) -> dict[str, Any]:
    sqlite = statistics.median(t.rate for t in result.sqlite)
    crm = statistics.median(t.rate for t in result.crm)
    return {
        "messages": messages,
        "sqlite_messages_per_second": round(sqlite, 1),
        "crm_messages_per_second": round(crm, 1),
        "ratio": round(crm / sqlite, 3),
        # Each trial files the same corpus with both stores back to back: the median of those
        # pairs' ratios is less exposed to load that changes between trials on a shared machine.
        "paired_ratio_median": round(
            statistics.median(
                c.rate / s.rate for s, c in zip(result.sqlite, result.crm, strict=True)
            ),
            3,
        ),
        "store_ms_per_message": {
            "sqlite": round(
                statistics.median(t.phases["store"] / t.messages for t in result.sqlite) * 1000, 3
            ),
            "crm": round(
                statistics.median(t.phases["store"] / t.messages for t in result.crm) * 1000, 3
            ),
        },
        "sqlite_seconds": [round(t.seconds, 4) for t in result.sqlite],
        "crm_seconds": [round(t.seconds, 4) for t in result.crm],
        "crm_phase_share": _phase_shares(result.crm),
    }


def _phase_shares(trials: Sequence[Trial]) -> dict[str, float]:
    """Median share of pass time per phase; ``other`` is the Filer itself, logs and events."""
    shares = {
        phase: statistics.median(t.phases[phase] / t.seconds for t in trials) for phase in PHASES
    }
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return {phase: round(share, 3) for phase, share in shares.items()}


def _latency_figures(result: LatencyResult) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "messages": len(result.emailsync),
        "baseline_ms": _percentiles(result.baseline),
        "emailsync_ms": _percentiles(result.emailsync),
        "daemon_histogram_mean_ms": _ms(result.histogram_mean),
    }
    if result.baseline and result.emailsync:
        base, ours = statistics.median(result.baseline), statistics.median(result.emailsync)
        figures["p50_overhead_ms"] = _ms(ours - base)
        figures["p50_ratio"] = round(ours / base, 3)
    return figures


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {_label(p): _ms(_percentile(ordered, p)) for p in PERCENTILES}


def _label(p: int) -> str:
    return "max" if p == 100 else f"p{p}"


def _percentile(ordered: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _table(report: dict[str, Any]) -> str:
    t, lat = report["throughput"], report["latency"]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in t["emailsync_phase_share"].items())
    lines = [
        f"emailsync bench: {report['messages']} queued messages, {report['groups']} groups,"
        f" median of {report['repeats']} passes; latency over {lat['messages']} messages"
        f" ({report['seconds']} s)",
        "",
        f"{'Pass throughput':34}{'msg/s':>10}",
        f"  {'baseline (bare imapclient loop)':32}{t['baseline_messages_per_second']:>10.1f}",
        f"  {'emailsync (Filer.run_pass)':32}{t['emailsync_messages_per_second']:>10.1f}",
        f"  {'ratio emailsync / baseline':32}{t['ratio']:>10.3f}",
        f"  emailsync time: {shares}",
        "",
        f"{'APPEND -> filed latency (ms)':34}" + "".join(f"{_label(p):>9}" for p in PERCENTILES),
        _latency_row("baseline (IDLE client: EXISTS)", lat["baseline_ms"]),
        _latency_row("emailsync (gone from Queue)", lat["emailsync_ms"]),
    ]
    if "p50_overhead_ms" in lat:
        lines.append(
            f"  p50 overhead over baseline: {lat['p50_overhead_ms']:+.1f} ms"
            f" (x{lat['p50_ratio']:.2f})"
        )
    lines.append(
        f"  daemon's filing_latency_seconds histogram mean: {lat['daemon_histogram_mean_ms']} ms"
    )
    crm = report["crm"]
    crm_shares = ", ".join(f"{k} {v:.0%}" for k, v in crm["crm_phase_share"].items())
    lines += [
        "",
        f"{'CRM throughput (all linked, ' + str(crm['messages']) + ' msgs)':34}{'msg/s':>10}",
        f"  {'emailsync + SQLite store':32}{crm['sqlite_messages_per_second']:>10.1f}",
        f"  {'emailsync + reference CRM':32}{crm['crm_messages_per_second']:>10.1f}",
        f"  {'ratio CRM / SQLite (goal >= 0.7)':32}{crm['ratio']:>10.3f}",
        f"  {'median ratio of paired passes':32}{crm['paired_ratio_median']:>10.3f}",
        f"  store ms/message: SQLite {crm['store_ms_per_message']['sqlite']},"
        f" CRM {crm['store_ms_per_message']['crm']}",
        f"  CRM time: {crm_shares}",
    ]
    return "\n".join(lines)


def _latency_row(name: str, values: dict[str, float | None]) -> str:
    cells = "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in values.values())
    return f"  {name:32}{cells}"


if __name__ == "__main__":
    sys.exit(main())
