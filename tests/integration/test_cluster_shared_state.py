"""What one process used to keep in memory, shared by the instances of a cluster (issue 20 #3).

Real daemons on one real PostgreSQL: a page login made on one instance is honoured by another
and after a restart, and a logout on one ends it everywhere; an Office 365 sign-in started on
one instance completes when the provider sends the browser back to another, once, and the
mailbox's worker (on whichever instance holds its lease) logs in with the token cache the
state database keeps. Uses the local identity provider on port 443: run under
``flock /tmp/emailsync-443.lock``.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import psycopg
import pytest
import requests

from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import share_registry_key

from .daemonproc import RunningDaemon, run_cli, wait_until
from .idp import IdentityProvider
from .mailenv import MailUser, new_user
from .oauth_fixtures import OAuthClients, office365_table
from .test_cluster import LEASE_SECONDS, Cluster
from .test_office365_daemon import count, deliver

pytestmark = pytest.mark.dovecot

SIGN_IN_SECONDS = 60  # a registered mailbox's worker starts on its lease's owner by then


class Answer:
    """An HTTP answer: status, headers, body."""

    def __init__(self, status: int, headers: dict[str, str], body: str) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def cookie(self) -> str:
        """The session cookie it set, as a Cookie header value."""
        return self.headers.get("set-cookie", "").split(";")[0]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def http(
    daemon: RunningDaemon,
    method: str,
    path: str,
    *,
    cookie: str = "",
    form: dict[str, str] | None = None,
    json_body: object = None,
    token: str | None = None,
    host: str | None = None,
) -> Answer:
    """One request to an instance; redirects are answers, not followed."""
    headers: dict[str, str] = {}
    data: bytes | None = None
    if cookie:
        headers["Cookie"] = cookie
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if host:
        headers["Host"] = host  # the public name a load balancer answers to
    if form is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        data = "&".join(f"{k}={quote(v)}" for k, v in form.items()).encode()
    elif json_body is not None:
        data = json.dumps(json_body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}{path}", method=method, headers=headers, data=data
    )
    try:
        with _opener.open(request, timeout=15) as response:
            return Answer(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read().decode(),
            )
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode())


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


class SharedCluster(Cluster):
    """A cluster whose instances share one control token (one admin, one public address);
    ``office365`` (an [office365] table) and ``tables`` go into every config."""

    def __init__(
        self,
        tmp_path: Path,
        users: list[MailUser],
        pg_url: str,
        office365: str = "",
        *,
        tables: str = "",
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        super().__init__(
            tmp_path,
            users,
            pg_url,
            tables=office365 + tables,
            lease_seconds=lease_seconds,
            token=secrets.token_urlsafe(16),
        )


@pytest.fixture
def user(oauth2_dovecot: Dovecot) -> MailUser:
    """A password login on the OAuth2 Dovecot: its branch b0 serves the Office 365 mailboxes."""
    return new_user(oauth2_dovecot)


@pytest.fixture
def office365_toml(idp: IdentityProvider, oauth_clients: OAuthClients, oauth_ca_file: Path) -> str:
    """The [office365] table of the provider's delegated client, for every instance."""
    return office365_table(idp, oauth_clients, oauth_ca_file)


@pytest.fixture
def two(tmp_path: Path, user: MailUser, pg_url: str) -> Iterator[Cluster]:
    """Instances a and b on one PostgreSQL state, one control token."""
    cluster = SharedCluster(tmp_path, [user], pg_url)
    with cluster:
        cluster.start_all(["a", "b"])
        yield cluster


