"""Pytest fixtures for Office 365 tests: a CA, the local identity provider, an OAuth2 Dovecot."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from emailsync.config import Settings, parse_settings
from emailsync.dev.dovecot import Dovecot, DovecotOptions

from .idp import IdentityProvider, write_ca_file

# The fixtures; conftest.py imports them so that pytest sees each exactly once.
__all__ = [
    "identity_provider_server",
    "idp",
    "oauth2_dovecot",
    "oauth_ca",
    "oauth_ca_file",
    "oauth_clients",
    "office365_settings",
]

DELEGATED_CLIENT_ID = "0d6f5c9e-1b7a-4e7b-9a51-6f3c2d8e4b10"
APP_CLIENT_ID = "7a2e9b41-3c6d-4f0e-8b25-9d1c4e6a8f32"
# Mailboxes the app-only client may open, as Exchange's Add-MailboxPermission grants them.
APP_MAILBOXES = ("shared@example.com", "agent1@example.com")


@dataclass(frozen=True)
class OAuthClients:
    """The applications registered at the provider, with the app's secret and certificate."""

    delegated_client_id: str
    app_client_id: str
    app_secret: str
    app_secret_file: Path
    app_certificate_file: Path  # PEM: private key, certificate, issuing CA
    app_private_key: str  # the key's PEM text, for tests that look for leaks


def office365_table(idp: IdentityProvider, clients: OAuthClients, ca_file: Path) -> str:
    """The [office365] table for delegated sign-in at the test identity provider."""
    return (
        f'[office365]\ntenant_id = "{idp.tenant_id}"\n'
        f'client_id = "{clients.delegated_client_id}"\n'
        f'authority = "{idp.authority}"\nca_file = "{ca_file}"\n'
    )


def new_app_certificate() -> trustme.LeafCert:
    """A fresh RSA key and certificate (Entra ID takes RSA for client assertions)."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    return ca.issue_cert(
        "emailsync.example.com", common_name="emailsync app", key_type=trustme.KeyType.RSA
    )


@functools.cache
def app_certificate() -> trustme.LeafCert:
    """The app's registered certificate, made once per session (RSA key generation is slow)."""
    return new_app_certificate()


def write_certificate_file(certificate: trustme.LeafCert, path: Path) -> Path:
    """Write key and certificate chain to one PEM file, as ``client_certificate_file`` wants."""
    certificate.private_key_and_cert_chain_pem.write_to_path(str(path))
    path.chmod(0o600)
    return path


def oauth2_dovecot_options(
    idp: IdentityProvider, ca_file: Path, dovecot: Dovecot
) -> DovecotOptions:
    """Dovecot settings: XOAUTH2 and OAUTHBEARER checked by the provider's introspection.

    Password users keep the passwd-file passdb (limited to PLAIN/LOGIN). Delegated tokens must
    name the login user. App-only tokens name no user, so a second oauth2 passdb accepts any
    app token of the tenant's domain (``continue-ok``) and a passwd-file allow-list then
    decides which mailboxes the app may open. Files go to ``dovecot.base_dir / "oauth2"``;
    assign the result to ``dovecot.options`` before starting it.
    """
    conf_dir = dovecot.base_dir / "oauth2"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.chmod(0o755)
    # Dovecot 2.3 checks the active attribute first ("Provided token is not valid", a plain
    # refusal) and then needs the username attribute: a response without it is a temporary
    # failure ([UNAVAILABLE]), so the provider always sends both for active tokens.
    common = (
        f"introspection_mode = post\n"
        f"introspection_url = {idp.introspection_url}\n"
        f"tls_ca_cert_file = {ca_file}\n"
        f"timeout_msecs = 10000\n"
        f"active_attribute = active\n"
        f"active_value = true\n"
    )
    users = conf_dir / "dovecot-oauth2-users.conf.ext"
    users.write_text(common + "username_attribute = username\n")
    # An app token's app_principal is "<client id>@<tenant domain>"; %d compares domains only.
    apps = conf_dir / "dovecot-oauth2-apps.conf.ext"
    apps.write_text(common + "username_attribute = app_principal\nusername_format = %d\n")
    allow_list = conf_dir / "app-mailboxes"
    # nopassword: the token was already checked; this passdb only says yes or no to the user.
    allow_list.write_text("".join(f"{box}::::::::nopassword=y\n" for box in APP_MAILBOXES))
    for path in (users, apps, allow_list):
        path.chmod(0o644)
    # The first passdb is devserver's own (one passwd-file per user), limited to passwords.
    passdb = f"""passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN {dovecot.passwd_path}/%u
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {users}
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {apps}
  result_success = continue-ok
}}
passdb {{
  driver = passwd-file
  mechanisms = xoauth2 oauthbearer
  args = {allow_list}
  skip = unauthenticated
  result_success = return-ok
  result_failure = return-fail
}}"""
    return DovecotOptions(
        passdb=passdb,
        extra_config="auth_mechanisms = plain login xoauth2 oauthbearer\n",
    )


