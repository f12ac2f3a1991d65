"""The daemon: ``run`` it (or the ``demo`` around it), and talk to a running one.

``start-sync``, ``stop`` and ``status`` go through the control API; ``poke_daemon`` is how
other commands ask a running daemon to retry a mailbox at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from typing import TYPE_CHECKING, TextIO

import structlog

from emailsync.cli.exitcode import EXIT_OK, EXIT_USAGE
from emailsync.cli.wiring import load, read_settings
from emailsync.config import Settings, mailbox_secret_problems, shared_secret_problems
from emailsync.errors import ConfigError, ControlError, StoreError
from emailsync.state import open_state
from emailsync.state.base import Store
from emailsync.state.legacystop import take_legacy_stop
from emailsync.timeline import open_timeline
from emailsync.web.control import ControlClient

if TYPE_CHECKING:
    from emailsync.cluster.membership import Cluster
    from emailsync.service.supervisor import ClusterFactory, Supervisor

log = structlog.get_logger(__name__)


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    """The daemon in the foreground, until SIGTERM."""
    from emailsync.runtime.worker import (  # noqa: PLC0415 -- only the daemon needs it
        WORKER_STACK_BYTES,
        limit_malloc_arenas,
        raise_open_files_limit,
    )
    from emailsync.service.supervisor import Supervisor  # noqa: PLC0415 -- only the daemon needs it

    # Every thread started from here on (a worker per mailbox) gets a small stack and shares
    # few malloc arenas (issue 10: per-mailbox memory).
    threading.stack_size(WORKER_STACK_BYTES)
    limit_malloc_arenas()
    open_files = raise_open_files_limit()  # two descriptors a mailbox
    settings = load(args)
    log.info("open_files_limit", limit=open_files)
    problems = shared_secret_problems(settings)
    if problems:
        raise ConfigError(problems)
    # One agent's unreadable password must not stop everyone's sync: that mailbox starts in
    # needs_reauth (its login fails), is alerted on, and the others run.
    for problem in mailbox_secret_problems(settings):
        log.error("mailbox_secret_unreadable", problem=problem)
    with contextlib.ExitStack() as stack:
        state = open_state(settings.state_url, settings.daemon.state_dir)
        stack.callback(state.close)
        timeline = open_timeline(state, settings.crm)
        if timeline is not state:
            stack.callback(timeline.close)
        return Supervisor(
            settings,
            timeline,
            state=state,
            cluster_factory=cluster_factory(settings, state, timeline),
        ).run()


def cluster_factory(settings: Settings, state: Store, timeline: Store) -> ClusterFactory | None:
    """With a shared PostgreSQL state, instances share the mailboxes by leases (cluster.py).

    The workers' timeline is ``timeline`` (the state's own tables, or the CRM), fenced by the
    leases in ``state``.
    """
    # Imported here: only a daemon with a PostgreSQL store loads psycopg and the cluster.
    from emailsync.cluster.membership import Cluster  # noqa: PLC0415
    from emailsync.state.postgres import PostgresStore  # noqa: PLC0415

    if not isinstance(state, PostgresStore):
        return None

    def make(supervisor: Supervisor) -> Cluster:
        return Cluster(state, supervisor, settings.cluster, supervisor.registry, timeline=timeline)

    return make


def cmd_start_sync(args: argparse.Namespace, out: TextIO) -> int:
    """Ask the running daemon for a pass now."""
    if not args.all and not args.addresses:
        print("emailsync start-sync: give ADDRESS… or --all", file=sys.stderr)
        return EXIT_USAGE
    client = ControlClient(read_settings(args))
    for address in [None] if args.all else args.addresses:
        client.sync(address, include_stuck=args.include_stuck)
        stuck = " (releasing stuck messages)" if args.include_stuck else ""
        print(f"start sync: {address or 'all mailboxes'}{stuck}", file=out)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    """Stop Email Sync for a mailbox in the running daemon."""
    client = ControlClient(read_settings(args))
    client.stop(args.address)
    print(
        f"{args.address}: stopped; run `emailsync setup {args.address}` to start it again", file=out
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Per-mailbox state from the running daemon."""
    client = ControlClient(read_settings(args))
    for status in client.mailboxes():
        if args.json:
            print(json.dumps(status), file=out)
        else:
            filed = ", ".join(f"{k} {n}" for k, n in sorted(status.get("filed", {}).items()))
            print(
                f"{status['address']:32} {status['state']:13} queue={status['queue']:<4} "
                f"stuck={status.get('stuck', 0):<3} "
                f"last_sync={status.get('last_sync') or 'never'}  {filed}"
                + (f"  owner={status['owner']}" if status.get("owner") else "")
                + (f"  error: {status['last_error']}" if status.get("last_error") else ""),
                file=out,
            )
    return EXIT_OK


def clear_stop(settings: Settings, address: str) -> bool:
    """Lift Stop Email Sync of a mailbox (a row of the state database, or an older version's
    marker file); True when it was stopped."""
    legacy = take_legacy_stop(settings, address, remove=True)
    with contextlib.closing(open_state(settings.state_url, settings.daemon.state_dir)) as state:
        return state.clear_stop(address) or legacy


def _is_stopped(settings: Settings, address: str) -> bool:
    """Whether Stop Email Sync holds the mailbox stopped (unknown when the state is down)."""
    if take_legacy_stop(settings, address, remove=False):
        return True
    try:
        with contextlib.closing(open_state(settings.state_url, settings.daemon.state_dir)) as state:
            return state.is_stopped(address)
    except StoreError:
        return False


def poke_daemon(
    settings: Settings, address: str, out: TextIO, *, include_stuck: bool = False
) -> None:
    """Ask a running daemon to retry a mailbox now (it may be waiting in needs_reauth)."""
    if _is_stopped(settings, address):
        print(f"{address}: sync is stopped; run `emailsync setup {address}` to start it", file=out)
        return
    with contextlib.suppress(ControlError):
        ControlClient(settings).sync(address, include_stuck=include_stuck)
        print(f"{address}: the running daemon will retry now", file=out)


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the demo (see emailsync.dev.demo)."""
    from emailsync.dev.demo import run_demo  # noqa: PLC0415 -- the demo pulls in the dev server

    return run_demo(args.dir, once=args.once, out=out, crm=args.crm)
