"""Fixtures for integration tests: real Dovecot servers on loopback and fresh users in them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot, DovecotOptions

from .daemonproc import DaemonFactory
from .faultproxy import FaultProxy
from .mailenv import MailUser, new_user, settings_for, write_config

# The Office 365 fixtures (identity provider, OAuth2 Dovecot) live in their own module and are
# made visible here once, so session-scoped ones really are one per session.
from .oauth_fixtures import (  # noqa: F401 -- pytest finds fixtures by name in conftest
    identity_provider_server,
    idp,
    oauth2_dovecot,
    oauth_ca,
    oauth_ca_file,
    oauth_clients,
    office365_settings,
)


def _start(options: DovecotOptions) -> Iterator[Dovecot]:
    if os.geteuid() != 0:
        pytest.fail("the Dovecot fixtures run Dovecot as root (its rule for default_login_user)")
    server = Dovecot(None, options)
    server.start()  # raises DovecotStartError with the log tail when it cannot start
    yield server
    server.close()


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A Dovecot with maildir++ (``.`` delimiter) and every capability."""
    yield from _start(DovecotOptions())


@pytest.fixture(scope="session")
def dovecot_slash() -> Iterator[Dovecot]:
    """A Dovecot with LAYOUT=fs and the ``/`` delimiter (as Exchange and Gmail use)."""
    yield from _start(DovecotOptions(separator="/"))


@pytest.fixture(scope="session")
def dovecot_nomove() -> Iterator[Dovecot]:
    """A Dovecot that does not announce MOVE (RFC 6851), so COPY + EXPUNGE is used."""
    yield from _start(DovecotOptions(without_capabilities=("MOVE",)))


# Production Dovecots answer a refused login after auth_failure_delay (2 s by default) and,
# through anvil's auth penalty, hold the next login from the same address for a few seconds
# more; the default fixture turns both off for speed. This one has both, the delay at 6 s.
SLOW_FAILURES_CONFIG = """auth_failure_delay = 6 secs
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0666
  }
}
"""


@pytest.fixture(scope="session")
def dovecot_slow_failures() -> Iterator[Dovecot]:
    """A Dovecot that answers a refused login after 6 s and holds the next one (auth penalty)."""
    yield from _start(DovecotOptions(extra_config=SLOW_FAILURES_CONFIG))


@pytest.fixture
def user(dovecot: Dovecot) -> MailUser:
    """A fresh mailbox on the default Dovecot."""
    return new_user(dovecot)


@pytest.fixture
def fault_proxy(dovecot: Dovecot) -> Iterator[FaultProxy]:
    """A fault proxy in front of the default Dovecot; ask for it before ``daemons``."""
    with FaultProxy(dovecot.port) as proxy:
        yield proxy


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Starts daemon subprocesses for a test; stops them at its end."""
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()


__all__ = ["MailUser", "new_user", "settings_for", "write_config"]


@pytest.fixture
def reference_crm() -> Iterator[DevCrm]:
    """The reference CRM (test_crm's secret) linking CLIENT_A to the group g-smith."""
    from .test_crm import CLIENT_A, SECRET  # noqa: PLC0415 -- the CRM tests' own constants

    server = DevCrm(SECRET.encode()).start()
    server.link("g-smith", "Smith", [CLIENT_A])
    yield server
    server.close()
