"""The key check: instances sharing a state database must hold the same registry key.

Each "instance" is a state directory of its own (its own registry.key) over one database:
a real SQLite file, or a throwaway PostgreSQL database shared the way a cluster shares it.
"""

from __future__ import annotations

import base64
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from emailsync.cli import EXIT_CONFIG, EXIT_USAGE, main
from emailsync.config import CrmSettings
from emailsync.errors import ConfigError, KeyUnavailableError
from emailsync.secret import SecretSource
from emailsync.state import DEFAULT_DB_NAME
from emailsync.state.base import RegisteredMailbox
from emailsync.state.failedindex import SqlEngine
from emailsync.state.keycheck import (
    KEY_CHECK,
    adopt_key_check,
    ensure_key_check,
    key_check_guard,
    key_check_problem,
    rotate_key_check,
    state_engine,
)
from emailsync.state.postgres import PostgresStore
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import KEY_CREDENTIAL, KEY_FILE_NAME, Vault, blob_generation
from emailsync.timeline import open_store

MISMATCH = "does not match the one this state database was set up with"


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlEngine]:
    """One state database, SQLite or PostgreSQL, that several instances share."""
    if request.param == "sqlite":
        store: SqliteStore | PostgresStore = SqliteStore(tmp_path / "shared.db")
    else:
        store = PostgresStore(request.getfixturevalue("pg_url"))
    try:
        yield store
    finally:
        store.close()


def instance(tmp_path: Path, name: str) -> Vault:
    """An instance's vault: its own state directory, so its own registry.key."""
    state = tmp_path / name
    state.mkdir(exist_ok=True)
    return Vault(state)


def key_bytes(vault: Vault) -> list[str]:
    """Every form of the vault's keys a message might leak: base64 and hex."""
    text = vault.path.read_text(encoding="utf-8")
    encoded = [part for part in text.replace('"', " ").split() if len(part) >= 40]
    raw = [base64.b64decode(part.rstrip(",}")) for part in encoded]
    assert raw, text
    return [part.rstrip(",}") for part in encoded] + [key.hex() for key in raw]


def check_row(engine: SqlEngine) -> bytes | None:
    sql = "SELECT value FROM state_meta WHERE name = ?".replace("?", engine.param_marker)
    with engine.reading("test") as conn:
        row = conn.execute(sql, (KEY_CHECK,)).fetchone()
    return bytes(row[0]) if row is not None else None


def test_the_first_start_writes_the_check_under_the_current_generation(
    engine: SqlEngine, tmp_path: Path
) -> None:
    vault = instance(tmp_path, "a")
    assert check_row(engine) is None
    ensure_key_check(engine, vault)
    blob = check_row(engine)
    assert blob is not None
    assert blob_generation(blob) == vault.generation
    ensure_key_check(engine, vault)  # the next start of the same instance passes
    assert check_row(engine) == blob  # and writes nothing new


def test_a_second_instance_with_another_key_is_refused_without_showing_a_key(
    engine: SqlEngine, tmp_path: Path
) -> None:
    first, second = instance(tmp_path, "a"), instance(tmp_path, "b")
    ensure_key_check(engine, first)
    with pytest.raises(ConfigError) as caught:
        ensure_key_check(engine, second)
    (message,) = caught.value.problems
    assert MISMATCH in message
    assert "generation 1" in message
    assert str(second.path) in message  # where the wrong key came from
    for leaked in key_bytes(first) + key_bytes(second):
        assert leaked not in message
    assert key_check_problem(engine, second) == message  # check-config says the same
    assert key_check_problem(engine, first) is None


def test_a_second_instance_with_the_same_key_passes(engine: SqlEngine, tmp_path: Path) -> None:
    first, second = instance(tmp_path, "a"), instance(tmp_path, "b")
    ensure_key_check(engine, first)
    shutil.copy(first.path, second.path)
    ensure_key_check(engine, second)
    assert key_check_problem(engine, second) is None


def test_instances_starting_together_on_a_fresh_database_agree_on_one_check(
    engine: SqlEngine, tmp_path: Path
) -> None:
    """All hold the same key: every one passes, whoever wrote first."""
    first = instance(tmp_path, "a")
    first.generation  # noqa: B018 -- makes the key file
    vaults = [first]
    for name in "bcdef":
        vault = instance(tmp_path, name)
        shutil.copy(first.path, vault.path)
        vaults.append(vault)
    with ThreadPoolExecutor(max_workers=len(vaults)) as pool:
        list(pool.map(lambda vault: ensure_key_check(engine, vault), vaults))
    assert check_row(engine) is not None


