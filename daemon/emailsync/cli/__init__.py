"""Command line: argv → objects. The only place that picks the concrete state, timeline and auth.

``entry`` is the console script (``main``: argv → handler → exit code, ``exitcode``);
``parser`` builds every command and its options, with ``examples`` under each --help;
``wiring`` opens what the commands work on (config, store, IMAP session, token caches).
The commands, by what they act on: ``daemon`` (run, start-sync, stop, status, demo),
``mailbox`` (setup, sync, retry-failed), ``timeline`` (groups, timeline, crm check),
``auth`` (Office 365 sign-in), ``tokens`` (agent tokens), ``keys`` (the registry key) and
``check`` (check-config, doctor).

May import: every layer (it is the top one).
"""

from emailsync.cli.entry import main
from emailsync.cli.examples import EXAMPLES
from emailsync.cli.exitcode import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from emailsync.cli.parser import build_parser, subcommands, walk_commands
from emailsync.cli.tokens import page_base
from emailsync.cli.wiring import session_for

__all__ = [
    "EXAMPLES",
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
    "page_base",
    "session_for",
    "subcommands",
    "walk_commands",
]
