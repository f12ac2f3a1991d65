"""Self-service over the /v1 API against a real daemon and Dovecot: branches, First Time Setup,
Start Sync, Stop Email Sync (secret provably gone), agent tokens and key rotation."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import imapclient
import imapclient.exceptions
import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.service.supervisor import Supervisor
from emailsync.state.base import RegisteredMailbox
from emailsync.state.keycheck import rotate_registry_key
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import Vault

from .conftest import MailUser, new_user, settings_for
from .daemonproc import DaemonFactory, RunningDaemon, new_port, run_cli, wait_until
from .faultproxy import FaultProxy
from .test_daemon import imap_pids
from .test_filing import ROOT, build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot


def call(
    daemon: RunningDaemon, method: str, path: str, body: Any = None, *, token: str | None = None
) -> tuple[int, Any]:
    """One request with a JSON body (none: empty); returns (status, parsed JSON answer)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}{path}",
        method=method,
        headers={
            "Authorization": f"Bearer {token or daemon.token}",
            "Content-Type": "application/json",
        },
        data=json.dumps(body).encode() if body is not None else b"",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310 -- loopback
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def page_session(daemon: RunningDaemon, token: str) -> str:
    """Log in to the pages with a token; returns the session cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.request("GET", f"/login?token={token}")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return (response.getheader("Set-Cookie") or "").split(";")[0]
    finally:
        conn.close()


def page_get(daemon: RunningDaemon, path: str, cookie: str) -> tuple[int, str | None]:
    """GET a page with a session cookie, without following redirects: (status, Location)."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


def db_path(daemon: RunningDaemon) -> Path:
    return daemon.workdir / "state" / "emailsync.db"


