"""What the timeline holds: ``groups``, ``timeline`` events, and ``crm check`` of the CRM.

Groups and events are managed here only in the built-in store; a configured CRM owns its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from emailsync.cli.exitcode import EXIT_OK, EXIT_RUNTIME, EXIT_UNAVAILABLE, EXIT_USAGE
from emailsync.cli.wiring import load, store_for
from emailsync.config import Settings, shared_secret_problems
from emailsync.errors import ConfigError, StoreError, StoreUnavailableError
from emailsync.model import TimelineEvent
from emailsync.state.csvimport import read_group_csv


def event_json(event: TimelineEvent) -> dict[str, Any]:
    """A timeline event as a JSON-ready dict (the ``timeline --json`` line shape)."""
    return {
        "group": event.group,
        "direction": event.direction.value,
        "mailboxes": list(event.mailboxes or (event.mailbox,)),
        "via": [
            {"mailbox": v.mailbox, "direction": v.direction.value if v.direction else None}
            for v in event.via
        ],
        "message_key": event.message_key,
        "message_id": event.message_id,
        "subject": event.subject,
        "from": event.from_,
        "to": event.to,
        "cc": event.cc,
        "date": event.date.isoformat() if event.date else None,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in event.attachments
        ],
        "size": event.size,
        "filed_at": event.filed_at.isoformat(),
        "body_text": event.body_text,
        "body_truncated": event.body_truncated,
    }


def event_line(event: TimelineEvent) -> str:
    """A timeline event as one tab-separated line (the ``timeline`` line shape)."""
    when = event.date.strftime("%Y-%m-%d %H:%M") if event.date else "?"
    # Each mailbox with the direction seen from it (outbound from the sender's).
    vias = [f"{v.mailbox} ({v.direction.value if v.direction else '?'})" for v in event.via]
    mailboxes = ",".join(vias) or event.mailbox
    return (
        f"{when}\t{event.group}\t{event.direction.value}\t{event.subject!r}"
        f"\tfrom {event.from_}\tvia {mailboxes}"
    )


Command = Callable[[argparse.Namespace, TextIO], int]
BuiltinCommand = Callable[[argparse.Namespace, TextIO, Settings], int]


def builtin_store_only(what: str) -> Callable[[BuiltinCommand], Command]:
    """A command on the built-in store's ``what``: it loads the config, and with a [crm] table
    says the CRM owns ``what`` and exits 64 (EX_USAGE) before it reads or opens anything."""

    def decorate(command: BuiltinCommand) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace, out: TextIO) -> int:
            settings = load(args)
            if settings.crm is not None:
                print(
                    f"emailsync: the CRM at {settings.crm.url} owns {what} ([crm] in"
                    f" {settings.path}); manage them in the CRM, not here",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            return command(args, out, settings)

        return run

    return decorate


@builtin_store_only("groups")
def cmd_groups_add(args: argparse.Namespace, out: TextIO, settings: Settings) -> int:
    """Create a group or link more addresses to it."""
    with store_for(settings) as store:
        try:
            group = store.add_group(args.name, args.addresses)
        except ValueError as exc:
            print(f"emailsync: {exc}", file=sys.stderr)
            return EXIT_USAGE
    print(f"{group.name}: {', '.join(group.addresses)}", file=out)
    return EXIT_OK


@builtin_store_only("groups")
def cmd_groups_import(args: argparse.Namespace, out: TextIO, settings: Settings) -> int:
    """Import group,address rows from a CSV file."""
    try:
        rows = read_group_csv(args.file)
    except (ValueError, OSError) as exc:
        print(f"emailsync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with store_for(settings) as store:
        linked = store.import_groups(rows)
    print(f"{args.file}: {len(rows)} rows, {linked} new links", file=out)
    return EXIT_OK


@builtin_store_only("groups")
def cmd_groups_list(args: argparse.Namespace, out: TextIO, settings: Settings) -> int:
    """List groups with their addresses."""
    with store_for(settings) as store:
        groups = store.list_groups()
    for group in groups:
        if args.json:
            print(json.dumps({"group": group.name, "addresses": list(group.addresses)}), file=out)
        else:
            print(f"{group.name}\t{', '.join(group.addresses)}", file=out)
    return EXIT_OK


@builtin_store_only("timeline events")
def cmd_timeline(args: argparse.Namespace, out: TextIO, settings: Settings) -> int:
    """Print recorded events, newest first; JSON is one object per line."""
    with store_for(settings) as store:
        events = store.list_events(group=args.group, mailbox=args.mailbox, limit=args.limit)
    for event in events:
        line = json.dumps(event_json(event), ensure_ascii=False) if args.json else event_line(event)
        print(line, file=out)
    return EXIT_OK


def cmd_crm_check(args: argparse.Namespace, out: TextIO) -> int:
    """One signed lookup against the CRM; one line saying it works or what is wrong."""
    from emailsync.timeline.crm.store import HttpStore  # noqa: PLC0415 -- only this command needs it

    settings = load(args)
    if settings.crm is None:
        print(
            f"emailsync: no [crm] table in {settings.path}: the built-in store is used",
            file=sys.stderr,
        )
        return EXIT_USAGE
    problems = shared_secret_problems(settings)
    if problems:
        raise ConfigError(problems)
    store = HttpStore(settings.crm)
    try:
        answer = store.lookup([args.address])
    except StoreError as exc:
        print(f"emailsync: CRM check failed: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, StoreUnavailableError) else EXIT_RUNTIME
    finally:
        store.close()
    groups = next(iter(answer.values()), ())
    print(
        f"{settings.crm.url}: ok (signature accepted; {args.address} is linked to "
        f"{len(groups)} group(s))",
        file=out,
    )
    return EXIT_OK
