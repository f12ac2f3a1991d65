"""Office 365 First Time Setup in a real browser: Start Authentication opens the local identity
provider's sign-in page in a pop-up (authorization code with PKCE); the pop-up closes, the
page shows the mailbox set up, and its mail is filed over XOAUTH2. Stop Email Sync deletes the
token cache. Run under ``flock /tmp/emailsync-443.lock`` (the provider holds port 443)."""

from __future__ import annotations

import json
import secrets
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from emailsync.dev.dovecot import Dovecot

from .daemonproc import RunningDaemon, daemon_config_extra, new_port, run_cli, wait_until
from .idp import IdentityProvider
from .oauth_fixtures import OAuthClients, office365_table
from .test_office365_daemon import count, deliver
from .test_selfservice_pages import SCREENSHOTS, TIMEOUT_MS, chromium, office365_popup

pytestmark = pytest.mark.dovecot

playwright_api = pytest.importorskip("playwright.sync_api")


def write_config(
    tmp_path: Path, idp: IdentityProvider, clients: OAuthClients, ca: Path, port: int
) -> tuple[Path, str]:
    token = secrets.token_urlsafe(16)
    token_file = tmp_path / "control-token"
    token_file.write_text(token + "\n")
    config = tmp_path / "emailsync.toml"
    daemon = daemon_config_extra(
        port, token_file, state_dir=str(tmp_path / "state"), timeout_seconds=10
    )
    config.write_text(f"[daemon]\n{daemon}\n\n{office365_table(idp, clients, ca)}")
    return config, token


def test_start_authentication_signs_in_in_a_pop_up_and_mail_is_filed_over_xoauth2(
    tmp_path: Path,
    idp: IdentityProvider,
    oauth_clients: OAuthClients,
    oauth2_dovecot: Dovecot,
    oauth_ca_file: Path,
) -> None:
    address = f"o365-{secrets.token_hex(4)}@example.com"
    password = secrets.token_urlsafe(12)
    idp.add_user(address, password)
    port = new_port()
    config, token = write_config(tmp_path, idp, oauth_clients, oauth_ca_file, port)
    assert run_cli(config, "groups", "add", "Smith", "john@clients.example").returncode == 0
    daemon = RunningDaemon(config, port, token, tmp_path)
    try:
        daemon.wait_ready()
        base = f"http://127.0.0.1:{port}"
        branch = {"host": oauth2_dovecot.host, "port": oauth2_dovecot.port, "security": "none"}
        put = run_cli(config, "token", "issue", address)
        assert put.returncode == 0, put.stderr
        agent_token = put.stdout.split()[0]
        _put_branch(base, token, branch)
        with chromium() as browser:
            # The provider's certificate comes from the tests' own CA.
            context = browser.new_context(ignore_https_errors=True)
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            page.goto(f"{base}/login?token={agent_token}")
            page.wait_for_url(f"{base}/email-sync/{quote(address, safe='@')}")
            popup = office365_popup(page, "o365-branch")
            assert popup.input_value("input[name=username]") == address  # login_hint
            popup.fill("input[name=password]", "wrong")
            popup.click("#idp-sign-in")
            assert "Wrong user name or password" in popup.inner_text("body")
            popup.fill("input[name=password]", password)
            with popup.expect_event("close", timeout=15_000):  # it reloads its opener, closes
                popup.click("#idp-sign-in")
            page.wait_for_selector("#start-sync", timeout=10_000)
            assert "First Time Setup" not in page.inner_text("main")
            wait_until(lambda: daemon.mailboxes()[address]["state"] == "idle", timeout=20)
            deliver(oauth2_dovecot, address, "over the pop-up's tokens")
            page.click("#start-sync")
            wait_until(lambda: count(oauth2_dovecot, address, "Received") == 1)

            def shows_filed() -> bool:
                page.reload()
                return "over the pop-up's tokens" in page.inner_text("main")

            wait_until(shows_filed, timeout=10, interval=0.3)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "office365-signed-in.png"), full_page=True)
            cache = tmp_path / "state" / "tokens" / f"{address}.json"
            assert cache.exists()
            assert cache.stat().st_mode & 0o777 == 0o600
            assert [r for r in idp.token_requests("authorization_code") if r.status == 200]
            page.click("#stop-sync")
            assert "First Time Setup" in page.inner_text("main")
            assert not cache.exists()
        log = daemon.log()
        for secret in idp.issued_secrets():
            assert secret not in log
    finally:
        code = daemon.stop()
    assert code == 0, f"the daemon exited {code} at shutdown"


def _put_branch(base: str, token: str, body: dict[str, object]) -> None:
    req = urllib.request.Request(  # noqa: S310 -- http:// on loopback
        f"{base}/v1/branches/o365-branch",
        method="PUT",
        headers={"Authorization": f"Bearer {token}"},
        data=json.dumps(body).encode(),
    )
    with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 -- loopback
        assert response.status == 201
