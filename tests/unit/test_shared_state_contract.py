"""The shared-state tables' statements (issue 20): one suite, run on SQLite and PostgreSQL.

Page sessions (``page_sessions``), Office 365 sign-ins under way (``signin_flows``) and MSAL
token caches (``token_caches``) are written once (``emailsync.store.sessions_sql``,
``signins_sql``, ``tokencache_sql``); every test here runs on both databases, each engine
opened as a separate instance would open it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.errors import ConfigError
from emailsync.store.postgres import PostgresStore
from emailsync.store.sqlite import SqliteStore
from emailsync.store.tokencache_sql import SqlTokenCaches, cache_label
from emailsync.vault import Vault

from .test_store_contract import open_kind

AGENT = "agent@example.com"
OTHER = "other@example.com"
# How long the second writer is kept waiting by the first one's row lock in the test.
HOLD_SECONDS = 0.5


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqliteStore | PostgresStore]:
    """A fresh state database of each kind."""
    opened = open_kind(request.param, request, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    """A vault with a key of its own."""
    directory = tmp_path / "vault"
    directory.mkdir()
    return Vault(directory)


def raw(engine: SqliteStore | PostgresStore, sql: str, *params: object) -> list[tuple[object, ...]]:
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
    assert b"refresh-one" not in bytes(blob)  # type: ignore[arg-type]
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


def test_a_key_rotation_re_encrypts_every_token_cache(
    engine: SqliteStore | PostgresStore, vault: Vault
) -> None:
    """``reencrypt`` rewrites each row with the rotation's convert, under the same label."""
    caches = SqlTokenCaches(engine, vault)
    for address in (AGENT, OTHER):
        with caches.locked(address) as slot:
            slot.write(f'{{"who": "{address}"}}')
    labels: list[str] = []

    def convert(blob: bytes, label: str) -> bytes:
        labels.append(label)
        return vault.encrypt(vault.decrypt(blob, label).reveal(), label)

    assert caches.reencrypt(convert) == 2
    assert sorted(labels) == [cache_label(AGENT), cache_label(OTHER)]
    stored = caches.read(OTHER)
    assert stored is not None
    assert stored.text == f'{{"who": "{OTHER}"}}'
