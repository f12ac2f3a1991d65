"""The Office 365 credential-expiry gauge's source: the configured date, else the certificate."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import trustme
from cryptography import x509

from emailsync.config import load_settings
from emailsync.service.supervisor import credential_expiry

BASE = """
[office365]
tenant_id = "t"
client_id = "c"
{extra}

[[mailboxes]]
address = "shared@example.com"
auth = "office365"
"""


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "emailsync.toml"
    path.write_text(BASE.format(extra=extra))
    return path


def test_a_certificate_s_not_after_is_the_expiry_when_no_date_is_configured(tmp_path: Path) -> None:
    leaf = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "app.example.com", key_type=trustme.KeyType.RSA
    )
    pem = tmp_path / "app.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    settings = load_settings(write(tmp_path, f'client_certificate_file = "{pem}"'))
    expected = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).not_valid_after_utc
    assert credential_expiry(settings) == expected


def test_a_configured_date_wins(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    settings = load_settings(
        write(tmp_path, f'client_secret_file = "{secret}"\nclient_secret_expires = 2027-06-30')
    )
    assert credential_expiry(settings) == datetime(2027, 6, 30, tzinfo=UTC)


def test_delegated_mode_has_no_credential_expiry(tmp_path: Path) -> None:
    assert credential_expiry(load_settings(write(tmp_path, ""))) is None
