"""The self-service pages in a real browser (Debian's chromium, driven by Playwright) against a
real daemon and Dovecot: IT adds a branch and makes an agent's link; the agent sets up (wrong
password, then the right one), clicks Start Sync, then Stop Email Sync; another agent's login
cannot see the mailbox. Screenshots go to ``test-artifacts/screenshots/`` (gitignored)."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from emailsync.dev.dovecot import Dovecot

from .conftest import MailUser, new_user
from .daemonproc import DaemonFactory, RunningDaemon, wait_until
from .test_filing import ROOT, build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot

CHROMIUM = Path("/usr/bin/chromium")
# Debian's chromium, headless; no first-run, sync or update traffic (the tests run offline).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root, where chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000  # a missing element fails in 10 s, not Playwright's 30
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"

playwright_api = pytest.importorskip("playwright.sync_api")


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, under Playwright; the test fails when it is not installed."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: run .ci/system-deps (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as launched:
        yield launched


def office365_popup(page: Any, branch: str) -> Any:
    """On an agent's page, choose ``branch`` for Office 365 and click Start Authentication:
    the provider's sign-in pop-up, once it shows its form."""
    page.select_option("#office365 select[name=branch]", branch)
    with page.expect_popup() as opened:
        page.click("#start-authentication")
    popup = opened.value
    popup.wait_for_selector("#idp-sign-in")
    return popup


