"""Is it fit to run: ``check-config`` (config, secrets, key) and ``doctor`` (a mailbox's server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from emailsync.cli.exitcode import EXIT_CONFIG, EXIT_OK
from emailsync.cli.wiring import load, read_settings
from emailsync.config import Settings, check_secrets, default_config_path
from emailsync.errors import ConfigError
from emailsync.privilege import ActingUser
from emailsync.state import check_store_url
from emailsync.state.keycheck import check_state_database
from emailsync.state.vault import Vault


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """Validate the config; one line per problem, exit 78 on any."""
    path = args.config or default_config_path()
    if args.json:
        return _check_config_json(args, out)
    settings = read_settings(args)
    problems = _service_access_problems(settings, args.acting_as)
    problems += [] if args.skip_secrets else check_secrets(settings)
    try:
        check_store_url(settings.store_url, settings.daemon.state_dir)
    except ConfigError as exc:
        # The same parser open_store uses: check-config accepts exactly what run accepts.
        problems.extend(f"{settings.path}: daemon.{p}" for p in exc.problems)
    if not args.skip_secrets:
        problems += state_key_problems(settings)
    if problems and args.acting_as is not None:
        problems.append(_acting_note(args.acting_as))
    if problems:
        raise ConfigError(problems)
    count = len(settings.mailboxes)
    enabled = sum(1 for m in settings.mailboxes if m.enabled)
    store = f", CRM {settings.crm.url}" if settings.crm is not None else ""
    noun = "mailbox" if count == 1 else "mailboxes"
    print(f"{path}: ok ({count} {noun}, {enabled} enabled{store})", file=out)
    return EXIT_OK


def state_key_problems(settings: Settings) -> list[str]:
    """Whether this instance's registry key opens the state database's key check (keycheck);
    a database that cannot be opened is only noted."""
    vault = Vault(settings.daemon.state_dir)
    problems, notes = check_state_database(settings.state_url, settings.daemon.state_dir, vault)
    for note in notes:
        print(f"emailsync: note: {note}", file=sys.stderr)
    return problems


def _service_access_problems(settings: Settings, acting_as: ActingUser | None) -> list[str]:
    """The config file, when root checks it on behalf of a service user who cannot read it."""
    if acting_as is None or os.access(settings.path, os.R_OK):
        return []
    return [
        f"{settings.path}: {acting_as.name} (the service's user) cannot read the config: "
        f"chgrp {acting_as.name} {settings.path} && chmod 0640 {settings.path}"
    ]


def _acting_note(acting_as: ActingUser) -> str:
    """The line that says whose access check-config tested, and how to grant it."""
    return (
        f"(checked as {acting_as.name}, who owns {acting_as.state_dir} and runs the service; "
        f"for a file it cannot read: chgrp {acting_as.name} FILE && chmod 0640 FILE)"
    )


def _check_config_json(args: argparse.Namespace, out: TextIO) -> int:
    """``check-config --json``: one object, exit 78 when it lists problems."""
    path = args.config or default_config_path()
    report: dict[str, Any] = {"config": str(path), "ok": True, "problems": []}
    try:
        settings = read_settings(args)
        problems = _service_access_problems(settings, args.acting_as)
        problems += [] if args.skip_secrets else check_secrets(settings)
        problems += [] if args.skip_secrets else state_key_problems(settings)
        if args.acting_as is not None:
            report["checked_as"] = args.acting_as.name
        report["mailboxes"] = len(settings.mailboxes)
        report["enabled"] = sum(1 for m in settings.mailboxes if m.enabled)
    except ConfigError as exc:
        problems = list(exc.problems)
    report["ok"] = not problems
    report["problems"] = problems
    print(json.dumps(report), file=out)
    return EXIT_OK if not problems else EXIT_CONFIG


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    """One line per check of a mailbox's server; exit 1 when any is a problem."""
    from emailsync.ops.doctor import diagnose, exit_code  # noqa: PLC0415 -- only doctor needs it

    settings = load(args)

    def emit(finding: Any) -> None:
        text = json.dumps(finding.as_json()) if args.json else finding.line()
        print(text, file=out, flush=True)

    findings = diagnose(settings, args.address, idle_timeout=args.idle_timeout, emit=emit)
    return exit_code(findings)
