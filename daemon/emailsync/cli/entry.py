"""The console script: argv → the command's handler → an exit code, errors as one line each."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from emailsync.cli.exitcode import EXIT_CONFIG, EXIT_RUNTIME, EXIT_UNAVAILABLE, EXIT_USAGE
from emailsync.cli.parser import Handler, build_parser
from emailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    ControlError,
    EmailSyncError,
    MailboxError,
    StoreError,
)


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
