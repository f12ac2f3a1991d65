"""CRM throughput: the same all-linked backlog filed with the reference CRM and with SQLite.

Every message of the corpus is linked (no Failed traffic, so every message costs a lookup and
an event: the connector's worst case). The reference CRM (``python -m emailsync.dev.crm``) runs
as its own process on loopback, as a real CRM would, with the bench's groups; emailsync talks
to it over signed HTTP exactly as the daemon does. Each trial seeds one corpus into two fresh
Queues; one pass files one against SQLite, the other against the CRM, the order alternating
from trial to trial. Ratio =
CRM msg/s / SQLite msg/s (the goal is at least 0.7).
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from corpus import BenchMessage, make_corpus
from testbed import OWNER_ALIAS, Testbed
from throughput import Trial, _emailsync_trial

from emailsync.config import CrmSettings
from emailsync.dev.net import free_port, stop_process, wait_for_port
from emailsync.secret import SecretSource

START_TIMEOUT_SECONDS = 15.0


@dataclass
class CrmThroughputResult:
    """The trials against each store, and what went wrong, if anything."""

    sqlite: list[Trial] = field(default_factory=list)
    crm: list[Trial] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def linked_corpus(count: int, testbed: Testbed, rng: random.Random) -> list[BenchMessage]:
    """``count`` messages that are all linked to a group (the documented mix, filtered)."""
    messages: list[BenchMessage] = []
    while len(messages) < count:
        batch = make_corpus(max(count * 2, 10), OWNER_ALIAS, testbed.directory, rng)
        messages.extend(m for m in batch if m.linked)
    return messages[:count]


def run_crm_throughput(
    testbed: Testbed, count: int, repeats: int, seed: int
) -> CrmThroughputResult:
    """``repeats`` trials against each store, alternating, on a fresh corpus per trial."""
    result = CrmThroughputResult()
    with ReferenceCrm(testbed) as crm:
        for trial in range(repeats):
            rng = random.Random(seed + trial)  # noqa: S311 -- test data, not cryptography
            corpus = linked_corpus(count, testbed, rng)
            crm_problems: list[str] = []
            # Who goes first alternates, so neither store always runs in the other's wake.
            for use_crm in (False, True) if trial % 2 == 0 else (True, False):
                if use_crm:
                    trial_result = _emailsync_trial(testbed, corpus, crm_problems, crm=crm.settings)
                    result.crm.append(trial_result)
                else:
                    result.sqlite.append(_emailsync_trial(testbed, corpus, result.problems))
            result.problems.extend(f"crm {p}" for p in crm_problems)
    return result


class ReferenceCrm:
    """``python -m emailsync.dev.crm`` with the bench's groups, on a free loopback port."""

    def __init__(self, testbed: Testbed) -> None:
        home = testbed.workdir / "devcrm"
        home.mkdir()
        secret_file = home / "secret"
        secret_file.write_text("bench-crm-secret\n", encoding="utf-8")
        groups = home / "groups.csv"
        with groups.open("w", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["group", "address"])
            writer.writerows(testbed.directory.rows())
        self.port = free_port()
        self.log = (home / "devcrm.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emailsync.dev.crm",
                "--secret-file",
                str(secret_file),
                "--db",
                str(home / "devcrm.db"),
                "--port",
                str(self.port),
                "--groups-csv",
                str(groups),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.settings = CrmSettings(
            url=f"http://127.0.0.1:{self.port}/crm/v1", secret=SecretSource(file=secret_file)
        )

    def __enter__(self) -> ReferenceCrm:
        process = self.process
        if wait_for_port(
            "127.0.0.1", self.port, START_TIMEOUT_SECONDS, alive=lambda: process.poll() is None
        ):
            return self
        self.close()
        raise RuntimeError("the reference CRM did not start")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the CRM process."""
        stop_process(self.process, 10)
        self.log.close()


def crm_log(testbed: Testbed) -> Path:
    """Where the reference CRM's output went."""
    return testbed.workdir / "devcrm" / "devcrm.log"
