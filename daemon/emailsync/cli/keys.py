"""``keys rotate | adopt``: the registry key that encrypts stored passwords and signs tokens."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from emailsync.cli.exitcode import EXIT_OK, EXIT_USAGE
from emailsync.cli.wiring import load
from emailsync.state import open_state
from emailsync.state.agenttoken import open_agent_tokens
from emailsync.state.keycheck import adopt_key_check, rotate_registry_key
from emailsync.state.vault import Vault


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
