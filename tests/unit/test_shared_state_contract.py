"""The shared-state tables' statements (issue 20): one suite, run on SQLite and PostgreSQL.

Page sessions (``page_sessions``), Office 365 sign-ins under way (``signin_flows``) and MSAL
token caches (``token_caches``) are written once (``emailsync.state.sessions_sql``,
``signins_sql``, ``tokencache_sql``); every test here runs on both databases, each engine
opened as a separate instance would open it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from emailsync.dev.postgres import Postgres
from emailsync.errors import ConfigError, KeyUnavailableError
from emailsync.imap.tokencache import FileTokenCaches
from emailsync.runtime.signins import FLOW_SECONDS
from emailsync.service.supervisor import ANONYMOUS_CSRF_INFO
from emailsync.state.keycheck import rotate_registry_key
from emailsync.state.postgres import PostgresStore
from emailsync.state.sessions_sql import SessionRow, SqlSessions, row_id
from emailsync.state.signins_sql import SqlSignInFlows
from emailsync.state.sqlite import SqliteStore
from emailsync.state.tokencache_sql import SqlTokenCaches, token_caches_for
from emailsync.state.vault import Vault
from emailsync.web.pages import MAX_SESSIONS, SESSION_SECONDS, Pages, Principal

from .stores import KINDS, closed_after
from .test_store_contract import open_kind

AGENT = "agent@example.com"
OTHER = "other@example.com"
CAP = 3  # max_sessions / max_flows of the tests that fill a table past its cap
# How long the second writer is kept waiting by the first one's row lock in the test.
HOLD_SECONDS = 0.5


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStore | PostgresStore]:
    """A fresh state database of each kind."""
    yield from closed_after(open_kind(request.param, request, tmp_path))


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    """A vault with a key of its own."""
    directory = tmp_path / "vault"
    directory.mkdir()
    return Vault(directory)


def raw(engine: SqliteStore | PostgresStore, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows of a statement in ``?`` spelling, as stored."""
    marker = engine.param_marker
    with engine.reading("test") as conn:
        return [tuple(r) for r in conn.execute(sql.replace("?", marker), params).fetchall()]


# -- token caches ---------------------------------------------------------------------------