def test_a_page_login_on_one_instance_works_on_another_survives_a_restart_and_logs_out_everywhere(
    two: Cluster,
) -> None:
    """A session made on a is accepted by b and by a after a restart; b's logout ends it on a.
    The login form a served (its anonymous CSRF token) is accepted by b."""
    a, b = two.daemons["a"], two.daemons["b"]
    login = http(a, "GET", f"/login?token={a.token}")
    assert login.status == 200
    cookie = login.cookie()
    assert cookie.startswith("emailsync_session=")
    assert http(b, "GET", "/it", cookie=cookie).status == 200
    a.stop()
    a = two.start("a")
    it_page = http(a, "GET", "/it", cookie=cookie)
    assert it_page.status == 200
    logout = http(b, "POST", "/logout", cookie=cookie, form={"csrf": csrf_of(it_page.body)})
    assert logout.status == 303
    gone = http(a, "GET", "/it", cookie=cookie)
    assert gone.status == 303
    assert gone.headers["location"] == "/login"
    form = http(a, "GET", "/login")
    posted = http(
        b,
        "POST",
        "/login",
        cookie=form.cookie(),
        form={"token": a.token, "csrf": csrf_of(form.body)},
    )
    assert posted.status == 303, posted.body
    assert http(a, "GET", "/it", cookie=posted.cookie()).status == 200


# -- Office 365 --------------------------------------------------------------------------------


def provider_redirect(authorize_url: str, username: str, password: str, ca_file: Path) -> str:
    """Sign in at the provider as the browser would; where it sends the browser back."""
    parts = urlsplit(authorize_url)
    form = dict(parse_qsl(parts.query))
    with requests.Session() as session:
        session.trust_env = False
        response = session.post(
            authorize_url.split("?", 1)[0],
            data={**form, "username": username, "password": password},
            verify=str(ca_file),
            allow_redirects=False,
            timeout=10,
        )
    assert response.status_code == 302, response.text
    return str(response.headers["Location"])


def token_cache_rows(pg_url: str, address: str) -> list[bytes]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT cache FROM token_caches WHERE address = %s", (address,))
        return [bytes(r[0]) for r in rows.fetchall()]


def test_an_office_365_sign_in_started_on_one_instance_completes_on_another_once(  # noqa: PLR0917 -- fixtures
    tmp_path: Path,
    user: MailUser,
    pg_url: str,
    idp: IdentityProvider,
    oauth2_dovecot: Dovecot,
    oauth_ca_file: Path,
    office365_toml: str,
) -> None:
    """Start on a, the provider's redirect served by b: the mailbox is set up, its worker (on
    whichever instance owns it) logs in with the cache in the state database; the same
    callback again, on either instance, is refused; so is a sign-in that expired; Stop Email
    Sync deletes the cache."""
    address = f"o365-{secrets.token_hex(4)}@example.com"
    password = secrets.token_urlsafe(12)
    idp.add_user(address, password)
    cluster = SharedCluster(tmp_path, [user], pg_url, office365=office365_toml)
    with cluster:
        a, b, _ = cluster.start_all(["a", "b", "c"])
        # One public address for every instance, as behind a load balancer: the redirect URI.
        public = f"127.0.0.1:{b.port}"
        started = http(
            a,
            "POST",
            f"/v1/mailboxes/{address}/office365/start",
            token=a.token,
            json_body={"branch": "b0"},
            host=public,
        )
        assert started.status == 200, started.body
        callback = provider_redirect(
            json.loads(started.body)["authorize_url"], address, password, oauth_ca_file
        )
        assert callback.startswith(f"http://{public}/oauth/office365/callback?")
        path = callback.removeprefix(f"http://{public}")
        finished = http(b, "GET", path)
        assert finished.status == 200, finished.body
        assert address in finished.body
        for instance in (a, b):
            replayed = http(instance, "GET", path)
            assert replayed.status == 400
            assert "already used" in replayed.body
        (blob,) = token_cache_rows(pg_url, address)
        for secret in idp.issued_secrets():
            assert secret.encode() not in blob
        for name in ("a", "b", "c"):
            assert not (tmp_path / name / "state" / "tokens").exists()

        def idle_somewhere() -> bool:
            """IDLE on whichever instance runs it (b lists the others' as remote)."""
            return any(
                (mailbox := daemon.mailboxes().get(address)) is not None
                and mailbox["state"] == "idle"
                for daemon in cluster.daemons.values()
            )

        wait_until(idle_somewhere, timeout=SIGN_IN_SECONDS)
        deliver(oauth2_dovecot, address, "over the shared token cache")
        owner = b.mailboxes()[address].get("owner")
        assert owner in ("a", "b", "c")
        wait_until(lambda: count(oauth2_dovecot, address, "Failed") == 1, timeout=30)

        # A sign-in whose ten minutes are over is refused, on any instance.
        late = f"late-{secrets.token_hex(4)}@example.com"
        idp.add_user(late, password)
        started = http(
            a, "POST", f"/v1/mailboxes/{late}/office365/start", token=a.token, host=public
        )
        assert started.status == 200, started.body
        with psycopg.connect(pg_url) as conn:
            conn.execute("UPDATE signin_flows SET expires_at = 0")
        callback = provider_redirect(
            json.loads(started.body)["authorize_url"], late, password, oauth_ca_file
        )
        expired = http(b, "GET", callback.removeprefix(f"http://{public}"))
        assert expired.status == 400
        assert token_cache_rows(pg_url, late) == []
        assert late not in b.mailboxes()

        # Stop Email Sync (on another instance than the sign-in's) deletes the cache.
        stopped = http(a, "DELETE", f"/v1/mailboxes/{address}", token=a.token)
        assert stopped.status in (200, 204), stopped.body
        assert token_cache_rows(pg_url, address) == []


