"""Command line: argv → objects. The only place that picks the concrete store and auth."""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit

import structlog

from emailsync import __version__
from emailsync.config import (
    MAX_AGENT_TOKEN_DAYS,
    MailboxSettings,
    Settings,
    check_secrets,
    default_config_path,
    load_settings,
    mailbox_secret_problems,
    shared_secret_problems,
)
from emailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    ControlError,
    EmailSyncError,
    MailboxError,
    StoreError,
    StoreUnavailableError,
)
from emailsync.filing.queuepass import Decision, Filer, PassResult
from emailsync.imap.auth import Authenticator, Office365Authenticator, make_authenticator
from emailsync.imap.session import ImapSession
from emailsync.imap.tokencache import TokenCacheStore
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.model import OUTCOME_KEYWORD, FolderRole, Outcome, TimelineEvent
from emailsync.ops.progress import progress
from emailsync.privilege import ActingUser, act_as_state_owner
from emailsync.state import POSTGRES_SCHEMES, check_store_url, open_state
from emailsync.state.agenttoken import open_agent_tokens, token_json
from emailsync.state.base import Store
from emailsync.state.csvimport import read_group_csv
from emailsync.state.keycheck import adopt_key_check, check_state_database, rotate_registry_key
from emailsync.state.legacystop import take_legacy_stop
from emailsync.state.tokencache_sql import token_caches_for
from emailsync.state.vault import Vault
from emailsync.telemetry.logs import configure_logging
from emailsync.timeline import open_store, open_timeline
from emailsync.web.control import ControlClient

if TYPE_CHECKING:
    from emailsync.cluster.membership import Cluster
    from emailsync.service.supervisor import ClusterFactory, Supervisor

log = structlog.get_logger(__name__)

# Exit codes (sysexits.h where one fits). A usage error is 64 (EX_USAGE), not argparse's 2:
# the units list it in RestartPreventExitStatus, since restarting cannot fix a command line.
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

