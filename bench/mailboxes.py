"""Many mailboxes (issue 10): RSS, start → all IDLE and CPU at rest, vs bare imapclient threads.

* **bare threads**: one process, one thread per mailbox doing LOGIN, SELECT and IDLE with
  imapclient, nothing else: what a connection costs at the least.
* **emailsync**: ``emailsync run`` with one config holding every mailbox (empty Queues).

Both run against the same Dovecot and the same users, one after the other. Measured from
outside: the time from process start until every mailbox is in IDLE (the daemon's
``emailsync_mailbox_state{state="idle"}`` gauges; the bare process says so on stdout), the
process's RSS once all are in IDLE, and its CPU over a rest window with nothing to do.
Dovecot needs one inotify instance per IDLE: the limit is raised for the run and restored.
Each start is timed on a quiet server: once ``doveadm who`` lists no session of the run
before (2,000 IMAP processes ending after a kill took long enough to slow the next start).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemonproc import DaemonProcess
from testbed import Testbed

from emailsync.devnet import free_port

START_TIMEOUT_SECONDS = 600.0
SETTLE_TIMEOUT_SECONDS = 300.0
REST_SECONDS = 10.0
INOTIFY_KNOB = Path("/proc/sys/fs/inotify/max_user_instances")
CLK_TCK = os.sysconf("SC_CLK_TCK")

BARE = textwrap.dedent(
    """
    import sys, threading, imapclient
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    users = [line.split("\\t") for line in open(path).read().splitlines()]
    idle, lock, stop = [0], threading.Lock(), threading.Event()
    def connect(address, password):
        for attempt in range(10):  # as any client would: a refused or slow login is retried
            try:
                client = imapclient.IMAPClient(host, port=port, ssl=False, timeout=30)
                client.login(address, password)
                return client
            except Exception:
                if attempt == 9:
                    raise
    def run(address, password):
        client = connect(address, password)
        client.select_folder("INBOX")
        client.idle()
        with lock:
            idle[0] += 1
            if idle[0] == len(users):
                print("ALL_IDLE", flush=True)
        while not stop.is_set():
            client.idle_check(timeout=5)
    for address, password in users:
        threading.Thread(target=run, args=(address, password), daemon=True).start()
    sys.stdin.read()  # until the bench closes stdin
    """
)


@dataclass(frozen=True)
class Footprint:
    """One contender's figures for N mailboxes."""

    mailboxes: int
    start_seconds: float
    rss_bytes: int
    rest_cpu_share: float  # of one core, over REST_SECONDS


@contextlib.contextmanager
def inotify_instances(wanted: int) -> Iterator[None]:
    """Raise fs.inotify.max_user_instances to ``wanted`` for the block, then restore it."""
    try:
        before = int(INOTIFY_KNOB.read_text())
    except (OSError, ValueError):
        yield
        return
    try:
        if before < wanted:
            INOTIFY_KNOB.write_text(str(wanted))
        yield
    finally:
        with contextlib.suppress(OSError):
            INOTIFY_KNOB.write_text(str(before))


def make_users(testbed: Testbed, count: int) -> list[tuple[str, str]]:
    """``count`` fresh Dovecot logins."""
    users = []
    for n in range(count):
        address = f"many{n}-{secrets.token_hex(3)}@example.com"
        password = secrets.token_urlsafe(12)
        testbed.server.add_user(address, password)
        users.append((address, password))
    return users


def bare_threads(
    testbed: Testbed, users: list[tuple[str, str]], rest_seconds: float = REST_SECONDS
) -> Footprint:
    """The bare imapclient process: start → all IDLE, RSS, CPU at rest."""
    listing = testbed.workdir / f"bare-{len(users)}.tsv"
    listing.write_text("".join(f"{a}\t{p}\n" for a, p in users), encoding="utf-8")
    settle(testbed)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", BARE, "127.0.0.1", str(testbed.server.port), str(listing)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if "ALL_IDLE" not in line:
            raise RuntimeError(f"bare threads did not all reach IDLE: {line!r}")
        seconds = time.monotonic() - started
        return _measure(process.pid, len(users), seconds, rest_seconds)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        process.kill()
        process.wait(10)