def raw_store_bytes(daemon: RunningDaemon) -> bytes:
    """Every byte of the store's files as they lie on disk (database, WAL)."""
    path = db_path(daemon)
    files = [path, path.with_name(path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def stored_secret(daemon: RunningDaemon, address: str) -> bytes | None:
    with sqlite3.connect(db_path(daemon)) as conn:
        row = conn.execute(
            "SELECT secret FROM registered_mailboxes WHERE address = ?", (address,)
        ).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def registered_rows(daemon: RunningDaemon) -> int:
    with sqlite3.connect(db_path(daemon)) as conn:
        return int(conn.execute("SELECT count(*) FROM registered_mailboxes").fetchone()[0])


def add_branch(daemon: RunningDaemon, server: Dovecot, name: str = "main") -> None:
    status, answer = call(
        daemon,
        "PUT",
        f"/v1/branches/{name}",
        {"host": server.host, "port": server.port, "security": "none"},
    )
    assert status == 201, answer


def with_branch(
    daemons: DaemonFactory, user: MailUser, server: Dovecot, **start: Any
) -> RunningDaemon:
    """A daemon for ``user`` (``start`` as for ``DaemonFactory.start``) with the branch "main"
    on ``server`` added through the API."""
    daemon = daemons.start([user], **start)
    add_branch(daemon, server)
    return daemon


def agent_token(daemon: RunningDaemon, address: str) -> str:
    status, answer = call(daemon, "POST", "/v1/tokens", {"address": address})
    assert status == 201, answer
    return str(answer["token"])


def test_an_agent_sets_up_syncs_and_stops_their_mailbox_and_the_password_is_gone(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = with_branch(daemons, user, dovecot, groups={"Smith": ["john@clients.example"]})
    agent = new_user(dovecot)
    path = f"/v1/mailboxes/{quote(agent.address)}"
    token = agent_token(daemon, agent.address)
    setup = {"branch": "main", "username": agent.address}

    # A wrong password: the server's refusal in one line, nothing stored.
    status, answer = call(daemon, "PUT", path, {**setup, "password": "wrong"}, token=token)
    assert status == 422, answer
    assert "refused" in answer["error"]
    assert "\n" not in answer["error"]
    assert "wrong" not in answer["error"]
    assert registered_rows(daemon) == 0
    assert call(daemon, "GET", path, token=token)[0] == 404

    # The right one: folders created and subscribed, the worker runs, status answered.
    status, answer = call(daemon, "PUT", path, {**setup, "password": agent.password}, token=token)
    assert status == 200, answer
    assert answer["address"] == agent.address
    assert answer["source"] == "registry"
    assert agent.password not in json.dumps(answer)
    with agent.client() as client:
        subscribed = {name for _, _, name in client.list_sub_folders()}
    assert {f"{ROOT}.Queue", f"{ROOT}.Sent", f"{ROOT}.Received", f"{ROOT}.Failed"} <= subscribed
    wait_until(lambda: call(daemon, "GET", path, token=token)[1]["state"] == "idle")
    blob = stored_secret(daemon, agent.address)
    assert blob is not None
    assert agent.password.encode() not in raw_store_bytes(daemon)  # encrypted at rest

    # Queue mail, Start Sync: filed, and the status shows the subject and outcome.
    queue(agent, build_message("john@clients.example", agent.address, "Offer on Elm St"))
    status, _ = call(daemon, "POST", f"{path}/sync", token=token)
    assert status == 202
    wait_until(lambda: "Offer on Elm St" in folder_subjects(agent, "Received"))
    detail = wait_until(lambda: (d := call(daemon, "GET", path, token=token)[1])["recent"] and d)
    assert detail["recent"][0]["subject"] == "Offer on Elm St"
    assert detail["recent"][0]["outcome"] == "received"
    assert detail["last_sync"] is not None

    # Stop Email Sync: the worker stops and the ciphertext is gone from the files.
    status, answer = call(daemon, "DELETE", path, token=token)
    assert (status, answer) == (200, {"stopped": agent.address})
    assert call(daemon, "GET", path, token=token)[0] == 404  # First Time Setup again
    assert agent.address not in daemon.mailboxes()
    assert registered_rows(daemon) == 0
    on_disk = raw_store_bytes(daemon)
    assert blob not in on_disk
    assert blob[-16:] not in on_disk  # not even the GCM tag
    assert agent.password.encode() not in on_disk
    assert '"mailbox_stopped"' in daemon.log()
    # Folders and history stay.
    assert "Offer on Elm St" in folder_subjects(agent, "Received")
    assert call(daemon, "POST", f"{path}/sync", token=token)[0] == 404  # not running


def test_an_agent_who_chooses_manual_at_set_up_gets_mail_filed_only_on_start_sync(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    """Issue 19: a self-registered mailbox was always `trigger = auto`, where the seed's agents
    file on Start Sync. The choice is the agent's, and it is kept across a restart."""
    daemon = with_branch(daemons, user, dovecot, groups={"Smith": ["john@clients.example"]})
    agent = new_user(dovecot)
    path = f"/v1/mailboxes/{quote(agent.address)}"
    setup = {"branch": "main", "username": agent.address, "password": agent.password}
    status, answer = call(daemon, "PUT", path, {**setup, "trigger": "manual"})
    assert status == 200, answer
    assert answer["trigger"] == "manual"
    wait_until(lambda: call(daemon, "GET", path)[1]["state"] == "idle")

    queue(agent, build_message("john@clients.example", agent.address, "Keys ready"))
    # Positive event: IDLE announced it and the worker counted it instead of filing it.
    wait_until(lambda: daemon.metric("emailsync_queue_messages", mailbox=agent.address) == 1)
    assert folder_subjects(agent, "Queue") == {"Keys ready": set()}
    assert call(daemon, "POST", f"{path}/sync")[0] == 202
    wait_until(lambda: "Keys ready" in folder_subjects(agent, "Received"))

    daemon.stop()
    again = daemons.start([user])
    wait_until(lambda: again.mailboxes().get(agent.address, {}).get("state") == "idle")
    assert again.mailboxes()[agent.address]["trigger"] == "manual"


def test_a_non_ascii_username_or_password_is_a_422_not_a_500(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    """Found by schemathesis: IMAP LOGIN (imaplib) sends ASCII only, and a username with an
    accent raised UnicodeEncodeError, a 500. It is a refused login now, and nothing is kept."""
    daemon = with_branch(daemons, user, dovecot)
    agent = new_user(dovecot)
    path = f"/v1/mailboxes/{quote(agent.address)}"
    for username, password in (("agént", agent.password), (agent.address, "pässword")):
        status, answer = call(
            daemon, "PUT", path, {"branch": "main", "username": username, "password": password}
        )
        assert status == 422, answer
        assert "non-ASCII" in answer["error"]
        assert "pässword" not in answer["error"]
    assert registered_rows(daemon) == 0
    # Positive signal: the same call with the right ASCII credentials is accepted.
    body = {"branch": "main", "username": agent.address, "password": agent.password}
    assert call(daemon, "PUT", path, body)[0] == 200


def test_a_mailbox_of_the_config_file_is_read_only_through_the_api(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user])
    path = f"/v1/mailboxes/{quote(user.address)}"
    body = {"branch": "b0", "username": user.address, "password": user.password}
    assert call(daemon, "PUT", path, body)[0] == 409
    assert call(daemon, "DELETE", path)[0] == 409
    branch = {"host": "127.0.0.1", "port": dovecot.port, "security": "none"}
    assert call(daemon, "PUT", "/v1/branches/b0", branch)[0] == 409
    # Positive signal: the mailbox is still there and its status readable.
    status, detail = call(daemon, "GET", path)
    assert status == 200
    assert detail["source"] == "config"
    assert detail["state"] != "stopped"


def test_an_agent_token_sees_and_touches_only_its_own_mailbox(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = with_branch(daemons, user, dovecot)
    first, second = new_user(dovecot), new_user(dovecot)
    for agent in (first, second):
        body = {"branch": "main", "username": agent.address, "password": agent.password}
        status, answer = call(daemon, "PUT", f"/v1/mailboxes/{quote(agent.address)}", body)
        assert status == 200, answer
    token = agent_token(daemon, first.address)
    other = f"/v1/mailboxes/{quote(second.address)}"
    toml = f"/v1/mailboxes/{quote(user.address)}"
    # Positive signal: the token works on its own mailbox.
    assert call(daemon, "GET", f"/v1/mailboxes/{quote(first.address)}", token=token)[0] == 200
    listed = call(daemon, "GET", "/v1/mailboxes", token=token)[1]["mailboxes"]
    assert [m["address"] for m in listed] == [first.address]
    nobody = {"error": "no such mailbox"}
    for target in (other, toml):
        assert call(daemon, "GET", target, token=token) == (404, nobody)
        assert call(daemon, "DELETE", target, token=token) == (404, nobody)
        assert call(daemon, "POST", f"{target}/sync", token=token) == (404, nobody)
        assert call(daemon, "POST", f"{target}/stop", token=token) == (404, nobody)
        body = {"branch": "main", "username": "x", "password": "y"}
        assert call(daemon, "PUT", target, body, token=token) == (404, nobody)
    forbidden = {"error": "this token is for one mailbox only"}
    assert call(daemon, "POST", "/v1/sync", token=token) == (403, forbidden)
    assert call(daemon, "GET", "/v1/branches", token=token) == (403, forbidden)
    branch = {"host": "evil.example", "port": 993, "security": "ssl"}
    assert call(daemon, "PUT", "/v1/branches/main", branch, token=token) == (403, forbidden)
    mint = {"address": second.address}
    assert call(daemon, "POST", "/v1/tokens", mint, token=token) == (403, forbidden)
    # The other mailboxes still run.
    states = {a: m["state"] for a, m in daemon.mailboxes().items()}
    assert states[second.address] != "stopped"
    assert states[user.address] != "stopped"


def test_rotating_the_key_revokes_agent_tokens_and_keeps_passwords_readable(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = with_branch(daemons, user, dovecot)
    agent = new_user(dovecot)
    path = f"/v1/mailboxes/{quote(agent.address)}"
    body = {"branch": "main", "username": agent.address, "password": agent.password}
    assert call(daemon, "PUT", path, body)[0] == 200
    token = agent_token(daemon, agent.address)
    cli_token = run_cli(daemon.config, "token", "issue", agent.address, "--expires", "2")
    assert cli_token.returncode == 0, cli_token.stderr
    issued = cli_token.stdout.split()[0]
    assert call(daemon, "GET", path, token=token)[0] == 200
    assert call(daemon, "GET", path, token=issued)[0] == 200
    before = stored_secret(daemon, agent.address)
    cookie = page_session(daemon, issued)
    page = f"/email-sync/{quote(agent.address, safe='@')}"
    assert page_get(daemon, page, cookie) == (200, None)

    rotated = run_cli(daemon.config, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert call(daemon, "GET", path, token=token)[0] == 401
    assert call(daemon, "GET", path, token=issued)[0] == 401
    assert page_get(daemon, page, cookie) == (303, "/login")  # the page session ended too
    after = stored_secret(daemon, agent.address)
    assert after is not None
    assert after != before
    # A restarted daemon decrypts the re-encrypted password and logs in with it.
    daemon.stop()
    again = daemons.start([user])
    wait_until(lambda: again.mailboxes()[agent.address]["state"] == "idle")


def test_a_set_up_outwaits_the_servers_failure_delay_and_takes_the_right_password_after(
    user: MailUser, dovecot_slow_failures: Dovecot, daemons: DaemonFactory
) -> None:
    """A typo is refused after the server's 6 s failure delay: 422 with its words, not a
    timeout. The right password right after, which the server holds (auth penalty), is 200."""
    daemon = daemons.start([user])
    agent = new_user(dovecot_slow_failures)
    add_branch(daemon, dovecot_slow_failures, "slow")
    path = f"/v1/mailboxes/{quote(agent.address)}"
    body = {"branch": "slow", "username": agent.address, "password": agent.password + "x"}
    started = time.monotonic()
    status, answer = call(daemon, "PUT", path, body)
    assert (status, "AUTHENTICATIONFAILED" in answer["error"]) == (422, True), answer
    assert time.monotonic() - started >= 5  # the refusal came after the server's delay
    status, answer = call(daemon, "PUT", path, {**body, "password": agent.password})
    assert status == 200, answer


def test_a_set_up_login_without_answer_is_504_naming_the_seconds_and_no_server_is_502(
    user: MailUser, dovecot: Dovecot, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user], setup_timeout_seconds=5)
    agent = new_user(dovecot)
    path = f"/v1/mailboxes/{quote(agent.address)}"
    for name, port in (("silent", fault_proxy.port), ("nowhere", new_port())):
        branch = {"host": "127.0.0.1", "port": port, "security": "none"}
        assert call(daemon, "PUT", f"/v1/branches/{name}", branch)[0] == 201
    body = {"branch": "silent", "username": agent.address, "password": agent.password}
    fault_proxy.stall_on(r"\bLOGIN\b")  # LOGIN reaches the server; its answer never comes back
    status, answer = call(daemon, "PUT", path, body)
    assert status == 504, answer
    assert "did not answer in 5 s" in answer["error"]
    status, answer = call(daemon, "PUT", path, {**body, "branch": "nowhere"})
    assert status == 502, answer
    assert "refused" in answer["error"]
    assert registered_rows(daemon) == 0  # nothing stored either time


def put_mailbox(
    daemon: RunningDaemon, address: str, body: dict[str, str], token: str | None = None
) -> tuple[int, Any, str | None]:
    """PUT /v1/mailboxes/{address}: (status, parsed answer, Retry-After header)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}/v1/mailboxes/{quote(address)}",
        method="PUT",
        headers={
            "Authorization": f"Bearer {token or daemon.token}",
            "Content-Type": "application/json",
        },
        data=json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:  # noqa: S310 -- loopback
            return response.status, json.loads(response.read()), None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), exc.headers.get("Retry-After")


def test_an_agent_sets_up_with_its_own_address_as_username_while_it_may_set_another(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    """An agent token could bind its mailbox to any account the agent knows a password of.
    Now an agent's username is its mailbox's address (or the one IT set for it); the admin
    token may set any username."""
    daemon = with_branch(daemons, user, dovecot)
    agent, other = new_user(dovecot), new_user(dovecot)
    token = agent_token(daemon, agent.address)
    foreign = {"branch": "main", "username": other.address, "password": other.password}
    status, answer, _ = put_mailbox(daemon, agent.address, foreign, token)
    assert status == 403, answer
    assert f"username must be the mailbox's address ({agent.address})" in answer["error"]
    assert registered_rows(daemon) == 0
    # IT may bind it to another login, and the agent may then keep the one IT set.
    assert put_mailbox(daemon, agent.address, foreign)[0] == 200
    assert put_mailbox(daemon, agent.address, foreign, token)[0] == 200
    own = {"branch": "main", "username": agent.address.upper(), "password": agent.password}
    assert put_mailbox(daemon, agent.address, own, token)[0] == 200  # case does not matter


def test_the_sixth_wrong_set_up_password_is_429_and_the_server_saw_five_logins(
    user: MailUser, dovecot: Dovecot, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    """Set-up was a password oracle with no limit: refused logins are capped at 5 per mailbox
    in 15 minutes, for the agent and the admin token alike, before any LOGIN is sent."""
    daemon = daemons.start([user])
    agent, elsewhere = new_user(dovecot), new_user(dovecot)
    branch = {"host": "127.0.0.1", "port": fault_proxy.port, "security": "none"}
    assert call(daemon, "PUT", "/v1/branches/proxied", branch)[0] == 201
    token = agent_token(daemon, agent.address)
    wrong = {"branch": "proxied", "username": agent.address, "password": "guess"}
    for n in range(5):
        status, answer, _ = put_mailbox(
            daemon, agent.address, {**wrong, "password": f"g{n}"}, token
        )
        assert status == 422, (n, answer)
    status, answer, retry_after = put_mailbox(daemon, agent.address, wrong, token)
    assert status == 429, answer
    assert retry_after is not None
    assert 0 < int(retry_after) <= 900
    assert "5 refused logins" in answer["error"]
    right = {**wrong, "password": agent.password}
    assert put_mailbox(daemon, agent.address, right)[0] == 429  # the admin too, on this mailbox
    assert fault_proxy.logins(agent.address) == 5
    # Positive signal: another mailbox, through the same proxy, still sets up.
    other = {"branch": "proxied", "username": elsewhere.address, "password": elsewhere.password}
    assert put_mailbox(daemon, elsewhere.address, other)[0] == 200
    assert fault_proxy.logins(agent.address) == 5


def old_password_refused(user: MailUser) -> bool:
    """True once the server refuses ``user``'s password (Dovecot re-reads its file within 1 s)."""
    client = imapclient.IMAPClient(user.server.host, port=user.server.port, ssl=False, timeout=10)
    try:
        client.login(user.address, user.password)
    except imapclient.exceptions.LoginError:
        return True
    finally:
        with contextlib.suppress(Exception):
            client.shutdown()
    return False


def test_a_workers_refused_login_and_the_set_ups_share_one_budget(
    user: MailUser, dovecot: Dovecot, fault_proxy: FaultProxy, daemons: DaemonFactory
) -> None:
    """The password changed at the server: the worker's next login is refused, and that counts
    against the same 5 as set-ups, so the agent's 5th wrong try is a 429, not a 5th LOGIN."""
    daemon = daemons.start([user])
    agent = new_user(dovecot)
    branch = {"host": "127.0.0.1", "port": fault_proxy.port, "security": "none"}
    assert call(daemon, "PUT", "/v1/branches/proxied", branch)[0] == 201
    right = {"branch": "proxied", "username": agent.address, "password": agent.password}
    assert put_mailbox(daemon, agent.address, right)[0] == 200
    path = f"/v1/mailboxes/{quote(agent.address)}"
    wait_until(lambda: call(daemon, "GET", path)[1]["state"] == "idle")
    dovecot.add_user(agent.address, agent.password + "-changed")
    wait_until(lambda: old_password_refused(agent))
    fault_proxy.drop()  # the worker reconnects with the stored (now wrong) password
    wait_until(lambda: call(daemon, "GET", path)[1]["state"] == "needs_reauth")
    token = agent_token(daemon, agent.address)
    for n in range(4):
        status, answer, _ = put_mailbox(
            daemon, agent.address, {**right, "password": f"g{n}"}, token
        )
        assert status == 422, (n, answer)
    logins = fault_proxy.logins(agent.address)
    status, answer, retry_after = put_mailbox(daemon, agent.address, right, token)
    assert (status, retry_after is not None) == (429, True), answer
    assert fault_proxy.logins(agent.address) == logins


class _RotatingAtFirstWrite(SqliteStore):
    """A store that runs a whole `keys rotate` just before its first registry write, so a
    set-up's encryption comes before the rotation and its write after."""

    def __init__(self, path: Path, state_dir: Path) -> None:
        super().__init__(path)
        self.state_dir = state_dir
        self.rotated: list[int] = []

    def put_mailbox(self, mailbox: RegisteredMailbox, secret: bytes | None) -> None:
        if not self.rotated:
            self.rotated.append(rotate_registry_key(self, Vault(self.state_dir)))  # keys rotate
        super().put_mailbox(mailbox, secret)


def test_a_set_up_racing_a_key_rotation_stores_a_password_that_decrypts(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """First Time Setup encrypts the password, a rotation re-encrypts everything and drops the
    old key, then the set-up writes its row: the password must still decrypt afterwards."""
    agent = new_user(dovecot)
    settings = settings_for(tmp_path, [new_user(dovecot)])
    state_dir = settings.daemon.state_dir
    store = _RotatingAtFirstWrite(state_dir / "emailsync.db", state_dir)
    supervisor = Supervisor(settings, store)
    try:
        supervisor.registrar.setup_mailbox(
            agent.address, "b0", agent.address, agent.password, agent=False, client=None
        )
        assert store.rotated == [2]
        blob = store.mailbox_secret(agent.address)
        assert blob is not None
        assert Vault(state_dir).decrypt(blob, agent.address).reveal() == agent.password
    finally:
        store.close()


def test_a_reload_leaves_a_registered_mailbox_and_its_connection_alone(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    daemon = with_branch(daemons, user, dovecot)
    agent = new_user(dovecot)
    body = {"branch": "main", "username": agent.address, "password": agent.password}
    assert call(daemon, "PUT", f"/v1/mailboxes/{quote(agent.address)}", body)[0] == 200
    wait_until(lambda: daemon.mailboxes()[agent.address]["state"] == "idle")
    pids_before = imap_pids(dovecot, agent.address)
    assert len(pids_before) == 1
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.notify.seen("RELOADING=1"))

    def reload_done() -> bool:  # READY=1 again after RELOADING=1: the reload has finished
        messages = list(daemon.notify.messages)
        started = next(i for i, m in enumerate(messages) if "RELOADING=1" in m)
        return any("READY=1" in m for m in messages[started + 1 :])

    wait_until(reload_done)
    assert daemon.mailboxes()[agent.address]["state"] == "idle"
    assert imap_pids(dovecot, agent.address) == pids_before  # the same connection
