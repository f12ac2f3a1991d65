"""Production shape: the all-linked backlog on each state database with each timeline.

The four deployments issue 20 makes possible, filed in one run on the same corpus: SQLite or
PostgreSQL state (``[daemon] state``), the built-in timeline or the reference CRM (``[crm]``,
its own process on loopback, signed HTTP). Each trial seeds one corpus into four fresh Queues
and files each with one pass, the order rotating from trial to trial so that no deployment
always runs in another's wake. Rates are reported as ratios to SQLite + built-in, the
default, measured in the same run (the goal: each ≥ 0.9).

    .venv/bin/python bench/shapes.py --messages 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from corpus import Directory
from crm import ReferenceCrm, linked_corpus
from testbed import Testbed
from throughput import Trial, _emailsync_trial

from emailsync.telemetry.logs import configure_logging

SEED = 2026_12_06
# (state, timeline): the default first, the production shape last.
SHAPES = (
    ("sqlite", "builtin"),
    ("postgresql", "builtin"),
    ("sqlite", "crm"),
    ("postgresql", "crm"),
)


@dataclass
class ShapeResult:
    """Trials per (state, timeline), and what went wrong, if anything."""

    trials: dict[tuple[str, str], list[Trial]] = field(
        default_factory=lambda: {shape: [] for shape in SHAPES}
    )
    problems: list[str] = field(default_factory=list)
    # CPU seconds the reference CRM's process spent during each CRM trial: on this machine it
    # runs beside Dovecot and the daemon, where a real CRM would be on a host of its own.
    crm_cpu: dict[tuple[str, str], list[float]] = field(
        default_factory=lambda: {shape: [] for shape in SHAPES}
    )


def run_shapes(
    count: int,
    repeats: int,
    seed: int = SEED,
    only: Sequence[tuple[str, str]] = SHAPES,
) -> ShapeResult:
    """``repeats`` trials of each shape on one Dovecot, one PostgreSQL and one reference CRM.

    ``only``: the shapes to run (a profile of one; the ratios need SQLite + built-in).
    """
    result = ShapeResult()
    directory = Directory.build(random.Random(seed))  # noqa: S311 -- test data
    with Testbed(directory, with_postgres=True) as testbed, ReferenceCrm(testbed) as crm:
        for trial in range(repeats):
            order = SHAPES[trial % len(SHAPES) :] + SHAPES[: trial % len(SHAPES)]
            for state, timeline in (shape for shape in order if shape in only):
                # A corpus of its own (same mix, other messages): the CRM keeps every event
                # it was given, and the same messages again would be "already there".
                shape = SHAPES.index((state, timeline))
                rng = random.Random(seed + 100 * trial + shape)  # noqa: S311 -- test data
                corpus = linked_corpus(count, testbed, rng)
                problems: list[str] = []
                crm_cpu = process_cpu_seconds(crm.process.pid)
                timed = _emailsync_trial(
                    testbed,
                    corpus,
                    problems,
                    crm=crm.settings if timeline == "crm" else None,
                    state=state,
                )
                result.trials[(state, timeline)].append(timed)
                if timeline == "crm":
                    crm_cpu = process_cpu_seconds(crm.process.pid) - crm_cpu
                    result.crm_cpu[(state, timeline)].append(crm_cpu)
                result.problems.extend(f"{state}+{timeline}: {p}" for p in problems)
    return result


def figures(result: ShapeResult) -> dict[str, object]:
    """msg/s per shape (median, min-max) and the ratio to SQLite + built-in, trial by trial.

    ``store_seconds``: the median time spent in the store's calls (group lookups and
    recording), the part the state database and the timeline decide; not all of it is the
    pass's, as a backlog's batches are recorded while the next one is decided.
    """
    base = result.trials[SHAPES[0]]
    rows: dict[str, object] = {}
    for shape, trials in result.trials.items():
        if not trials:
            continue
        rates = [t.messages / t.seconds for t in trials]
        ratios = (
            [
                t.messages / t.seconds / (b.messages / b.seconds)
                for t, b in zip(trials, base, strict=True)
            ]
            if base
            else [0.0]
        )
        rows[f"{shape[0]}+{shape[1]}"] = {
            "messages_per_second": round(statistics.median(rates), 1),
            "min_max": [round(min(rates), 1), round(max(rates), 1)],
            "ratio_to_sqlite_builtin": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "seconds": round(statistics.median(t.seconds for t in trials), 3),
            "store_seconds": round(
                statistics.median(t.phases.get("store", 0.0) for t in trials), 3
            ),
        }
        if result.crm_cpu[shape]:
            rows[f"{shape[0]}+{shape[1]}"]["crm_cpu_seconds"] = round(  # type: ignore[index]
                statistics.median(result.crm_cpu[shape]), 3
            )
    return {"shapes": rows, "problems": result.problems}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (proc(5) stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="backlog per pass")
    parser.add_argument("--repeats", type=int, default=3, help="trials of each shape")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--only",
        action="append",
        choices=[f"{state}+{timeline}" for state, timeline in SHAPES],
        help="run only this shape (repeatable; for a profile: no ratios without sqlite+builtin)",
    )
    args = parser.parse_args(argv)
    only = [tuple(name.split("+")) for name in args.only] if args.only else SHAPES
    with open(os.devnull, "w", encoding="utf-8") as sink:
        configure_logging("json", "warning", stream=sink)
        report = figures(run_shapes(args.messages, args.repeats, only=only))
    print(f"all-linked backlog of {args.messages}, {args.repeats} trials each (msg/s):")
    for name, row in report["shapes"].items():  # type: ignore[attr-defined]
        print(
            f"  {name:22} {row['messages_per_second']:>8} ({row['min_max'][0]}-{row['min_max'][1]})"
            f"  x{row['ratio_to_sqlite_builtin']} of sqlite+builtin"
            f" ({row['ratio_min_max'][0]}-{row['ratio_min_max'][1]})"
            f"  pass {row['seconds']} s, store {row['store_seconds']} s"
            + (f", CRM process CPU {row['crm_cpu_seconds']} s" if "crm_cpu_seconds" in row else "")
        )
    for problem in report["problems"]:  # type: ignore[attr-defined]
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
