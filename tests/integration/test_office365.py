"""Office 365 sign-in end to end: real MSAL, a local identity provider, Dovecot's oauth2 passdb.

Also the password authenticator against plain Dovecot. Nothing is mocked: MSAL talks HTTPS to
the provider in ``idp.py``, Dovecot asks the same provider to introspect every token.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import imapclient
import pytest
import requests

from emailsync.config import Settings
from emailsync.dev.dovecot import Dovecot, DovecotOptions
from emailsync.errors import (
    AuthError,
    ConnectionLostError,
    IdentityProviderUnavailableError,
)
from emailsync.imap.auth import (
    MSAL_EXPIRY_MARGIN_SECONDS,
    Authenticator,
    Office365Authenticator,
    PasswordAuthenticator,
    make_authenticator,
)

from .conftest import MailUser, new_user, settings_for
from .idp import DEVICE_GRANT, HOST, IdentityProvider
from .oauth_fixtures import (
    OAuthClients,
    new_app_certificate,
    shared_temp_dir,
    write_certificate_file,
)

pytestmark = pytest.mark.dovecot

AGENT = "agent1@example.com"
IMAP_TIMEOUT_SECONDS = 10


@contextmanager
def imap(server: Dovecot) -> Iterator[imapclient.IMAPClient]:
    """A connected, not yet logged-in client; logged out (or closed) afterwards."""
    client = imapclient.IMAPClient(
        server.host, port=server.port, ssl=False, timeout=IMAP_TIMEOUT_SECONDS
    )
    try:
        yield client
    finally:
        try:
            client.logout()
        except (imapclient.exceptions.IMAPClientError, OSError):
            client.shutdown()


def login_and_select(auth: Authenticator, server: Dovecot) -> None:
    """Log in with ``auth`` and prove the session works by selecting INBOX."""
    with imap(server) as client:
        auth.login(client)
        client.select_folder("INBOX")


def office365(settings: Settings, address: str = AGENT) -> Office365Authenticator:
    """The Office 365 authenticator make_authenticator builds for a mailbox."""
    auth = make_authenticator(settings.mailbox(address), settings)
    assert isinstance(auth, Office365Authenticator)
    return auth


def sign_in(
    auth: Office365Authenticator,
    idp: IdentityProvider,
    username: str = AGENT,
    *,
    approve_after_seconds: float = 0.0,
) -> list[str]:
    """Run the device-code sign-in; "the browser" approves the shown code. Returns messages."""
    shown: list[str] = []
    timers: list[threading.Timer] = []

    def show(message: str) -> None:
        shown.append(message)
        match = re.search(r"enter the code (\S+)", message)
        assert match, message
        timer = threading.Timer(approve_after_seconds, idp.approve, (match.group(1), username))
        timers.append(timer)
        timer.start()

    try:
        auth.device_code_login(show, timeout_seconds=30)
    finally:
        for timer in timers:
            timer.cancel()
            timer.join(timeout=5)
    return shown


@pytest.fixture
def auth(
    idp: IdentityProvider, office365_settings: Callable[..., Settings]
) -> Office365Authenticator:
    """The agent's authenticator, signed in by device code."""
    signed_in = office365(office365_settings())
    sign_in(signed_in, idp)
    return signed_in


def cached_refresh_tokens(path: Path) -> list[str]:
    """The refresh tokens in an MSAL token cache file."""
    cache = json.loads(path.read_text())
    return [entry["secret"] for entry in cache.get("RefreshToken", {}).values()]


