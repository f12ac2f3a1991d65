"""Failover bench: N instances share M mailboxes through PostgreSQL; kill -9 one of them and
time until each of its mailboxes is IDLE on another instance again. Each instance's RSS is
read once all are IDLE and balanced, and the survivors' once the killed one's mailboxes are
IDLE on them (issue 23).

    .venv/bin/python bench/failover.py --mailboxes 150 --instances 3 --lease 12

Runs as root (Dovecot's rule). Starts a throwaway Dovecot and PostgreSQL on 127.0.0.1 and the
daemons as subprocesses; everything is stopped on exit. Prints the figures; exit code 1 only
when something failed (a mailbox never came back), never for a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import tempfile
import time
from pathlib import Path

from daemonproc import DaemonProcess, memory_lines, rss_bytes

from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import free_port, share_registry_key
from emailsync.dev.postgres import Postgres

PASSWORD = "bench-password"  # a throwaway Dovecot's users; nothing secret


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


def idle_on(daemon: DaemonProcess, mailboxes: list[str]) -> set[str]:
    """The mailboxes this daemon reports IDLE."""
    samples = daemon.metrics()
    return {
        m
        for m in mailboxes
        if samples.get(("emailsync_mailbox_state", frozenset({("mailbox", m), ("state", "idle")})))
        == 1
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=60)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--lease", type=float, default=12.0)  # the least allowed
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--memory", action="store_true", help="print each instance's memory by kind (smaps)"
    )
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="emailsync-failover-"))
    (home / "password").write_text(PASSWORD + "\n")
    with Dovecot() as server, Postgres() as pg:
        mailboxes = [f"fo{i:05d}@example.com" for i in range(args.mailboxes)]
        for address in mailboxes:
            server.add_user(address, PASSWORD)
        pg_url = pg.create_database()
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
                owned = [d.metric("emailsync_owned_mailboxes") or 0 for d in daemons]
                idle = set().union(*(idle_on(d, mailboxes) for d in daemons))
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
                time.sleep(0.5)
            balanced = time.monotonic() - started
            time.sleep(2.0)  # the last IDLEs settle
            rss_balanced = [round(rss_bytes(d.process.pid) / 2**20, 1) for d in daemons]
            if args.memory:
                for d in daemons:
                    print(memory_lines(d.process.pid), file=sys.stderr)
            victim = daemons[-1]
            orphans = idle_on(victim, mailboxes)
            victim.process.kill()
            killed = time.monotonic()
            victim.process.wait(10)
            victim.returncode = -9
            survivors = daemons[:-1]
            deadline = killed + args.timeout
            while True:
                back = set().union(*(idle_on(d, sorted(orphans)) for d in survivors))
                if back >= orphans:
                    break
                if time.monotonic() > deadline:
                    print(f"FAILED: {len(orphans - back)} mailboxes not IDLE again")
                    return 1
                time.sleep(0.2)
            failover = time.monotonic() - killed
            owned = [d.metric("emailsync_owned_mailboxes") or 0 for d in survivors]
            time.sleep(2.0)
            rss_after = [round(rss_bytes(d.process.pid) / 2**20, 1) for d in survivors]
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
                    }
                )
            )
            return 0
        finally:
            for daemon in daemons:
                daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
