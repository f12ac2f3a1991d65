"""A full restart (SIGHUP with a ``[daemon]`` change) of many idle mailboxes, against a fresh start.

One throwaway Dovecot, N users, one config with N mailboxes. The daemon is started once to
create every folder tree (not timed), stopped, then started again: the **fresh start** (spawn
→ every mailbox idle) is the baseline. Then ``[daemon]`` changes and SIGHUP restarts every
worker: the **restart** (SIGHUP → every mailbox connected anew and idle). Throughout, a
thread GETs ``/healthz`` every 0.2 s (30 s timeout), another a page that does not exist
(answered without asking the supervisor: what any request costs while the process is busy),
and one counts each user's connections with ``doveadm who`` (a mailbox must never have two).
Reported: worst ``/healthz`` and 404 latency during each phase, the restart/fresh-start
ratio, shutdown time, and the load average (the machine may be shared).

    sudo .venv/bin/python bench/restart.py --mailboxes 300 [--json bench/results/restart.json]

Runs by hand, not in ``make test``. Exit code 1 only when something failed (a mailbox never
idle, two connections for one mailbox, a non-zero exit at SIGTERM), never about timings.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mailboxes import bench_config

from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import free_port, stop_process
from emailsync.dev.runner import start_daemon

PROBE_SECONDS = 0.2
PROBE_TIMEOUT_SECONDS = 30.0
WHO_SECONDS = 1.0
READY_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 30.0
REFUSED = 0  # a probe's status when nothing listens yet
NO_ANSWER = -1  # a probe's status when it timed out


@dataclass
class Phase:
    """One timed phase: how long until every mailbox was idle, and /healthz meanwhile."""

    name: str
    seconds: float = 0.0
    probes: int = 0
    worst_healthz_seconds: float = 0.0
    # The same for a path the listener answers without asking the supervisor (a 404): what
    # the process as a whole (GIL, CPU shared with Dovecot and others) costs any request.
    worst_404_seconds: float = 0.0
    failed_probes: int = 0  # timed out or not 200 (at a fresh start: once the listener is up)
    most_connections: int = 0  # per mailbox, as doveadm who saw it


@dataclass
class Result:
    """Everything one run measured."""

    mailboxes: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    phases: list[Phase] = field(default_factory=list)
    shutdown_seconds: float = 0.0
    exit_code: int | None = None
    problems: list[str] = field(default_factory=list)


class Prober(threading.Thread):
    """GETs a path every PROBE_SECONDS; records (start, seconds, status) of each."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(name=f"prober{path}", daemon=True)
        self.url = f"http://127.0.0.1:{port}{path}"
        self.samples: list[tuple[float, float, int]] = []
        self._running = True

    def run(self) -> None:
        while self._running:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=PROBE_TIMEOUT_SECONDS) as response:  # noqa: S310
                    status = int(response.status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except urllib.error.URLError as exc:
                refused = isinstance(exc.reason, ConnectionRefusedError)
                status = REFUSED if refused else NO_ANSWER
            except OSError:  # a timeout while reading the answer
                status = NO_ANSWER
            self.samples.append((started, time.monotonic() - started, status))
            time.sleep(max(0.0, PROBE_SECONDS - (time.monotonic() - started)))

    def stop(self) -> None:
        self._running = False
        self.join(PROBE_TIMEOUT_SECONDS + 5)

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        """Probes that started in [start, end]."""
        return [s for s in list(self.samples) if start <= s[0] <= end]


class WhoWatcher(threading.Thread):
    """Runs ``doveadm who`` every WHO_SECONDS; records the most connections any user had."""

    def __init__(self, server: Dovecot) -> None:
        super().__init__(name="who-watcher", daemon=True)
        self.server = server
        self.samples: list[tuple[float, int]] = []
        self._running = True

    def run(self) -> None:
        while self._running:
            at = time.monotonic()
            users = Counter(self.server.sessions())
            self.samples.append((at, max(users.values(), default=0)))
            time.sleep(WHO_SECONDS)

    def stop(self) -> None:
        self._running = False
        self.join(60)

    def most(self, start: float, end: float) -> int:
        return max((n for at, n in list(self.samples) if start <= at <= end), default=0)


class Daemon:
    """``emailsync run`` on a config, logging JSON to a file."""

    def __init__(self, config: Path, port: int, token: str, log_path: Path) -> None:
        self.port = port
        self.token = token
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = start_daemon(config, self._log)

    def states(self) -> dict[str, str]:
        """Each mailbox's state from /v1/mailboxes (empty when unreachable)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/mailboxes",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_SECONDS * 4) as response:  # noqa: S310
                body = json.loads(response.read())
        except (OSError, ValueError):
            return {}
        return {m["address"]: m["state"] for m in body["mailboxes"]}

    def log_size(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def connected_since(self, offset: int) -> int:
        """How many ``connected`` events the log holds after byte ``offset``."""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().count(b'"event": "connected"')

    def stop(self) -> tuple[float, int]:
        """SIGTERM; returns (seconds until it exited, exit code)."""
        started = time.monotonic()
        code = stop_process(self.process, STOP_TIMEOUT_SECONDS)
        self._log.close()
        return time.monotonic() - started, code


def write_config(workdir: Path, users: list[tuple[str, str]], port: int, server_port: int) -> Path:
    token_file = workdir / "control-token"
    token_file.write_text(secrets.token_urlsafe(24) + "\n")
    keys = (
        f'store = "sqlite:///{workdir / "state" / "emailsync.db"}"\n'
        f'control_token_file = "{token_file}"\nsweep_seconds = 3600\npoll_seconds = 3600'
    )
    path = workdir / "emailsync.toml"
    path.write_text(bench_config(workdir, server_port, port, users, keys))
    return path


def wait_all(
    daemon: Daemon, addresses: list[str], *, since: int | None = None, timeout: float
) -> float | None:
    """Wait until every mailbox is idle (and, with ``since``, has connected anew after that
    log offset); returns the monotonic time it happened, or None on timeout."""
    deadline = time.monotonic() + timeout
    wanted = set(addresses)
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            return None
        if since is None or daemon.connected_since(since) >= len(addresses):
            states = daemon.states()
            if wanted <= states.keys() and all(states[a] == "idle" for a in wanted):
                return time.monotonic()
        time.sleep(0.25)
    return None


def measure_phase(
    name: str,
    probers: tuple[Prober, Prober],
    who: WhoWatcher,
    start: float,
    end: float | None,
) -> Phase:
    phase = Phase(name)
    if end is None:
        return phase
    prober, baseline = probers
    probes = prober.between(start, end)
    phase.worst_404_seconds = round(max((s[1] for s in baseline.between(start, end)), default=0), 3)
    if name == "fresh start":  # before the listener is up, probes are refused: not counted
        up = next((i for i, s in enumerate(probes) if s[2] != REFUSED), len(probes))
        probes = probes[up:]
    phase.seconds = round(end - start, 2)
    phase.probes = len(probes)
    phase.worst_healthz_seconds = round(max((s[1] for s in probes), default=0.0), 3)
    phase.failed_probes = sum(1 for s in probes if s[2] != 200)
    phase.most_connections = who.most(start, end)
    return phase


def run(count: int) -> Result:
    result = Result(count, os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="emailsync-restart-"))
    try:
        with Dovecot() as server:
            users = [(f"agent{n}@example.com", secrets.token_urlsafe(12)) for n in range(count)]
            for address, password in users:
                server.add_user(address, password)
            addresses = [a for a, _ in users]
            port = free_port()
            config = write_config(workdir, users, port, server.port)
            token = (workdir / "control-token").read_text().strip()
            log_path = workdir / "daemon.log"

            print(f"{count} mailboxes: first start (creates the folder trees; not timed)")
            first = Daemon(config, port, token, log_path)
            if wait_all(first, addresses, timeout=READY_TIMEOUT_SECONDS) is None:
                result.problems.append("first start: not every mailbox became idle")
            first.stop()

            who = WhoWatcher(server)
            who.start()
            print("fresh start")
            started = time.monotonic()
            daemon = Daemon(config, port, token, log_path)
            probers = (Prober(port, "/healthz"), Prober(port, "/no-such-page"))
            for prober in probers:
                prober.start()
            done = wait_all(daemon, addresses, timeout=READY_TIMEOUT_SECONDS)
            result.phases.append(measure_phase("fresh start", probers, who, started, done))
            if done is None:
                result.problems.append("fresh start: not every mailbox became idle")

            time.sleep(3.0)
            print("restart: [daemon] changed, SIGHUP")
            text = config.read_text()
            config.write_text(text.replace("sweep_seconds = 3600", "sweep_seconds = 3599"))
            offset = daemon.log_size()
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGHUP)
            done = wait_all(daemon, addresses, since=offset, timeout=READY_TIMEOUT_SECONDS)
            result.phases.append(measure_phase("restart (SIGHUP)", probers, who, started, done))
            if done is None:
                result.problems.append("restart: not every mailbox connected anew and idle")
            time.sleep(1.0)
            for prober in probers:
                prober.stop()
            result.shutdown_seconds, result.exit_code = daemon.stop()
            result.shutdown_seconds = round(result.shutdown_seconds, 2)
            who.stop()
            if result.exit_code != 0:
                result.problems.append(f"exit code {result.exit_code} at SIGTERM")
            if any(p.most_connections > 1 for p in result.phases):
                result.problems.append("a mailbox had two connections at once")
    finally:
        result.load_after = os.getloadavg()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def report(result: Result) -> None:
    print(f"\n{result.mailboxes} idle mailboxes; load average before {result.load_before}")
    print(
        f"{'phase':<18} {'until all idle':>15} {'worst /healthz':>15} {'failed':>7} "
        f"{'worst 404':>10} {'conn.':>6}"
    )
    for p in result.phases:
        print(
            f"{p.name:<18} {p.seconds:>13.2f} s {p.worst_healthz_seconds:>13.3f} s "
            f"{p.failed_probes:>3}/{p.probes:<3} {p.worst_404_seconds:>8.3f} s "
            f"{p.most_connections:>6}"
        )
    fresh = next((p for p in result.phases if p.name == "fresh start"), None)
    restart = next((p for p in result.phases if p.name.startswith("restart")), None)
    if fresh and restart and fresh.seconds:
        print(f"restart / fresh start = {restart.seconds / fresh.seconds:.2f}")
    print(f"SIGTERM → exit: {result.shutdown_seconds:.2f} s (exit code {result.exit_code})")
    print(f"load average after {result.load_after}")
    for problem in result.problems:
        print(f"PROBLEM: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=300)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    result = run(args.mailboxes)
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
