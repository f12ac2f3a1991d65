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

Issue 23 adds two runs of the daemon:

* **monitored start** (``emailsync_monitored``): the same start while it is watched at a
  common pace, ``/v1/mailboxes`` every 2 s (which also says when all are IDLE) and
  ``/metrics`` (gzip, as Prometheus asks) every 15 s; against the bare threads of the run.
* **at rest** (``rest_profile``): once every mailbox is IDLE, the CPU of one ``/metrics``
  and one ``/v1/mailboxes`` (the daemon's own CPU time from ``/proc``, less its background,
  mean of 10 calls, median of 3 blocks), then a rest window scraped every 15 s (a shorter
  window in six slots): the process's CPU share and its main thread's, what the log grew
  by (info level: nothing should be logged), and the sweep's cost a mailbox (the CPU of the
  slots in which sweep passes were counted, beyond the median quiet slot, per pass).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import secrets
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from daemonproc import DaemonProcess, memory_lines
from prometheus_client.parser import text_string_to_metric_families
from testbed import Testbed

from emailsync.dev.net import free_port

START_TIMEOUT_SECONDS = 600.0
SETTLE_TIMEOUT_SECONDS = 300.0
REST_SECONDS = 10.0
INOTIFY_KNOB = Path("/proc/sys/fs/inotify/max_user_instances")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The common pace of watching a daemon (issue 23): a status poll every 2 s, a scrape every 15 s.
STATUS_SECONDS = 2.0
SCRAPE_SECONDS = 15.0
CALLS = 10  # per block, when timing one /metrics or /v1/mailboxes
CALL_BLOCKS = 3
HTTP_SECONDS = 60.0

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
    testbed: Testbed,
    users: list[tuple[str, str]],
    rest_seconds: float = REST_SECONDS,
    memory: bool = False,
) -> Footprint:
    """``emailsync run`` over every user: start → all IDLE, RSS, CPU at rest; with ``memory``,
    where its memory is once all are IDLE printed to stderr (issue 23)."""
    home, port, config = new_home(testbed, users, f"many-{len(users)}", _config)
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
        footprint = _measure(daemon.process.pid, len(users), seconds, rest_seconds)
        if memory:
            print(memory_lines(daemon.process.pid), file=sys.stderr)
        return footprint


@dataclass(frozen=True)
class RestProfile:
    """What an idle daemon of N mailboxes costs: per call, and over a rest window."""

    mailboxes: int
    scrape_cpu_ms: float  # one /metrics, gzipped
    scrape_bytes: int  # on the wire (gzipped)
    scrape_text_bytes: int
    status_cpu_ms: float  # one /v1/mailboxes
    status_bytes: int
    rest_seconds: float
    rest_cpu_share: float  # of one core, over the window (scraped every 15 s)
    main_thread_share: float
    sweep_passes: int
    sweep_ms_per_mailbox: float | None  # None: no sweep in the window
    logged_bytes: int  # what the log (info level) grew by in the window


def emailsync_monitored(testbed: Testbed, users: list[tuple[str, str]]) -> Footprint:
    """``emailsync run`` watched at a common pace: start → all IDLE by ``/v1/mailboxes`` every
    2 s, ``/metrics`` scraped every 15 s meanwhile (issue 23)."""
    home, port, config = new_home(testbed, users, f"many-{len(users)}", _config)
    settle(testbed)
    started = time.monotonic()
    with DaemonProcess(config, port, home / "daemon.log") as daemon:
        scraper = _Scraper(port)
        scraper.start()
        try:
            _wait_all_idle(daemon, home, len(users), started)
        finally:
            scraper.stop()
        seconds = time.monotonic() - started
        return _measure(daemon.process.pid, len(users), seconds, 1.0)


