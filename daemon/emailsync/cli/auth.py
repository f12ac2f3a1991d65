"""``auth login`` and ``auth status``: Office 365 sign-in and token state per mailbox."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from emailsync.cli.daemon import poke_daemon
from emailsync.cli.exitcode import EXIT_OK, EXIT_USAGE
from emailsync.cli.wiring import load, token_caches_of
from emailsync.config import MailboxSettings
from emailsync.imap.auth import Authenticator, Office365Authenticator, make_authenticator


def cmd_auth_login(args: argparse.Namespace, out: TextIO) -> int:
    """Device-code sign-in; then a running daemon is told to retry the mailbox at once."""
    settings = load(args)
    mailbox = settings.mailbox(args.address)
    with token_caches_of(settings, mailbox) as caches:
        code = _auth_login(mailbox, make_authenticator(mailbox, settings, token_caches=caches), out)
    if code == EXIT_OK:
        poke_daemon(settings, mailbox.address, out)
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
