"""A small local OAuth2/OpenID Connect identity provider on loopback HTTPS, for Office 365 tests.

It speaks just enough of Microsoft Entra ID's v2.0 endpoints for MSAL and Dovecot: OpenID
discovery, device authorisation (RFC 8628), an authorization endpoint with a sign-in form (the
authorization-code grant with PKCE, RFC 7636 S256 only; users from ``add_user()``), a token
endpoint (authorization_code, device_code, refresh_token with
rotation on every use, client_credentials with a client secret or an RFC 7523 JWT client
assertion signed with a registered certificate) and RFC 7662 introspection for Dovecot's oauth2
passdb. Access and refresh tokens are opaque random strings; the id_token is an unsigned JWT
(MSAL decodes its claims without checking a signature). Tests drive it through plain methods:
``approve()`` a device code, ``revoke_refresh_tokens()``, ``expire_access_tokens()``,
``down()``/``up()``, and read ``requests`` and ``issued_secrets()``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import html
import json
import os
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from emailsync.dev.net import LocalServer

# A loopback address of this process's own (all of 127.0.0.0/8 reaches this machine), so two
# test runs, or two pytest-xdist workers, each have their own port 443.
HOST = f"127.{os.getpid() >> 16 & 0xFF}.{os.getpid() >> 8 & 0xFF}.{max(2, os.getpid() & 0xFF)}"
# Like Entra ID, the provider listens on the HTTPS default port: MSAL rebuilds some URLs
# from the host name alone (authority aliases, user-realm discovery). The flows tested here
# also work on another port with MSAL 1.39 and instance_discovery=False (``port=``).
HTTPS_PORT = 443
SOCKET_TIMEOUT_SECONDS = 10.0
START_TIMEOUT_SECONDS = 10.0
DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS = 3600
DEVICE_CODE_LIFETIME_SECONDS = 120
# RFC 8628 §3.2: how long a client waits between polls; MSAL sleeps in whole seconds.
DEVICE_POLL_INTERVAL_SECONDS = 1
AUTHORIZATION_CODE_LIFETIME_SECONDS = 600
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 7523 §2.2: a JWT that authenticates the client in place of a client secret.
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Entra ID answers these codes; MSAL and emailsync only look at the OAuth2 error names.
AADSTS_PENDING = 70016
AADSTS_REVOKED = 50173
AADSTS_REFRESH_TOKEN_USED = 70000
AADSTS_BAD_CLIENT_SECRET = 7000215
AADSTS_UNKNOWN_CLIENT = 700016
AADSTS_NO_CLIENT_CREDENTIAL = 7000218
AADSTS_BAD_CLIENT_ASSERTION = 700027
AADSTS_CLIENT_ASSERTION_EXPIRED = 700024


@dataclass
class _Client:
    client_id: str
    secret: str | None
    # The registered certificates by x5t (unpadded base64url of the SHA-1 thumbprint).
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)

    @property
    def confidential(self) -> bool:
        """False for a public client (device-code sign-in): no secret, no certificate."""
        return self.secret is not None or bool(self.certificates)


@dataclass
class _AccessToken:
    subject: str  # the user name, or the client id for app-only tokens
    client_id: str
    scope: str
    expires_at: float
    app: bool


@dataclass
class _RefreshToken:
    username: str
    client_id: str
    scope: str
    issued_at: float
    revoked_by: int | None = None  # the AADSTS code to answer once it no longer works


@dataclass
class _DeviceCode:
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    approved_for: str | None = None
    redeemed: bool = False


@dataclass
class _AuthorizationCode:
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    nonce: str | None
    username: str
    expires_at: float
    redeemed: bool = False


@dataclass(frozen=True)
class IdpRequest:
    """One request the provider answered: what was asked and the status sent back."""

    method: str
    path: str
    grant_type: str | None
    status: int


@dataclass
class _State:
    clients: dict[str, _Client] = field(default_factory=dict)
    access_tokens: dict[str, _AccessToken] = field(default_factory=dict)
    refresh_tokens: dict[str, _RefreshToken] = field(default_factory=dict)
    device_codes: dict[str, _DeviceCode] = field(default_factory=dict)
    authorization_codes: dict[str, _AuthorizationCode] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)  # user name → password
    issued: set[str] = field(default_factory=set)
    requests: list[IdpRequest] = field(default_factory=list)


class IdentityProvider(LocalServer):
    """An OAuth2/OpenID provider for one tenant on https://HOST (port 443)."""

    def __init__(
        self,
        ca: trustme.CA,
        *,
        tenant_id: str = "5f1c0e1a-7c1d-4c55-9d4b-2f4e8a6d1c01",
        domain: str = "example.com",
        port: int = HTTPS_PORT,
    ) -> None:
        self.tenant_id, self.domain, self.port = tenant_id, domain, port
        self.access_token_lifetime_seconds = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS
        self._cert = ca.issue_cert(HOST, "localhost")
        self._lock = threading.Lock()
        self._state = _State()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._down_status: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen and serve in a thread; the socket accepts connections once this returns."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(context)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                server = _Server((HOST, self.port), _Handler, context, self)
                break
            except OSError as exc:
                # Another test session's provider may hold port 443 for a moment.
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"identity provider cannot listen on {HOST}:{self.port}: {exc}"
                    ) from exc
                time.sleep(0.2)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread

    def close(self) -> None:
        """Leaving ``with``: stop serving."""
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the listening socket; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=SOCKET_TIMEOUT_SECONDS)

    def down(self, status: int | None = None) -> None:
        """Become unreachable: refuse connections, or answer every request with ``status``."""
        self._down_status = status
        if status is None:
            self.stop()

    def up(self) -> None:
        """Serve normally again after ``down()``."""
        self._down_status = None
        if self._server is None:
            self.start()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def authority(self) -> str:
        """The authority host URL, without the tenant (``Office365Settings.authority``)."""
        port = "" if self.port == HTTPS_PORT else f":{self.port}"
        return f"https://{HOST}{port}"

    @property
    def issuer(self) -> str:
        """The tenant's issuer URL, as OpenID discovery announces it."""
        return f"{self.authority}/{self.tenant_id}/v2.0"

    @property
    def token_endpoint(self) -> str:
        """Where tokens are redeemed."""
        return f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def introspection_url(self) -> str:
        """The RFC 7662 endpoint Dovecot's oauth2 passdb posts tokens to."""
        return f"{self.authority}/{self.tenant_id}/oauth2/v2.0/introspect"

    # -- controls for tests ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget clients, tokens, device codes and the request log; serve normally."""
        with self._lock:
            self._state = _State()
        self.access_token_lifetime_seconds = DEFAULT_ACCESS_TOKEN_LIFETIME_SECONDS
        self.up()

    def add_client(
        self, client_id: str, secret: str | None = None, certificate_pem: bytes | None = None
    ) -> None:
        """Register an application: public (device code) without credentials, else confidential.

        ``certificate_pem`` is the app's public certificate (the first in the PEM text), as
        uploaded under *Certificates & secrets*; its key signs the client assertions.
        """
        client = _Client(client_id, secret)
        if certificate_pem is not None:
            certificate = x509.load_pem_x509_certificate(certificate_pem)
            client.certificates[_x5t(certificate)] = certificate
        with self._lock:
            self._state.clients[client_id] = client
            if secret is not None:
                self._state.issued.add(secret)

    def add_user(self, username: str, password: str) -> None:
        """A user who can sign in on the authorization endpoint's form."""
        with self._lock:
            self._state.users[username.lower()] = password
            self._state.issued.add(password)

    def approve(self, user_code: str, username: str) -> None:
        """Sign ``username`` in on the device waiting with ``user_code`` (the browser step)."""
        with self._lock:
            for device in self._state.device_codes.values():
                if device.user_code == user_code and device.expires_at > time.time():
                    device.approved_for = username
                    return
        raise KeyError(f"no pending device code {user_code!r}")

    def revoke_refresh_tokens(self, username: str) -> int:
        """Revoke every refresh token of a user (as an admin's "revoke sessions" does)."""
        count = 0
        with self._lock:
            for token in self._state.refresh_tokens.values():
                if token.username == username and token.revoked_by is None:
                    token.revoked_by = AADSTS_REVOKED
                    count += 1
        return count

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired, as far as introspection is concerned."""
        now = time.time()
        with self._lock:
            for token in self._state.access_tokens.values():
                token.expires_at = min(token.expires_at, now - 1)

    def refresh_token_works(self, refresh_token: str) -> bool:
        """True if a refresh grant with this token would succeed now (no side effects)."""
        with self._lock:
            token = self._state.refresh_tokens.get(refresh_token)
            return token is not None and token.revoked_by is None

    def access_token_active(self, access_token: str) -> bool:
        """True if introspection would call this access token active."""
        with self._lock:
            token = self._state.access_tokens.get(access_token)
            return token is not None and token.expires_at > time.time()

    def issued_secrets(self) -> set[str]:
        """Every secret value handed out or registered: tokens, device codes, client secrets."""
        with self._lock:
            return set(self._state.issued)

    @property
    def requests(self) -> list[IdpRequest]:
        """The requests answered so far, oldest first."""
        with self._lock:
            return list(self._state.requests)

    def token_requests(self, grant_type: str | None = None) -> list[IdpRequest]:
        """Requests to the token endpoint, optionally only those of one grant type."""
        return [
            r
            for r in self.requests
            if r.path.endswith("/oauth2/v2.0/token")
            and (grant_type is None or r.grant_type == grant_type)
        ]

    # -- the protocol ------------------------------------------------------------------------

    def _handle(
        self, method: str, path: str, form: Mapping[str, str], basic: tuple[str, str] | None
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        if self._down_status is not None:
            # Retry-After: 0 keeps MSAL from replaying this answer from its throttle cache
            # once the test brings the provider back.
            return self._down_status, {"error": "temporarily_unavailable"}, {"Retry-After": "0"}
        prefix = f"/{self.tenant_id}"
        if not path.startswith(prefix + "/"):
            return _error(HTTPStatus.BAD_REQUEST, "invalid_tenant", 90002, "Tenant not found.")
        route = path[len(prefix) :]
        if method == "GET" and route == "/v2.0/.well-known/openid-configuration":
            return HTTPStatus.OK, self._discovery(), {}
        if route == "/oauth2/v2.0/authorize":
            return self._authorize(method, form)
        if method == "POST" and route == "/oauth2/v2.0/devicecode":
            return self._device_authorization(form)
        if method == "POST" and route == "/oauth2/v2.0/token":
            return self._token(form, basic)
        if method == "POST" and route == "/oauth2/v2.0/introspect":
            return HTTPStatus.OK, self._introspect(form.get("token", "")), {}
        return HTTPStatus.NOT_FOUND, {"error": "not_found"}, {}

    def _discovery(self) -> dict[str, Any]:
        base = f"{self.authority}/{self.tenant_id}"
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": self.token_endpoint,
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "introspection_endpoint": self.introspection_url,
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code", "id_token", "code id_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["none"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def _device_authorization(
        self, form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        client_id = form.get("client_id", "")
        with self._lock:
            if client_id not in self._state.clients:
                return _error(
                    HTTPStatus.BAD_REQUEST,
                    "unauthorized_client",
                    AADSTS_UNKNOWN_CLIENT,
                    "Application not found.",
                )
            device_code = secrets.token_urlsafe(32)
            user_code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(9))
            self._state.device_codes[device_code] = _DeviceCode(
                user_code=user_code,
                client_id=client_id,
                scope=form.get("scope", ""),
                expires_at=time.time() + DEVICE_CODE_LIFETIME_SECONDS,
            )
            self._state.issued.add(device_code)
        verification_uri = f"{self.authority}/devicelogin"
        return (
            HTTPStatus.OK,
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "expires_in": DEVICE_CODE_LIFETIME_SECONDS,
                "interval": DEVICE_POLL_INTERVAL_SECONDS,
                "message": (
                    f"To sign in, use a web browser to open the page {verification_uri} "
                    f"and enter the code {user_code} to authenticate."
                ),
            },
            {},
        )

    def _token(
        self, form: Mapping[str, str], basic: tuple[str, str] | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        client_id = basic[0] if basic else form.get("client_id", "")
        secret = basic[1] if basic else form.get("client_secret")
        grant = form.get("grant_type", "")
        with self._lock:
            client = self._state.clients.get(client_id)
            if client is None:
                return _error(
                    HTTPStatus.BAD_REQUEST,
                    "unauthorized_client",
                    AADSTS_UNKNOWN_CLIENT,
                    "Application not found in the directory.",
                )
            if "client_assertion" in form or "client_assertion_type" in form:
                refusal = self._check_client_assertion(client, form)
                if refusal is not None:
                    return refusal
            elif client.confidential and (client.secret is None or secret != client.secret):
                if secret is None:
                    return _error(
                        HTTPStatus.UNAUTHORIZED,
                        "invalid_client",
                        AADSTS_NO_CLIENT_CREDENTIAL,
                        "The request body must contain 'client_assertion' or 'client_secret'.",
                    )
                return _error(
                    HTTPStatus.UNAUTHORIZED,
                    "invalid_client",
                    AADSTS_BAD_CLIENT_SECRET,
                    "Invalid client secret provided.",
                )
            if grant == "authorization_code":
                return self._redeem_authorization_code(client, form)
            if grant == DEVICE_GRANT:
                return self._redeem_device_code(client, form.get("device_code", ""))
            if grant == "refresh_token":
                return self._redeem_refresh_token(client, form)
            if grant == "client_credentials" and client.confidential:
                return self._client_credentials(client, form.get("scope", ""))
        return _error(
            HTTPStatus.BAD_REQUEST, "unsupported_grant_type", 70003, f"{grant!r} not supported."
        )

    def _check_client_assertion(
        self, client: _Client, form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """Check an RFC 7523 client assertion (§3); None when it authenticates ``client``.

        The JWT must carry a registered certificate's ``x5t``, an RS256 signature by its key,
        ``iss`` and ``sub`` equal to the client id, ``aud`` equal to the token endpoint (what
        MSAL sends) and an ``exp`` in the future.
        """
        assertion = form.get("client_assertion", "")
        # A bearer credential until it expires: the leak tests look for it like for tokens.
        self._state.issued.add(assertion)

        def refused(
            description: str, code: int = AADSTS_BAD_CLIENT_ASSERTION
        ) -> tuple[int, dict[str, Any], dict[str, str]]:
            return _error(HTTPStatus.UNAUTHORIZED, "invalid_client", code, description)

        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return refused(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}.")
        try:
            header_part, claims_part, signature_part = assertion.split(".")
            header = json.loads(_b64url_decode(header_part))
            claims = json.loads(_b64url_decode(claims_part))
            signature = _b64url_decode(signature_part)
        except (ValueError, binascii.Error):
            return refused("Client assertion is not a signed JWT.")
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return refused("Client assertion is not a signed JWT.")
        if header.get("alg") != "RS256":
            return refused("Client assertion must be signed with RS256.")
        # MSAL pads its base64url x5t with "="; RFC 7515 §2 says base64url without padding.
        certificate = client.certificates.get(str(header.get("x5t", "")).rstrip("="))
        if certificate is None:
            return refused(
                "The certificate with identifier used to sign the client assertion "
                "is not registered on application."
            )
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            return refused("The registered certificate has no RSA key.")
        try:
            public_key.verify(
                signature,
                f"{header_part}.{claims_part}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return refused("Client assertion failed signature validation.")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self.token_endpoint not in audiences:
            return refused(f"Client assertion audience must be {self.token_endpoint}.")
        if not claims.get("iss") == claims.get("sub") == client.client_id:
            return refused("Client assertion issuer and subject must be the client id.")
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= time.time():
            return refused(
                "Client assertion is not within its valid time range.",
                AADSTS_CLIENT_ASSERTION_EXPIRED,
            )
        return None

    def _authorize(
        self, method: str, form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        """GET: the sign-in form; POST: check the user, redirect with a code (RFC 6749 §4.1).

        Only ``code_challenge_method=S256`` is accepted (RFC 7636 §4.2: ``plain`` would let a
        stolen code be redeemed by whoever saw the request).
        """
        client_id, redirect_uri = form.get("client_id", ""), form.get("redirect_uri", "")
        with self._lock:
            known = client_id in self._state.clients
        if not known or not redirect_uri.startswith(("http://127.0.0.1:", "http://localhost:")):
            return HTTPStatus.BAD_REQUEST, "<p>Unknown application or redirect URI.</p>", {}
        if form.get("response_type") != "code" or form.get("code_challenge_method") != "S256":
            return HTTPStatus.BAD_REQUEST, "<p>PKCE with S256 and response_type=code only.</p>", {}
        error = ""
        if method == "POST":
            username = form.get("username", "").strip().lower()
            with self._lock:
                ok = username and self._state.users.get(username) == form.get("password")
                if ok:
                    code = secrets.token_urlsafe(32)
                    self._state.authorization_codes[code] = _AuthorizationCode(
                        client_id=client_id,
                        redirect_uri=redirect_uri,
                        scope=form.get("scope", ""),
                        code_challenge=form.get("code_challenge", ""),
                        nonce=form.get("nonce"),
                        username=username,
                        expires_at=time.time() + AUTHORIZATION_CODE_LIFETIME_SECONDS,
                    )
                    self._state.issued.add(code)
            if ok:
                query = urlencode({"code": code, "state": form.get("state", "")})
                return HTTPStatus.FOUND, "", {"Location": f"{redirect_uri}?{query}"}
            error = "<p id='error'>Wrong user name or password.</p>"
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in form.items()
            if k not in ("username", "password")
        )
        login_hint = html.escape(form.get("login_hint", ""))
        page = (
            "<!doctype html><html><head><title>Sign in to your account</title></head><body>"
            f"<h1>Sign in</h1>{error}<form method='post'>{hidden}"
            f"<label>Email <input name='username' value='{login_hint}'></label>"
            "<label>Password <input name='password' type='password'></label>"
            "<button id='idp-sign-in' type='submit'>Sign in</button></form></body></html>"
        )
        return HTTPStatus.OK, page, {}

    def _redeem_authorization_code(
        self, client: _Client, form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        grant = self._state.authorization_codes.get(form.get("code", ""))
        if (
            grant is None
            or grant.redeemed
            or grant.client_id != client.client_id
            or grant.redirect_uri != form.get("redirect_uri")
            or grant.expires_at <= time.time()
        ):
            return _error(HTTPStatus.BAD_REQUEST, "invalid_grant", 70008, "Bad or expired code.")
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if challenge.rstrip(b"=").decode() != grant.code_challenge:
            return _error(
                HTTPStatus.BAD_REQUEST, "invalid_grant", 501481, "The code_verifier is wrong."
            )
        grant.redeemed = True
        tokens = self._user_tokens(client, grant.username, grant.scope, nonce=grant.nonce)
        return HTTPStatus.OK, tokens, {}

    def _redeem_device_code(
        self, client: _Client, device_code: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        device = self._state.device_codes.get(device_code)
        if device is None or device.client_id != client.client_id or device.redeemed:
            return _error(HTTPStatus.BAD_REQUEST, "invalid_grant", 70000, "Bad device code.")
        if device.expires_at <= time.time():
            return _error(HTTPStatus.BAD_REQUEST, "expired_token", 70020, "Code expired.")
        if device.approved_for is None:
            return _error(
                HTTPStatus.BAD_REQUEST,
                "authorization_pending",
                AADSTS_PENDING,
                "OAuth 2.0 device flow error. Authorization is pending.",
            )
        device.redeemed = True
        return HTTPStatus.OK, self._user_tokens(client, device.approved_for, device.scope), {}

    def _redeem_refresh_token(
        self, client: _Client, form: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        token = self._state.refresh_tokens.get(form.get("refresh_token", ""))
        if token is None or token.client_id != client.client_id:
            return _error(HTTPStatus.BAD_REQUEST, "invalid_grant", 9002313, "Invalid request.")
        if token.revoked_by == AADSTS_REVOKED:
            return _error(
                HTTPStatus.BAD_REQUEST,
                "invalid_grant",
                AADSTS_REVOKED,
                "The provided grant has expired due to it being revoked, "
                "a fresh auth token is needed.",
            )
        if token.revoked_by is not None:
            return _error(
                HTTPStatus.BAD_REQUEST,
                "invalid_grant",
                token.revoked_by,
                "The refresh token has already been redeemed.",
            )
        # Rotation: a refresh token works once; the response carries its successor.
        token.revoked_by = AADSTS_REFRESH_TOKEN_USED
        scope = form.get("scope") or token.scope
        return HTTPStatus.OK, self._user_tokens(client, token.username, scope), {}

    def _client_credentials(
        self, client: _Client, scope: str
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if not scope.endswith("/.default"):
            return _error(
                HTTPStatus.BAD_REQUEST,
                "invalid_scope",
                1002012,
                "The scope provided is not valid for client credentials; use /.default.",
            )
        lifetime = self.access_token_lifetime_seconds
        access_token = self._new_access_token(client.client_id, client.client_id, scope, app=True)
        return (
            HTTPStatus.OK,
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": access_token,
            },
            {},
        )

    def _user_tokens(
        self, client: _Client, username: str, scope: str, *, nonce: str | None = None
    ) -> dict[str, Any]:
        lifetime = self.access_token_lifetime_seconds
        now = time.time()
        access_token = self._new_access_token(username, client.client_id, scope, app=False)
        refresh_token = secrets.token_urlsafe(48)
        self._state.refresh_tokens[refresh_token] = _RefreshToken(
            username=username, client_id=client.client_id, scope=scope, issued_at=now
        )
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.tenant_id}/{username}"))
        claims = {
            "iss": self.issuer,
            "aud": client.client_id,
            "sub": oid.replace("-", ""),
            "oid": oid,
            "tid": self.tenant_id,
            "preferred_username": username,
            "name": username.split("@", maxsplit=1)[0],
            "ver": "2.0",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + lifetime,
        }
        if nonce:
            claims["nonce"] = nonce  # OpenID Connect Core §3.1.3.7: MSAL checks it
        # An unsigned JWT (RFC 7519 §6): MSAL only decodes the claims.
        id_token = ".".join((_b64url({"alg": "none", "typ": "JWT"}), _b64url(claims), ""))
        self._state.issued.update((refresh_token, id_token))
        return {
            "token_type": "Bearer",
            "scope": scope,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access_token,
            "refresh_token": refresh_token,
            "id_token": id_token,
            # Entra's client_info: MSAL builds the account's home_account_id from it.
            "client_info": _b64url({"uid": oid, "utid": self.tenant_id}),
        }

    def _new_access_token(self, subject: str, client_id: str, scope: str, *, app: bool) -> str:
        token = secrets.token_urlsafe(48)
        self._state.access_tokens[token] = _AccessToken(
            subject=subject,
            client_id=client_id,
            scope=scope,
            expires_at=time.time() + self.access_token_lifetime_seconds,
            app=app,
        )
        self._state.issued.add(token)
        return token

    def _introspect(self, raw_token: str) -> dict[str, Any]:
        with self._lock:
            token = self._state.access_tokens.get(raw_token)
            if token is None or token.expires_at <= time.time():
                return {"active": False}  # RFC 7662 §2.2: nothing more about a dead token
            return {
                "active": True,
                # Delegated tokens name their user. An app-only token names no user: Exchange
                # checks the app's mailbox permissions instead, which Dovecot models with
                # app_principal (compared by domain) and an allow-list of mailboxes.
                "username": f"app:{token.client_id}" if token.app else token.subject,
                "app_principal": f"{token.client_id}@{self.domain}" if token.app else "none",
                "client_id": token.client_id,
                "scope": token.scope,
                "exp": int(token.expires_at),
                "token_type": "Bearer",
            }

    def _log(self, record: IdpRequest) -> None:
        with self._lock:
            self._state.requests.append(record)


def _b64url(claims: Mapping[str, Any]) -> str:
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _x5t(certificate: x509.Certificate) -> str:
    """RFC 7515 §4.1.7: base64url (unpadded) of the certificate's SHA-1 thumbprint."""
    digest = certificate.fingerprint(hashes.SHA1())  # noqa: S303 -- x5t is defined as SHA-1
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _error(
    status: int, error: str, code: int, description: str
) -> tuple[int, dict[str, Any], dict[str, str]]:
    return (
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description}",
            "error_codes": [code],
        },
        {},
    )


class _Server(ThreadingHTTPServer):
    """The HTTP server: TLS is set up per connection, in the connection's own thread."""

    daemon_threads = True
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        idp: IdentityProvider,
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.idp = idp

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Handshaking here (not in accept) keeps one slow client from stalling the others.
        request.settimeout(SOCKET_TIMEOUT_SECONDS)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is normal in the down()/up() tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: down() needs no draining
    timeout = SOCKET_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read the request log instead; stderr lines would only be noise.
        pass

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8") if length else url.query
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        status, payload, headers = self.server.idp._handle(
            method, path, form, _basic_credentials(self.headers.get("Authorization", ""))
        )
        self.server.idp._log(IdpRequest(method, path, form.get("grant_type"), status))
        # A page (the sign-in form, a redirect) is text; everything else is JSON.
        page = isinstance(payload, str)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type",
            "text/html; charset=utf-8" if page else "application/json; charset=utf-8",
        )
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))


def write_ca_file(ca: trustme.CA, directory: Path) -> Path:
    """Write the CA certificate where Dovecot's auth process and requests can read it."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / "idp-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    path.chmod(0o644)
    return path