def test_a_token_cache_is_written_under_its_lock_read_back_and_stored_encrypted(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """What a locked slot writes is what a read gives; the row holds no plaintext."""
    caches = SqlTokenCaches(engine, vault)
    assert caches.read(AGENT) is None
    with caches.locked(AGENT) as slot:
        assert slot.read() is None
        first = slot.write('{"RefreshToken": {"rt": {"secret": "refresh-one"}}}')
        assert slot.read() is not None
    stored = caches.read(AGENT)
    assert stored is not None
    assert stored.text == '{"RefreshToken": {"rt": {"secret": "refresh-one"}}}'
    assert stored.stamp == first
    ((blob,),) = raw(engine, "SELECT cache FROM token_caches WHERE address = ?", AGENT)
    assert b"refresh-one" not in bytes(blob)
    with caches.locked(AGENT) as slot:
        second = slot.write('{"RefreshToken": {}}')
    assert second != first
    assert caches.read(AGENT) == type(stored)('{"RefreshToken": {}}', second)


def test_a_token_cache_moved_to_another_mailbox_s_row_does_not_open(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """The row's address is the associated data: a copied blob is refused, not used."""
    caches = SqlTokenCaches(engine, vault)
    with caches.locked(AGENT) as slot:
        slot.write("{}")
    ((blob,),) = raw(engine, "SELECT cache FROM token_caches WHERE address = ?", AGENT)
    with engine.transaction("test") as conn:
        conn.execute(
            "INSERT INTO token_caches (address, cache, updated_at) VALUES (?, ?, 0)".replace(
                "?", engine.param_marker
            ),
            (OTHER, blob),
        )
    with pytest.raises(ConfigError):
        caches.read(OTHER)


def test_forgetting_a_token_cache_deletes_the_row_and_leaves_others(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """Stop Email Sync's forget takes the row out; another mailbox's stays."""
    caches = SqlTokenCaches(engine, vault)
    for address in (AGENT, OTHER):
        with caches.locked(address) as slot:
            slot.write(f'{{"who": "{address}"}}')
    caches.forget(AGENT)
    caches.forget(AGENT)  # nothing left to delete is fine
    assert caches.read(AGENT) is None
    assert raw(engine, "SELECT address FROM token_caches") == [(OTHER,)]


def test_a_second_writer_waits_for_the_first_and_reads_what_it_wrote(
    engine: SqliteStore | PostgresStore, tmp_path: Path, vault: Vault
) -> None:
    """Two instances refreshing one mailbox take turns: the second reads the first's write.

    Without the lock the second would read the cache from before, redeem the refresh token
    the first has rotated away, and overwrite the first's cache with an older one.
    """
    first = SqlTokenCaches(engine, vault)
    with first.locked(AGENT) as slot:
        slot.write('{"n": 0}')
    other = (
        SqliteStore(engine.path) if isinstance(engine, SqliteStore) else PostgresStore(engine._url)
    )
    second = SqlTokenCaches(other, vault)
    seen: list[str | None] = []
    holding = threading.Event()

    def refresh_second() -> None:
        holding.wait(10)
        with second.locked(AGENT) as slot:
            stored = slot.read()
            seen.append(None if stored is None else stored.text)
            slot.write('{"n": 2}')

    thread = threading.Thread(target=refresh_second)
    thread.start()
    try:
        with first.locked(AGENT) as slot:
            holding.set()
            time.sleep(HOLD_SECONDS)  # the second is blocked on the lock meanwhile
            assert not seen
            slot.write('{"n": 1}')
    finally:
        thread.join(10)
        other.close()
    assert seen == ['{"n": 1}']
    stored = first.read(AGENT)
    assert stored is not None
    assert stored.text == '{"n": 2}'


# -- page sessions --------------------------------------------------------------------------


def another_instance(engine: SqliteStore | PostgresStore) -> SqliteStore | PostgresStore:
    """The same database opened again, as another instance (or the next start) opens it."""
    if isinstance(engine, SqliteStore):
        return SqliteStore(engine.path)
    return PostgresStore(engine._url)


@pytest.fixture
def second(engine: SqliteStore | PostgresStore) -> Iterator[SqliteStore | PostgresStore]:
    """The test's database opened by a second instance."""
    opened = another_instance(engine)
    yield opened
    opened.close()


def session_row(sid: str, *, created: float, principal: str | None = AGENT) -> SessionRow:
    return SessionRow(
        sid, principal, f"token-of-{sid}", f"csrf-{sid}", {}, created, created + SESSION_SECONDS
    )


def test_a_session_stored_by_one_instance_is_read_by_another_and_keeps_no_cookie_id(
    engine: SqliteStore | PostgresStore, second: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """The row's id is the cookie id's SHA-256 and the token is sealed; another reads both."""
    now = time.time()
    SqlSessions(engine, vault, max_sessions=10).insert(
        session_row("cookie-id", created=now, principal=None)
    )
    found = SqlSessions(second, vault, max_sessions=10).load("cookie-id")
    assert found == session_row("cookie-id", created=now, principal=None)
    ((rid, blob),) = raw(engine, "SELECT id, token FROM page_sessions")
    assert rid == row_id("cookie-id") != "cookie-id"
    assert b"token-of-cookie-id" not in bytes(blob)
    assert SqlSessions(second, vault, max_sessions=10).load("another-id") is None


def test_messages_are_written_back_and_a_deleted_session_is_gone_everywhere(
    engine: SqliteStore | PostgresStore, second: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """A flash written by one instance shows on another; a logout on one ends it on both."""
    one, other = (SqlSessions(e, vault, max_sessions=10) for e in (engine, second))
    one.insert(session_row("s1", created=time.time()))
    one.save_messages("s1", {"notice": "Sync started."})
    found = other.load("s1")
    assert found is not None
    assert found.messages == {"notice": "Sync started."}
    other.delete("s1")
    assert one.load("s1") is None


def test_an_expired_session_is_refused_and_deleted_and_logins_sweep_expired_rows(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """Past its expiry a session is None and its row goes; a new login deletes the others."""
    sessions = SqlSessions(engine, vault, max_sessions=10)
    now = time.time()
    sessions.insert(session_row("old", created=now - SESSION_SECONDS - 1), now=now - 2)
    sessions.insert(session_row("older", created=now - SESSION_SECONDS - 2), now=now - 2)
    assert sessions.load("old", now=now) is None
    assert len(raw(engine, "SELECT id FROM page_sessions")) == 1
    sessions.insert(session_row("new", created=now), now=now)
    assert raw(engine, "SELECT id FROM page_sessions") == [(row_id("new"),)]


def test_beyond_the_cap_the_oldest_sessions_are_dropped(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """A flood of logins cannot grow the table: the oldest go first."""
    sessions = SqlSessions(engine, vault, max_sessions=CAP)
    now = time.time()
    logins = [f"s{n}" for n in range(CAP + 2)]  # oldest first
    for n, sid in enumerate(logins):
        sessions.insert(session_row(sid, created=now + n), now=now)
    assert [sid for sid in logins if sessions.load(sid) is not None] == logins[2:]


def test_a_session_sealed_under_another_key_is_treated_as_logged_out(
    engine: SqliteStore | PostgresStore, vault: Vault, tmp_path: Path
) -> None:
    """A row this instance's key cannot open (a rotation) is deleted, not an error."""
    SqlSessions(engine, vault, max_sessions=10).insert(session_row("s1", created=time.time()))
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    stranger = SqlSessions(engine, Vault(stranger_dir), max_sessions=10)
    assert stranger.load("s1") is None
    assert raw(engine, "SELECT id FROM page_sessions") == []


def pages_of(engine: SqliteStore | PostgresStore, vault: Vault) -> Pages:
    """The pages of an instance on ``engine``, as the daemon builds them."""
    return Pages(
        sessions=SqlSessions(engine, vault, max_sessions=MAX_SESSIONS),
        anonymous_key=lambda: vault.derived_key(ANONYMOUS_CSRF_INFO),
    )


def test_pages_on_two_instances_share_logins_messages_logouts_and_the_login_form(
    engine: SqliteStore | PostgresStore, second: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """A login on A is a session on B and after A's restart; B's flash shows on A; B's logout
    ends it on A; the login form A served (anonymous CSRF) is accepted by B."""
    a, b = pages_of(engine, vault), pages_of(second, vault)
    session = a.login(Principal(AGENT), token="agent-token")
    cookie = a.cookie(session).split(";")[0]
    on_b = b.session(cookie)
    assert on_b is not None
    assert (on_b.principal, on_b.token) == (Principal(AGENT), "agent-token")
    assert on_b.csrf == session.csrf
    on_b.flash("notice", "Sync started.")
    restarted_engine = another_instance(engine)
    try:
        restarted = pages_of(restarted_engine, vault)
        on_a = restarted.session(cookie)
        assert on_a is not None
        assert on_a.messages == {"notice": "Sync started."}
        assert restarted.render("expired.html", on_a)  # rendering pops the notice ...
        again = a.session(cookie)
        assert again is not None
        assert again.pop_flash("notice") is None  # ... once, for every instance
        b.logout(on_b)
        assert a.session(cookie) is None
        assert restarted.session(cookie) is None
    finally:
        restarted_engine.close()
    anonymous = a.anonymous()
    form_cookie = a.cookie(anonymous).split(";")[0]
    on_b_anonymous = b.session(form_cookie)
    assert on_b_anonymous is not None
    assert Pages.csrf_ok(on_b_anonymous, anonymous.csrf)


# -- Office 365 sign-ins under way ----------------------------------------------------------


def msal_flow(state: str) -> dict[str, object]:
    """What MSAL's initiate_auth_code_flow keeps: the PKCE verifier and the nonce above all."""
    return {
        "state": state,
        "redirect_uri": "http://127.0.0.1:9387/oauth/office365/callback",
        "scope": ["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"],
        "auth_uri": f"https://login.example/authorize?state={state}",
        "code_verifier": f"verifier-{state}",
        "nonce": f"nonce-{state}",
        "claims_challenge": None,
    }


def test_a_sign_in_kept_by_one_instance_is_taken_once_by_another_and_stored_sealed(
    engine: SqliteStore | PostgresStore, second: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """B takes what A kept (the whole flow back); a second take, on either, finds nothing."""
    now = time.time()
    a, b = (SqlSignInFlows(e, vault, max_flows=10) for e in (engine, second))
    payload = {"flow": msal_flow("st1"), "branch": None, "trigger": "manual"}
    a.put("st1", AGENT, payload, now + FLOW_SECONDS, now)
    ((blob,),) = raw(engine, "SELECT flow FROM signin_flows WHERE state = ?", "st1")
    assert b"verifier-st1" not in bytes(blob)
    assert b.take("st1", now) == (AGENT, payload)
    assert b.take("st1", now) is None
    assert a.take("st1", now) is None
    assert a.take("", now) is None


def test_of_two_callbacks_taking_one_sign_in_at_once_exactly_one_gets_it(
    engine: SqliteStore | PostgresStore, second: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """A replayed (or double-clicked) callback racing the first on another instance loses."""
    now = time.time()
    flows = [SqlSignInFlows(e, vault, max_flows=100) for e in (engine, second)]
    states = [f"race{n}" for n in range(20)]
    for state in states:
        flows[0].put(state, AGENT, {"flow": msal_flow(state)}, now + FLOW_SECONDS, now)

    def taken_by(mine: SqlSignInFlows) -> list[str]:
        return [state for state in states if mine.take(state, now) is not None]

    with ThreadPoolExecutor(len(flows)) as pool:
        won = [state for taken in pool.map(taken_by, flows, timeout=30) for state in taken]
    assert sorted(won) == sorted(states)


def test_an_expired_sign_in_is_refused_and_starting_another_sweeps_expired_ones(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """Past FLOW_SECONDS the flow is refused (and gone); a new start deletes the expired."""
    flows = SqlSignInFlows(engine, vault, max_flows=10)
    started = time.time() - FLOW_SECONDS - 1
    flows.put("late", AGENT, {"flow": msal_flow("late")}, started + FLOW_SECONDS, started)
    flows.put("later", AGENT, {"flow": msal_flow("later")}, started + FLOW_SECONDS, started)
    now = time.time()
    assert flows.take("late", now) is None
    assert raw(engine, "SELECT state FROM signin_flows") == [("later",)]
    flows.put("fresh", AGENT, {"flow": msal_flow("fresh")}, now + FLOW_SECONDS, now)
    assert raw(engine, "SELECT state FROM signin_flows") == [("fresh",)]


def test_beyond_the_cap_the_sign_ins_closest_to_expiry_are_dropped(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """Starting sign-ins in a loop cannot grow the table past its cap."""
    flows = SqlSignInFlows(engine, vault, max_flows=CAP)
    now = time.time()
    for n in range(CAP + 2):
        flows.put(f"s{n}", AGENT, {"n": n}, now + FLOW_SECONDS + n, now)
    assert sorted(r[0] for r in raw(engine, "SELECT state FROM signin_flows")) == [
        f"s{n}" for n in range(2, CAP + 2)
    ]


def test_a_sign_in_moved_to_another_state_does_not_open(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """The state is the associated data: a flow copied under another state is refused."""
    flows = SqlSignInFlows(engine, vault, max_flows=10)
    now = time.time()
    flows.put("st1", AGENT, {"flow": msal_flow("st1")}, now + FLOW_SECONDS, now)
    with engine.transaction("test") as conn:
        conn.execute(
            "UPDATE signin_flows SET state = ? WHERE state = ?".replace("?", engine.param_marker),
            ("st2", "st1"),
        )
    assert flows.take("st2", now) is None


# -- key rotation and the key check ---------------------------------------------------------


def test_keys_rotate_re_seals_token_caches_sessions_and_sign_ins_under_the_new_key(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """After ``keys rotate`` (the old generation dropped) every sealed row still opens."""
    now = time.time()
    caches = SqlTokenCaches(engine, vault)
    with caches.locked(AGENT) as slot:
        slot.write('{"RefreshToken": {}}')
    sessions = SqlSessions(engine, vault, max_sessions=10)
    sessions.insert(session_row("s1", created=now))
    flows = SqlSignInFlows(engine, vault, max_flows=10)
    flows.put("st1", AGENT, {"flow": msal_flow("st1")}, now + FLOW_SECONDS, now)
    old = vault.generation
    assert rotate_registry_key(engine, vault) == old + 1  # emailsync keys rotate
    assert vault.generations == [old + 1]
    stored = caches.read(AGENT)
    assert stored is not None
    assert stored.text == '{"RefreshToken": {}}'
    assert sessions.load("s1") == session_row("s1", created=now)
    assert flows.take("st1", now) == (AGENT, {"flow": msal_flow("st1")})


def test_an_instance_whose_key_fails_the_check_redeems_no_refresh_token(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """The key check comes before the cache's lock: nothing is read to refresh with."""

    def refused() -> None:
        raise KeyUnavailableError("the registry key does not match")

    vault.guard = refused
    with pytest.raises(KeyUnavailableError), SqlTokenCaches(engine, vault).locked(AGENT):
        pytest.fail("the cache was handed out")


def test_a_refresh_holding_its_row_lock_never_keeps_the_state_s_pool_waiting(
    postgres: Postgres, vault: Vault, tmp_path: Path
) -> None:
    """PostgreSQL: the locking transaction runs on the caches' own connections, so the state's
    pool (leases, filing) is free while a refresh waits for the provider. Here the state has
    a single connection: it is still served while the lock is held."""
    state = PostgresStore(postgres.create_database(), max_connections=1)
    caches = token_caches_for(state, vault, tmp_path)
    assert isinstance(caches, SqlTokenCaches)
    try:
        with caches.locked(AGENT) as slot:
            with state.transaction("renew leases") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            slot.write("{}")
        stored = caches.read(AGENT)
        assert stored is not None
        assert stored.text == "{}"
    finally:
        caches.close()
        state.close()
    sqlite = SqliteStore(tmp_path / "s.db")
    try:
        assert isinstance(token_caches_for(sqlite, vault, tmp_path), FileTokenCaches)
    finally:
        sqlite.close()