@pytest.fixture(scope="session")
def oauth_ca() -> trustme.CA:
    """The test CA that signs the identity provider's certificate."""
    return trustme.CA()


@contextmanager
def shared_temp_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory that Dovecot's unprivileged processes can traverse.

    pytest's tmp_path lives below /tmp/pytest-of-root (mode 0700), where Dovecot's auth
    process (user dovecot) and mail processes (nobody) get "Permission denied".
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def oauth_ca_file(oauth_ca: trustme.CA) -> Iterator[Path]:
    """The CA certificate as a PEM file readable by Dovecot's auth process."""
    with shared_temp_dir("emailsync-idp-ca-") as directory:
        yield write_ca_file(oauth_ca, directory)


@pytest.fixture(scope="session")
def identity_provider_server(oauth_ca: trustme.CA) -> Iterator[IdentityProvider]:
    """The identity provider, listening on https://HOST:443 for the whole session."""
    with IdentityProvider(oauth_ca) as idp:
        yield idp


@pytest.fixture
def idp(identity_provider_server: IdentityProvider) -> Iterator[IdentityProvider]:
    """The identity provider, reset to no tokens and serving, for one test."""
    identity_provider_server.reset()
    yield identity_provider_server
    identity_provider_server.up()


@pytest.fixture
def oauth_clients(idp: IdentityProvider, tmp_path: Path) -> OAuthClients:
    """A public client for delegated sign-in and a confidential client for app-only.

    The app has both a client secret and a certificate, as an Entra ID registration may.
    """
    secret = "app-secret-" + tmp_path.name
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    certificate = app_certificate()
    certificate_file = write_certificate_file(certificate, tmp_path / "client-certificate.pem")
    idp.add_client(DELEGATED_CLIENT_ID)
    idp.add_client(APP_CLIENT_ID, secret, certificate_pem=certificate.cert_chain_pems[0].bytes())
    return OAuthClients(
        delegated_client_id=DELEGATED_CLIENT_ID,
        app_client_id=APP_CLIENT_ID,
        app_secret=secret,
        app_secret_file=secret_file,
        app_certificate_file=certificate_file,
        app_private_key=certificate.private_key_pem.bytes().decode("ascii"),
    )


@pytest.fixture(scope="session")
def oauth2_dovecot(
    identity_provider_server: IdentityProvider, oauth_ca_file: Path
) -> Iterator[Dovecot]:
    """Dovecot accepting passwords (``add_user``) and provider-issued OAuth2 tokens."""
    with shared_temp_dir("emailsync-oauth2-dovecot-") as directory:
        server = Dovecot(directory)
        server.options = oauth2_dovecot_options(identity_provider_server, oauth_ca_file, server)
        with server:
            yield server


@pytest.fixture
def office365_settings(
    idp: IdentityProvider,
    oauth_clients: OAuthClients,
    oauth2_dovecot: Dovecot,
    oauth_ca_file: Path,
    tmp_path: Path,
) -> Callable[..., Settings]:
    """Build Settings for Office 365 mailboxes served by ``oauth2_dovecot``.

    Call it as ``office365_settings("agent1@example.com", app_only=False)``; app-only uses the
    client secret, or the certificate file given as ``certificate_file`` (implies app-only).
    """

    def build(
        *addresses: str, app_only: bool = False, certificate_file: Path | None = None
    ) -> Settings:
        app_only = app_only or certificate_file is not None
        office365: dict[str, Any] = {
            "tenant_id": idp.tenant_id,
            "client_id": oauth_clients.app_client_id
            if app_only
            else oauth_clients.delegated_client_id,
            "authority": idp.authority,
            "ca_file": str(oauth_ca_file),
        }
        if certificate_file is not None:
            office365["client_certificate_file"] = str(certificate_file)
        elif app_only:
            office365["client_secret_file"] = str(oauth_clients.app_secret_file)
        data = {
            "daemon": {"state_dir": str(tmp_path / "state"), "timeout_seconds": 10},
            "branches": {
                "local": {
                    "host": oauth2_dovecot.host,
                    "port": oauth2_dovecot.port,
                    "security": "none",
                    "allow_insecure": True,
                }
            },
            "office365": office365,
            "mailboxes": [
                {"address": address, "branch": "local", "auth": "office365"}
                for address in addresses or ("agent1@example.com",)
            ],
        }
        return parse_settings(data, tmp_path / "emailsync.toml")

    return build
