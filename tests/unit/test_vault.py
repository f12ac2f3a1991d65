"""The vault: AES-GCM secrets bound to their mailbox, the key file, agent tokens, rotation."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emailsync.errors import ConfigError
from emailsync.state.base import RegisteredMailbox
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import KEY_CREDENTIAL, Vault

from .child import python_child


def test_a_secret_round_trips_and_never_appears_in_its_ciphertext(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    first = vault.encrypt("hunter2-long-password", "agent@example.com")
    second = vault.encrypt("hunter2-long-password", "agent@example.com")
    assert b"hunter2" not in first
    assert first != second  # a fresh nonce each time
    assert vault.decrypt(first, "agent@example.com").reveal() == "hunter2-long-password"


def test_a_ciphertext_moved_to_another_mailbox_does_not_decrypt(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    blob = vault.encrypt("secret", "agent@example.com")
    with pytest.raises(ConfigError, match=r"other@example\.com") as raised:
        vault.decrypt(blob, "other@example.com")
    assert "secret" not in str(raised.value).replace("stored password", "")


def test_the_key_file_is_private_and_made_once(tmp_path: Path) -> None:
    blob = Vault(tmp_path).encrypt("secret", "agent@example.com")
    key_file = tmp_path / "registry.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert Vault(tmp_path).decrypt(blob, "agent@example.com").reveal() == "secret"
    assert [p.name for p in tmp_path.iterdir()] == ["registry.key"]  # no temporary left


def test_an_agent_token_grants_its_mailbox_until_it_expires(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    expires = datetime.now(UTC) + timedelta(days=1)
    token = vault.issue_token("agent@example.com", expires, token_id="a1")
    granted = vault.check_token(token)
    assert granted is not None
    assert granted.address == "agent@example.com"
    assert vault.check_token(token, now=expires + timedelta(seconds=1)) is None
    forever = vault.issue_token("agent@example.com", None, token_id="a2")
    assert vault.check_token(forever, now=datetime(2100, 1, 1, tzinfo=UTC)) is not None


def test_a_tampered_token_grants_nothing(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    token = vault.issue_token("agent@example.com", None, token_id="a1")
    prefix, token_id, address, generation, expiry, mac = token.split(".")
    other = base64.urlsafe_b64encode(b"boss@example.com").decode().rstrip("=")
    for forged in (
        f"{prefix}.{token_id}.{other}.{generation}.{expiry}.{mac}",  # another mailbox
        f"{prefix}.{token_id}.{address}.{generation}.9999999999.{mac}",  # a longer life
        f"{prefix}.{token_id}.{address}.{generation}.{expiry}.{mac[:-2]}AA",
        token + "x",
        "es1....",
        "es2.....",
        "",
    ):
        assert vault.check_token(forged) is None, forged
    assert Vault(tmp_path / "elsewhere").check_token(token) is None  # another key


def test_rotating_the_key_revokes_tokens_and_re_encrypts_secrets(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    token = vault.issue_token("agent@example.com", None, token_id="a1")
    blobs = {"agent@example.com": vault.encrypt("secret", "agent@example.com")}

    def reencrypt(convert: object) -> int:
        for address, blob in blobs.items():
            blobs[address] = convert(blob, address)  # type: ignore[operator]
        return len(blobs)

    old = blobs["agent@example.com"]
    assert vault.rotate(reencrypt) == 2
    assert vault.check_token(token) is None
    assert blobs["agent@example.com"] != old
    assert vault.decrypt(blobs["agent@example.com"], "agent@example.com").reveal() == "secret"
    with pytest.raises(ConfigError, match="unknown key generation"):
        vault.decrypt(old, "agent@example.com")  # the old key is gone
    assert vault.check_token(vault.issue_token("agent@example.com", None, token_id="a2"))


def test_a_systemd_credential_is_the_key_and_cannot_be_rotated_here(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / KEY_CREDENTIAL).write_text(base64.b64encode(os.urandom(32)).decode())
    vault = Vault(tmp_path / "state", credentials_dir=credentials)
    blob = vault.encrypt("secret", "agent@example.com")
    assert not (tmp_path / "state" / "registry.key").exists()
    again = Vault(tmp_path / "other-state", credentials_dir=credentials)
    assert again.decrypt(blob, "agent@example.com").reveal() == "secret"
    with pytest.raises(ConfigError, match="systemd credential"):
        vault.rotate(lambda convert: 0)


def _registry_with_passwords(state: Path, count: int) -> tuple[SqliteStore, dict[str, str]]:
    """A real store with ``count`` registered mailboxes whose passwords the vault encrypted."""
    store = SqliteStore(state / "emailsync.db")
    vault = Vault(state)
    passwords = {
        f"agent{n}@example.com": f"password-{n}-{os.urandom(4).hex()}" for n in range(count)
    }
    for address, password in passwords.items():
        record = RegisteredMailbox(address, "main", "password", address, True, False)
        store.put_mailbox(record, vault.encrypt(password, address))
    return store, passwords


def _readable(state: Path, store: SqliteStore, passwords: dict[str, str]) -> dict[str, str]:
    """Every stored password as a fresh vault decrypts it (or the error it gives)."""
    vault = Vault(state)
    found: dict[str, str] = {}
    for address in passwords:
        blob = store.mailbox_secret(address)
        assert blob is not None
        try:
            found[address] = vault.decrypt(blob, address).reveal()
        except ConfigError as exc:
            found[address] = str(exc)
    return found


_KILLED_AFTER_COMMIT = """
import os, signal, sys
from pathlib import Path
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import Vault

