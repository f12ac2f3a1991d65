"""The production shape end to end (issue 20): three instances on one PostgreSQL state, filing
to the reference CRM, agents in a real browser (Chromium) on whichever instance answers.

An agent sets up through instance a's pages; the mailbox runs on its lease's owner and its
mail reaches the CRM once; Start Sync through b files it; another agent's Office 365 pop-up
starts on a and the provider's redirect is served by b; Stop Email Sync through c's page ends
the owner's IMAP session within 5 s. (kill -9 and SIGSTOP with the CRM: test_cluster_crm.py.)
Uses the local identity provider on port 443: run under ``flock /tmp/emailsync-443.lock``.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot

from .balancer import Balancer
from .daemonproc import RunningDaemon, run_cli, wait_until
from .idp import IdentityProvider
from .mailenv import MailUser, new_user
from .oauth_fixtures import OAuthClients
from .test_cluster import imap_connections
from .test_cluster_shared_state import SharedCluster, http, office365_table
from .test_crm import CLIENT_A, crm_table
from .test_filing import build_message, folder_subjects, queue
from .test_office365_daemon import count, deliver
from .test_selfservice_pages import TIMEOUT_MS, chromium, office365_popup, shot

pytestmark = pytest.mark.dovecot

playwright_api = pytest.importorskip("playwright.sync_api")

STOP_SECONDS = 5.0  # Stop Email Sync ends the owner's session within this, from any instance
CLUSTER_LEASE_SECONDS = 30
# A mailbox set up at run time is claimed and IDLE on its owner within a few heartbeats.
RUN_SECONDS = CLUSTER_LEASE_SECONDS + 30.0


def owner_daemon(cluster: SharedCluster, address: str) -> RunningDaemon | None:
    """The instance that runs ``address`` now, if its worker is IDLE there."""
    for daemon in cluster.daemons.values():
        mine = daemon.mailboxes().get(address)
        if mine is not None and mine.get("state") == "idle":
            return daemon
    return None


def crm_subjects(crm: DevCrm) -> Counter[str]:
    return Counter(str(event["subject"]) for event in crm.events())


def test_agents_set_up_sync_sign_in_and_stop_through_any_of_three_crm_instances(  # noqa: PLR0917 -- fixtures
    tmp_path: Path,
    pg_url: str,
    reference_crm: DevCrm,
    idp: IdentityProvider,
    oauth_clients: OAuthClients,
    oauth2_dovecot: Dovecot,
    oauth_ca_file: Path,
) -> None:
    # The config file's one mailbox gives the instances branch b0 (the OAuth2 Dovecot, which
    # takes passwords too); the agents' mailboxes are registered at run time.
    filler = new_user(oauth2_dovecot, prefix="pf")
    agent = new_user(oauth2_dovecot, prefix="pa")
    o365 = f"o365-{secrets.token_hex(4)}@example.com"
    o365_password = secrets.token_urlsafe(12)
    idp.add_user(o365, o365_password)
    # Leases long enough that no heartbeat (a third of one) comes within STOP_SECONDS: only
    # the registry's notification can end the owner's session that fast.
    cluster = SharedCluster(
        tmp_path,
        [filler],
        pg_url,
        office365_table(idp, oauth_clients, oauth_ca_file),
        tables=crm_table(tmp_path, reference_crm),
        lease_seconds=CLUSTER_LEASE_SECONDS,
    )
    # The balancer sends the browser's pages to the instance a step names (the last of
    # ``pages``), and the provider's redirect to the pop-up's callback always to b.
    pages: list[int] = []

    def route(path: str) -> int:
        return cluster.ports["b"] if path.startswith("/oauth/office365/callback") else pages[-1]

    try:
        with Balancer(route) as lb:
            a, b, c = cluster.start_all(["a", "b", "c"], public_url=lb.url)
            walk(cluster, lb, pages, (a, b, c), agent, (o365, o365_password), idp, reference_crm)
        # Exactly once: one event for the one message, and nothing else delivered.
        assert crm_subjects(reference_crm) == Counter({"viewing on friday": 1})
    finally:
        cluster.stop_all()


def walk(  # noqa: PLR0917 -- the walk's cast
    cluster: SharedCluster,
    lb: Balancer,
    pages: list[int],
    instances: tuple[RunningDaemon, RunningDaemon, RunningDaemon],
    agent: MailUser,
    o365_user: tuple[str, str],
    idp: IdentityProvider,
    reference_crm: DevCrm,
) -> None:
    """Set-up on a, Start Sync on b, the pop-up from a with its callback on b, Stop on c."""
    a, b, c = instances
    o365, o365_password = o365_user
    oauth2_dovecot = agent.server
    link = run_cli(a.config, "token", "issue", agent.address)
    assert link.returncode == 0, link.stderr
    agent_token = link.stdout.split()[0]
    base = lb.url
    with chromium() as browser:
        context = browser.new_context(ignore_https_errors=True)  # the provider's test CA
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        # First Time Setup through a's pages, filing on Start Sync only.
        pages.append(a.port)
        page.goto(f"{base}/login?token={agent_token}")
        page.wait_for_url(f"{base}/email-sync/{quote(agent.address, safe='@')}")
        page.select_option("#basic select[name=branch]", "b0")
        page.fill("#basic input[name=password]", agent.password)
        page.check("#basic input[name=trigger][value=manual]")
        page.click("#authenticate")
        assert "Authenticated" in page.inner_text(".notice")
        assert {port for port, _ in lb.paths} == {a.port}
        wait_until(lambda: owner_daemon(cluster, agent.address) is not None, RUN_SECONDS)
        owner = owner_daemon(cluster, agent.address)
        assert owner is not None
        assert imap_connections(oauth2_dovecot)[agent.address] == 1

        # Start Sync through b: the owner files the Queue, the CRM gets one event.
        queue(agent, build_message(CLIENT_A, agent.address, "viewing on friday"))
        wait_until(lambda: owner.metric("emailsync_queue_messages", mailbox=agent.address) == 1)
        assert folder_subjects(agent, "Queue") == {"viewing on friday": set()}  # manual
        status = http(b, "POST", f"/v1/mailboxes/{agent.address}/sync", token=b.token)
        assert status.status == 202, status.body
        wait_until(lambda: "viewing on friday" in folder_subjects(agent, "Received"), 15)
        assert crm_subjects(reference_crm)["viewing on friday"] == 1

        # The Office 365 pop-up: started on a's page, the redirect served by b.
        o365_link = run_cli(c.config, "token", "issue", o365)
        assert o365_link.returncode == 0, o365_link.stderr
        page.goto(f"{base}/login?token={o365_link.stdout.split()[0]}")
        page.wait_for_url(f"{base}/email-sync/{quote(o365, safe='@')}")
        popup = office365_popup(page, "b0")
        popup.fill("input[name=password]", o365_password)
        with popup.expect_event("close", timeout=15_000):
            popup.click("#idp-sign-in")
        signed_in = [r for r in idp.token_requests("authorization_code") if r.status == 200]
        assert signed_in, "the provider issued no token"
        # The provider sent the pop-up back to the public address; b finished it.
        callbacks = [p for p, path in lb.paths if path.startswith("/oauth/office365/")]
        assert callbacks == [b.port]
        assert "GET /oauth/office365/callback" not in a.log()
        wait_until(lambda: owner_daemon(cluster, o365) is not None, RUN_SECONDS)
        deliver(oauth2_dovecot, o365, "over the pop-up on b")
        wait_until(lambda: count(oauth2_dovecot, o365, "Failed") == 1, timeout=30)
        shot(page, "production-office365-signed-in")

        # Stop Email Sync through c's page (b's, if c runs the mailbox) ends the owner's
        # IMAP session within 5 s.
        owner = owner_daemon(cluster, agent.address)
        assert owner is not None
        stopper = c if owner is not c else b
        pages.append(stopper.port)
        page.goto(f"{base}/login?token={agent_token}")
        page.wait_for_url(f"{base}/email-sync/{quote(agent.address, safe='@')}")
        before = imap_connections(oauth2_dovecot)[agent.address]
        assert before == 1
        clicked = time.monotonic()
        page.click("#stop-sync")
        assert "Email Sync stopped" in page.inner_text(".notice")
        wait_until(
            lambda: imap_connections(oauth2_dovecot)[agent.address] == 0,
            timeout=STOP_SECONDS,
            interval=0.1,
        )
        ended = time.monotonic() - clicked
        print(f"stop through another instance ended the owner's session after {ended:.1f} s")
