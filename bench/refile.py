"""Link change → filed (issue 22): Failed mail coming back once its group appears.

The daemon runs over MAILBOXES mailboxes; MESSAGES are spread over them round-robin (one
message: the first mailbox only, the others idle). Each is APPENDed to a Queue with its own
counterpart, linked to no group, so the daemon files it to Failed (``$EmailSyncNoGroup``) and
indexes it; that first filing, of the same messages from Queue, is the **baseline**. Then one
link change makes every message due at once — ``emailsync groups import`` of every
counterpart (``groups add`` for one message) — and the clock runs until the daemon has
re-filed every message to Received (``emailsync_refiled_total``, then folder counts checked
by STATUS). Reported: from the CLI's start (what a person waits), from its exit (the commit),
and the daemon's own ``lag_seconds`` (the link change's logged time → the last move), plus the
baseline. Run as root (Dovecot's rule)::

    .venv/bin/python bench/refile.py                 # 1, then 1,000 messages over 100 mailboxes
    .venv/bin/python bench/refile.py --mailboxes 20 --messages 100
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import imapclient
from corpus import Directory
from daemonproc import DaemonProcess
from mailboxes import bench_config, inotify_instances, make_users, new_home, settle
from testbed import Testbed

ROOT = "Rezi-Imported"
POLL_SECONDS = 0.02
FILED_TIMEOUT_SECONDS = 300.0
START_TIMEOUT_SECONDS = 120.0


@dataclass
class RefileResult:
    """One scenario's figures (seconds) and what went wrong, if anything."""

    mailboxes: int
    messages: int
    baseline: float = 0.0  # APPEND to Queue → all in Failed
    from_cli_start: float = 0.0
    from_commit: float = 0.0
    daemon_lag: float | None = None  # the daemon's largest lag_seconds
    problems: list[str] = field(default_factory=list)


def run_refile(testbed: Testbed, mailboxes: int, messages: int) -> RefileResult:
    """One scenario on fresh users: ``messages`` filed to Failed over ``mailboxes``, linked."""
    users = make_users(testbed, mailboxes)
    result = RefileResult(mailboxes, messages)
    home, port, config = new_home(testbed, users, f"refile-{mailboxes}-{messages}", _config)
    counterparts = {n: f"late{n}-{secrets.token_hex(3)}@clients.example" for n in range(messages)}
    expected = {address: 0 for address, _ in users}
    for n in range(messages):
        expected[users[n % mailboxes][0]] += 1
    settle(testbed)
    with (
        inotify_instances(2 * mailboxes + 512),  # an IDLE notice per mailbox (DESIGN.md §2)
        DaemonProcess(config, port, home / "daemon.log") as daemon,
    ):
        daemon.wait_ready()
        _wait(daemon, lambda m: _total(m, "emailsync_mailbox_state", "idle") >= mailboxes)
        started = time.monotonic()
        for index, (address, password) in enumerate(users):
            mine = range(index, messages, mailboxes)
            if not mine:
                continue
            with _client(testbed, address, password) as client:
                for n in mine:
                    raw = _message(counterparts[n], address, f"late {n}")
                    client.append(f"{ROOT}.Queue", raw)
        _wait(
            daemon,
            # Every message here fails for want of a group; the reason label exists only at
            # metrics_detail = "mailbox", so the total counts them at either detail.
            lambda m: _total(m, "emailsync_messages_failed_total") >= result.messages,
        )
        result.baseline = time.monotonic() - started
        _wait(daemon, lambda m: _total(m, "emailsync_mailbox_state", "idle") >= mailboxes)
        rows = home / "groups.csv"
        rows.write_text(
            "group,address\n" + "".join(f"Late,{a}\n" for a in counterparts.values()),
            encoding="utf-8",
        )
        command = (
            ["groups", "import", str(rows)]
            if result.messages > 1
            else ["groups", "add", "Late", *counterparts.values()]
        )
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "emailsync.cli", "--config", str(config), *command],
            capture_output=True,
            text=True,
            check=False,
        )
        committed = time.monotonic()
        if done.returncode != 0:
            result.problems.append(f"groups import failed: {done.stderr.strip()}")
            return result
        try:
            _wait(daemon, lambda m: _total(m, "emailsync_refiled_total") >= result.messages)
        except TimeoutError as exc:
            result.problems.append(str(exc))
            return result
        filed = time.monotonic()
        result.from_cli_start = filed - started
        result.from_commit = filed - committed
        lags = [
            entry["lag_seconds"]
            for entry in _log(home / "daemon.log", "messages_refiled")
            if entry.get("count") and entry.get("lag_seconds") is not None
        ]
        result.daemon_lag = max(lags) if lags else None
    for address, password in users:
        with _client(testbed, address, password) as client:
            received = client.folder_status(f"{ROOT}.Received", [b"MESSAGES"])[b"MESSAGES"]
            failed = client.folder_status(f"{ROOT}.Failed", [b"MESSAGES"])[b"MESSAGES"]
        if (received, failed) != (expected[address], 0):
            result.problems.append(f"{address}: {received} in Received, {failed} in Failed")
    return result


def _config(home: Path, imap_port: int, listen_port: int, users: list[tuple[str, str]]) -> str:
    keys = 'log_level = "info"\nsweep_seconds = 3600'
    return bench_config(home, imap_port, listen_port, users, keys)


def _message(frm: str, to: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = frm, to, subject
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain="bench.example")
    msg.set_content("Before the card was made.")
    return msg.as_bytes()


def _client(testbed: Testbed, address: str, password: str) -> imapclient.IMAPClient:
    client = imapclient.IMAPClient("127.0.0.1", port=testbed.server.port, ssl=False, timeout=30)
    client.login(address, password)
    return client


def _total(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str = ""
) -> float:
    """The sum of a metric over mailboxes (those whose labels include ``label``, if given)."""
    return sum(
        value
        for (sample, labels), value in metrics.items()
        if sample == name and (not label or any(v == label for _, v in labels))
    )


def _wait(daemon: DaemonProcess, done: object) -> None:
    deadline = time.monotonic() + FILED_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if callable(done) and done(daemon.metrics()):
            return
        if daemon.process.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{daemon.log_tail()}")
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"not done within {FILED_TIMEOUT_SECONDS:.0f} s:\n{daemon.log_tail()}")


def _log(path: Path, event: str) -> list[dict[str, object]]:
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                found.append(entry)
    return found


def table(results: list[RefileResult]) -> str:
    """The figures, one row per scenario."""
    lines = [
        "link change → filed (issue 22)     messages  baseline  from CLI start  "
        "from commit  daemon lag",
    ]
    for r in results:
        lag = f"{r.daemon_lag:.2f} s" if r.daemon_lag is not None else "-"
        lines.append(
            f"  {r.messages:>5} over {r.mailboxes:>3} mailboxes       {r.messages:>5}"
            f"  {r.baseline:7.2f} s  {r.from_cli_start:12.2f} s  {r.from_commit:9.2f} s  {lag:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Both scenarios of the issue (or one, by its sizes); exit 1 only when one failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mailboxes", type=int, default=100)
    parser.add_argument("--messages", type=int, default=1000, help="the second scenario's")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    directory = Directory.build(random.Random(1))  # noqa: S311 -- test data
    results: list[RefileResult] = []
    with Testbed(directory) as testbed:
        results.append(run_refile(testbed, args.mailboxes, 1))
        results.append(run_refile(testbed, args.mailboxes, args.messages))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    problems = [p for r in results for p in r.problems]
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