def refresh_grant_status(idp: IdentityProvider, ca_file: Path, client_id: str, rt: str) -> int:
    """Redeem a refresh token at the provider directly, as any client could; the HTTP status."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.post(
            idp.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": rt, "client_id": client_id},
            verify=str(ca_file),
            timeout=10,
        )
        return response.status_code


# -- delegated (device code) -----------------------------------------------------------------


def test_device_code_login_persists_a_private_token_cache_and_xoauth2_login_works(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
) -> None:
    """The device-code flow shows a URL and code, polls until approval, then saves 0600."""
    auth = office365(office365_settings())

    shown = sign_in(auth, idp, approve_after_seconds=1.5)

    assert f"https://{HOST}/devicelogin" in shown[0]
    assert idp.token_requests(DEVICE_GRANT)[0].status == 400  # authorization_pending first
    assert auth.cache_path is not None
    assert stat.S_IMODE(auth.cache_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(auth.cache_path.parent.stat().st_mode) == 0o700
    assert len(cached_refresh_tokens(auth.cache_path)) == 1
    login_and_select(auth, oauth2_dovecot)
    status = auth.status()
    assert status["mode"] == "delegated"
    assert status["account"] == AGENT
    assert status["signed_in"] is True
    assert status["access_token_expires"] is not None
    assert status["refresh_token_age_seconds"] is not None
    assert status["last_error"] is None


def test_a_cached_access_token_serves_every_reconnect_while_it_is_valid(
    idp: IdentityProvider, auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """Reconnecting asks MSAL each time, and MSAL answers from its cache: no token requests."""
    before = len(idp.token_requests())

    login_and_select(auth, oauth2_dovecot)
    login_and_select(auth, oauth2_dovecot)

    assert len(idp.token_requests()) == before


def test_silent_refresh_after_expiry_persists_the_rotated_refresh_token(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    oauth_clients: OAuthClients,
    oauth_ca_file: Path,
) -> None:
    """An access token MSAL deems expired is refreshed; the new refresh token is on disk."""
    # MSAL treats a token with under 300 s left as expired: this one crosses that in ~2 s.
    idp.access_token_lifetime_seconds = MSAL_EXPIRY_MARGIN_SECONDS + 2
    auth = office365(office365_settings())
    sign_in(auth, idp)
    assert auth.cache_path is not None
    before = auth.cache_path.read_bytes()
    (old_rt,) = cached_refresh_tokens(auth.cache_path)
    expiry_before = auth.token_expiry()
    time.sleep(2.5)

    login_and_select(auth, oauth2_dovecot)

    assert [r.status for r in idp.token_requests("refresh_token")] == [200]
    assert auth.cache_path.read_bytes() != before
    assert stat.S_IMODE(auth.cache_path.stat().st_mode) == 0o600
    (new_rt,) = cached_refresh_tokens(auth.cache_path)
    assert new_rt != old_rt
    client_id = oauth_clients.delegated_client_id
    assert refresh_grant_status(idp, oauth_ca_file, client_id, old_rt) == 400
    assert idp.refresh_token_works(new_rt)
    new_expiry = auth.token_expiry()
    assert expiry_before is not None
    assert new_expiry is not None
    assert new_expiry > expiry_before


def test_a_token_revoked_at_the_server_after_caching_is_replaced_on_the_second_try(
    idp: IdentityProvider, auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """Dovecot refuses the cached token; one forced refresh and the login goes through."""
    idp.expire_access_tokens()  # MSAL's cache still calls the token valid for an hour

    login_and_select(auth, oauth2_dovecot)

    assert [r.status for r in idp.token_requests("refresh_token")] == [200]


def test_revoked_refresh_token_needs_reauth_and_a_new_device_login_restores_login(
    idp: IdentityProvider, auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """invalid_grant (AADSTS50173) is an AuthError naming the fix; signing in again works."""
    idp.revoke_refresh_tokens(AGENT)
    idp.expire_access_tokens()

    with pytest.raises(AuthError, match=r"invalid_grant.*emailsync auth login agent1@"):
        login_and_select(auth, oauth2_dovecot)
    assert "AADSTS50173" in (auth.status()["last_error"] or "")

    sign_in(auth, idp)
    login_and_select(auth, oauth2_dovecot)
    assert auth.status()["last_error"] is None


def test_a_sign_in_by_another_process_is_picked_up_without_a_restart(
    idp: IdentityProvider, office365_settings: Callable[..., Settings], oauth2_dovecot: Dovecot
) -> None:
    """The daemon's authenticator rereads the cache file `emailsync auth login` wrote."""
    settings = office365_settings()
    daemon = office365(settings)
    with pytest.raises(AuthError, match="no Office 365 sign-in"):
        login_and_select(daemon, oauth2_dovecot)

    sign_in(office365(settings), idp)  # the CLI, with its own MSAL instance

    login_and_select(daemon, oauth2_dovecot)


def test_refresh_if_needed_refreshes_only_when_too_little_time_is_left(
    idp: IdentityProvider, auth: Office365Authenticator
) -> None:
    """The scheduler's keep-alive refreshes ahead of expiry and returns the new expiry."""
    expiry = auth.token_expiry()
    assert expiry is not None

    assert auth.refresh_if_needed(60) == expiry
    assert idp.token_requests("refresh_token") == []

    time.sleep(1.1)  # the new token's expiry must differ by at least a second
    new_expiry = auth.refresh_if_needed(2 * 3600)

    assert len(idp.token_requests("refresh_token")) == 1
    assert new_expiry is not None
    assert new_expiry > expiry


