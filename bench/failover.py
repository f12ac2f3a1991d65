"""Failover bench: N instances share M mailboxes through PostgreSQL; kill -9 one of them and
time until each of its mailboxes is IDLE on another instance again. Each instance's RSS is
read once all are IDLE and balanced, and the survivors' once the killed one's mailboxes are
IDLE on them (issue 23).

    .venv/bin/python bench/failover.py --mailboxes 150 --instances 3 --lease 12
    .venv/bin/python bench/failover.py --mailboxes 6000 --instances 3 --memory  # make bench
    .venv/bin/python bench/failover.py --mailboxes 2000 --instances 1  # the fresh-start reference

Dovecot serves --imap-clients connections per imap process (DovecotOptions.imap_client_limit):
one process a connection would be 6,000 processes at the production shape. Also printed: each
instance's CPU seconds, Dovecot's processes and RSS, the most PostgreSQL connections seen and
the least memory the machine had available; below --min-available-mb the run stops (exit 1).

Runs as root (Dovecot's rule). Starts a throwaway Dovecot and PostgreSQL on 127.0.0.1 and the
daemons as subprocesses; everything is stopped on exit. Prints the figures; exit code 1 only
when something failed (a mailbox never came back), never for a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
from daemonproc import DaemonProcess, memory_lines, rss_bytes

from emailsync.dev.dovecot import Dovecot, DovecotOptions
from emailsync.dev.net import free_port, share_registry_key
from emailsync.dev.postgres import Postgres

PASSWORD = "bench-password"  # a throwaway Dovecot's users; nothing secret
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HTTP_TIMEOUT_SECONDS = 5.0
OWNED = re.compile(r"^emailsync_owned_mailboxes ([0-9.e+]+)$", re.MULTILINE)
IDLE = re.compile(r'^emailsync_mailbox_state\{mailbox="([^"]+)",state="idle"\} 1\.0$', re.MULTILINE)
CLIENTS_SQL = (  # the instances' connections (this one's not counted)
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


class OutOfMemoryError(RuntimeError):
    """The machine's available memory fell below the floor the run was given."""


class Watch:
    """What the run costs the machine: memory available, PostgreSQL connections (peaks)."""

    def __init__(self, pg_url: str, floor_mb: int) -> None:
        self.pg_url = pg_url
        self.floor_mb = floor_mb
        self.least_available_mb = available_mb()
        self.most_pg_connections = 0
        self.next_pg_sample = 0.0

    def sample(self) -> None:
        """Take one sample of each; raise OutOfMemoryError below the floor."""
        self.least_available_mb = min(self.least_available_mb, available_mb())
        if self.least_available_mb < self.floor_mb:
            raise OutOfMemoryError(f"{self.least_available_mb} MB available")
        if time.monotonic() < self.next_pg_sample:
            return
        self.next_pg_sample = time.monotonic() + 2.0  # a connection costs PostgreSQL a fork
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            row = conn.execute(CLIENTS_SQL).fetchone()
        self.most_pg_connections = max(self.most_pg_connections, int(row[0]) if row else 0)


def available_mb() -> int:
    """MemAvailable (proc(5)), in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def dovecot_footprint(server: Dovecot) -> tuple[int, float]:
    """Dovecot's processes (its master's session) and their summed RSS in MB."""
    master = int((server.base_dir / "run" / "master.pid").read_text().split()[0])
    count, rss = 0, 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == master:  # the session id: Dovecot runs in its own session
            count += 1
            rss += rss_bytes(int(stat.parent.name))
    return count, round(rss / 2**20, 1)


def write_config(
    home: Path,
    name: str,
    *,
    port: int,
    pg_url: str,
    server: Dovecot,
    mailboxes: list[str],
    lease: float,
) -> Path:
    """One instance's config: the shared store and mailboxes, its own port and instance id."""
    workdir = home / name
    workdir.mkdir()
    (workdir / "control-token").write_text(secrets.token_urlsafe(16) + "\n")
    share_registry_key(home / "registry-key", workdir / "state")
    lines = [
        "[daemon]",
        f'state_dir = "{workdir / "state"}"',
        f"store = {json.dumps(pg_url)}",
        f'listen = "127.0.0.1:{port}"',
        f'control_token_file = "{workdir / "control-token"}"',
        'log_format = "json"',
        "sweep_seconds = 3600",
        "timeout_seconds = 10",
        "[cluster]",
        f'instance_id = "{name}"',
        f"lease_seconds = {lease}",
        "[folders]",
        "[branches.local]",
        'host = "127.0.0.1"',
        f"port = {server.port}",
        'security = "none"',
        "allow_insecure = true",
    ]
    for address in mailboxes:
        lines += [
            "[[mailboxes]]",
            f'address = "{address}"',
            'branch = "local"',
            f'password_file = "{home / "password"}"',
        ]
    path = workdir / "emailsync.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def scrape(daemon: DaemonProcess) -> tuple[float, set[str]]:
    """The mailboxes a daemon owns and those it reports IDLE, from one /metrics.

    Read line by line rather than by prometheus_client's parser: at 2,000 mailboxes an
    exposition is ~1.5 MB, and parsing three every half second took half a core of this
    2-core machine from the daemons being timed.
    """
    try:
        url = f"http://127.0.0.1:{daemon.port}/metrics"
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            text = response.read().decode()
    except OSError:
        return 0.0, set()
    owned = float(next(iter(OWNED.findall(text)), 0.0))
    return owned, set(IDLE.findall(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=60)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--lease", type=float, default=12.0)  # the least allowed
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--memory", action="store_true", help="print each instance's memory by kind (smaps)"
    )
    parser.add_argument(
        "--imap-clients", type=int, default=100, help="connections an imap process serves"
    )
    parser.add_argument("--min-available-mb", type=int, default=2048)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="emailsync-failover-"))
    (home / "password").write_text(PASSWORD + "\n")
    options = DovecotOptions(imap_client_limit=args.imap_clients)
    try:
        return run(args, home, options)
    except OutOfMemoryError as exc:
        print(f"FAILED: stopped, the machine ran low on memory ({exc})")
        return 1
    finally:
        shutil.rmtree(home, ignore_errors=True)  # the instances' configs, state and logs