state = Path(sys.argv[1])
store = SqliteStore(state / "emailsync.db")

def reencrypt(convert):
    store.reencrypt_secrets(convert)  # committed
    os.kill(os.getpid(), signal.SIGKILL)  # before the key file's last write

Vault(state).rotate(reencrypt)
"""


def test_a_rotation_killed_after_its_commit_is_resumed_and_every_password_still_decrypts(
    tmp_path: Path,
) -> None:
    """`keys rotate` killed between the re-encrypt commit and the key file's last write leaves
    both generations; the next rotate finishes that rotation with the same new key."""
    store, passwords = _registry_with_passwords(tmp_path, 3)
    killed = python_child(_KILLED_AFTER_COMMIT, str(tmp_path), timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = json.loads((tmp_path / "registry.key").read_text(encoding="utf-8"))
    assert (left["current"], sorted(left["keys"])) == (1, ["1", "2"])
    assert _readable(tmp_path, store, passwords) == passwords  # both keys are still there

    assert Vault(tmp_path).rotate(store.reencrypt_secrets) == 2  # resumed, not generation 3
    assert _readable(tmp_path, store, passwords) == passwords
    final = json.loads((tmp_path / "registry.key").read_text(encoding="utf-8"))
    assert (final["current"], sorted(final["keys"])) == (2, ["2"])
    assert final["keys"]["2"] == left["keys"]["2"]  # the key the secrets are under, kept
    assert Vault(tmp_path).rotate(store.reencrypt_secrets) == 3  # and rotation goes on
    assert _readable(tmp_path, store, passwords) == passwords


def test_a_rotation_that_failed_before_its_commit_is_resumed_with_the_same_new_key(
    tmp_path: Path,
) -> None:
    """A re-encrypt that fails (store busy, a crash) changes no secret; the retry reuses the
    pending key instead of making another."""
    store, passwords = _registry_with_passwords(tmp_path, 2)

    def failing(convert: Callable[[bytes, str], bytes]) -> int:
        raise ConfigError(["store unavailable"])

    with pytest.raises(ConfigError, match="store unavailable"):
        Vault(tmp_path).rotate(failing)
    pending = json.loads((tmp_path / "registry.key").read_text(encoding="utf-8"))["keys"]["2"]
    assert Vault(tmp_path).rotate(store.reencrypt_secrets) == 2
    final = json.loads((tmp_path / "registry.key").read_text(encoding="utf-8"))
    assert final == {"current": 2, "keys": {"2": pending}}
    assert _readable(tmp_path, store, passwords) == passwords


def test_a_second_rotation_while_one_runs_is_refused_and_changes_no_key(tmp_path: Path) -> None:
    """Two `keys rotate` at once would both write "generation 2": the second is refused."""
    store, passwords = _registry_with_passwords(tmp_path, 2)
    inside, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def slow(convert: Callable[[bytes, str], bytes]) -> int:
        inside.set()
        release.wait(30)
        return store.reencrypt_secrets(convert)

    first = threading.Thread(target=lambda: outcome.append(Vault(tmp_path).rotate(slow)))
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(ConfigError, match="already running"):
            Vault(tmp_path).rotate(store.reencrypt_secrets)
    finally:
        release.set()
        first.join(30)
    assert outcome == [2]
    assert _readable(tmp_path, store, passwords) == passwords


def test_a_secret_stored_while_a_rotation_runs_is_under_a_key_that_is_kept(
    tmp_path: Path,
) -> None:
    """A set-up encrypts, then a whole rotation runs, then its row is written: the vault sees
    that its generation went and writes the secret again under the new one."""
    store, passwords = _registry_with_passwords(tmp_path, 1)
    vault = Vault(tmp_path)
    address, password = "late@example.com", "late-password"
    rotated: list[int] = []

    def put(blob: bytes) -> None:
        if not rotated:  # the rotation runs between this set-up's encryption and its write
            rotated.append(Vault(tmp_path).rotate(store.reencrypt_secrets))
        store.put_mailbox(
            RegisteredMailbox(address, "main", "password", address, True, False), blob
        )

    vault.store_secret(password, address, put)
    assert rotated == [2]
    passwords[address] = password
    assert _readable(tmp_path, store, passwords) == passwords