def test_forget_removes_the_token_cache_and_a_later_login_raises_auth_error(
    auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """Stop Email Sync forgets the tokens: the file is gone and login needs a new sign-in."""
    assert auth.cache_path is not None

    auth.forget()

    assert not auth.cache_path.exists()
    assert auth.token_expiry() is None
    assert auth.status()["signed_in"] is False
    with pytest.raises(AuthError, match=r"emailsync auth login agent1@example\.com"):
        login_and_select(auth, oauth2_dovecot)


def test_a_delegated_token_does_not_open_another_users_mailbox(
    idp: IdentityProvider, office365_settings: Callable[..., Settings], oauth2_dovecot: Dovecot
) -> None:
    """Signed in as agent1 for agent2's mailbox: Dovecot refuses, even after a fresh token."""
    settings = office365_settings("agent2@example.com")
    auth = office365(settings, "agent2@example.com")
    sign_in(auth, idp, AGENT)

    with pytest.raises(AuthError, match="refused the Office 365 token"):
        login_and_select(auth, oauth2_dovecot)
    assert len(idp.token_requests("refresh_token")) == 1  # the one retry


def test_the_oauth2_server_checks_every_token_over_xoauth2_and_oauthbearer(
    auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """The token emailsync obtained opens the mailbox over XOAUTH2 and OAUTHBEARER (RFC 7628),
    and a token the provider never issued is refused over both: a server that took any token
    would make every Office 365 test here pass without proving anything."""
    token = auth.access_token()
    forged = secrets.token_urlsafe(len(token) * 3 // 4)

    login_and_select(auth, oauth2_dovecot)  # the product's own XOAUTH2 login
    with imap(oauth2_dovecot) as client:
        client.oauthbearer_login(AGENT, token)
        client.select_folder("INBOX")
    with imap(oauth2_dovecot) as client, pytest.raises(imapclient.exceptions.LoginError):
        client.oauth2_login(AGENT, forged)
    with imap(oauth2_dovecot) as client, pytest.raises(imapclient.exceptions.LoginError):
        client.oauthbearer_login(AGENT, forged)


# -- app-only (client credentials) -----------------------------------------------------------


def test_app_only_login_works_for_allowed_mailboxes_and_writes_no_cache(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    tmp_path: Path,
) -> None:
    """Client credentials buy a token Dovecot accepts for mailboxes on the app's allow-list."""
    settings = office365_settings("shared@example.com", "other@example.com", app_only=True)
    auth = office365(settings, "shared@example.com")

    login_and_select(auth, oauth2_dovecot)

    assert [r.status for r in idp.token_requests("client_credentials")] == [200]
    assert auth.cache_path is None
    assert not (tmp_path / "state" / "tokens").exists()
    status = auth.status()
    assert status["mode"] == "app_only"
    assert status["credential"] == "secret"
    assert status["signed_in"] is True
    assert status["access_token_expires"] is not None
    with pytest.raises(AuthError, match=r"IMAP\.AccessAsApp"):
        login_and_select(office365(settings, "other@example.com"), oauth2_dovecot)


def test_app_only_with_a_wrong_client_secret_needs_reauth(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    oauth_clients: OAuthClients,
) -> None:
    """invalid_client (AADSTS7000215) is an AuthError, not a transient failure.

    The message names the request that failed: app-only sign-in has no refresh token.
    """
    settings = office365_settings("shared@example.com", app_only=True)
    oauth_clients.app_secret_file.write_text("not-the-secret\n")

    with pytest.raises(AuthError, match=r"invalid_client.*AADSTS7000215") as refused:
        login_and_select(office365(settings, "shared@example.com"), oauth2_dovecot)
    assert "app-only token request (client secret) failed: invalid_client" in str(refused.value)
    assert "refresh" not in str(refused.value)


def test_app_only_login_with_a_certificate_works_and_shows_no_key_material(  # noqa: PLR0917 -- each argument is a fixture
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    oauth_clients: OAuthClients,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A certificate-signed RFC 7523 client assertion buys the token; the key stays hidden."""
    caplog.set_level(logging.DEBUG)
    oauth_clients.app_secret_file.unlink()  # the secret cannot be what gets the token
    settings = office365_settings(
        "shared@example.com",
        "other@example.com",
        certificate_file=oauth_clients.app_certificate_file,
    )
    auth = office365(settings, "shared@example.com")

    login_and_select(auth, oauth2_dovecot)
    requests_for_shared = idp.token_requests("client_credentials")
    with pytest.raises(AuthError, match=r"IMAP\.AccessAsApp") as refused:
        login_and_select(office365(settings, "other@example.com"), oauth2_dovecot)

    assert [r.status for r in requests_for_shared] == [200]
    assert auth.cache_path is None
    status = auth.status()
    assert status["mode"] == "app_only"
    assert status["credential"] == "certificate"
    assert status["signed_in"] is True
    assert status["access_token_expires"] is not None
    captured = capsys.readouterr()
    everything = "\n".join(
        (
            caplog.text,
            captured.out,
            captured.err,
            json.dumps(status),
            repr(auth),
            repr(settings),
            str(refused.value),
            repr(refused.value),
        )
    )
    assert "access_token_obtained" in everything  # the logs were captured at all
    assert "PRIVATE KEY" not in everything
    key_lines = [line for line in oauth_clients.app_private_key.splitlines() if len(line) == 64]
    assert key_lines
    assert [line for line in key_lines if line in everything] == []
    # The provider's secrets include the signed client assertions it received.
    assert [s[:6] + "…" for s in idp.issued_secrets() if s in everything] == []


def test_app_only_with_a_certificate_the_provider_does_not_know_needs_reauth(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    tmp_path: Path,
) -> None:
    """An assertion signed by an unregistered certificate is invalid_client: needs_reauth."""
    unknown = write_certificate_file(new_app_certificate(), tmp_path / "unknown.pem")
    auth = office365(
        office365_settings("shared@example.com", certificate_file=unknown), "shared@example.com"
    )

    with pytest.raises(AuthError, match=r"invalid_client.*AADSTS700027") as refused:
        login_and_select(auth, oauth2_dovecot)

    assert not isinstance(refused.value, ConnectionLostError)
    assert "Certificates & secrets" in str(refused.value)
    assert auth.status()["last_error"] == str(refused.value)
    assert [r.status for r in idp.token_requests("client_credentials")] == [401]


def test_app_only_with_an_unreadable_certificate_file_needs_reauth(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    tmp_path: Path,
) -> None:
    """A missing certificate file is a problem for a person, not a reason to retry quickly."""
    missing = tmp_path / "absent.pem"
    auth = office365(
        office365_settings("shared@example.com", certificate_file=missing), "shared@example.com"
    )

    with pytest.raises(AuthError, match=rf"cannot read file {missing}"):
        login_and_select(auth, oauth2_dovecot)

    assert idp.token_requests("client_credentials") == []


# -- the identity provider is down -----------------------------------------------------------


@pytest.mark.parametrize("answer", [None, 503], ids=["refused", "http-503"])
def test_identity_provider_down_is_transient_not_auth_error(
    answer: int | None, idp: IdentityProvider, auth: Office365Authenticator, oauth2_dovecot: Dovecot
) -> None:
    """Token refresh fails with IdentityProviderUnavailableError, and logins fail transiently."""
    idp.down(answer)
    with pytest.raises(IdentityProviderUnavailableError) as refresh_error:
        auth.refresh_if_needed(2 * 3600)
    error_after_refresh = auth.status()["last_error"] or ""
    # MSAL's token is still cached, but Dovecot cannot introspect it: NO [UNAVAILABLE].
    with pytest.raises(ConnectionLostError) as login_error:
        login_and_select(auth, oauth2_dovecot)
    error_after_login = auth.status()["last_error"] or ""
    idp.up()

    assert refresh_error.value.kind == ("refused" if answer is None else "protocol")
    assert "identity provider unavailable" in error_after_refresh
    assert not isinstance(login_error.value, AuthError)
    assert "UNAVAILABLE" in str(login_error.value)
    assert "UNAVAILABLE" in error_after_login
    login_and_select(auth, oauth2_dovecot)
    assert auth.status()["last_error"] is None
    assert auth.refresh_if_needed(2 * 3600) is not None


def test_identity_provider_down_at_first_use_is_transient(
    idp: IdentityProvider, office365_settings: Callable[..., Settings], oauth2_dovecot: Dovecot
) -> None:
    """Without OpenID discovery MSAL cannot even start: still a back-off, not needs_reauth."""
    auth = office365(office365_settings("shared@example.com", app_only=True), "shared@example.com")
    idp.down()

    with pytest.raises(IdentityProviderUnavailableError):
        login_and_select(auth, oauth2_dovecot)
    idp.up()

    login_and_select(auth, oauth2_dovecot)


# -- secrets stay secret ---------------------------------------------------------------------


def test_no_token_or_secret_appears_in_logs_exceptions_or_status(
    idp: IdentityProvider,
    office365_settings: Callable[..., Settings],
    oauth2_dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every token, device code and client secret the provider handed out stays out of sight."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def expect_failure(action: Callable[[], object]) -> None:
        with pytest.raises((AuthError, ConnectionLostError)) as info:
            action()
        texts.extend((str(info.value), repr(info.value), str(info.value.__cause__)))

    idp.access_token_lifetime_seconds = MSAL_EXPIRY_MARGIN_SECONDS + 1
    delegated = office365(office365_settings())
    texts.append("\n".join(sign_in(delegated, idp)))
    time.sleep(1.5)
    login_and_select(delegated, oauth2_dovecot)  # a refresh with rotation
    idp.down()
    expect_failure(lambda: delegated.refresh_if_needed(3600))
    idp.up()
    idp.revoke_refresh_tokens(AGENT)
    idp.expire_access_tokens()
    expect_failure(lambda: login_and_select(delegated, oauth2_dovecot))
    texts.append(json.dumps(delegated.status()))
    texts.append(repr(delegated))

    app_settings = office365_settings("shared@example.com", "other@example.com", app_only=True)
    app = office365(app_settings, "shared@example.com")
    login_and_select(app, oauth2_dovecot)
    expect_failure(
        lambda: login_and_select(office365(app_settings, "other@example.com"), oauth2_dovecot)
    )
    texts.append(json.dumps(app.status()))
    texts.append(repr(app))

    captured = capsys.readouterr()
    texts.extend((caplog.text, captured.out, captured.err))
    everything = "\n".join(texts)
    secrets = idp.issued_secrets()
    assert any(s.startswith("app-secret-") for s in secrets)  # the client secret is checked too
    assert len(secrets) >= 8  # tokens of several kinds were issued
    leaked = sorted(s[:6] + "…" for s in secrets if s in everything)
    assert leaked == []
    assert "access_token_obtained" in everything  # the logs were captured at all


# -- passwords -------------------------------------------------------------------------------


def password_authenticator(tmp_path: Path, user: MailUser) -> PasswordAuthenticator:
    """The authenticator make_authenticator builds for a password mailbox."""
    settings = settings_for(tmp_path, [user])
    auth = make_authenticator(settings.mailbox(user.address), settings)
    assert isinstance(auth, PasswordAuthenticator)
    return auth


def test_password_login_works(tmp_path: Path, oauth2_dovecot: Dovecot) -> None:
    """The password from the secret file logs in; nothing expires or needs forgetting."""
    user = new_user(oauth2_dovecot)
    auth = password_authenticator(tmp_path, user)

    login_and_select(auth, oauth2_dovecot)

    assert auth.token_expiry() is None
    # Stop Email Sync on a password mailbox forgets nothing: the secret file is the
    # operator's, so it stays, and the next login still works.
    auth.forget()
    assert (tmp_path / "secrets" / user.address).read_text().strip() == user.password
    login_and_select(auth, oauth2_dovecot)


def test_wrong_password_raises_auth_error_without_the_password_in_it(
    tmp_path: Path, oauth2_dovecot: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused LOGIN is AuthError (needs_reauth); the message never carries the password."""
    caplog.set_level(logging.DEBUG)
    user = new_user(oauth2_dovecot)
    wrong = "Wrong-" + user.password
    auth = password_authenticator(tmp_path, user)
    (tmp_path / "secrets" / user.address).write_text(wrong + "\n")

    with pytest.raises(AuthError, match="AUTHENTICATIONFAILED") as info:
        login_and_select(auth, oauth2_dovecot)

    assert wrong not in str(info.value)
    assert wrong not in repr(info.value.__cause__)
    assert wrong not in caplog.text


def test_a_missing_password_file_needs_reauth(tmp_path: Path, oauth2_dovecot: Dovecot) -> None:
    """A secret that cannot be read is AuthError naming the file, not a crash or a retry."""
    user = new_user(oauth2_dovecot)
    auth = password_authenticator(tmp_path, user)
    (tmp_path / "secrets" / user.address).unlink()

    with pytest.raises(AuthError, match="cannot read file"):
        login_and_select(auth, oauth2_dovecot)


def test_an_unavailable_answer_to_login_is_transient(tmp_path: Path) -> None:
    """NO [UNAVAILABLE] (RFC 5530: the server's auth backend failed) means back off."""
    # A checkpassword program that cannot run is an internal failure of Dovecot's auth.
    broken_passdb = "passdb {\n  driver = checkpassword\n  args = /nonexistent/checkpassword\n}"
    with (
        shared_temp_dir("emailsync-broken-dovecot-") as directory,
        Dovecot(directory, DovecotOptions(passdb=broken_passdb)) as server,
    ):
        user = MailUser("agent@example.com", "secret-password-1", server)
        auth = password_authenticator(tmp_path, user)

        with pytest.raises(ConnectionLostError, match="UNAVAILABLE") as info:
            login_and_select(auth, server)

    assert not isinstance(info.value, AuthError)
    assert info.value.kind == "protocol"
