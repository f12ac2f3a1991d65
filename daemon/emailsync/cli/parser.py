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

    command("run", cmd_run, "the daemon, in the foreground")
    p = command("check-config", cmd_check_config, "validate the config and the presence of secrets")
    p.add_argument(
        "--skip-secrets",
        action="store_true",
        help="check the config's structure only, not that its secret files can be read "
        "(e.g. an example config, or on a build host without the secrets)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object: ok, counts and every problem"
    )

    p = command("setup", cmd_setup, "log in and create + subscribe the folder tree")
    p.add_argument("address", help="the mailbox address")

    p = command("sync", cmd_sync, "one sync pass without the daemon")
    p.add_argument(
        "addresses", nargs="*", metavar="ADDRESS", help="mailboxes (default: all enabled)"
    )
    p.add_argument(
        "--once", action="store_true", help="one pass and exit (the default without a daemon)"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would happen; change nothing")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line: each decision (with --dry-run), then a per-mailbox summary",
    )

    p = command("start-sync", cmd_start_sync, "send Start Sync to the running daemon")
    p.add_argument("addresses", nargs="*", metavar="ADDRESS")
    p.add_argument("--all", action="store_true", help="every mailbox")
    p.add_argument(
        "--include-stuck",
        action="store_true",
        help="also retry messages quarantined in Queue ($EmailSyncStuck)",
    )

    p = command("stop", cmd_stop, "Stop Email Sync for a mailbox (forgets its tokens)")
    p.add_argument("address")

    p = command("status", cmd_status, "per-mailbox state from the running daemon")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command(
        "retry-failed",
        cmd_retry_failed,
        "move Failed messages back to Queue and release stuck ones in Queue",
    )
    p.add_argument("address", help="the mailbox address")

    groups = sub.add_parser(
        "groups", help="the group directory of the built-in store (a CRM owns its own)"
    )
    groups_sub = groups.add_subparsers(title="groups commands", metavar="COMMAND")
    p = groups_sub.add_parser("add", help="link addresses to a group (created if new)")
    p.add_argument("name")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    p.set_defaults(handler=cmd_groups_add)
    p = groups_sub.add_parser("import", help="import a CSV with columns group,address")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=cmd_groups_import)
    p = groups_sub.add_parser("list", help="list groups and their addresses")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=cmd_groups_list)

    auth = sub.add_parser("auth", help="Office 365 sign-in and token state")
    auth_sub = auth.add_subparsers(title="auth commands", metavar="COMMAND")
    p = auth_sub.add_parser(
        "login", help="Office 365 device-code sign-in for a mailbox (delegated mode)"
    )
    p.add_argument("address")
    p.set_defaults(handler=cmd_auth_login)
    p = auth_sub.add_parser("status", help="token state of every Office 365 mailbox")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=cmd_auth_status)

    token = sub.add_parser("token", help="per-agent tokens for the self-service pages and API")
    token_sub = token.add_subparsers(title="token commands", metavar="COMMAND")
    p = token_sub.add_parser(
        "issue",
        help="a signed token for one mailbox's set-up, Start Sync, Stop and status",
    )
    p.add_argument("address", help="the mailbox address")
    p.add_argument(
        "--expires",
        type=int,
        default=None,
        metavar="DAYS",
        help="valid for this many days, 1-3660 (default: [daemon] agent_token_days, 90)",
    )
    p.set_defaults(handler=cmd_token_issue)
    p = token_sub.add_parser(
        "list", help="every token issued: mailbox, who and when, expiry, last use, state"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=cmd_token_list)
    p = token_sub.add_parser(
        "revoke", help="revoke one token by its id, or every token of a mailbox by its address"
    )
    p.add_argument(
        "which", metavar="ID|ADDRESS", help="a token id (see `token list`) or an address"
    )
    p.set_defaults(handler=cmd_token_revoke)

    keys = sub.add_parser("keys", help="the registry key (stored passwords, agent tokens)")
    keys_sub = keys.add_subparsers(title="keys commands", metavar="COMMAND")
    p = keys_sub.add_parser(
        "rotate", help="new key: re-encrypt stored passwords, revoke every agent token"
    )
    p.set_defaults(handler=cmd_keys_rotate)
    p = keys_sub.add_parser(
        "adopt",
        help="make this instance's key the one the state database checks (the old one is lost)",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="confirm: passwords stored under the old key must be set up again",
    )
    p.set_defaults(handler=cmd_keys_adopt)

    crm = sub.add_parser("crm", help="the configured CRM connector")
    crm_sub = crm.add_subparsers(title="crm commands", metavar="COMMAND")
    p = crm_sub.add_parser(
        "check", help="call the CRM once: a signed group lookup of a test address"
    )
    p.add_argument(
        "--address", default="emailsync-check@example.invalid", help="the address to look up"
    )
    p.set_defaults(handler=cmd_crm_check)

    p = command("timeline", cmd_timeline, "recorded timeline events, newest first")
    p.add_argument("--group", help="only this group")
    p.add_argument("--mailbox", help="only events filed from this mailbox")
    p.add_argument("--limit", type=int, default=None, help="at most this many events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command(
        "doctor",
        cmd_doctor,
        "log in as the daemon would and report TLS, capabilities, folders and IDLE delay",
    )
    p.add_argument("address", help="the mailbox address")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=75.0,
        metavar="SECONDS",
        help="how long to wait for the server's IDLE notice of the probe (default 75)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = command(
        "demo", cmd_demo, "throwaway Dovecot + seeded mailboxes, groups and mail + the daemon"
    )
    p.add_argument("--dir", type=Path, default=Path(".demo"), help="where the demo keeps its files")
    p.add_argument(
        "--once", action="store_true", help="one pass and exit instead of running the daemon"
    )
    p.add_argument(
        "--crm",
        action="store_true",
        help="groups and events in the reference CRM (emailsync.dev.crm) instead of SQLite",
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
