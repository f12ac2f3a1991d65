"""``token issue | list | revoke``: the agents' tokens for the self-service pages and API."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

from emailsync.cli.exitcode import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from emailsync.cli.wiring import load
from emailsync.config import MAX_AGENT_TOKEN_DAYS, Settings
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.state.agenttoken import open_agent_tokens, token_json


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