def rest_profile(
    testbed: Testbed,
    users: list[tuple[str, str]],
    rest_seconds: float,
    sweep_seconds: float | None = None,
    blocks: int = CALL_BLOCKS,
) -> RestProfile:
    """Start ``emailsync run`` (info logging), wait until all are IDLE, then time single calls
    and watch a rest window, scraping every 15 s as Prometheus would (issue 23)."""
    extra = "" if sweep_seconds is None else f"sweep_seconds = {sweep_seconds}"

    def info_config(home: Path, imap_port: int, port: int, users: list[tuple[str, str]]) -> str:
        store = f'store = "sqlite:///{home / "state" / "emailsync.db"}"'
        return bench_config(home, imap_port, port, users, f'{store}\nlog_level = "info"\n{extra}')

    home, port, config = new_home(testbed, users, f"many-{len(users)}", info_config)
    settle(testbed)
    log = home / "daemon.log"
    with DaemonProcess(config, port, log) as daemon:
        pid = daemon.process.pid
        token = _wait_all_idle(daemon, home, len(users), time.monotonic())
        time.sleep(2.0)  # the last IDLEs settle
        auth = {"Authorization": f"Bearer {token}"}
        gz = {"Accept-Encoding": "gzip"}
        scrape_ms, scrape_bytes = _call_cpu(pid, port, "/metrics", gz, blocks)
        status_ms, status_bytes = _call_cpu(pid, port, "/v1/mailboxes", auth, blocks)
        text_bytes = len(_get(port, "/metrics", {})[1])
        logged = log.stat().st_size
        slots: list[tuple[float, float]] = []  # (CPU seconds, sweep passes) per 15 s slot
        started = time.monotonic()
        cpu_before, main_before = _cpu_seconds(pid), _cpu_seconds(pid, pid)
        sweeps = _sweeps(port)
        cpu, end = cpu_before, started + rest_seconds
        slot = min(SCRAPE_SECONDS, rest_seconds / 6)  # a short window still has quiet slots
        while time.monotonic() < end:
            time.sleep(max(0.0, min(slot, end - time.monotonic())))
            now_cpu, now_sweeps = _cpu_seconds(pid), _sweeps(port)
            slots.append((now_cpu - cpu, now_sweeps - sweeps))
            cpu, sweeps = now_cpu, now_sweeps
        elapsed = time.monotonic() - started
        share = (_cpu_seconds(pid) - cpu_before) / elapsed
        main = (_cpu_seconds(pid, pid) - main_before) / elapsed
        logged = log.stat().st_size - logged
    quiet = [c for c, n in slots if n == 0]
    swept = [(c, n) for c, n in slots if n > 0]
    passes = int(sum(n for _, n in swept))
    sweep_ms = None
    if swept and quiet:
        extra_cpu = sum(c for c, _ in swept) - statistics.median(quiet) * len(swept)
        sweep_ms = max(0.0, extra_cpu) * 1000 / passes
    return RestProfile(
        len(users),
        round(scrape_ms, 1),
        scrape_bytes,
        text_bytes,
        round(status_ms, 1),
        status_bytes,
        round(elapsed, 1),
        share,
        main,
        passes,
        None if sweep_ms is None else round(sweep_ms, 3),
        logged,
    )