def rotate(vault: Vault, engine: SqlEngine, then: Callable[[], None] = lambda: None) -> int:
    """``keys rotate`` as cli.cmd_keys_rotate does it, over a store without secrets."""
    ensure_key_check(engine, vault)

    def reencrypt(convert: Callable[[bytes, str], bytes]) -> int:
        rotate_key_check(engine, convert)
        then()
        return 0

    return vault.rotate(reencrypt)


def test_after_a_rotation_the_old_key_is_refused_and_the_rotated_one_accepted(
    engine: SqlEngine, tmp_path: Path
) -> None:
    first, second = instance(tmp_path, "a"), instance(tmp_path, "b")
    ensure_key_check(engine, first)
    shutil.copy(first.path, second.path)
    ensure_key_check(engine, second)

    new = rotate(first, engine)
    assert new == 2
    blob = check_row(engine)
    assert blob is not None
    assert blob_generation(blob) == new
    ensure_key_check(engine, first)
    with pytest.raises(ConfigError) as caught:
        ensure_key_check(engine, second)  # still holds generation 1
    assert MISMATCH in caught.value.problems[0]
    assert f"(generation {new})" in caught.value.problems[0]

    shutil.copy(first.path, second.path)  # the operator hands the new key out
    ensure_key_check(engine, second)


def test_during_a_rotation_the_pending_key_opens_the_check(
    engine: SqlEngine, tmp_path: Path
) -> None:
    """Between the re-seal and the switch, the rotating instance (both keys) still passes; an
    instance with the old key alone is refused already, before the secrets move."""
    first, second = instance(tmp_path, "a"), instance(tmp_path, "b")
    ensure_key_check(engine, first)
    shutil.copy(first.path, second.path)
    seen: list[str | None] = []

    def midway() -> None:
        assert len(first.generations) == 2  # the pending key is in the file
        seen.append(key_check_problem(engine, first))
        seen.append(key_check_problem(engine, second))

    rotate(first, engine, then=midway)
    assert seen[0] is None
    assert seen[1] is not None
    assert MISMATCH in seen[1]


def test_a_running_instance_whose_key_fails_the_check_stores_no_secret(
    tmp_path: Path,
) -> None:
    """The guard: set-up on an instance left with the old key answers "tell IT", not a row
    under a key nobody else holds."""
    store = SqliteStore(tmp_path / "shared.db")
    try:
        first, second = instance(tmp_path, "a"), instance(tmp_path, "b")
        ensure_key_check(store, first)
        shutil.copy(first.path, second.path)
        ensure_key_check(store, second)
        second.guard = key_check_guard(store, second)
        record = RegisteredMailbox("agent@example.com", "b0", "password", "agent", True, False)

        second.store_secret("pw-1", record.address, lambda b: store.put_mailbox(record, b))
        stored = store.mailbox_secret(record.address)
        assert stored is not None

        rotate(first, store, then=lambda: store.reencrypt_secrets(lambda b, a: b))
        with pytest.raises(KeyUnavailableError, match=MISMATCH):
            second.store_secret("pw-2", record.address, lambda b: store.put_mailbox(record, b))
        with pytest.raises(KeyUnavailableError, match=MISMATCH):
            second.encrypt("session token", record.address)
        assert store.mailbox_secret(record.address) == stored  # nothing written
    finally:
        store.close()


def test_a_replaced_credential_is_named_in_the_refusal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "shared.db")
    try:
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        credential = credentials / KEY_CREDENTIAL
        credential.write_text(base64.b64encode(b"k" * 32).decode() + "\n")
        ensure_key_check(store, Vault(tmp_path / "a", credentials_dir=credentials))
        credential.write_text(base64.b64encode(b"j" * 32).decode() + "\n")
        with pytest.raises(ConfigError) as caught:
            ensure_key_check(store, Vault(tmp_path / "a", credentials_dir=credentials))
        (message,) = caught.value.problems
        assert MISMATCH in message
        assert f"credential {KEY_CREDENTIAL}" in message
        assert base64.b64encode(b"j" * 32).decode() not in message
    finally:
        store.close()


