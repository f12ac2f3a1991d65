"""Settings → the concrete objects a command works on: the only place that picks them.

The config is read as the command's caller; the store (state's own tables or the CRM), a
logged-in IMAP session with its authenticator, and the Office 365 token caches are opened here.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from urllib.parse import urlsplit

from emailsync.config import MailboxSettings, Settings, default_config_path, load_settings
from emailsync.imap.session import ImapSession
from emailsync.imap.session import session_for as imap_session_for
from emailsync.imap.tokencache import TokenCacheStore
from emailsync.privilege import act_as_state_owner
from emailsync.state import POSTGRES_SCHEMES, open_state
from emailsync.state.base import Store
from emailsync.state.tokencache_sql import token_caches_for
from emailsync.state.vault import Vault
from emailsync.telemetry.logs import configure_logging
from emailsync.timeline import open_store


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
    """A logged-in session to one configured mailbox, logged out at the end; its token caches
    are the daemon's (``token_caches_of``)."""
    with (
        token_caches_of(settings, settings.mailbox(address)) as caches,
        imap_session_for(settings, address, token_caches=caches) as session,
    ):
        yield session


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