def run(args: argparse.Namespace, home: Path, options: DovecotOptions) -> int:
    """Start, balance, kill one, wait for its mailboxes elsewhere; print the figures."""
    with Dovecot(None, options) as server, Postgres() as pg:
        mailboxes = [f"fo{i:05d}@example.com" for i in range(args.mailboxes)]
        for address in mailboxes:
            server.add_user(address, PASSWORD)
        pg_url = pg.create_database()
        watch = Watch(pg_url, args.min_available_mb)
        daemons: list[DaemonProcess] = []
        try:
            started = time.monotonic()
            for n in range(args.instances):
                port = free_port()
                name = f"i{n}"
                config = write_config(
                    home,
                    name,
                    port=port,
                    pg_url=pg_url,
                    server=server,
                    mailboxes=mailboxes,
                    lease=args.lease,
                )
                daemons.append(DaemonProcess(config, port, home / name / "daemon.log"))
            # Started together, as a deployment would: they see each other before claiming.
            # No /readyz wait: with hundreds of mailboxes each, the balance loop below is it.
            share = math.ceil(args.mailboxes / args.instances)
            deadline = time.monotonic() + args.timeout
            while True:
                scrapes = [scrape(d) for d in daemons]
                owned = [count for count, _ in scrapes]
                idle = set().union(*(names for _, names in scrapes))
                if (
                    sum(owned) == args.mailboxes
                    and max(owned) <= share
                    and len(idle) == len(mailboxes)
                ):
                    break
                if time.monotonic() > deadline or any(
                    d.process.poll() is not None for d in daemons
                ):
                    print(f"FAILED: not balanced and idle: owned {owned}, idle {len(idle)}")
                    return 1
                watch.sample()
                time.sleep(0.5)
            balanced = time.monotonic() - started
            time.sleep(2.0)  # the last IDLEs settle
            rss_balanced = [round(rss_bytes(d.process.pid) / 2**20, 1) for d in daemons]
            cpu_balanced = [round(cpu_seconds(d.process.pid), 1) for d in daemons]
            dovecot_balanced = dovecot_footprint(server)
            if args.memory:
                for d in daemons:
                    print(memory_lines(d.process.pid), file=sys.stderr)
            if len(daemons) == 1:  # the reference: a fresh start of them all, nothing to kill
                print(
                    json.dumps(
                        {
                            "mailboxes": args.mailboxes,
                            "instances": 1,
                            "start_to_all_idle_seconds": round(balanced, 1),
                            "rss_mb": rss_balanced,
                            "cpu_seconds": cpu_balanced,
                            "dovecot_processes_rss_mb": dovecot_balanced,
                            "dovecot_imap_client_limit": args.imap_clients,
                            "most_postgresql_connections": watch.most_pg_connections,
                            "least_available_mb": watch.least_available_mb,
                        }
                    )
                )
                return 0
            victim = daemons[-1]
            orphans = scrape(victim)[1]
            victim.process.kill()
            killed = time.monotonic()
            victim.process.wait(10)
            victim.returncode = -9
            survivors = daemons[:-1]
            deadline = killed + args.timeout
            while True:
                back = set().union(*(scrape(d)[1] for d in survivors))
                if back >= orphans:
                    break
                if time.monotonic() > deadline:
                    print(f"FAILED: {len(orphans - back)} mailboxes not IDLE again")
                    return 1
                watch.sample()
                time.sleep(0.2)
            failover = time.monotonic() - killed
            owned = [scrape(d)[0] for d in survivors]
            time.sleep(2.0)
            rss_after = [round(rss_bytes(d.process.pid) / 2**20, 1) for d in survivors]
            cpu_after = [round(cpu_seconds(d.process.pid), 1) for d in survivors]
            watch.sample()
            if args.memory:
                for d in survivors:
                    print(memory_lines(d.process.pid), file=sys.stderr)
            print(
                json.dumps(
                    {
                        "mailboxes": args.mailboxes,
                        "instances": args.instances,
                        "lease_seconds": args.lease,
                        "start_to_balanced_idle_seconds": round(balanced, 1),
                        "killed_instance_mailboxes": len(orphans),
                        "kill_to_all_idle_elsewhere_seconds": round(failover, 1),
                        "owned_after": owned,
                        "rss_mb_balanced": rss_balanced,
                        "rss_mb_after": rss_after,
                        "cpu_seconds_balanced": cpu_balanced,
                        "cpu_seconds_after": cpu_after,
                        "dovecot_processes_rss_mb_balanced": dovecot_balanced,
                        "dovecot_imap_client_limit": args.imap_clients,
                        "most_postgresql_connections": watch.most_pg_connections,
                        "least_available_mb": watch.least_available_mb,
                    }
                )
            )
            return 0
        finally:
            for daemon in daemons:
                daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