Handler = Callable[[argparse.Namespace, TextIO], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args, sys.stdout)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except ControlError as exc:
        print(f"emailsync: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AuthError as exc:
        print(f"emailsync: authentication failed: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ConnectionLostError as exc:
        print(f"emailsync: server unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (MailboxError, StoreError, EmailSyncError) as exc:
        print(f"emailsync: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


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


# Examples shown under each command's --help (and in the man page). Every command has one:
# tests/unit/test_cli_help.py fails for a command added without.
EXAMPLES: dict[str, str] = {
    "run": "emailsync --config /etc/emailsync/emailsync.toml run   # what the unit runs",
    "check-config": (
        "emailsync check-config\n  emailsync check-config --json\n"
        "  emailsync --config config/emailsync.toml check-config --skip-secrets"
    ),
    "setup": "emailsync setup agent1@example.com   # as root: acts as the state dir's owner",
    "sync": (
        "emailsync sync --dry-run agent1@example.com   # what would happen, nothing changed\n"
        "  emailsync sync --once                          # one pass over every enabled mailbox\n"
        "  emailsync sync --dry-run --json | jq -c 'select(.destination == \"failed\")'"
    ),
    "start-sync": (
        "emailsync start-sync agent1@example.com\n  emailsync start-sync --all\n"
        "  emailsync start-sync --include-stuck agent1@example.com"
    ),
    "stop": "emailsync stop agent1@example.com   # then `emailsync setup` starts it again",
    "status": "emailsync status\n  emailsync status --json | jq -r 'select(.queue > 0).address'",
    "retry-failed": (
        "emailsync groups add Smiths buyer@example.org && emailsync retry-failed agent1@example.com"
    ),
    "groups": "emailsync groups list",
    "groups add": "emailsync groups add 'Smith, 12 High St' buyer@example.org seller@example.net",
    "groups import": "emailsync groups import groups.csv   # header: group,address",
    "groups list": "emailsync groups list --json",
    "auth": "emailsync auth status",
    "auth login": "emailsync auth login agent3@contoso.com   # prints a URL and a code",
    "auth status": "emailsync auth status --json",
    "token": "emailsync token issue agent1@example.com",
    "token issue": (
        "emailsync token issue agent1@example.com --expires 30   # prints the token and page link"
    ),
    "token list": (
        "emailsync token list\n"
        "  emailsync token list --json | jq -r 'select(.state == \"active\") | .id'"
    ),
    "token revoke": (
        "emailsync token revoke 3f9c2a7be1d04c55         # one link (its id from `token list`)\n"
        "  emailsync token revoke agent1@example.com    # every link of the mailbox"
    ),
    "keys": "emailsync keys rotate",
    "keys rotate": "emailsync keys rotate   # every agent token stops working",
    "keys adopt": "emailsync keys adopt --yes   # after the old key was lost for good",
    "timeline": "emailsync timeline --group Smiths --limit 20\n  emailsync timeline --json",
    "doctor": "emailsync doctor agent1@example.com\n  emailsync doctor --json agent1@example.com",
    "demo": (
        "emailsync demo            # Ctrl-C to stop\n  emailsync demo --once\n"
        "  emailsync demo --crm      # events go to the reference CRM"
    ),
    "crm": "emailsync crm check",
    "crm check": "emailsync crm check   # one signed lookup; says what is wrong in one line",
    "completion": (
        "emailsync completion bash > /etc/bash_completion.d/emailsync\n"
        '  emailsync completion zsh > "${fpath[1]}/_emailsync"'
    ),
}


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


# -- helpers -------------------------------------------------------------------------------------


def read_settings(args: argparse.Namespace) -> Settings:
    """The config named by --config (or the default), read as the command's caller.

    From here on a command run as root acts as the owner of the state directory (the
    service's user), so that every file it creates there stays readable by the service.
    """
    settings = load_settings(args.config or default_config_path())
    args.acting_as = act_as_state_owner(settings.daemon.state_dir)
    return settings


def load(args: argparse.Namespace) -> Settings:
    """Load the config named by --config (or the default) and set up logging from it."""
    settings = read_settings(args)
    configure_logging(settings.daemon.log_format, settings.daemon.log_level)
    return settings


@contextlib.contextmanager
def store_for(settings: Settings) -> Iterator[Store]:
    """Open the configured store for the length of a ``with`` block."""
    store = open_store(settings.store_url, settings.daemon.state_dir, settings.crm)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def session_for(settings: Settings, address: str) -> Iterator[ImapSession]:
    """A logged-in session to one configured mailbox, logged out at the end."""
    mailbox = settings.mailbox(address)
    with token_caches_of(settings, mailbox) as caches:
        session = ImapSession.open(
            mailbox,
            settings.folders,
            make_authenticator(mailbox, settings, token_caches=caches),
            timeout_seconds=settings.daemon.timeout_seconds,
        )
        try:
            yield session
        finally:
            session.logout()


@contextlib.contextmanager
def token_caches_of(
    settings: Settings, mailbox: MailboxSettings | None = None
) -> Iterator[TokenCacheStore | None]:
    """Where the daemon keeps delegated Office 365 token caches, open for a ``with`` block.

    The state database's when it is PostgreSQL (``token_caches_for``: the daemons of a
    cluster read the cache `auth login` writes there); None (files in ``state_dir``, what
    ``make_authenticator`` uses by default) otherwise, and for a mailbox that is not
    Office 365 (nothing is opened then).
    """
    shared = urlsplit(settings.state_url.strip()).scheme.lower() in POSTGRES_SCHEMES
    if not shared or (mailbox is not None and mailbox.auth != "office365"):
        yield None
        return
    state_dir = settings.daemon.state_dir
    with contextlib.closing(open_state(settings.state_url, state_dir)) as state:
        caches = token_caches_for(state, Vault(state_dir), state_dir)
        try:
            yield caches
        finally:
            caches.close()


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


# -- commands ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    """The daemon in the foreground, until SIGTERM."""
    from emailsync.runtime.worker import (  # noqa: PLC0415 -- only the daemon needs it
        WORKER_STACK_BYTES,
        limit_malloc_arenas,
    )
    from emailsync.service.supervisor import Supervisor  # noqa: PLC0415 -- only the daemon needs it

    # Every thread started from here on (a worker per mailbox) gets a small stack and shares
    # few malloc arenas (issue 10: per-mailbox memory).
    threading.stack_size(WORKER_STACK_BYTES)
    limit_malloc_arenas()
    settings = load(args)
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
    if _clear_stop(settings, address):
        with contextlib.suppress(ControlError):
            ControlClient(settings).start(address)
        print(f"{address}: sync started again", file=out)
    else:
        _poke_daemon(settings, address, out)
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
    _poke_daemon(settings, settings.mailbox(args.address).address, out, include_stuck=True)
    return EXIT_OK


def cmd_groups_add(args: argparse.Namespace, out: TextIO) -> int:
    """Create a group or link more addresses to it."""
    settings = load(args)
    if settings.crm is not None:
        return _owned_by_crm(settings, "groups")
    with store_for(settings) as store:
        try:
            group = store.add_group(args.name, args.addresses)
        except ValueError as exc:
            print(f"emailsync: {exc}", file=sys.stderr)
            return EXIT_USAGE
    print(f"{group.name}: {', '.join(group.addresses)}", file=out)
    return EXIT_OK


def cmd_groups_import(args: argparse.Namespace, out: TextIO) -> int:
    """Import group,address rows from a CSV file."""
    settings = load(args)
    if settings.crm is not None:
        return _owned_by_crm(settings, "groups")
    try:
        rows = read_group_csv(args.file)
    except (ValueError, OSError) as exc:
        print(f"emailsync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with store_for(settings) as store:
        linked = store.import_groups(rows)
    print(f"{args.file}: {len(rows)} rows, {linked} new links", file=out)
    return EXIT_OK


def cmd_groups_list(args: argparse.Namespace, out: TextIO) -> int:
    """List groups with their addresses."""
    settings = load(args)
    if settings.crm is not None:
        return _owned_by_crm(settings, "groups")
    with store_for(settings) as store:
        groups = store.list_groups()
    for group in groups:
        if args.json:
            print(json.dumps({"group": group.name, "addresses": list(group.addresses)}), file=out)
        else:
            print(f"{group.name}\t{', '.join(group.addresses)}", file=out)
    return EXIT_OK


def _operator() -> str:
    """Who runs this command, for a token's ``issued_by``: the sudo caller, else the login."""
    name = os.environ.get("SUDO_USER")
    if not name:
        try:
            name = getpass.getuser()
        except OSError:  # no name for this uid (a container): its number says who
            name = str(os.getuid())
    return name


def cmd_token_issue(args: argparse.Namespace, out: TextIO) -> int:
    """Print an agent token for one mailbox and the page link that carries it."""
    settings = load(args)
    address = normalise_address(args.address)
    if address is None or mailbox_address_problem(address) is not None:
        print(f"emailsync: {args.address!r} is not a mailbox address", file=sys.stderr)
        return EXIT_USAGE
    if args.expires is not None and not 1 <= args.expires <= MAX_AGENT_TOKEN_DAYS:
        print(
            f"emailsync: --expires takes a number of days, 1 to {MAX_AGENT_TOKEN_DAYS}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with open_agent_tokens(settings) as tokens:
        token, issued = tokens.issue(address, args.expires, f"cli:{_operator()}")
    print(token, file=out)
    print(f"page: {page_base(settings)}/login?token={token}", file=out)
    expires = issued.expires_at.isoformat() if issued.expires_at else "never"
    print(f"id: {issued.id}  expires: {expires}", file=out)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace, out: TextIO) -> int:
    """Every agent token issued: mailbox, who issued it and when, expiry, last use, state."""
    settings = load(args)
    with open_agent_tokens(settings) as tokens:
        issued = tokens.issued()
    now = datetime.now(UTC)
    for token in issued:
        row = token_json(token, now)
        if args.json:
            print(json.dumps(row), file=out)
            continue
        print(
            "\t".join(
                [
                    token.id,
                    token.address,
                    row["state"],
                    f"issued {row['issued_at'] or 'before ids'} by {token.issued_by}",
                    f"expires {row['expires_at'] or 'never'}",
                    f"last used {row['last_used_at'] or 'never'}",
                ]
            ),
            file=out,
        )
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace, out: TextIO) -> int:
    """Revoke one token by id, or every token of a mailbox by address (the daemon sees it at
    once: it checks the state database on every use)."""
    settings = load(args)
    with open_agent_tokens(settings) as tokens:
        try:
            revoked = tokens.revoke(args.which)
        except ValueError as exc:
            print(f"emailsync: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if not revoked:
        print(f"emailsync: no such token: {args.which}", file=sys.stderr)
        return EXIT_RUNTIME
    for token in revoked:
        print(f"revoked {token.id} ({token.address})", file=out)
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace, out: TextIO) -> int:
    """Rotate the registry key: re-encrypt stored passwords; agent tokens stop working."""
    settings = load(args)
    # The registry is emailsync's state: in the state database whichever timeline is set.
    state = open_state(settings.state_url, settings.daemon.state_dir)
    try:
        generation = rotate_registry_key(state, Vault(settings.daemon.state_dir))
    finally:
        state.close()
    # Their signatures fail already; the list says so too.
    with open_agent_tokens(settings) as tokens:
        tokens.rotated()
    print(f"registry key rotated to generation {generation}; agent tokens revoked", file=out)
    return EXIT_OK


def cmd_keys_adopt(args: argparse.Namespace, out: TextIO) -> int:
    """Make this instance's registry key the one the state database checks (keycheck)."""
    settings = load(args)
    vault = Vault(settings.daemon.state_dir)
    if not args.yes:
        print(
            "emailsync keys adopt: the state database will check for this instance's key "
            f"({vault.describe()}); secrets stored under the old key stay unreadable (set "
            "those mailboxes up again) and every other instance must get this key. Give --yes",
            file=sys.stderr,
        )
        return EXIT_USAGE
    state = open_state(settings.state_url, settings.daemon.state_dir)
    try:
        adopted = adopt_key_check(state, vault)
    finally:
        state.close()
    if not adopted:
        print("the state database already checks for this instance's key: nothing to do", file=out)
        return EXIT_OK
    print(
        f"the state database now checks for this instance's key (generation {vault.generation}, "
        f"from {vault.describe()}); give every other instance this key",
        file=out,
    )
    return EXIT_OK


def page_base(settings: Settings) -> str:
    """The pages' base URL: ``[daemon] public_url``, else the listen address on this machine
    (a wildcard means loopback)."""
    if settings.daemon.public_url:
        return settings.daemon.public_url
    host = settings.daemon.listen_host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 -- a wildcard listener is reached on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.daemon.listen_port}"


def cmd_timeline(args: argparse.Namespace, out: TextIO) -> int:
    """Print recorded events, newest first; JSON is one object per line."""
    settings = load(args)
    if settings.crm is not None:
        return _owned_by_crm(settings, "timeline events")
    with store_for(settings) as store:
        events = store.list_events(group=args.group, mailbox=args.mailbox, limit=args.limit)
    for event in events:
        if args.json:
            print(json.dumps(event_json(event), ensure_ascii=False), file=out)
        else:
            when = event.date.strftime("%Y-%m-%d %H:%M") if event.date else "?"
            # Each mailbox with the direction seen from it (outbound from the sender's).
            vias = [f"{v.mailbox} ({v.direction.value if v.direction else '?'})" for v in event.via]
            mailboxes = ",".join(vias) or event.mailbox
            print(
                f"{when}\t{event.group}\t{event.direction.value}\t{event.subject!r}"
                f"\tfrom {event.from_}\tvia {mailboxes}",
                file=out,
            )
    return EXIT_OK


def _owned_by_crm(settings: Settings, what: str) -> int:
    assert settings.crm is not None  # noqa: S101 -- callers check
    print(
        f"emailsync: the CRM at {settings.crm.url} owns {what} ([crm] in {settings.path});"
        f" manage them in the CRM, not here",
        file=sys.stderr,
    )
    return EXIT_USAGE


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
    except StoreUnavailableError as exc:
        print(f"emailsync: CRM check failed: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StoreError as exc:
        print(f"emailsync: CRM check failed: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        store.close()
    groups = next(iter(answer.values()), ())
    print(
        f"{settings.crm.url}: ok (signature accepted; {args.address} is linked to "
        f"{len(groups)} group(s))",
        file=out,
    )
    return EXIT_OK


def cmd_auth_login(args: argparse.Namespace, out: TextIO) -> int:
    """Device-code sign-in; then a running daemon is told to retry the mailbox at once."""
    settings = load(args)
    mailbox = settings.mailbox(args.address)
    with token_caches_of(settings, mailbox) as caches:
        code = _auth_login(mailbox, make_authenticator(mailbox, settings, token_caches=caches), out)
    if code == EXIT_OK:
        _poke_daemon(settings, mailbox.address, out)
    return code


def _auth_login(mailbox: MailboxSettings, authenticator: Authenticator, out: TextIO) -> int:
    """``auth login``'s sign-in (device code) or app-only check; its exit code."""
    if not isinstance(authenticator, Office365Authenticator):
        print(
            f"emailsync: {mailbox.address} signs in with a password, not Office 365",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if authenticator.mode == "app_only":
        authenticator.access_token()  # proves the client credentials work
        print(f"{mailbox.address}: app-only access works (no personal sign-in needed)", file=out)
    else:
        authenticator.device_code_login(lambda text: print(text, file=out, flush=True))
        status = authenticator.status()
        print(
            f"{mailbox.address}: signed in as {status['account']}; "
            f"access token valid until {status['access_token_expires']}",
            file=out,
        )
    return EXIT_OK


def _clear_stop(settings: Settings, address: str) -> bool:
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


def _poke_daemon(
    settings: Settings, address: str, out: TextIO, *, include_stuck: bool = False
) -> None:
    """Ask a running daemon to retry a mailbox now (it may be waiting in needs_reauth)."""
    if _is_stopped(settings, address):
        print(f"{address}: sync is stopped; run `emailsync setup {address}` to start it", file=out)
        return
    with contextlib.suppress(ControlError):
        ControlClient(settings).sync(address, include_stuck=include_stuck)
        print(f"{address}: the running daemon will retry now", file=out)


def cmd_auth_status(args: argparse.Namespace, out: TextIO) -> int:
    """Mode, account, token expiry, refresh-token age and last error per Office 365 mailbox."""
    settings = load(args)
    mailboxes = [m for m in settings.mailboxes if m.auth == "office365"]
    if not mailboxes:
        print("no Office 365 mailboxes in the config", file=out)
    for mailbox in mailboxes:
        with token_caches_of(settings, mailbox) as caches:
            authenticator = make_authenticator(mailbox, settings, token_caches=caches)
            assert isinstance(authenticator, Office365Authenticator)  # noqa: S101 -- auth = office365
            status = authenticator.status()
        if args.json:
            print(json.dumps(dict(status)), file=out)
            continue
        age = status["refresh_token_age_seconds"]
        who = f"signed in as {status['account']}" if status["signed_in"] else "NOT signed in"
        mode = status["mode"] + (f" ({status['credential']})" if status["credential"] else "")
        print(
            f"{status['address']:32} {mode:21} {who}"
            f"  token until {status['access_token_expires'] or '-'}"
            f"  refresh token age {f'{age / 86400:.1f} d' if age is not None else '-'}"
            + (f"  last error: {status['last_error']}" if status["last_error"] else ""),
            file=out,
        )
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, out: TextIO) -> int:
    """One line per check of a mailbox's server; exit 1 when any is a problem."""
    from emailsync.ops.doctor import diagnose, exit_code  # noqa: PLC0415 -- only doctor needs it

    settings = load(args)

    def emit(finding: Any) -> None:
        text = json.dumps(finding.as_json()) if args.json else finding.line()
        print(text, file=out, flush=True)

    findings = diagnose(settings, args.address, idle_timeout=args.idle_timeout, emit=emit)
    return exit_code(findings)


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    """Print the completion script for a shell, or the man page, generated from this parser."""
    from emailsync.ops.completion import bash_script, man_page, zsh_script  # noqa: PLC0415

    parser = build_parser()
    if args.shell == "man":
        out.write(man_page(parser, EXAMPLES))
    else:
        out.write(bash_script(parser) if args.shell == "bash" else zsh_script(parser))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the demo (see emailsync.dev.demo)."""
    from emailsync.dev.demo import run_demo  # noqa: PLC0415 -- the demo pulls in the dev server

    return run_demo(args.dir, once=args.once, out=out, crm=args.crm)


if __name__ == "__main__":
    raise SystemExit(main())