def shot(page: object, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def registered(daemon: RunningDaemon, address: str) -> bytes | None:
    """The stored (encrypted) secret of a registered mailbox, read from the raw database."""
    with sqlite3.connect(daemon.workdir / "state" / "emailsync.db") as conn:
        row = conn.execute(
            "SELECT secret FROM registered_mailboxes WHERE address = ?", (address,)
        ).fetchone()
    return None if row is None else bytes(row[0])


def test_it_adds_a_branch_and_an_agent_sets_up_syncs_and_stops_in_the_browser(
    browser: object, user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user], groups={"Smith": ["john@clients.example"]})
    base = f"http://127.0.0.1:{daemon.port}"
    agent, other = new_user(dovecot), new_user(dovecot)

    # IT support: log in with the admin token, add the branch, make the agent's link.
    it = browser.new_context()  # type: ignore[attr-defined]
    it.set_default_timeout(TIMEOUT_MS)
    it_page = page = it.new_page()
    response = page.goto(f"{base}/login?token={daemon.token}")
    page.wait_for_url(f"{base}/it")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    cookie = next(c for c in it.cookies() if c["name"] == "emailsync_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    page.fill("#add-branch input[name=name]", "high-street")
    page.fill("#add-branch input[name=host]", dovecot.host)
    page.fill("#add-branch input[name=port]", str(dovecot.port))
    page.select_option("#add-branch select[name=security]", "none")
    page.click("#add-branch button")
    assert "Branch high-street saved." in page.inner_text(".notice")
    assert "high-street" in page.inner_text("#branches")
    page.fill("#issue-token input[name=address]", agent.address)
    page.click("#issue-token button")
    link = page.inner_text("#token-link")
    assert link.startswith(f"{base}/login?token=es2.")

    # The agent opens their link: First Time Setup, then a wrong password.
    agent_context = browser.new_context()  # type: ignore[attr-defined]
    agent_context.set_default_timeout(TIMEOUT_MS)
    page = agent_context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(link)
    my_page = f"{base}/email-sync/{quote(agent.address, safe='@')}"
    page.wait_for_url(my_page)
    assert "First Time Setup" in page.inner_text("main")
    assert "Office 365" in page.inner_text("#first-time-setup")
    page.select_option("#basic select[name=branch]", "high-street")
    page.fill("#basic input[name=password]", "not-my-password")
    page.click("#authenticate")
    error = page.inner_text("p.error")
    assert "refused" in error
    assert "not-my-password" not in page.content()
    assert registered(daemon, agent.address) is None  # nothing stored
    assert "First Time Setup" in page.inner_text("main")

    # The right password: the folders exist over IMAP, Start Sync files the Queue.
    page.select_option("#basic select[name=branch]", "high-street")
    page.fill("#basic input[name=password]", agent.password)
    page.click("#authenticate")
    assert "Authenticated" in page.inner_text(".notice")
    assert registered(daemon, agent.address) is not None
    with agent.client() as client:
        assert client.folder_exists(f"{ROOT}.Queue")
        assert client.folder_exists(f"{ROOT}.Received")
    wait_until(lambda: daemon.mailboxes()[agent.address]["state"] == "idle")
    queue(agent, build_message("john@clients.example", agent.address, "Viewing on Friday"))
    page.click("#start-sync")
    assert "Sync started." in page.inner_text(".notice")
    wait_until(lambda: "Viewing on Friday" in folder_subjects(agent, "Received"))

    def shows_filed() -> bool:
        page.reload()
        return "Viewing on Friday" in page.inner_text("main")

    wait_until(shows_filed, timeout=10, interval=0.3)
    assert "received" in page.inner_text("#recent")
    shot(page, "agent-email-sync")
    it_page.reload()
    row = it_page.inner_text(f"#mailboxes tr:has-text('{agent.address}')")
    assert "high-street" in row
    assert "registry" in row
    shot(it_page, "it-overview")

    # Another agent's login cannot see this mailbox, on the pages or through the API.
    intruder = browser.new_context()  # type: ignore[attr-defined]
    intruder.set_default_timeout(TIMEOUT_MS)
    spy = intruder.new_page()
    token = daemon_token_for(daemon, other.address)
    spy.goto(f"{base}/login?token={token}")
    spy.wait_for_url(f"{base}/email-sync/{quote(other.address, safe='@')}")  # positive signal
    answer = spy.goto(my_page)
    assert answer.status == 404
    assert agent.address not in spy.content()
    assert "Viewing on Friday" not in spy.content()
    api = intruder.request.get(
        f"{base}/v1/mailboxes/{quote(agent.address)}",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert api.status == 404
    # A form post without the session's CSRF token is refused, even with the cookie.
    forged = agent_context.request.post(f"{my_page}/stop", form={"csrf": "forged"})
    assert forged.status == 403
    assert registered(daemon, agent.address) is not None

    # Stop Email Sync: worker gone, secret gone, First Time Setup offered again.
    page.click("#stop-sync")
    assert "Email Sync stopped" in page.inner_text(".notice")
    assert "First Time Setup" in page.inner_text("main")
    assert registered(daemon, agent.address) is None
    assert agent.address not in daemon.mailboxes()
    assert "Viewing on Friday" in folder_subjects(agent, "Received")  # the folders stay
    shot(page, "agent-first-time-setup")
    # The pages keep to their own Content-Security-Policy (no inline script or style).
    assert not [e for e in console_errors if "Content Security Policy" in e], console_errors
    # IT revokes the agent's link with its button: the agent's session ends at once.
    it_page.goto(f"{base}/it")
    it_page.click(f"#tokens tr:has-text('{agent.address}') button")
    assert "Link revoked" in it_page.inner_text(".notice")
    assert agent.address not in it_page.inner_text("#tokens")
    page.goto(my_page)
    page.wait_for_url(f"{base}/login")
    # IT can stop a mailbox of the config file from its page too (it stays, stopped).
    it_page.goto(f"{base}/email-sync/{quote(user.address, safe='@')}")
    it_page.click("#stop-sync")
    assert "stopped" in it_page.inner_text(".notice")
    assert daemon.mailboxes()[user.address]["state"] == "stopped"
    for context in (it, agent_context, intruder):
        context.close()


def daemon_token_for(daemon: RunningDaemon, address: str) -> str:
    """An agent token minted through the admin API."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}/v1/tokens",
        method="POST",
        headers={"Authorization": f"Bearer {daemon.token}"},
        data=json.dumps({"address": address}).encode(),
    )
    with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 -- loopback
        return str(json.loads(response.read())["token"])
