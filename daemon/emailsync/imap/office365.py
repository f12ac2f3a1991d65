"""How an Office 365 mailbox logs in to IMAP: an OAuth2 token (XOAUTH2) from Entra ID via MSAL.

Office 365 has two modes. Delegated: an agent signs in once, in the browser (the self-service
pages) or with MSAL's device-code flow (``emailsync auth login ADDRESS``); MSAL's token cache,
with the refresh token, is kept per mailbox in a ``TokenCacheStore`` and rewritten whenever
MSAL changes it, so a rotated refresh token is never lost: ``state_dir/tokens/<address>.json``
(SQLite state, one host) or a row of the shared state database (PostgreSQL: any instance may
finish the sign-in, another runs the mailbox). Each read-modify-write of the cache (read it,
let MSAL refresh, write it back) holds the store's lock (an ``flock``, or ``SELECT … FOR
UPDATE``), so no writer redeems a refresh token another has already rotated away, nor writes
an older cache over a newer one (``emailsync.imap.tokencache``).

App-only: the app's client secret, or a certificate whose private key signs an RFC 7523 JWT
client assertion, buys tokens for any mailbox the tenant lets it open; nothing is written to
disk.

Every (re)connect asks MSAL for a token: MSAL answers from its cache while the token has more
than five minutes left and refreshes it otherwise. Errors are sorted by what the worker does:
``AuthError`` (needs_reauth: a person must sign in again or fix the app) versus
``ConnectionLostError`` / ``IdentityProviderUnavailableError`` (back off and retry).
Token values, client secrets and private keys never reach a log line, an exception message,
a repr or ``status()``.

The ``Authenticator`` protocol and ``make_authenticator`` are in imap/auth.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import imapclient
import msal
import requests
import structlog
from imapclient.exceptions import LoginError

from emailsync.config import MailboxSettings, Office365Settings
from emailsync.errors import (
    AuthError,
    ConfigError,
    IdentityProviderUnavailableError,
    KeyUnavailableError,
    MailboxError,
    StoreError,
)
from emailsync.imap.loginerror import login_failure, short
from emailsync.imap.tokencache import CacheSlot, FileTokenCaches, TokenCacheStore
from emailsync.imap.translate import translated

log = structlog.get_logger(__name__)

# Delegated access to IMAP (Exchange Online's permission name). MSAL adds openid, profile and
# offline_access itself and refuses them as input ("reserved scopes").
DELEGATED_SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All",)
# App-only (client credentials) tokens ask for the resource's .default scope, which carries
# whatever application permissions (IMAP.AccessAsApp) the tenant admin granted.
APP_ONLY_SCOPES = ("https://outlook.office365.com/.default",)
# MSAL serves a cached access token only while more than this is left; below, it refreshes.
MSAL_EXPIRY_MARGIN_SECONDS = 300
# Entra ID refresh tokens lapse after 90 days unused; redeem one at least this often.
REFRESH_TOKEN_KEEPALIVE_SECONDS = 7 * 24 * 3600
# Longest a device-code sign-in waits for the person (Entra ID's codes live 15 minutes).
DEVICE_CODE_TIMEOUT_SECONDS = 15 * 60
# RFC 6749 §5.2 / Entra ID token-endpoint errors that say nothing about the credentials.
TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


class _DropTokenEvents(logging.Filter):
    """Drops MSAL's debug dump of every token response.

    MSAL masks access and refresh tokens in it but not the request data, so the device code
    would reach the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.DEBUG and str(record.msg).startswith("event="))


logging.getLogger("msal.token_cache").addFilter(_DropTokenEvents())


class Office365Status(TypedDict):
    """What ``emailsync auth status`` shows for one mailbox; never a token value."""

    address: str
    mode: str  # "delegated" or "app_only"
    credential: str | None  # "secret" or "certificate" (app-only); None (delegated)
    account: str | None  # the signed-in user (delegated) or None
    signed_in: bool
    access_token_expires: str | None  # ISO 8601, UTC
    refresh_token_age_seconds: float | None
    client_secret_expires: str | None  # ISO 8601, from the config (app-only)
    token_cache: str | None  # the cache file (delegated)
    last_error: str | None