def test_an_unreadable_key_file_is_its_own_problem_not_a_mismatch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "shared.db")
    try:
        vault = instance(tmp_path, "a")
        ensure_key_check(store, vault)
        (tmp_path / "a" / KEY_FILE_NAME).write_text("{not json")
        with pytest.raises(ConfigError) as caught:
            ensure_key_check(store, vault)
        assert "unreadable registry key file" in caught.value.problems[0]
    finally:
        store.close()


def test_a_crm_store_checks_its_local_state_database(tmp_path: Path) -> None:
    """HttpStore keeps emailsync's own state in state() (SQLite): the check lives there."""
    secret = tmp_path / "crm-secret"
    secret.write_text("s" * 32 + "\n")
    crm = CrmSettings(url="https://127.0.0.1:9/", secret=SecretSource(file=secret))
    store = open_store("", tmp_path / "a", crm)  # no request reaches the CRM here
    try:
        state = state_engine(store)
        assert isinstance(state, SqliteStore)
        ensure_key_check(store, instance(tmp_path, "a"))
        assert check_row(state) is not None
        with pytest.raises(ConfigError, match=MISMATCH):
            ensure_key_check(store, instance(tmp_path, "b"))
    finally:
        store.close()
    assert state_engine(object()) is None


def test_a_replaced_credential_is_adopted_with_keys_adopt_and_the_old_one_then_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented way to replace a credential (or recover from a lost key): the daemon
    refuses the new key until `keys adopt --yes` makes it the database's."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    credential = credentials / KEY_CREDENTIAL
    old, new = (base64.b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    credential.write_text(old + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    state_dir = tmp_path / "state"
    config = tmp_path / "emailsync.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\n')
    store = SqliteStore(state_dir / DEFAULT_DB_NAME)
    try:
        ensure_key_check(store, Vault(state_dir))  # the daemon's first start
    finally:
        store.close()

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(config), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    assert cli("check-config")[0] == 0
    credential.write_text(new + "\n")
    code, _, err = cli("check-config")
    assert code == EXIT_CONFIG
    assert MISMATCH in err
    assert "keys adopt --yes" in err
    assert old not in err
    assert new not in err

    code, _, err = cli("keys", "adopt")
    assert code == EXIT_USAGE
    assert "--yes" in err
    assert cli("check-config")[0] == EXIT_CONFIG  # nothing was adopted

    code, out, _ = cli("keys", "adopt", "--yes")
    assert code == 0
    assert "now checks for this instance's key" in out
    assert new not in out
    assert cli("check-config")[0] == 0
    assert "nothing to do" in cli("keys", "adopt", "--yes")[1]

    credential.write_text(old + "\n")  # an instance still holding the old credential
    assert cli("check-config")[0] == EXIT_CONFIG


def test_adopt_writes_a_check_a_fresh_database_lacks(engine: SqlEngine, tmp_path: Path) -> None:
    vault = instance(tmp_path, "a")
    assert adopt_key_check(engine, vault)
    assert check_row(engine) is not None
    ensure_key_check(engine, vault)
    assert not adopt_key_check(engine, vault)
    with pytest.raises(ConfigError, match=MISMATCH):
        ensure_key_check(engine, instance(tmp_path, "b"))


def test_check_config_lists_an_unreadable_key_file_among_its_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config names every problem: a damaged key file is one line, not an abort."""
    state_dir = tmp_path / "state"
    store = SqliteStore(state_dir / DEFAULT_DB_NAME)
    try:
        ensure_key_check(store, Vault(state_dir))
    finally:
        store.close()
    (state_dir / KEY_FILE_NAME).write_text("{not json")
    config = tmp_path / "emailsync.toml"
    token = tmp_path / "token"
    token.write_text("short\n")
    config.write_text(f'[daemon]\nstate_dir = "{state_dir}"\ncontrol_token_file = "{token}"\n')
    assert main(["--config", str(config), "check-config"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "unreadable registry key file" in err
    assert "control_token_file" in err  # the other problem is listed too


def test_instances_with_different_keys_starting_together_one_wins_the_others_are_refused(
    engine: SqlEngine, tmp_path: Path
) -> None:
    vaults = [instance(tmp_path, name) for name in "abcd"]

    def start(vault: Vault) -> bool:
        try:
            ensure_key_check(engine, vault)
        except ConfigError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=len(vaults)) as pool:
        started = list(pool.map(start, vaults))
    assert started.count(True) == 1
    (winner,) = [v for v, ok in zip(vaults, started, strict=True) if ok]
    ensure_key_check(engine, winner)
