"""Agent links one at a time, against a real daemon: a default expiry, a list for IT (who,
when, expiry, last use), revocation of one token or of a mailbox's (CLI, API, the IT page's
button) that ends its API access and its page session at once, and es1 links from before."""

from __future__ import annotations

import base64
import http.client
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.state.vault import Vault, _token_mac

from .conftest import MailUser, new_user
from .daemonproc import DaemonFactory, RunningDaemon, run_cli
from .test_selfservice_api import call, page_get, page_session

pytestmark = pytest.mark.dovecot


def issue(daemon: RunningDaemon, address: str, **body: Any) -> dict[str, Any]:
    status, answer = call(daemon, "POST", "/v1/tokens", {"address": address, **body})
    assert status == 201, answer
    return dict(answer)


def listed(daemon: RunningDaemon) -> dict[str, dict[str, Any]]:
    status, answer = call(daemon, "GET", "/v1/tokens")
    assert status == 200, answer
    return {t["id"]: t for t in answer["tokens"]}


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def mailbox_status(daemon: RunningDaemon, address: str, token: str) -> int:
    return call(daemon, "GET", f"/v1/mailboxes/{quote(address)}", token=token)[0]


def page_form(
    daemon: RunningDaemon, path: str, cookie: str, form: dict[str, str]
) -> tuple[int, str | None]:
    """POST a page form with the session's cookie; (status, Location)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        body = urlencode(form)
        headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"}
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


def page_text(daemon: RunningDaemon, path: str, cookie: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
        return text
    finally:
        conn.close()


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


def test_a_link_issued_without_an_expiry_expires_after_the_configured_default(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """API, CLI and the IT page alike: no days given → `agent_token_days`."""
    daemon = daemons.start([user], agent_token_days=7)
    api = issue(daemon, user.address)
    cli = run_cli(daemon.config, "token", "issue", user.address)
    assert cli.returncode == 0, cli.stderr
    admin = page_session(daemon, daemon.token)
    it = page_text(daemon, "/it", admin)
    form = {"csrf": csrf_of(it), "address": user.address}
    assert page_form(daemon, "/it/tokens", admin, form) == (303, "/it")

    tokens = listed(daemon)
    assert len(tokens) == 3
    assert {t["issued_by"].split(":")[0] for t in tokens.values()} == {"api", "cli", "page"}
    for token in tokens.values():
        issued_at, expires_at = when(token["issued_at"]), when(token["expires_at"])
        assert abs(issued_at - datetime.now(UTC)) < timedelta(minutes=1)
        assert expires_at - issued_at == timedelta(days=7)
        assert token["state"] == "active"
    assert api["expires_at"] == tokens[api["id"]]["expires_at"]
    # The expiry is in the token itself (the signed field), not only in the list.
    assert api["token"].split(".")[4] == str(int(when(api["expires_at"]).timestamp()))


def test_revoking_one_of_two_tokens_ends_its_api_access_and_page_session_only(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user])
    first, second = issue(daemon, user.address), issue(daemon, user.address, expires_days=2)
    page = f"/email-sync/{quote(user.address, safe='@')}"
    sessions = [page_session(daemon, t["token"]) for t in (first, second)]
    assert mailbox_status(daemon, user.address, first["token"]) == 200
    assert mailbox_status(daemon, user.address, second["token"]) == 200
    assert [page_get(daemon, page, c) for c in sessions] == [(200, None), (200, None)]

    # The list IT sees: whose, who issued it and when, until when, last used.
    before = listed(daemon)
    for token in (first, second):
        row = before[token["id"]]
        assert row["address"] == user.address
        assert row["issued_by"] == "api"
        assert row["last_used_at"] is not None
        assert row["revoked_at"] is None
    assert when(before[second["id"]]["expires_at"]) - when(
        before[second["id"]]["issued_at"]
    ) == timedelta(days=2)

    status, answer = call(daemon, "DELETE", f"/v1/tokens/{first['id']}")
    assert status == 200, answer
    assert [t["id"] for t in answer["revoked"]] == [first["id"]]
    assert mailbox_status(daemon, user.address, first["token"]) == 401
    assert page_get(daemon, page, sessions[0]) == (303, "/login")  # the session ended
    assert mailbox_status(daemon, user.address, second["token"]) == 200
    assert page_get(daemon, page, sessions[1]) == (200, None)
    after = listed(daemon)
    assert after[first["id"]]["state"] == "revoked"
    assert after[first["id"]]["revoked_at"] is not None
    assert after[second["id"]]["state"] == "active"
    assert call(daemon, "DELETE", "/v1/tokens/0000000000000000")[0] == 404


def test_only_the_admin_lists_and_revokes_tokens(user: MailUser, daemons: DaemonFactory) -> None:
    daemon = daemons.start([user])
    mine = issue(daemon, user.address)
    forbidden = (403, {"error": "this token is for one mailbox only"})
    assert call(daemon, "GET", "/v1/tokens", token=mine["token"]) == forbidden
    assert call(daemon, "DELETE", f"/v1/tokens/{mine['id']}", token=mine["token"]) == forbidden
    assert mailbox_status(daemon, user.address, mine["token"]) == 200


def test_the_cli_lists_tokens_and_revokes_every_token_of_a_mailbox(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    other = new_user(dovecot)
    daemon = daemons.start([user, other])
    issued = [run_cli(daemon.config, "token", "issue", user.address) for _ in range(2)]
    assert all(r.returncode == 0 for r in issued), [r.stderr for r in issued]
    mine = [r.stdout.split()[0] for r in issued]
    theirs = issue(daemon, other.address)["token"]
    assert [mailbox_status(daemon, user.address, t) for t in mine] == [200, 200]

    shown = run_cli(daemon.config, "token", "list", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert sorted(r["address"] for r in rows) == sorted([user.address] * 2 + [other.address])
    assert all(r["last_used_at"] is not None for r in rows if r["address"] == user.address)
    assert all(r["issued_by"].startswith("cli:") for r in rows if r["address"] == user.address)
    table = run_cli(daemon.config, "token", "list")
    assert table.returncode == 0, table.stderr
    assert all(r["id"] in table.stdout for r in rows)

    revoked = run_cli(daemon.config, "token", "revoke", user.address)
    assert revoked.returncode == 0, revoked.stderr
    assert [mailbox_status(daemon, user.address, t) for t in mine] == [401, 401]
    assert mailbox_status(daemon, other.address, theirs) == 200
    unknown = run_cli(daemon.config, "token", "revoke", "0000000000000000")
    assert unknown.returncode == 1
    assert "no such token" in unknown.stderr


def test_it_revokes_a_link_with_the_button_on_the_it_page(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user])
    revoked, kept = issue(daemon, user.address), issue(daemon, user.address)
    admin = page_session(daemon, daemon.token)
    it = page_text(daemon, "/it", admin)
    assert revoked["id"] in it
    assert kept["id"] in it
    # Without the session's CSRF token the form is refused and the link still works.
    form = {"csrf": "forged", "id": revoked["id"]}
    assert page_form(daemon, "/it/tokens/revoke", admin, form)[0] == 403
    assert mailbox_status(daemon, user.address, revoked["token"]) == 200

    form = {"csrf": csrf_of(it), "id": revoked["id"]}
    assert page_form(daemon, "/it/tokens/revoke", admin, form) == (303, "/it")
    assert mailbox_status(daemon, user.address, revoked["token"]) == 401
    assert mailbox_status(daemon, user.address, kept["token"]) == 200
    after = page_text(daemon, "/it", admin)
    assert "Link revoked" in after
    assert revoked["id"] not in after.split('id="tokens"', 1)[1]  # active links only


def test_an_es1_link_from_before_the_upgrade_works_until_its_mailbox_s_links_are_revoked(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """es1 links carry no id: they keep working (bookmarks survive the upgrade), show up in
    the list once used, and go with a revocation of their mailbox (or `keys rotate`)."""
    daemon = daemons.start([user])
    vault = Vault(daemon.workdir / "state")
    generation, keys = vault._keys()
    encoded = base64.urlsafe_b64encode(user.address.encode()).decode().rstrip("=")
    mac = _token_mac(keys[generation], user.address, generation, "0")
    old = f"es1.{encoded}.{generation}.0.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"
    assert mailbox_status(daemon, user.address, old) == 200
    cookie = page_session(daemon, old)
    page = f"/email-sync/{quote(user.address, safe='@')}"
    assert page_get(daemon, page, cookie) == (200, None)
    (row,) = listed(daemon).values()
    assert (row["address"], row["issued_by"], row["issued_at"]) == (user.address, "es1", None)

    status, answer = call(daemon, "DELETE", f"/v1/tokens/{quote(user.address)}")
    assert status == 200, answer
    assert mailbox_status(daemon, user.address, old) == 401
    assert page_get(daemon, page, cookie) == (303, "/login")