class _Scraper(threading.Thread):
    """GETs /metrics (gzip) every SCRAPE_SECONDS, the first at once, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            _get(self.port, "/metrics", {"Accept-Encoding": "gzip"})
            self._halt.wait(SCRAPE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join(HTTP_SECONDS)


def new_home(
    testbed: Testbed,
    users: list[tuple[str, str]],
    name: str,
    config: Callable[[Path, int, int, list[tuple[str, str]]], str],
) -> tuple[Path, int, Path]:
    """A fresh directory ``name-…`` under the testbed (with state/), a free port for the
    daemon, and ``config(home, imap_port, listen_port, users)`` written to its
    emailsync.toml: (home, port, config path)."""
    home = testbed.workdir / f"{name}-{secrets.token_hex(2)}"
    (home / "state").mkdir(parents=True)
    port = free_port()
    path = home / "emailsync.toml"
    path.write_text(config(home, testbed.server.port, port, users), encoding="utf-8")
    return home, port, path


def _wait_all_idle(daemon: DaemonProcess, home: Path, count: int, started: float) -> str:
    """Poll /v1/mailboxes every STATUS_SECONDS until all ``count`` are idle; the token."""
    token_file = home / "state" / "control-token"
    deadline = started + START_TIMEOUT_SECONDS
    while True:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"daemon exited:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all {count} in IDLE:\n{daemon.log_tail()}")
        token = token_file.read_text().strip() if token_file.exists() else ""
        status, body = _get(daemon.port, "/v1/mailboxes", {"Authorization": f"Bearer {token}"})
        if status == 200:
            states = [m["state"] for m in json.loads(body)["mailboxes"]]
            if len(states) >= count and all(state == "idle" for state in states):
                return token
        time.sleep(STATUS_SECONDS)


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_SECONDS) as response:  # noqa: S310 -- loopback
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _call_cpu(
    pid: int, port: int, path: str, headers: dict[str, str], count: int
) -> tuple[float, int]:
    """The daemon's CPU milliseconds for one GET (less its background, median of ``count``
    blocks of CALLS), and the bytes."""
    blocks = []
    size = 0
    for _ in range(count):
        before, at = _cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)
        background = (_cpu_seconds(pid) - before) / (time.monotonic() - at)
        before, at = _cpu_seconds(pid), time.monotonic()
        for _ in range(CALLS):
            size = len(_get(port, path, headers)[1])
        time.sleep(0.2)  # the last answer's thread finishes
        spent = _cpu_seconds(pid) - before - background * (time.monotonic() - at)
        blocks.append(max(0.0, spent) * 1000 / CALLS)
    return statistics.median(blocks), size


def _sweeps(port: int) -> float:
    """Sweep passes so far (the summed ``sync_passes_total{trigger="sweep"}``)."""
    status, body = _get(port, "/metrics", {"Accept-Encoding": "gzip"})
    if status != 200:
        return 0.0
    text = gzip.decompress(body).decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "emailsync_sync_passes_total" and sample.labels.get("trigger") == "sweep"
    )


def rest_line(rest: RestProfile) -> str:
    """The rest profile in one line."""
    sweep = (
        "no sweep in the window"
        if rest.sweep_ms_per_mailbox is None
        else f"sweep {rest.sweep_ms_per_mailbox:.2f} ms CPU a mailbox ({rest.sweep_passes} passes)"
    )
    return (
        f"{rest.mailboxes} mailboxes: /metrics {rest.scrape_cpu_ms:.0f} ms CPU,"
        f" {rest.scrape_bytes / 1e6:.2f} MB gzipped ({rest.scrape_text_bytes / 1e6:.2f} MB text);"
        f" /v1/mailboxes {rest.status_cpu_ms:.0f} ms CPU, {rest.status_bytes / 1e6:.2f} MB;"
        f" at rest {100 * rest.rest_cpu_share:.2f} % of a core over {rest.rest_seconds:.0f} s"
        f" (main thread {100 * rest.main_thread_share:.2f} %), {sweep},"
        f" {rest.logged_bytes} bytes logged"
    )


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


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds of a process (or of one of its threads) from /proc."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
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
    parser.add_argument(
        "--monitored", action="store_true", help="also the start watched at a common pace"
    )
    parser.add_argument(
        "--rest", type=float, metavar="SECONDS", help="also the rest profile over this window"
    )
    parser.add_argument("--sweep-seconds", type=float, help="the rest profile's sweep_seconds")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="print where the daemon's memory is once all are IDLE: RSS by kind of mapping"
        " and open files (Python's own objects: trace_mailboxes.py)",
    )
    args = parser.parse_args(argv)
    count = args.mailboxes
    directory = Directory.build(random.Random(1))  # noqa: S311 -- test data
    with Testbed(directory) as testbed, inotify_instances(2 * count + 512):
        users = make_users(testbed, count)
        emailsync_run(testbed, users)  # not timed: the first start creates every folder tree
        figures = {}
        if not args.no_bare:
            figures["bare"] = bare_threads(testbed, users).__dict__
        figures["emailsync"] = emailsync_run(testbed, users, memory=args.memory).__dict__
        if args.monitored:
            figures["monitored"] = emailsync_monitored(testbed, users).__dict__
        rest = rest_profile(testbed, users, args.rest, args.sweep_seconds) if args.rest else None
    for name, f in figures.items():
        print(
            f"{name}: {f['mailboxes']} mailboxes, start {f['start_seconds']:.1f} s,"
            f" RSS {f['rss_bytes'] / 2**20:.1f} MB"
            f" ({f['rss_bytes'] / 1024 / f['mailboxes']:.1f} KB each),"
            f" rest CPU {100 * f['rest_cpu_share']:.2f} %"
        )
    if "bare" in figures:
        for name in ("emailsync", "monitored"):
            if name in figures:
                ratio = figures[name]["start_seconds"] / figures["bare"]["start_seconds"]
                print(f"{name} start ratio {ratio:.2f}")
    if rest is not None:
        print(rest_line(rest))
        figures["rest"] = rest.__dict__
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