def test_auth_login_with_a_postgresql_state_writes_the_cache_every_instance_reads(
    tmp_path: Path,
    pg_url: str,
    idp: IdentityProvider,
    oauth2_dovecot: Dovecot,
    office365_toml: str,
) -> None:
    """`emailsync auth login` on any host of a cluster signs in into the state database (no
    file in its state_dir), and `auth status` on another host's config sees the sign-in."""
    address = f"o365-{secrets.token_hex(4)}@example.com"
    idp.add_user(address, "unused")
    configs = []
    for host in ("one", "two"):
        (tmp_path / host).mkdir()
        config = tmp_path / host / "emailsync.toml"
        config.write_text(
            f'[daemon]\nstate_dir = "{tmp_path / host / "state"}"\nstate = "{pg_url}"\n'
            f"timeout_seconds = 10\n\n{office365_toml}\n"
            f'[branches.o]\nhost = "127.0.0.1"\nport = {oauth2_dovecot.port}\n'
            'security = "none"\nallow_insecure = true\n\n'
            f'[[mailboxes]]\naddress = "{address}"\nbranch = "o"\nauth = "office365"\n'
        )
        configs.append(config)
    # Both hosts hold the cluster's registry key (the vault seals the cache with it).
    for host in ("one", "two"):
        share_registry_key(tmp_path / "registry-key", tmp_path / host / "state")
    login = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emailsync.cli",
            "--config",
            str(configs[0]),
            "auth",
            "login",
            address,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert login.stdout is not None
        shown = ""
        while "enter the code" not in shown:
            line = login.stdout.readline()
            assert line, f"auth login ended without a code: {shown}"
            shown += line
        code = re.search(r"enter the code (\S+)", shown)
        assert code is not None
        idp.approve(code.group(1), address)
        rest, _ = login.communicate(timeout=60)
    finally:
        if login.poll() is None:
            login.kill()
            login.wait()
    assert login.returncode == 0, shown + rest
    assert len(token_cache_rows(pg_url, address)) == 1
    assert not (tmp_path / "one" / "state" / "tokens").exists()
    status = run_cli(configs[1], "auth", "status", "--json")
    assert status.returncode == 0, status.stderr
    (line,) = status.stdout.splitlines()
    assert json.loads(line)["signed_in"] is True
    assert json.loads(line)["token_cache"] == "in the state database (postgresql)"