class Office365Authenticator:
    """XOAUTH2 with Microsoft Entra ID tokens from MSAL: delegated or app-only."""

    def __init__(
        self,
        mailbox: MailboxSettings,
        office365: Office365Settings,
        *,
        state_dir: Path,
        http_session: requests.Session,
        token_caches: TokenCacheStore | None = None,
    ) -> None:
        self._mailbox = mailbox
        self._office365 = office365
        self._session = http_session
        self._app_only = office365.app_only
        self._scopes = list(APP_ONLY_SCOPES if self._app_only else DELEGATED_SCOPES)
        self._cache = msal.SerializableTokenCache()
        # Where the delegated cache lives (None: app-only, nothing is kept); files by default.
        self._caches: TokenCacheStore | None = (
            None if self._app_only else token_caches or FileTokenCaches(state_dir)
        )
        self.cache_path: Path | None = (
            None if self._caches is None else self._caches.path(mailbox.address)
        )
        self._cache_stamp: object | None = None
        self._slot: CacheSlot | None = None  # while the cache's lock is held
        self._app: Any = None  # built on first use: creating it fetches OpenID discovery
        self._lock = threading.RLock()
        self._last_error: str | None = None
        self._log = log.bind(mailbox=mailbox.address)

    def __repr__(self) -> str:
        mode = "app_only" if self._app_only else "delegated"
        return f"Office365Authenticator({self._mailbox.address!r}, mode={mode!r})"

    @property
    def mode(self) -> str:
        """``"app_only"`` (client credentials) or ``"delegated"`` (device-code sign-in)."""
        return "app_only" if self._app_only else "delegated"

    # -- the Authenticator protocol ------------------------------------------------------------

    def login(self, client: imapclient.IMAPClient) -> None:
        """AUTHENTICATE XOAUTH2 with a fresh token; see ``Authenticator.login``.

        A refusal is retried once with a token MSAL refreshes regardless of its cache: the
        cached one may have been revoked at the server since it was issued.
        """
        address = self._mailbox.address
        with translated(f"{address}: login"):
            if not client.has_capability("AUTH=XOAUTH2"):
                raise AuthError(f"{address}: the server does not offer AUTH=XOAUTH2")
        token = self.access_token()
        refusal = self._xoauth2(client, token)
        if refusal is not None:
            self._log.info("xoauth2_refused_retrying", reason=refusal)
            token = self._acquire(force_refresh=True)
            refusal = self._xoauth2(client, token)
        if refusal is None:
            self._last_error = None
            return
        message = f"{address}: the server refused the Office 365 token: {refusal}; " + (
            self._fix_hint()
        )
        self._last_error = message
        self._log.warning("login_refused", reason=message)
        raise AuthError(message)

    def token_expiry(self) -> datetime | None:
        """When the newest cached access token expires (may be in the past), or None."""
        with self._lock:
            self._reload_cache()
            expiries = [int(at["expires_on"]) for at in self._cached(_AT)]
        return datetime.fromtimestamp(max(expiries), tz=UTC) if expiries else None

    def forget(self) -> None:
        """Delete the stored token cache and every cached token and account in memory."""
        with self._lock:
            self._cache.deserialize(None)
            self._cache_stamp = None
            self._app = None  # also drops MSAL's memory of recent HTTP answers
            if self._caches is not None:
                self._caches.forget(self._mailbox.address)
        self._log.info("tokens_forgotten")

    # -- Office 365 specifics ------------------------------------------------------------------

    def access_token(self) -> str:
        """A usable access token: MSAL's cached one while it is valid, else a refreshed one."""
        return self._acquire(force_refresh=False)

    def refresh_if_needed(self, min_valid_seconds: float) -> datetime | None:
        """Refresh now if the access token has less than ``min_valid_seconds`` left.

        Also redeems the refresh token when it has not been used for
        ``REFRESH_TOKEN_KEEPALIVE_SECONDS``, so it never lapses unused. Returns the new expiry.
        """
        expiry = self.token_expiry()
        age = self._refresh_token_age()
        left = None if expiry is None else expiry.timestamp() - time.time()
        stale = age is not None and age > REFRESH_TOKEN_KEEPALIVE_SECONDS
        if left is None or left < min_valid_seconds or stale:
            self._acquire(force_refresh=True)
            self._log.info("token_refreshed_ahead", seconds_left=left, refresh_token_stale=stale)
        return self.token_expiry()

    def device_code_login(
        self, out: Callable[[str], None], *, timeout_seconds: float = DEVICE_CODE_TIMEOUT_SECONDS
    ) -> None:
        """Delegated sign-in: show MSAL's message (URL and code) via ``out`` and wait for it.

        Raises AuthError when the person declines or the code expires, ConfigError for an
        app-only configuration, IdentityProviderUnavailableError when Entra ID is unreachable.
        """
        address = self._mailbox.address
        if self._app_only:
            raise ConfigError(
                [
                    f"mailbox {address}: [office365] has a client {self._office365.credential} "
                    "(app-only sign-in); device-code sign-in is for delegated mode"
                ]
            )
        with self._lock:
            self._reload_cache()
            app = self._application()
        with self._provider_errors():
            flow = app.initiate_device_flow(scopes=self._scopes)
        if "user_code" not in flow:
            raise self._refused(flow, "device-code sign-in")
        flow["expires_at"] = min(float(flow["expires_at"]), time.time() + timeout_seconds)
        out(str(flow["message"]))
        # Polls at the interval Entra ID asks for (RFC 8628 §3.5) until approval or expiry.
        with self._provider_errors():
            result = app.acquire_token_by_device_flow(flow)
        # The person may take minutes: the file lock is held only to write the result.
        with self._lock, self._cache_held():
            try:
                if "error" in result:
                    raise self._refused(result, "device-code sign-in")
                account = self._keep_only_account(app, result)
            finally:
                self._persist_cache()
            self._last_error = None
        self._log.info("device_code_signed_in", account=account)

    def start_auth_code_flow(self, redirect_uri: str) -> dict[str, Any]:
        """Begin a browser sign-in: MSAL's authorization-code flow with PKCE (RFC 7636).

        Returns MSAL's flow (``auth_uri``, ``state``, the PKCE verifier, the nonce): keep it
        server-side until the callback. ConfigError for an app-only configuration.
        """
        if self._app_only:
            raise ConfigError(
                [f"mailbox {self._mailbox.address}: [office365] is app-only; no browser sign-in"]
            )
        with self._lock:
            self._reload_cache()
            app = self._application()
        with self._provider_errors(), warnings.catch_warnings():
            # MSAL suggests response_mode=form_post (RFC 9700 §4.3.1); the code in the query
            # is useless without the PKCE verifier, which never leaves the daemon.
            warnings.simplefilter("ignore", UserWarning)
            flow: dict[str, Any] = app.initiate_auth_code_flow(
                self._scopes, redirect_uri=redirect_uri, login_hint=self._mailbox.address
            )
        if "auth_uri" not in flow:
            raise self._refused(flow, "browser sign-in")
        return flow

    def finish_auth_code_flow(
        self, flow: dict[str, Any], params: Mapping[str, str], allowed: frozenset[str]
    ) -> str:
        """Redeem the callback's code; keep the tokens only when the account is in ``allowed``.

        Raises AuthError when the provider refused or someone else signed in (nothing is
        kept then). Returns the signed-in account's user name.
        """
        address = self._mailbox.address
        with self._lock, self._cache_held():
            self._reload_cache()
            app = self._application()
            try:
                with self._provider_errors():
                    result = app.acquire_token_by_auth_code_flow(flow, dict(params))
            except ValueError as exc:
                # MSAL's own check: the state does not match the flow it started.
                raise AuthError(f"{address}: browser sign-in: {short(str(exc))}") from None
            if "error" in result:
                self._forget_unsaved()
                raise self._refused(result, "browser sign-in")
            claims = result.get("id_token_claims") or {}
            username = str(claims.get("preferred_username", "")).lower()
            if username not in allowed:
                self._forget_unsaved()
                raise AuthError(
                    f"{address}: signed in as {username or 'an unnamed account'}, which is "
                    "not this mailbox; sign in with the mailbox's own account"
                )
            self._keep_only_account(app, result)
            self._persist_cache()
            self._last_error = None
        self._log.info("browser_signed_in", account=username)
        return username

    def _forget_unsaved(self) -> None:
        """Drop what MSAL cached in memory from a sign-in that is not kept (the file stays)."""
        self._cache.deserialize(None)
        self._cache_stamp = None
        self._app = None

    def status(self) -> Office365Status:
        """Mode, account, token expiry, refresh-token age and last error (no token values)."""
        with self._lock:
            with contextlib.suppress(AuthError):  # an unreadable cache shows as last_error
                self._reload_cache()
            account = None if self._app_only else self._cached_username()
            expiry = self.token_expiry()
            age = self._refresh_token_age()
            secret_expires = self._office365.client_secret_expires
            return Office365Status(
                address=self._mailbox.address,
                mode=self.mode,
                credential=self._office365.credential,
                account=account,
                signed_in=self._app_only or account is not None,
                access_token_expires=expiry.isoformat() if expiry else None,
                refresh_token_age_seconds=age,
                client_secret_expires=secret_expires.isoformat() if secret_expires else None,
                token_cache=(
                    self._caches.where(self._mailbox.address) if self._caches is not None else None
                ),
                last_error=self._last_error,
            )

    # -- MSAL ----------------------------------------------------------------------------------

    def _application(self) -> Any:
        if self._app is not None:
            return self._app
        settings = self._office365
        options: dict[str, Any] = {
            "authority": f"{settings.authority}/{settings.tenant_id}",
            "token_cache": self._cache,
            "http_client": self._session,
            # The authority is configured, not guessed: skip the alias lookup at
            # login.microsoftonline.com, which also lets tests use a local provider.
            "instance_discovery": False,
            "validate_authority": False,
        }
        with self._provider_errors():
            try:
                if self._app_only:
                    self._app = msal.ConfidentialClientApplication(
                        settings.client_id, client_credential=self._client_credential(), **options
                    )
                else:
                    self._app = msal.PublicClientApplication(settings.client_id, **options)
            except ValueError as exc:
                # MSAL's message for a 4xx discovery answer: wrong tenant or authority.
                raise self._record(
                    AuthError(
                        f"{self._mailbox.address}: identity provider rejected the authority "
                        f"{settings.authority}/{settings.tenant_id}: {short(str(exc))}"
                    )
                ) from exc
        return self._app

    def _client_credential(self) -> str | dict[str, str]:
        """The client secret, or the certificate MSAL signs client assertions with.

        Read now, at every application build, so a replaced secret or certificate file counts
        after ``forget()``. For a certificate MSAL sends an RFC 7523 JWT assertion (RS256,
        header ``x5t`` = the SHA-1 thumbprint) instead of a secret; ``public_certificate``
        also puts the chain in ``x5c`` for subject-name/issuer authentication.
        """
        settings = self._office365
        try:
            if settings.client_certificate is not None:
                certificate = settings.read_client_certificate()
                credential = {
                    "private_key": certificate.private_key.reveal(),
                    "thumbprint": certificate.thumbprint,
                }
                if certificate.certificate_chain is not None:
                    credential["public_certificate"] = certificate.certificate_chain
                return credential
            if settings.client_secret is not None:
                return settings.client_secret.read().reveal()
        except ConfigError as exc:
            # The message names the file only; a bad credential needs a person, not retries.
            raise self._record(AuthError(f"{self._mailbox.address}: {exc}")) from exc
        raise AuthError(
            f"{self._mailbox.address}: app-only sign-in needs a client secret or certificate"
        )

    def _acquire(self, *, force_refresh: bool) -> str:
        with self._lock, self._cache_held():
            self._reload_cache()
            app = self._application()
            try:
                with self._provider_errors():
                    if self._app_only:
                        if force_refresh:
                            # acquire_token_for_client has no force_refresh: empty the cache.
                            app.remove_tokens_for_client()
                        result = app.acquire_token_for_client(self._scopes)
                    else:
                        account = self._account(app)
                        result = (
                            None
                            if account is None
                            else app.acquire_token_silent_with_error(
                                self._scopes, account, force_refresh=force_refresh
                            )
                        )
            finally:
                # Whatever MSAL changed (a rotated refresh token above all) goes to disk now.
                self._persist_cache()
            if not result:
                raise self._record(
                    AuthError(
                        f"{self._mailbox.address}: no Office 365 sign-in; "
                        f"run `emailsync auth login {self._mailbox.address}`"
                    )
                )
            if "error" in result:
                # App-only has no refresh token: it asks for a token with the app's credential.
                action = (
                    f"app-only token request (client {self._office365.credential})"
                    if self._app_only
                    else "token refresh"
                )
                raise self._refused(result, action)
            if result.get("token_source") == "identity_provider":
                self._last_error = None  # the provider accepted us again
                self._log.info("access_token_obtained", expires_in_seconds=result.get("expires_in"))
            return str(result["access_token"])

    def _account(self, app: Any) -> dict[str, Any] | None:
        accounts: list[dict[str, Any]] = app.get_accounts()
        wanted = self._mailbox.username.lower()
        for account in accounts:
            if str(account.get("username", "")).lower() == wanted:
                return account
        return accounts[0] if accounts else None

    def _keep_only_account(self, app: Any, result: Mapping[str, Any]) -> str | None:
        """Remove accounts other than the one that just signed in; returns its user name."""
        claims = result.get("id_token_claims") or {}
        username = claims.get("preferred_username")
        oid = claims.get("oid") or claims.get("sub")
        for account in app.get_accounts():
            if account.get("local_account_id") != oid:
                app.remove_account(account)
        return str(username) if username else None

    def _refused(self, result: Mapping[str, Any], action: str) -> MailboxError:
        """The exception for an OAuth2 error answer (RFC 6749 §5.2) from the token endpoint."""
        error = str(result.get("error", "unknown_error"))
        description = str(result.get("error_description", "")).splitlines()
        detail = short(description[0]) if description else ""
        text = f"{self._mailbox.address}: {action} failed: {error}" + (
            f" ({detail})" if detail else ""
        )
        if error in TRANSIENT_OAUTH_ERRORS:
            return IdentityProviderUnavailableError(text, kind="protocol")
        return self._record(AuthError(f"{text}; {self._fix_hint()}"))

    def _fix_hint(self) -> str:
        if self._office365.credential == "certificate":
            return (
                "check the app's certificate (uploaded under Certificates & secrets) "
                "and its IMAP.AccessAsApp permission"
            )
        if self._app_only:
            return "check the app's client secret and its IMAP.AccessAsApp permission"
        return f"run `emailsync auth login {self._mailbox.address}`"

    def _record(self, error: AuthError) -> AuthError:
        self._last_error = str(error)
        self._log.warning("office365_auth_failed", reason=str(error))
        return error

    @contextlib.contextmanager
    def _provider_errors(self) -> Iterator[None]:
        """Turn network failures reaching the identity provider into a transient error."""
        authority = self._office365.authority
        try:
            yield
        except requests.Timeout as exc:
            raise self._unavailable(f"{authority} timed out", "timeout") from exc
        except requests.exceptions.SSLError as exc:
            raise self._unavailable(f"TLS with {authority} failed: {exc}", "tls") from exc
        except requests.RequestException as exc:
            raise self._unavailable(f"cannot reach {authority}: {exc}", "refused") from exc
        except msal.exceptions.MsalServiceError as exc:
            # MSAL raises this for HTTP 5xx answers (outage, maintenance).
            raise self._unavailable(f"{authority} answered {exc}", "protocol") from exc

    def _unavailable(self, what: str, kind: str) -> IdentityProviderUnavailableError:
        message = f"{self._mailbox.address}: identity provider unavailable: {short(what)}"
        self._last_error = message
        self._log.warning("identity_provider_unavailable", reason=message, kind=kind)
        return IdentityProviderUnavailableError(message, kind=kind)

    # -- XOAUTH2 -------------------------------------------------------------------------------

    def _xoauth2(self, client: imapclient.IMAPClient, token: str) -> str | None:
        """AUTHENTICATE XOAUTH2; None on success, the server's refusal text on NO."""
        address = self._mailbox.address
        mechanism = _XOAuth2(self._mailbox.username, token)
        with translated(f"{address}: login"):
            try:
                client.sasl_login("XOAUTH2", mechanism)
            except LoginError as exc:
                error = login_failure(exc, address, "XOAUTH2 login", (token,))
                if not isinstance(error, AuthError):
                    self._last_error = str(error)
                    # Not chained: the library's exception repeats the server's text unredacted.
                    raise error from None
                status = mechanism.server_status
                return str(error) + (f" (status {status})" if status else "")
        self._log.debug("logged_in", method="XOAUTH2")
        return None

    # -- the token cache ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _cache_held(self) -> Iterator[None]:
        """Hold the cache's lock (``TokenCacheStore.locked``), with the stored cache loaded.

        ``_persist_cache`` inside writes through the held lock. Nothing is held for app-only.
        """
        if self._caches is None:
            yield
            return
        with self._caches.locked(self._mailbox.address) as slot:
            self._slot = slot
            try:
                self._reload_cache()
                yield
            finally:
                self._slot = None

    def _reload_cache(self) -> None:
        """Read the stored cache if another writer (``auth login``, an instance) changed it."""
        if self._caches is None:
            return
        try:
            stored = (
                self._slot.read()
                if self._slot is not None
                else self._caches.read(self._mailbox.address)
            )
        except (OSError, ValueError, ConfigError) as exc:
            raise self._unreadable(exc) from exc
        if stored is None:
            if self._cache_stamp is not None:  # deleted under us: Stop Email Sync
                self._cache.deserialize(None)
                self._cache_stamp = None
            return
        if stored.stamp == self._cache_stamp:
            return
        try:
            self._cache.deserialize(stored.text)
        except ValueError as exc:
            raise self._unreadable(exc) from exc
        self._cache_stamp = stored.stamp

    def _unreadable(self, exc: Exception) -> AuthError:
        where = self._caches.where(self._mailbox.address) if self._caches else "none"
        return self._record(
            AuthError(
                f"{self._mailbox.address}: token cache {where} is unreadable "
                f"({type(exc).__name__}); run `emailsync auth login {self._mailbox.address}`"
            )
        )

    def _persist_cache(self) -> None:
        slot = self._slot
        if slot is None or not self._cache.has_state_changed:
            return
        where = self._caches.where(self._mailbox.address) if self._caches else "none"
        try:
            self._cache_stamp = slot.write(self._cache.serialize())
        except OSError as exc:
            # The tokens still work from memory; a lost rotation costs a sign-in at worst.
            self._last_error = f"{self._mailbox.address}: cannot write {where}: {exc.strerror}"
            self._log.error("token_cache_write_failed", path=where, error=exc.strerror)
            return
        except (StoreError, KeyUnavailableError) as exc:
            self._last_error = f"{self._mailbox.address}: cannot write {where}: {exc}"
            self._log.error("token_cache_write_failed", path=where, error=str(exc))

    def _cached(self, credential_type: str) -> list[dict[str, Any]]:
        query: dict[str, str | None] = {"client_id": self._office365.client_id}
        if self._app_only:
            query["home_account_id"] = None  # app-only tokens belong to no account
        # now=0: list expired access tokens too instead of letting MSAL delete them here.
        return list(self._cache.search(credential_type, query=query, now=0))

    def _cached_username(self) -> str | None:
        accounts = list(self._cache.search(_ACCOUNT, now=0))
        wanted = self._mailbox.username.lower()
        names = [str(a.get("username", "")) for a in accounts]
        for name in names:
            if name.lower() == wanted:
                return name
        return names[0] if names else None

    def _refresh_token_age(self) -> float | None:
        if self._app_only:
            return None
        times = [int(rt.get("last_modification_time", 0)) for rt in self._cached(_RT)]
        times = [t for t in times if t > 0]
        return max(0.0, time.time() - max(times)) if times else None


_AT = msal.TokenCache.CredentialType.ACCESS_TOKEN
_RT = msal.TokenCache.CredentialType.REFRESH_TOKEN
_ACCOUNT = msal.TokenCache.CredentialType.ACCOUNT


class _XOAuth2:
    """The client side of SASL XOAUTH2, as a callable for ``IMAPClient.sasl_login``.

    The first (empty) challenge gets the initial response. A second challenge is the
    server's error status as JSON; like OAUTHBEARER (RFC 7628 §3.2.3) the client answers it
    with an empty response and the server then completes with NO.
    """

    def __init__(self, user: str, token: str) -> None:
        self._user = user
        self._token = token
        self._sent = False
        self.server_status: str | None = None

    def __repr__(self) -> str:
        return f"_XOAuth2({self._user!r})"

    def __call__(self, challenge: bytes) -> bytes:
        if not self._sent:
            self._sent = True
            return f"user={self._user}\x01auth=Bearer {self._token}\x01\x01".encode()
        with contextlib.suppress(ValueError, AttributeError):
            self.server_status = str(json.loads(challenge).get("status"))
        return b""