def emailsync_run(
    testbed: Testbed, users: list[tuple[str, str]], rest_seconds: float = REST_SECONDS
) -> Footprint:
    """``emailsync run`` over every user: start → all IDLE, RSS, CPU at rest."""
    home = testbed.workdir / f"many-{len(users)}-{secrets.token_hex(2)}"
    (home / "state").mkdir(parents=True)
    port = free_port()
    config = home / "emailsync.toml"
    config.write_text(_config(home, testbed.server.port, port, users), encoding="utf-8")
    settle(testbed)
    started = time.monotonic()
    with DaemonProcess(config, port, home / "daemon.log") as daemon:
        deadline = started + START_TIMEOUT_SECONDS
        while True:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{daemon.log_tail()}")
            idle = sum(
                value
                for (name, labels), value in daemon.metrics().items()
                if name == "emailsync_mailbox_state" and ("state", "idle") in labels
            )
            if idle >= len(users):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{idle} of {len(users)} in IDLE:\n{daemon.log_tail()}")
            time.sleep(0.25)
        seconds = time.monotonic() - started
        return _measure(daemon.process.pid, len(users), seconds, rest_seconds)


def settle(testbed: Testbed) -> None:
    """Wait until Dovecot has no IMAP session left (the previous run's have all ended)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not testbed.server.sessions():
            return
        time.sleep(0.5)
    raise RuntimeError(f"Dovecot still has sessions after {SETTLE_TIMEOUT_SECONDS:.0f} s")


def _measure(pid: int, mailboxes: int, seconds: float, rest_seconds: float) -> Footprint:
    time.sleep(min(1.0, rest_seconds))  # let the last IDLEs settle
    before = _cpu_seconds(pid)
    time.sleep(rest_seconds)
    cpu = (_cpu_seconds(pid) - before) / rest_seconds
    return Footprint(mailboxes, seconds, _rss_bytes(pid), cpu)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (proc(5))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_config(
    home: Path,
    imap_port: int,
    listen_port: int,
    users: list[tuple[str, str]],
    daemon_keys: str = "",
) -> str:
    """A daemon config for ``users`` on the bench's Dovecot (passwords in 0600 files in
    ``home``), with ``daemon_keys`` (TOML lines) added to its [daemon] table."""
    mailboxes = []
    for n, (address, password) in enumerate(users):
        secret = home / f"password{n}"
        secret.write_text(password + "\n", encoding="utf-8")
        secret.chmod(0o600)
        mailboxes.append(
            f'[[mailboxes]]\naddress = "{address}"\nbranch = "bench"\npassword_file = "{secret}"\n'
        )
    return f"""[daemon]
state_dir = "{home / "state"}"
listen = "127.0.0.1:{listen_port}"
log_format = "json"
timeout_seconds = 60
{daemon_keys}

[branches.bench]
host = "127.0.0.1"
port = {imap_port}
security = "none"
allow_insecure = true

{chr(10).join(mailboxes)}"""


def _config(home: Path, imap_port: int, listen_port: int, users: list[tuple[str, str]]) -> str:
    store = f'store = "sqlite:///{home / "state" / "emailsync.db"}"'
    return bench_config(home, imap_port, listen_port, users, f'{store}\nlog_level = "warning"')


def main(argv: list[str] | None = None) -> int:
    """Only this row: ``python bench/mailboxes.py N`` (bare threads, then emailsync, once each)."""
    import argparse  # noqa: PLC0415 -- only the command line needs it
    import json  # noqa: PLC0415
    import random  # noqa: PLC0415

    from corpus import Directory  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("mailboxes", type=int)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare threads")
    args = parser.parse_args(argv)
    count = args.mailboxes
    directory = Directory.build(random.Random(1))  # noqa: S311 -- test data
    with Testbed(directory) as testbed, inotify_instances(2 * count + 512):
        users = make_users(testbed, count)
        emailsync_run(testbed, users)  # not timed: the first start creates every folder tree
        figures = {}
        if not args.no_bare:
            figures["bare"] = bare_threads(testbed, users).__dict__
        figures["emailsync"] = emailsync_run(testbed, users).__dict__
    for name, f in figures.items():
        print(
            f"{name}: {f['mailboxes']} mailboxes, start {f['start_seconds']:.1f} s,"
            f" RSS {f['rss_bytes'] / 2**20:.1f} MB"
            f" ({f['rss_bytes'] / 1024 / f['mailboxes']:.1f} KB each),"
            f" rest CPU {100 * f['rest_cpu_share']:.2f} %"
        )
    if "bare" in figures:
        ratio = figures["emailsync"]["start_seconds"] / figures["bare"]["start_seconds"]
        print(f"start ratio {ratio:.2f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
