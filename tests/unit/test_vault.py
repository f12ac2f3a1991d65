"""The vault: AES-GCM secrets bound to their mailbox, the key file, agent tokens, rotation."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emailsync.errors import ConfigError
from emailsync.vault import KEY_CREDENTIAL, Vault


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
    token = vault.issue_token("agent@example.com", expires)
    granted = vault.check_token(token)
    assert granted is not None
    assert granted.address == "agent@example.com"
    assert vault.check_token(token, now=expires + timedelta(seconds=1)) is None
    forever = vault.issue_token("agent@example.com")
    assert vault.check_token(forever, now=datetime(2100, 1, 1, tzinfo=UTC)) is not None


def test_a_tampered_token_grants_nothing(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    token = vault.issue_token("agent@example.com")
    prefix, address, generation, expiry, mac = token.split(".")
    other = base64.urlsafe_b64encode(b"boss@example.com").decode().rstrip("=")
    for forged in (
        f"{prefix}.{other}.{generation}.{expiry}.{mac}",  # another mailbox
        f"{prefix}.{address}.{generation}.9999999999.{mac}",  # a longer life
        f"{prefix}.{address}.{generation}.{expiry}.{mac[:-2]}AA",
        token + "x",
        "es1....",
        "",
    ):
        assert vault.check_token(forged) is None, forged
    assert Vault(tmp_path / "elsewhere").check_token(token) is None  # another key


def test_rotating_the_key_revokes_tokens_and_re_encrypts_secrets(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    token = vault.issue_token("agent@example.com")
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
    assert vault.check_token(vault.issue_token("agent@example.com")) is not None


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
