"""One mailbox by hand: ``setup`` its folders, a ``sync`` pass, ``retry-failed``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from emailsync.cli.daemon import clear_stop, poke_daemon
from emailsync.cli.exitcode import EXIT_OK, EXIT_RUNTIME, EXIT_UNAVAILABLE
from emailsync.cli.wiring import load, session_for, store_for
from emailsync.errors import ConnectionLostError, ControlError, MailboxError, StoreError
from emailsync.filing.decision import Decision, PassResult
from emailsync.filing.queuepass import Filer
from emailsync.model import OUTCOME_KEYWORD, FolderRole, Outcome
from emailsync.ops.progress import progress
from emailsync.web.control import ControlClient


def cmd_setup(args: argparse.Namespace, out: TextIO) -> int:
    """First-time setup of one mailbox: log in, create and subscribe the folder tree."""
    settings = load(args)
    with session_for(settings, args.address) as session:
        created = session.ensure_folders()
        tree = session.tree
    assert tree is not None  # noqa: S101 -- ensure_folders resolved it
    for name in tree.all_names():
        state = "created" if name in created else "exists"
        print(f"{name}\t{state}, subscribed", file=out)
    address = settings.mailbox(args.address).address
    if clear_stop(settings, address):
        with contextlib.suppress(ControlError):
            ControlClient(settings).start(address)
        print(f"{address}: sync started again", file=out)
    else:
        poke_daemon(settings, address, out)
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    """One pass per mailbox; with --dry-run, print decisions and change nothing."""
    settings = load(args)
    mailboxes = (
        [settings.mailbox(a) for a in args.addresses]
        if args.addresses
        else [m for m in settings.mailboxes if m.enabled]
    )
    status = EXIT_OK
    with store_for(settings) as store:
        for mailbox in mailboxes:
            try:
                with session_for(settings, mailbox.address) as session:
                    if not args.dry_run:
                        session.ensure_folders()
                    filer = Filer(
                        mailbox,
                        store,
                        batch_size=settings.daemon.fetch_batch,
                        stuck_after=settings.daemon.stuck_after_attempts,
                    )
                    # A dry run prints each batch's decisions as it goes: the pass keeps counts.
                    show = _print_decisions_json if args.json else _print_decisions
                    on_batch = functools.partial(show, mailbox.address, out=out)
                    with progress(mailbox.address, sys.stderr) as report:
                        result = filer.run_pass(
                            session,
                            dry_run=args.dry_run,
                            progress=report,
                            on_batch=on_batch if args.dry_run else None,
                        )
            except (MailboxError, StoreError) as exc:
                print(f"{mailbox.address}: {exc}", file=sys.stderr)
                status = EXIT_UNAVAILABLE if isinstance(exc, ConnectionLostError) else EXIT_RUNTIME
                continue
            if args.json:
                _print_pass_json(mailbox.address, result, out, dry_run=args.dry_run)
            else:
                _print_pass(mailbox.address, result, out, dry_run=args.dry_run)
            if filer.stuck:
                print(
                    f"{mailbox.address}: {filer.stuck} stuck in Queue ($EmailSyncStuck), skipped;"
                    f" `emailsync retry-failed {mailbox.address}` releases them",
                    file=sys.stderr if args.json else out,
                )
    return status


def _print_decisions(address: str, decisions: Sequence[Decision], out: TextIO) -> None:
    """``sync --dry-run``: one line per decision of a batch."""
    for d in decisions:
        direction = d.classification.direction.value if d.classification else "-"
        counterparts = ",".join(d.classification.counterparts) if d.classification else "-"
        reason = f"\t({d.message.problem})" if d.message.problem else ""
        print(
            f"{address}\tuid={d.uid}\t{direction}\tcounterparts={counterparts or '-'}"
            f"\tgroups={','.join(d.groups) or '-'}\t→ {d.destination.value}{reason}",
            file=out,
        )


def _print_decisions_json(address: str, decisions: Sequence[Decision], out: TextIO) -> None:
    """``sync --dry-run --json``: one JSON line per decision of a batch."""
    for d in decisions:
        c = d.classification
        print(
            json.dumps(
                {
                    "mailbox": address,
                    "uid": d.uid,
                    "direction": c.direction.value if c else None,
                    "counterparts": list(c.counterparts) if c else [],
                    "groups": list(d.groups),
                    "destination": d.destination.value,
                    "problem": d.message.problem,
                }
            ),
            file=out,
        )


def _print_pass(address: str, result: PassResult, out: TextIO, *, dry_run: bool) -> None:
    failed = result.count(Outcome.NO_GROUP) + result.count(Outcome.UNPARSEABLE)
    summary = (
        f"{result.count(Outcome.SENT)} to Sent, {result.count(Outcome.RECEIVED)} to Received, "
        f"{failed} to Failed"
    )
    verb = "would file" if dry_run else "filed"
    print(
        f"{address}: {verb} {result.messages} ({summary}); {result.new_events} new events",
        file=out,
    )


def _print_pass_json(address: str, result: PassResult, out: TextIO, *, dry_run: bool) -> None:
    """``sync --json``: the mailbox's summary line (decisions were printed per batch)."""
    print(
        json.dumps(
            {
                "mailbox": address,
                "dry_run": dry_run,
                "messages": result.messages,
                "sent": result.count(Outcome.SENT),
                "received": result.count(Outcome.RECEIVED),
                "failed": result.count(Outcome.NO_GROUP) + result.count(Outcome.UNPARSEABLE),
                "new_events": result.new_events,
            }
        ),
        file=out,
    )


def cmd_retry_failed(args: argparse.Namespace, out: TextIO) -> int:
    """Move every Failed message back to Queue (after groups were linked); release stuck ones."""
    settings = load(args)
    with session_for(settings, args.address) as session:
        session.ensure_folders()
        with progress(f"{args.address} Failed → Queue", sys.stderr) as report:
            moved = session.requeue(
                FolderRole.FAILED,
                list(OUTCOME_KEYWORD.values()),
                batch_size=settings.daemon.fetch_batch,
                progress=report,
            )
        released = session.release_stuck()
    print(f"{args.address}: moved {moved} messages from Failed back to Queue", file=out)
    print(f"{args.address}: released {released} stuck messages in Queue", file=out)
    # A keyword change is no new mail to IDLE: ask a running daemon for a pass now, releasing
    # too what it holds in memory only (a Queue that takes no keywords).
    poke_daemon(settings, settings.mailbox(args.address).address, out, include_stuck=True)
    return EXIT_OK
