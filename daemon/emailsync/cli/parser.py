"""The argument parser: every command and its options, the examples, a global --config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, TextIO

from emailsync import __version__
from emailsync.cli.auth import cmd_auth_login, cmd_auth_status
from emailsync.cli.check import cmd_check_config, cmd_doctor
from emailsync.cli.daemon import cmd_demo, cmd_run, cmd_start_sync, cmd_status, cmd_stop
from emailsync.cli.examples import EXAMPLES
from emailsync.cli.exitcode import EXIT_OK, EXIT_USAGE
from emailsync.cli.keys import cmd_keys_adopt, cmd_keys_rotate
from emailsync.cli.mailbox import cmd_retry_failed, cmd_setup, cmd_sync
from emailsync.cli.timeline import (
    cmd_crm_check,
    cmd_groups_add,
    cmd_groups_import,
    cmd_groups_list,
    cmd_timeline,
)
from emailsync.cli.tokens import cmd_token_issue, cmd_token_list, cmd_token_revoke

Handler = Callable[[argparse.Namespace, TextIO], int]


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit 64 (EX_USAGE) instead of 2."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the problem, then exit EX_USAGE."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


JSON_LINES = ("--json", "one JSON object per line")
CONFIG_HELP = "config file (default: $EMAILSYNC_CONFIG, else /etc/emailsync/emailsync.toml)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = UsageParser(
        prog="emailsync",
        description="Files mail dropped into an IMAP Queue folder onto CRM group timelines.",
    )
    parser.add_argument("--version", action="version", version=f"emailsync {__version__}")
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def group(
        name: str, help_text: str, *commands: tuple[str, Handler, str]
    ) -> dict[str, argparse.ArgumentParser]:
        """A command of commands (``groups add``): each ``(name, handler, help)``'s parser."""
        parent = sub.add_parser(name, help=help_text)
        children = parent.add_subparsers(title=f"{name} commands", metavar="COMMAND")
        parsers: dict[str, argparse.ArgumentParser] = {}
        for child, handler, child_help in commands:
            parsers[child] = children.add_parser(child, help=child_help)
            parsers[child].set_defaults(handler=handler)
        return parsers

    def flags(p: argparse.ArgumentParser, *names_and_help: tuple[str, str]) -> None:
        """On/off options: each ``(--name, help)``."""
        for name, help_text in names_and_help:
            p.add_argument(name, action="store_true", help=help_text)

    def mailbox_address(p: argparse.ArgumentParser) -> None:
        p.add_argument("address", help="the mailbox address")

    command("run", cmd_run, "the daemon, in the foreground")
    p = command("check-config", cmd_check_config, "validate the config and the presence of secrets")
    flags(
        p,
        (
            "--skip-secrets",
            "check the config's structure only, not that its secret files can be read "
            "(e.g. an example config, or on a build host without the secrets)",
        ),
        ("--json", "one JSON object: ok, counts and every problem"),
    )

    p = command("setup", cmd_setup, "log in and create + subscribe the folder tree")
    mailbox_address(p)

    p = command("sync", cmd_sync, "one sync pass without the daemon")
    p.add_argument(
        "addresses", nargs="*", metavar="ADDRESS", help="mailboxes (default: all enabled)"
    )
    flags(
        p,
        ("--once", "one pass and exit (the default without a daemon)"),
        ("--dry-run", "print what would happen; change nothing"),
        (
            "--json",
            "one JSON object per line: each decision (with --dry-run), then a per-mailbox summary",
        ),
    )

    p = command("start-sync", cmd_start_sync, "send Start Sync to the running daemon")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    flags(
        p,
        ("--all", "every mailbox"),
        ("--include-stuck", "also retry messages quarantined in Queue ($EmailSyncStuck)"),
    )

    p = command("stop", cmd_stop, "Stop Email Sync for a mailbox (forgets its tokens)")
    p.add_argument("address")

    p = command("status", cmd_status, "per-mailbox state from the running daemon")
    flags(p, JSON_LINES)

    p = command(
        "retry-failed",
        cmd_retry_failed,
        "move Failed messages back to Queue and release stuck ones in Queue",
    )
    mailbox_address(p)

    groups = group(
        "groups",
        "the group directory of the built-in store (a CRM owns its own)",
        ("add", cmd_groups_add, "link addresses to a group (created if new)"),
        ("import", cmd_groups_import, "import a CSV with columns group,address"),
        ("list", cmd_groups_list, "list groups and their addresses"),
    )
    groups["add"].add_argument("name")
    groups["add"].add_argument("addresses", nargs="+", metavar="ADDRESS")
    groups["import"].add_argument("file", type=Path)
    flags(groups["list"], JSON_LINES)

    auth = group(
        "auth",
        "Office 365 sign-in and token state",
        ("login", cmd_auth_login, "Office 365 device-code sign-in for a mailbox (delegated mode)"),
        ("status", cmd_auth_status, "token state of every Office 365 mailbox"),
    )
    auth["login"].add_argument("address")
    flags(auth["status"], JSON_LINES)

    token = group(
        "token",
        "per-agent tokens for the self-service pages and API",
        (
            "issue",
            cmd_token_issue,
            "a signed token for one mailbox's set-up, Start Sync, Stop and status",
        ),
        (
            "list",
            cmd_token_list,
            "every token issued: mailbox, who and when, expiry, last use, state",
        ),
        (
            "revoke",
            cmd_token_revoke,
            "revoke one token by its id, or every token of a mailbox by its address",
        ),
    )
    mailbox_address(token["issue"])
    token["issue"].add_argument(
        "--expires",
        type=int,
        default=None,
        metavar="DAYS",
        help="valid for this many days, 1-3660 (default: [daemon] agent_token_days, 90)",
    )
    flags(token["list"], JSON_LINES)
    token["revoke"].add_argument(
        "which", metavar="ID|ADDRESS", help="a token id (see `token list`) or an address"
    )

    keys = group(
        "keys",
        "the registry key (stored passwords, agent tokens)",
        (
            "rotate",
            cmd_keys_rotate,
            "new key: re-encrypt stored passwords, revoke every agent token",
        ),
        (
            "adopt",
            cmd_keys_adopt,
            "make this instance's key the one the state database checks (the old one is lost)",
        ),
    )
    flags(
        keys["adopt"], ("--yes", "confirm: passwords stored under the old key must be set up again")
    )

    crm = group(
        "crm",
        "the configured CRM connector",
        ("check", cmd_crm_check, "call the CRM once: a signed group lookup of a test address"),
    )
    crm["check"].add_argument(
        "--address", default="emailsync-check@example.invalid", help="the address to look up"
    )

    p = command("timeline", cmd_timeline, "recorded timeline events, newest first")
    p.add_argument("--group", help="only this group")
    p.add_argument("--mailbox", help="only events filed from this mailbox")
    p.add_argument("--limit", type=int, default=None, help="at most this many events")
    flags(p, JSON_LINES)

    p = command(
        "doctor",
        cmd_doctor,
        "log in as the daemon would and report TLS, capabilities, folders and IDLE delay",
    )
    mailbox_address(p)
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=75.0,
        metavar="SECONDS",
        help="how long to wait for the server's IDLE notice of the probe (default 75)",
    )
    flags(p, JSON_LINES)

    p = command(
        "demo", cmd_demo, "throwaway Dovecot + seeded mailboxes, groups and mail + the daemon"
    )
    p.add_argument("--dir", type=Path, default=Path(".demo"), help="where the demo keeps its files")
    flags(
        p,
        ("--once", "one pass and exit instead of running the daemon"),
        (
            "--crm",
            "groups and events in the reference CRM (emailsync.dev.crm) instead of SQLite",
        ),
    )

    p = command(
        "completion", cmd_completion, "print a bash or zsh completion script, or the man page"
    )
    p.add_argument("shell", choices=("bash", "zsh", "man"))

    add_examples(parser)
    # --config is global, and accepted after the command too (`emailsync run --config F`, as
    # an operator or a unit file may write it). SUPPRESS: a command's parser sets it only when
    # given there, so `emailsync --config F run` keeps F.
    for _, sub_parser in walk_commands(parser):
        sub_parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's direct subcommands by name (argparse keeps them on a private action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk_commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command path (``"groups add"``) with its parser, depth first."""
    for name, sub in subcommands(parser).items():
        path = f"{prefix} {name}".strip()
        yield path, sub
        yield from walk_commands(sub, path)


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Put each command's example into its --help epilog."""
    for path, sub in walk_commands(parser):
        example = EXAMPLES.get(path)
        if example:
            sub.epilog = f"example:\n  {example}"
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n  emailsync demo\n  emailsync check-config && emailsync doctor "
        "agent1@example.com\n\n'emailsync COMMAND --help' shows a command's options and example."
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    """Print the completion script for a shell, or the man page, generated from this parser."""
    from emailsync.ops.completion import bash_script, man_page, zsh_script  # noqa: PLC0415

    parser = build_parser()
    if args.shell == "man":
        out.write(man_page(parser, EXAMPLES))
    else:
        out.write(bash_script(parser) if args.shell == "bash" else zsh_script(parser))
    return EXIT_OK
